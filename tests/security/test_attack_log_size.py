"""A build that prints without end (`yes`, a runaway test suite) filled the workspace's disk,
which is often the host's root: the log now keeps the first bytes of an attempt and its last
ones, with a note saying how much was left out between them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from orchestrator import api
from orchestrator.execution import container as runner
from orchestrator.workspace import Workspace
from tests.helpers import BASE_IMAGE

pytestmark = [pytest.mark.docker, pytest.mark.usefixtures("no_leftovers")]

PRINTED = 20_000_000


def test_a_flood_of_output_keeps_the_log_bounded_with_its_end(
    workspace: Workspace,
    lfs_dir: Path,
    stage_file: Callable[[str, str], Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(runner, "LOG_MAX_BYTES", 1 << 20)
    monkeypatch.setattr(runner, "LOG_TAIL_BYTES", 64 << 10)
    stage = stage_file(
        "s.yaml",
        f"""
        stage: s
        image: {BASE_IMAGE}
        checkpoint: none
        packages:
          - name: flood
            script: "head -c {PRINTED} /dev/zero | tr '\\\\0' x; echo; echo END; exit 3"
        """,
    )
    state = api.run([stage], lfs_dir, workspace=workspace)
    assert state.outcome == "failed"
    log = workspace.run_dir(state.run_id) / "logs" / "s" / "flood.log"
    data = log.read_bytes()
    assert len(data) < (1 << 20) + (64 << 10) + 4096
    assert data.endswith(b"x\nEND\n")
    note = b"bytes of output left out here (the log keeps the first 1048576 bytes of an attempt"
    assert note in data
    kept_x = data.count(b"x")
    left_out = int(data.split(b"lfsorch: ")[-1].split(b" ")[0])
    assert kept_x + left_out >= PRINTED  # every printed byte is either kept or counted
