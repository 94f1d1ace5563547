"""One in-process event bus and the events it carries: one frozen dataclass per kind.

A subscriber takes every event (`bus.subscribe(handler)`) or only some kinds
(`bus.subscribe(handler, BuildStart, BuildComplete)`); kinds are classes, so a field's name
or type is checked where the event is made, not where it is read. `name` is the kind as the
JSON event log and plugins know it (`build.start`).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

log = logging.getLogger(__name__)

# Fields every event may carry, written first in the JSON log; the rest are the kind's own.
_COMMON = ("run_id", "stage", "package", "time")


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    name: ClassVar[str] = "event"
    run_id: str
    time: float = field(default_factory=time.time)

    @property
    def data(self) -> dict[str, Any]:
        """The kind's own fields, by name."""
        return {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in _COMMON
        }

    def as_json(self) -> dict[str, Any]:
        record: dict[str, Any] = {"event": self.name, "time": round(self.time, 3)}
        if self.run_id:
            record["run_id"] = self.run_id
        for key in ("stage", "package"):
            value = getattr(self, key, None)
            if value is not None:
                record[key] = value
        record.update(self.data)
        return record


@dataclass(frozen=True, slots=True, kw_only=True)
class RunStart(Event):
    name: ClassVar[str] = "run.start"
    lfs: str
    stages: list[str]
    packages: int
    already_done: int
    host: dict[str, Any]


@dataclass(frozen=True, slots=True, kw_only=True)
class RunComplete(Event):
    name: ClassVar[str] = "run.complete"
    outcome: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Cleanup(Event):
    """Containers of dead runs and staging leftovers removed before a run."""

    name: ClassVar[str] = "engine.cleanup"
    removed: list[str]


@dataclass(frozen=True, slots=True, kw_only=True)
class StageEvent(Event):
    stage: str


@dataclass(frozen=True, slots=True, kw_only=True)
class StageStart(StageEvent):
    name: ClassVar[str] = "stage.start"


@dataclass(frozen=True, slots=True, kw_only=True)
class StageComplete(StageEvent):
    name: ClassVar[str] = "stage.complete"
    ok: bool
    duration_s: float


@dataclass(frozen=True, slots=True, kw_only=True)
class StageCached(StageEvent):
    """A stage not built: its checkpoint (or, `covered`, a later stage's) exists."""

    name: ClassVar[str] = "stage.cached"
    key: str
    covered: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class SnapshotCreate(StageEvent):
    name: ClassVar[str] = "snapshot.create"
    package: str | None  # the packages of a group checkpoint, joined; None for a stage's
    key: str
    delta: bool
    archive_bytes: int
    duration_s: float


@dataclass(frozen=True, slots=True, kw_only=True)
class SnapshotRestore(StageEvent):
    name: ClassVar[str] = "snapshot.restore"
    key: str
    reason: str
    duration_s: float


@dataclass(frozen=True, slots=True, kw_only=True)
class PackageEvent(StageEvent):
    package: str  # the package's own name (`libstdc++`), never its container's


@dataclass(frozen=True, slots=True, kw_only=True)
class BuildStart(PackageEvent):
    name: ClassVar[str] = "build.start"
    attempt: int
    log: str


@dataclass(frozen=True, slots=True, kw_only=True)
class BuildProgress(PackageEvent):
    """The last line a build printed, and how many it printed so far (throttled)."""

    name: ClassVar[str] = "build.progress"
    line: str
    lines: int


@dataclass(frozen=True, slots=True, kw_only=True)
class BuildRetry(PackageEvent):
    name: ClassVar[str] = "build.retry"
    attempt: int  # the attempt about to start


@dataclass(frozen=True, slots=True, kw_only=True)
class BuildSkipped(PackageEvent):
    name: ClassVar[str] = "build.skipped"
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class BuildEnded(PackageEvent):
    """An attempt's end, with the package's figures (None where none were measured)."""

    attempt: int
    duration_s: float | None = None
    exit_code: int | None = None
    oom_killed: bool = False
    timed_out: bool = False
    cpu_seconds: float | None = None
    memory_peak_bytes: int | None = None
    read_bytes: int | None = None
    write_bytes: int | None = None
    io_source: str | None = None
    disk_added_bytes: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class BuildComplete(BuildEnded):
    name: ClassVar[str] = "build.complete"


@dataclass(frozen=True, slots=True, kw_only=True)
class BuildError(BuildEnded):
    name: ClassVar[str] = "build.error"
    will_retry: bool
    reason: str
    log: str


@dataclass(frozen=True, slots=True, kw_only=True)
class RecoveryDecision(PackageEvent):
    """What a failed attempt was classified as and what follows it."""

    name: ClassVar[str] = "recovery.decision"
    attempt: int  # the attempt that failed
    failure_class: str  # configuration, build, memory, time, disk or system
    strategy: str  # retry, retry-fewer-jobs, retry-more-memory, retry-longer, wait-engine, fail
    reason: str
    change: str | None  # what the next attempt changes; None when there is none
    will_retry: bool


E = TypeVar("E", bound=Event)
Handler = Callable[[Event], None]


class EventBus:
    """Delivers each event to its subscribers in order, one event at a time.

    Builds run in threads; serialising delivery keeps subscribers simple (no locking of
    their own) and a failing subscriber is logged, never allowed to stop a build.
    """

    def __init__(self) -> None:
        self._subscribers: list[tuple[Callable[[Any], None], tuple[type[Event], ...]]] = []
        self._lock = threading.RLock()

    def subscribe(self, handler: Callable[[E], None], *kinds: type[E]) -> None:
        """`handler` receives events of `kinds` (and their subclasses), or every event."""
        with self._lock:
            self._subscribers.append((handler, kinds or (Event,)))

    def emit(self, event: Event) -> None:
        with self._lock:
            for handler, kinds in self._subscribers:
                if not isinstance(event, kinds):
                    continue
                try:
                    handler(event)
                except Exception:
                    log.exception("event subscriber %r failed on %s", handler, event.name)
