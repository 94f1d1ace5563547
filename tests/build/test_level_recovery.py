"""A package that fails beside others (a level at -j N) is built again exactly: the level's
others finish, the checkpoint before the level comes back, and the level is built one package
at a time, the failed one with its strategy's changes. A kill at any point of this, then the
same command again, gives the partition a clean build gives."""

from __future__ import annotations

import json
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from orchestrator.workspace import Workspace
from tests.helpers import BASE_IMAGE, partition_text, run_build, run_cli, start_cli, started

pytestmark = [pytest.mark.docker, pytest.mark.usefixtures("no_leftovers")]

WriteStage = Callable[[str, str], Path]

# `flaky` fails its first attempt after half installing itself, while `steady` builds beside
# it; each appends to its file, so a package built twice on the same tree shows.
LEVEL_STAGE = f"""
stage: lvl
image: {BASE_IMAGE}
checkpoint: package
recovery: {{backoff: 0.1s}}
packages:
  - name: base
    script: echo base >> /mnt/lfs/base
  - name: steady
    depends: [base]
    script: sleep 3; echo steady >> /mnt/lfs/steady
  - name: flaky
    depends: [base]
    retries: 1
    script: |
      echo half >> /mnt/lfs/flaky
      if [ "$LFSORCH_ATTEMPT" = 1 ]; then echo "oops" > /mnt/lfs/half-installed; exit 1; fi
      sleep 3
  - name: after
    depends: [steady, flaky]
    script: cat /mnt/lfs/steady /mnt/lfs/flaky > /mnt/lfs/after
"""
CLEAN = {
    "base": "base\n",
    "steady": "steady\n",
    "flaky": "half\n",
    "after": "steady\nhalf\n",
}


def test_a_failure_in_a_level_rebuilds_the_level_one_package_at_a_time(
    workspace: Workspace, lfs_dir: Path, stage_file: WriteStage
) -> None:
    path = stage_file("lvl.yaml", LEVEL_STAGE)
    state, recorded = run_build([path], lfs_dir, workspace, parallel=2)
    assert state.outcome == "succeeded"
    # Nothing of the failed attempt, and nothing built twice on the same tree.
    assert partition_text(lfs_dir) == CLEAN
    begun = started(recorded)
    assert begun[0] == "lvl/base" and begun[-1] == "lvl/after"
    assert sorted(begun[1:3]) == ["lvl/flaky", "lvl/steady"]
    assert begun[3:5] == ["lvl/steady", "lvl/flaky"]  # alone, in the level's order
    (decision,) = [e.data for e in recorded if e.name == "recovery.decision"]
    level_start = state.checkpoints["lvl/base"]
    assert (decision["failure_class"], decision["strategy"]) == ("build", "retry")
    assert decision["change"] == (
        "retry 1 of 1 after 0.1s; level rebuilt one package at a time from checkpoint "
        f"{level_start[:12]}"
    )
    reasons = [e.data["reason"] for e in recorded if e.name == "snapshot.restore"]
    assert reasons == ["level steady, flaky: rebuilt one package at a time"]
    # The report tells the decision, attempt by attempt, for people and for programs.
    human = run_cli("report", check=True).stdout
    assert "recovery decisions:" in human
    step = (
        "  lvl/flaky attempt 1: build failure (exit status 1), retry; next: retry 1 of 1 "
        f"after 0.1s; level rebuilt one package at a time from checkpoint {level_start[:12]}"
    )
    assert step in human.splitlines()
    rows = json.loads(run_cli("report", "--json", check=True).stdout)["packages"]
    assert {row["package"]: row["recovery"] for row in rows}["flaky"] == [
        {
            "attempt": 1,
            "failure_class": "build",
            "strategy": "retry",
            "reason": "exit status 1",
            "change": decision["change"],
        }
    ]
    assert all(row["recovery"] == [] for row in rows if row["package"] != "flaky")
    # The level's checkpoint is the same as a level built side by side: the next run has
    # nothing to do.
    again, recorded = run_build([path], lfs_dir, workspace, parallel=2)
    assert again.outcome == "succeeded" and started(recorded) == []


