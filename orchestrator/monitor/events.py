"""One in-process event bus and the events it carries: one frozen dataclass per kind.

A subscriber takes every event (`bus.subscribe(handler)`) or only some kinds
(`bus.subscribe(handler, BuildStart, BuildComplete)`); kinds are classes, so a field's name
or type is checked where the event is made, not where it is read. `name` is the kind as the
JSON event log and plugins know it (`build.start`).

On the way out (the JSON event log, plugins) an event is a `Message` of the design's protocol:
`event`, an ISO 8601 `timestamp`, the `source` component, the `target` it is about, a
`priority`, and a `payload` of the kind's own `data` and the `context` (run, stage, package).
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, TypeVar

log = logging.getLogger(__name__)

# Fields every event may carry, in the message's context; the rest are the kind's own data.
_COMMON = ("run_id", "stage", "package", "time")

Priority = Literal["debug", "info", "warning", "error"]


@dataclass(frozen=True, slots=True)
class Payload:
    data: dict[str, Any]
    context: dict[str, str]


@dataclass(frozen=True, slots=True)
class Message:
    """An event as the message protocol carries it."""

    event: str
    timestamp: str  # ISO 8601, UTC, milliseconds
    source: str  # the component that emitted it
    target: str  # what it is about: the run, `stage`, or `stage/package`
    priority: Priority
    payload: Payload

    def as_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    name: ClassVar[str] = "event"
    source: ClassVar[str] = "orchestrator"
    level: ClassVar[Priority] = "info"
    run_id: str
    time: float = field(default_factory=time.time)

    @property
    def data(self) -> dict[str, Any]:
        """The kind's own fields, by name."""
        return {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in _COMMON
        }

    @property
    def priority(self) -> Priority:
        return self.level

    @property
    def context(self) -> dict[str, str]:
        context = {"run_id": self.run_id} if self.run_id else {}
        for key in ("stage", "package"):
            value = getattr(self, key, None)
            if value is not None:
                context[key] = str(value)
        return context

    @property
    def target(self) -> str:
        parts = [str(getattr(self, key, None) or "") for key in ("stage", "package")]
        return "/".join(part for part in parts if part) or f"run {self.run_id}"

    def message(self) -> Message:
        moment = datetime.datetime.fromtimestamp(self.time, datetime.UTC)
        return Message(
            event=self.name,
            timestamp=moment.isoformat(timespec="milliseconds"),
            source=self.source,
            target=self.target,
            priority=self.priority,
            payload=Payload(data=self.data, context=self.context),
        )

    def as_json(self) -> dict[str, Any]:
        return self.message().as_json()


@dataclass(frozen=True, slots=True, kw_only=True)
class RunStart(Event):
    name: ClassVar[str] = "run.start"
    source: ClassVar[str] = "scheduler"
    lfs: str
    stages: list[str]
    packages: int
    already_done: int
    host: dict[str, Any]


@dataclass(frozen=True, slots=True, kw_only=True)
class RunComplete(Event):
    name: ClassVar[str] = "run.complete"
    source: ClassVar[str] = "scheduler"
    outcome: str

    @property
    def priority(self) -> Priority:
        if self.outcome == "succeeded":
            return "info"
        return "warning" if self.outcome == "interrupted" else "error"


@dataclass(frozen=True, slots=True, kw_only=True)
class Cleanup(Event):
    """Containers of dead runs and staging leftovers removed before a run."""

    name: ClassVar[str] = "engine.cleanup"
    source: ClassVar[str] = "engine"
    removed: list[str]


@dataclass(frozen=True, slots=True, kw_only=True)
class StageEvent(Event):
    source: ClassVar[str] = "scheduler"
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
    source: ClassVar[str] = "checkpoints"
    package: str | None  # the packages of a group checkpoint, joined; None for a stage's
    key: str
    delta: bool
    archive_bytes: int
    duration_s: float


@dataclass(frozen=True, slots=True, kw_only=True)
class SnapshotRestore(StageEvent):
    name: ClassVar[str] = "snapshot.restore"
    source: ClassVar[str] = "checkpoints"
    key: str
    reason: str
    duration_s: float


@dataclass(frozen=True, slots=True, kw_only=True)
class PackageEvent(StageEvent):
    source: ClassVar[str] = "builder"
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
    level: ClassVar[Priority] = "debug"
    line: str
    lines: int


@dataclass(frozen=True, slots=True, kw_only=True)
class BuildRetry(PackageEvent):
    name: ClassVar[str] = "build.retry"
    attempt: int  # the attempt about to start


@dataclass(frozen=True, slots=True, kw_only=True)
class BuildSkipped(PackageEvent):
    name: ClassVar[str] = "build.skipped"
    level: ClassVar[Priority] = "warning"
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
    pids_peak: int | None = None
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

    @property
    def priority(self) -> Priority:
        return "warning" if self.will_retry else "error"


@dataclass(frozen=True, slots=True, kw_only=True)
class ResourceSample(Event):
    """The host's figures, sampled every `monitor_interval`: what the builds have to work with."""

    name: ClassVar[str] = "resource.sample"
    source: ClassVar[str] = "monitor"
    level: ClassVar[Priority] = "debug"
    load_average: list[float]
    memory_available_bytes: int
    free_bytes: dict[str, int | None]  # by filesystem: `partition`, `workspace`


@dataclass(frozen=True, slots=True, kw_only=True)
class ResourceChange(Event):
    """One resource crossed its threshold: `memory`, `partition` or `workspace`."""

    source: ClassVar[str] = "monitor"
    resource: str
    path: str | None  # the filesystem's directory, for disk space
    available_bytes: int
    threshold_bytes: int

    @property
    def target(self) -> str:
        return self.resource


@dataclass(frozen=True, slots=True, kw_only=True)
class ResourceDepleted(ResourceChange):
    name: ClassVar[str] = "resource.depleted"
    level: ClassVar[Priority] = "warning"


@dataclass(frozen=True, slots=True, kw_only=True)
class ResourceAvailable(ResourceChange):
    name: ClassVar[str] = "resource.available"


@dataclass(frozen=True, slots=True, kw_only=True)
class SystemEvent(Event):
    """The container engine, as the monitor sees it."""

    source: ClassVar[str] = "engine"
    reason: str

    @property
    def target(self) -> str:
        return "engine"


@dataclass(frozen=True, slots=True, kw_only=True)
class SystemReady(SystemEvent):
    name: ClassVar[str] = "system.ready"


@dataclass(frozen=True, slots=True, kw_only=True)
class SystemError(SystemEvent):
    name: ClassVar[str] = "system.error"
    level: ClassVar[Priority] = "error"


@dataclass(frozen=True, slots=True, kw_only=True)
class SystemShutdown(SystemEvent):
    name: ClassVar[str] = "system.shutdown"

    @property
    def priority(self) -> Priority:
        return "warning" if self.reason == "interrupted" else "info"


@dataclass(frozen=True, slots=True, kw_only=True)
class RecoveryDecision(PackageEvent):
    """What a failed attempt was classified as and what follows it."""

    name: ClassVar[str] = "recovery.decision"
    attempt: int  # the attempt that failed
    failure_class: str  # configuration, build, memory, time, disk or system
    strategy: str  # retry, fewer-jobs, more-memory, fewer-packages, longer-timeout, wait-engine,
    # free-space, fail
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
