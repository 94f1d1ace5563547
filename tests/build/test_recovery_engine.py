"""Recovery on the real engine: a package killed at its memory limit is built again with the
limit raised, and `lfsorch status` tells attempt by attempt what failed and what changed."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from orchestrator import api
from orchestrator.workspace import Workspace
from tests.helpers import BASE_IMAGE, run_build, start_cli

pytestmark = [pytest.mark.docker, pytest.mark.usefixtures("no_leftovers")]

WriteStage = Callable[[str, str], Path]


def test_memory_kill_is_retried_with_a_raised_limit_on_the_same_checkpoint(
    workspace: Workspace, lfs_dir: Path, stage_file: WriteStage
) -> None:
    path = stage_file(
        "hungry.yaml",
        f"""
        stage: hungry
        image: {BASE_IMAGE}
        checkpoint: package
        resources: {{memory: 128m}}
        recovery: {{memory_factor: 4}}
        packages:
          - name: before
            script: echo kept > /mnt/lfs/before
          - name: eater
            depends: [before]
            environment: {{MAKEFLAGS: -j1}}
            script: |
              echo "$LFSORCH_ATTEMPT" >> /mnt/lfs/eater-attempts
              # tail keeps a line without newline whole: about 300 MB in memory.
              head -c 300000000 /dev/zero | tail -n 1 | wc -c > /mnt/lfs/eaten
        """,
    )
    state, recorded = run_build([path], lfs_dir, workspace)
    assert state.outcome == "succeeded"
    eater = state.find("hungry", "eater")
    assert eater is not None
    first, second = eater.attempts
    assert (first.failure_class, first.strategy) == ("memory", "more-memory")
    assert first.oom_killed and first.error and first.error.startswith("killed by the kernel's")
    assert first.change == "memory limit 512MiB (was 128MiB)"
    assert (second.exit_code, second.failure_class) == (0, None)
    assert (lfs_dir / "eaten").read_text().strip() == "300000000"
    # The retry started from the checkpoint before the package: its first attempt's writes
    # are gone, and the package before it was not built again.
    assert (lfs_dir / "eater-attempts").read_text() == "2\n"
    assert [e.data["attempt"] for e in recorded if e.name == "build.start"] == [1, 1, 2]
    decisions = [e.data for e in recorded if e.name == "recovery.decision"]
    assert [(d["failure_class"], d["strategy"], d["will_retry"]) for d in decisions] == [
        ("memory", "more-memory", True)
    ]

    process = start_cli("status")
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output
    lines = output.splitlines()
    at = lines.index("hungry/eater:")
    assert lines[at + 1].startswith(
        "  attempt 1: memory failure, killed by the kernel's OOM killer (exit status 137)"
    )
    assert lines[at + 1].endswith("; next: memory limit 512MiB (was 128MiB)")
    assert lines[at + 2] == "  attempt 2: succeeded"


def test_ctrl_c_ends_a_retry_backoff_at_once(
    workspace: Workspace, lfs_dir: Path, stage_file: WriteStage
) -> None:
    path = stage_file(
        "patient.yaml",
        f"""
        stage: patient
        image: {BASE_IMAGE}
        recovery: {{backoff: 10m, backoff_max: 10m}}
        packages:
          - {{name: flaky, retries: 1, script: "exit 3"}}
        """,
    )
    process = start_cli("run", str(path), "--lfs", str(lfs_dir))
    assert process.stdout is not None
    for line in process.stdout:
        if "build failure of patient/flaky (attempt 1), retry" in line:
            break
    started = time.monotonic()
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 130, output
    assert time.monotonic() - started < 30  # not the 10 minutes of the backoff
    state = api.last_run(workspace)
    assert state is not None and state.outcome == "interrupted"
    assert len(state.packages[0].attempts) == 1


def test_timeout_is_retried_once_with_the_factor(
    workspace: Workspace, lfs_dir: Path, stage_file: WriteStage
) -> None:
    path = stage_file(
        "slowish.yaml",
        f"""
        stage: slowish
        image: {BASE_IMAGE}
        recovery: {{timeout_factor: 4}}
        packages:
          - {{name: slow, timeout: 2s, script: "sleep 4; echo done > /mnt/lfs/slow"}}
          - {{name: endless, timeout: 1s, script: "sleep 300"}}
        """,
    )
    state, _ = run_build([path], lfs_dir, workspace)
    slow, endless = state.packages
    assert slow.status == "done"
    assert [(a.failure_class, a.change) for a in slow.attempts] == [
        ("time", "timeout 8s (was 2s)"),
        (None, None),
    ]
    assert endless.status == "failed"
    assert [(a.failure_class, a.strategy) for a in endless.attempts] == [
        ("time", "longer-timeout"),
        ("time", "fail"),
    ]
    assert endless.attempts[-1].error == "timed out after 4s (container killed)"


def test_a_missing_user_is_never_retried(
    workspace: Workspace, lfs_dir: Path, stage_file: WriteStage
) -> None:
    path = stage_file(
        "nouser.yaml",
        f"""
        stage: nouser
        image: {BASE_IMAGE}
        user: nobody-here
        retries: 3
        packages:
          - {{name: p, script: "true"}}
        """,
    )
    state, recorded = run_build([path], lfs_dir, workspace)
    (attempt,) = state.packages[0].attempts
    assert (attempt.failure_class, attempt.strategy) == ("configuration", "fail")
    assert attempt.error == "the stage's user does not exist in the image (see the log)"
    assert [e.name for e in recorded].count("build.start") == 1
