"""Which earlier run `verify-reproducible --against` compares with, read from real run
records in a workspace (no engine: the records are what a run writes)."""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path

import pytest

from orchestrator.build.reproducible import NotReproducibleSetup, earlier_build
from orchestrator.build.state import PackageState, RunState, save_state
from orchestrator.workspace import Workspace
from tests.helpers import gone_pid


def record(workspace: Workspace, run_id: str, state: RunState) -> None:
    workspace.run_dir(run_id).mkdir(parents=True, exist_ok=True)
    save_state(state, workspace.run_dir(run_id) / "state.json")


def building(run_id: str, owner_pid: int, checkpoints: dict[str, str]) -> RunState:
    return RunState(
        run_id=run_id,
        lfs="/var/tmp/lfs",
        files=["ch5.yaml", "ch6.yaml"],
        owner_pid=owner_pid,
        packages=[PackageState(stage="ch5", name="gcc"), PackageState(stage="ch6", name="m4")],
        checkpoints=checkpoints,
    )


def test_a_run_still_building_the_stages_is_waited_for(tmp_path: Path) -> None:
    workspace = Workspace(tmp_path / "earlier")
    run_id = "20261202-070000-aaaa"
    alive = subprocess.Popen(["sleep", "60"])
    try:
        record(workspace, run_id, building(run_id, alive.pid, {"ch5": "k5"}))
        said: list[str] = []
        found: list[RunState] = []
        waiter = threading.Thread(
            target=lambda: found.append(
                earlier_build(workspace, ["ch5", "ch6"], poll_s=0.05, notify=said.append)
            )
        )
        waiter.start()
        waiter.join(0.5)
        assert waiter.is_alive(), "it waits while the run is under way"
        record(workspace, run_id, building(run_id, alive.pid, {"ch5": "k5", "ch6": "k6"}))
        waiter.join(10)
    finally:
        alive.kill()
        alive.wait()
    assert not waiter.is_alive()
    assert [state.checkpoints for state in found] == [{"ch5": "k5", "ch6": "k6"}]
    assert said == [
        f"waiting for run {run_id} (process {alive.pid}) in {workspace.root} to checkpoint ch6"
    ]


def test_a_run_whose_process_is_gone_is_not_waited_for(tmp_path: Path) -> None:
    workspace = Workspace(tmp_path / "earlier")
    record(workspace, "r1", building("r1", gone_pid(), {"ch5": "k5"}))
    with pytest.raises(NotReproducibleSetup) as refused:
        earlier_build(workspace, ["ch5", "ch6"], poll_s=60)
    assert refused.value.message == (
        f"no run in the workspace {workspace.root} has a checkpoint of every stage (ch5, ch6)"
    )
    assert refused.value.hint == (
        "finish its build of those stages (a stopped one resumes with the same `lfsorch run`), "
        "then run again"
    )


def test_a_finished_run_is_taken_before_one_still_building(tmp_path: Path) -> None:
    workspace = Workspace(tmp_path / "earlier")
    done = building("20261201-000000-done", gone_pid(), {"ch5": "a", "ch6": "b"})
    done.outcome = "succeeded"
    record(workspace, done.run_id, done)
    record(workspace, "20261202-000000-busy", building("20261202-000000-busy", 1, {}))
    assert earlier_build(workspace, ["ch5", "ch6"], poll_s=60).run_id == done.run_id
