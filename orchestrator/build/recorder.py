"""The record of the run in progress: made from the partition's own record, changed under one
lock by the scheduler and the attempts building side by side, on disk after every change.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from orchestrator.build import records
from orchestrator.build.inputs import InputsOf
from orchestrator.build.state import PackageState, RunState, save_state
from orchestrator.errors import LfsorchError
from orchestrator.partition import Partition
from orchestrator.spec.graph import Plan
from orchestrator.spec.models import Stage
from orchestrator.workspace import Workspace


class RunRecorder:
    """This run's record and every copy of it: the partition's (what resume reads), the
    workspace's last run, and the run directory's own."""

    def __init__(
        self,
        run_id: str,
        plan: Plan,
        partition: Partition,
        workspace: Workspace,
        inputs_of: InputsOf,
    ) -> None:
        self.run_id = run_id
        self.partition = partition
        self.workspace = workspace
        self._lock = threading.Lock()
        # Whether this workspace knows the partition: one that does not must not build on a
        # partition another workspace's run left half-built.
        self.knows_partition = records.load_record(partition) is not None
        self.state = initial_state(run_id, plan, partition, inputs_of)

    def find(self, stage: str, package: str) -> PackageState:
        record = self.state.find(stage, package)
        assert record is not None, f"{stage}/{package} is not in the plan"
        return record

    def stage_records(self, stage: Stage) -> list[PackageState]:
        return [self.find(stage.stage, package.name) for package in stage.packages]

    @contextlib.contextmanager
    def recording(self) -> Iterator[RunState]:
        """Change the state under the lock; the change is on disk when the block ends."""
        with self._lock:
            yield self.state
            self.save()

    def _record_files(self) -> list[Path]:
        """The partition's record (what resume reads), the workspace's last run, and the run
        directory's own, which `runs`, `ci plan` and `verify-reproducible --against` read,
        also while the run is under way."""
        assert self.state.partition is not None
        return [
            self.partition.record_file(self.state.partition),
            self.workspace.state_file,
            self.workspace.run_dir(self.run_id) / "state.json",
        ]

    def save(self) -> None:
        for path in self._record_files():
            save_state(self.state, path)

    def save_final(self) -> None:
        """Write every copy of the finished record, each one even if another fails; raise
        the first failure unless an error is already on its way out."""
        failures: list[LfsorchError] = []
        for path in self._record_files():
            try:
                save_state(self.state, path)
            except LfsorchError as exc:
                failures.append(exc)
        if failures and sys.exc_info()[1] is None:
            raise failures[0]


def initial_state(run_id: str, plan: Plan, partition: Partition, inputs_of: InputsOf) -> RunState:
    """This run's record, carrying on from the partition's own record (never another
    partition's: a run elsewhere must not change how this partition resumes)."""
    previous = records.load_record(partition)
    files = [str(p.file.path) for p in plan.stages]
    carried: dict[tuple[str, str], PackageState] = {}
    identity = partition.identity()
    state = RunState(run_id=run_id, lfs=str(partition.path), partition=identity, files=files)
    if previous is not None:
        carried = {p.key: p for p in previous.packages}
        state.base_stage, state.base_key = previous.base_stage, previous.base_key
        state.checkpoints = dict(previous.checkpoints)
        state.partition_at = previous.partition_at
    for stage_plan in plan.stages:
        stage = stage_plan.file.stage
        for package in stage.packages:
            digest = inputs_of.digest(stage_plan.file, package)
            old = carried.get((stage.stage, package.name))
            if old is not None and old.definition == digest:
                # Unchanged: keep its history; only what is not done is built again.
                if old.status != "done":
                    old.status = "pending"
                state.packages.append(old)
            else:
                state.packages.append(
                    PackageState(stage=stage.stage, name=package.name, definition=digest)
                )
    return state