@pytest.mark.parametrize(
    "kill_after",
    [
        "build failure of lvl/flaky",  # its neighbour still building beside it
        "restored ",  # the level back at its checkpoint, `steady` building alone
        "checkpoint lvl/steady:",  # `flaky` building alone
        "checkpoint lvl/flaky:",  # before the level's own checkpoint
    ],
)
def test_a_kill_while_a_level_is_rebuilt_resumes_to_a_clean_partition(
    tmp_path: Path, lfs_dir: Path, stage_file: WriteStage, kill_after: str
) -> None:
    path = stage_file("lvl.yaml", LEVEL_STAGE)
    home = tmp_path / "home"
    command = ("run", str(path), "--lfs", str(lfs_dir), "-j", "2")
    process = start_cli(*command, home=home)
    assert process.stdout is not None
    seen = []
    for line in process.stdout:
        seen.append(line)
        if line.strip().startswith(kill_after):
            process.send_signal(signal.SIGKILL)
            break
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, "".join(seen)
    again = run_cli(*command, home=home)
    assert again.returncode == 0, again.stdout + again.stderr
    assert partition_text(lfs_dir) == CLEAN


def test_memory_beside_others_is_retried_alone_once_jobs_and_cap_are_used_up(
    workspace: Workspace, lfs_dir: Path, stage_file: WriteStage
) -> None:
    path = stage_file(
        "crowd.yaml",
        f"""
        stage: crowd
        image: {BASE_IMAGE}
        checkpoint: package
        resources: {{memory: 128m}}
        recovery: {{memory_cap: 128m}}
        packages:
          - name: base
            script: "true"
          - name: neighbour
            depends: [base]
            script: sleep 2; echo n > /mnt/lfs/neighbour
          - name: eater
            depends: [base]
            environment: {{MAKEFLAGS: -j1}}
            script: |
              # Beside others it takes about 300 MB; built alone, less.
              size=300000000
              if [ "$LFSORCH_ATTEMPT" = 2 ]; then size=30000000; fi
              head -c $size /dev/zero | tail -n 1 | wc -c > /mnt/lfs/eaten
        """,
    )
    state, recorded = run_build([path], lfs_dir, workspace, parallel=2)
    assert state.outcome == "succeeded"
    eater = state.find("crowd", "eater")
    assert eater is not None
    level_start = state.checkpoints["crowd/base"][:12]
    assert [(a.failure_class, a.strategy, a.change) for a in eater.attempts] == [
        (
            "memory",
            "fewer-packages",
            f"level rebuilt one package at a time from checkpoint {level_start}",
        ),
        (None, None, None),
    ]
    assert (lfs_dir / "eaten").read_text().strip() == "30000000"
    assert partition_text(lfs_dir) == {"neighbour": "n\n", "eaten": "30000000\n"}
    (decision,) = [e.data for e in recorded if e.name == "recovery.decision"]
    assert decision["reason"].endswith("; at -j1 and the cap 128MiB reached")
    # Beside the eater's first attempt, then alone.
    assert started(recorded).count("crowd/neighbour") == 2


def test_a_level_with_a_failure_for_good_is_not_rebuilt(
    workspace: Workspace, lfs_dir: Path, stage_file: WriteStage
) -> None:
    path = stage_file(
        "broken.yaml",
        f"""
        stage: broken
        image: {BASE_IMAGE}
        checkpoint: package
        recovery: {{backoff: 0.1s}}
        packages:
          - {{name: base, script: "true"}}
          - {{name: flaky, depends: [base], retries: 1, script: "exit 1"}}
          - {{name: broken, depends: [base], script: "sleep 2; exit 2"}}
          - {{name: waiting, depends: [base], script: "true"}}
        """,
    )
    state, recorded = run_build([path], lfs_dir, workspace, parallel=2)
    assert state.outcome == "failed"
    statuses = {p.name: (p.status, len(p.attempts)) for p in state.packages}
    assert statuses == {
        "base": ("done", 1),
        "flaky": ("failed", 1),  # its retry waited for a level rebuild that cannot help
        "broken": ("failed", 1),
        "waiting": ("skipped", 0),  # never started once a package of the level was deferred
    }
    assert [e.data["reason"] for e in recorded if e.name == "build.skipped"] == [
        "a package of its level failed"
    ]
    assert not [e for e in recorded if e.name == "snapshot.restore"]
