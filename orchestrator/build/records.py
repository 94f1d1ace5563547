"""Run records kept per partition, the list of recent runs, and room to write them.

Resume reads the record of the partition it builds into (`partitions/<identity>/state.json`),
so a run on another partition never changes how this one resumes. `state.json` at the
workspace's top is a copy of the last run's record, for `status` and `report`.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.build.state import RunState, load_state
from orchestrator.errors import LfsorchError, local_file_error
from orchestrator.partition import Partition
from orchestrator.workspace import Workspace

# Kept free during a run and given back before the final records are written, so a disk
# the build filled still takes the record that says how the run ended.
RESERVE_BYTES = 256 * 1024
RESERVE_FILE = "run.reserve"


def load_record(partition: Partition) -> RunState | None:
    """The partition's record in its workspace, or None for a partition never built here.

    A workspace from before records were kept per partition has only the top-level record;
    it is adopted when it names this partition's path.
    """
    identity = partition.identity()
    assert identity is not None
    record = load_state(partition.record_file(identity))
    if record is not None:
        return record
    last = load_state(partition.workspace.state_file)
    if last is not None and last.partition is None and last.lfs == str(partition.path):
        return last.model_copy(update={"partition": identity})
    return None


def peek_record(partition: Partition) -> RunState | None:
    """The partition's record without giving the partition an identity (for `status`)."""
    identity = partition.identity(create=False)
    if identity is None:
        return None
    return load_state(partition.record_file(identity))


@dataclass(frozen=True)
class RunSummary:
    run_id: str
    lfs: str
    started: str
    finished: str | None
    outcome: str
    counts: dict[str, int] = field(default_factory=dict)

    def as_json(self) -> dict[str, object]:
        return {
            "run_id": self.run_id,
            "partition": self.lfs,
            "started": self.started,
            "finished": self.finished,
            "outcome": self.outcome,
            "counts": self.counts,
        }


def recent_runs(workspace: Workspace, limit: int) -> list[RunSummary]:
    """The newest runs first; a record that cannot be read is listed as such."""
    if not workspace.runs_dir.is_dir():
        return []
    summaries = [_summary(item) for item in workspace.runs_dir.iterdir() if item.is_dir()]
    summaries.sort(key=lambda s: (s.started, s.run_id), reverse=True)
    return summaries[:limit]


def _summary(run_dir: Path) -> RunSummary:
    try:
        state = load_state(run_dir / "state.json")
    except LfsorchError:
        state = None
    if state is None:
        return RunSummary(run_dir.name, "?", "", None, "unreadable record")
    counts: dict[str, int] = {}
    for package in state.packages:
        counts[package.status] = counts.get(package.status, 0) + 1
    return RunSummary(
        state.run_id, state.lfs, state.started, state.finished, state.outcome_now(), counts
    )


class SpaceReserve:
    """A file holding RESERVE_BYTES of the workspace's disk until `release`."""

    def __init__(self, workspace: Workspace) -> None:
        self.path = workspace.root / RESERVE_FILE
        try:
            with self.path.open("wb") as handle:
                try:
                    os.posix_fallocate(handle.fileno(), 0, RESERVE_BYTES)
                except OSError as exc:
                    if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                        raise
                    handle.write(bytes(RESERVE_BYTES))
        except OSError as exc:
            with contextlib.suppress(OSError):
                self.path.unlink()
            raise local_file_error(exc, "the workspace", workspace.root) from None

    def release(self) -> None:
        with contextlib.suppress(OSError):
            self.path.unlink()


@contextlib.contextmanager
def reserved_space(workspace: Workspace) -> Iterator[SpaceReserve]:
    reserve = SpaceReserve(workspace)
    try:
        yield reserve
    finally:
        reserve.release()
