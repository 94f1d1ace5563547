"""Two workspaces on one partition: each keeps its own record of it, so a partition that a run
of one workspace left half-built looked fresh to the other, which then built on top of the
half-installed files."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator import api
from orchestrator.partition import PartitionHalfBuilt
from orchestrator.workspace import Workspace

pytestmark = [pytest.mark.docker, pytest.mark.usefixtures("no_leftovers")]


def test_a_partition_half_built_from_another_workspace_is_refused(
    tmp_path: Path,
    half_built: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LFSORCH_CONFIG", str(tmp_path / "no-user-config.yaml"))
    lfs = tmp_path / "lfs"
    lfs.mkdir()
    first_home, second_home = Workspace(tmp_path / "ws1"), Workspace(tmp_path / "ws2")
    failed = api.run([half_built], lfs, overrides=["environment.FAIL=1"], workspace=first_home)
    assert failed.outcome == "failed"
    assert (lfs / "count").read_text() == "line\n"  # half installed

    with pytest.raises(PartitionHalfBuilt) as refused:
        api.run([half_built], lfs, workspace=second_home)
    assert refused.value.message == (
        f"the partition {lfs} was left failed by run {failed.run_id} of the workspace "
        f"{first_home.root}, which holds its record and checkpoints: building here would "
        "build on half-installed files"
    )
    assert (lfs / "count").read_text() == "line\n"
    assert not second_home.snapshots_dir.exists() or not any(second_home.snapshots_dir.iterdir())

    # The workspace that holds the record resumes it; afterwards the finished tree is no
    # longer refused elsewhere.
    resumed = api.run([half_built], lfs, workspace=first_home)
    assert resumed.outcome == "succeeded"
    assert (lfs / "count").read_text() == "line\n"
    assert api.run([half_built], lfs, workspace=second_home).outcome == "succeeded"
