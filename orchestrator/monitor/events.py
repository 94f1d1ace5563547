"""One in-process event bus: the console, the JSON log, metrics and plugins subscribe to it."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

RUN_START = "run.start"
RUN_COMPLETE = "run.complete"
STAGE_START = "stage.start"
STAGE_COMPLETE = "stage.complete"
BUILD_START = "build.start"
BUILD_PROGRESS = "build.progress"
BUILD_COMPLETE = "build.complete"
BUILD_ERROR = "build.error"
BUILD_RETRY = "build.retry"
BUILD_SKIPPED = "build.skipped"
BUILD_STATS = "build.stats"
CLEANUP = "engine.cleanup"
STAGE_CACHED = "stage.cached"
SNAPSHOT_CREATE = "snapshot.create"
SNAPSHOT_RESTORE = "snapshot.restore"


@dataclass(frozen=True)
class Event:
    name: str
    run_id: str = ""
    stage: str | None = None
    package: str | None = None
    data: dict[str, Any] = field(default_factory=dict)
    time: float = field(default_factory=time.time)

    def as_json(self) -> dict[str, Any]:
        record: dict[str, Any] = {"event": self.name, "time": round(self.time, 3)}
        if self.run_id:
            record["run_id"] = self.run_id
        if self.stage is not None:
            record["stage"] = self.stage
        if self.package is not None:
            record["package"] = self.package
        record.update(self.data)
        return record


Handler = Callable[[Event], None]


class EventBus:
    """Delivers each event to its subscribers in order, one event at a time.

    Builds run in threads; serialising delivery keeps subscribers simple (no locking of
    their own) and a failing subscriber is logged, never allowed to stop a build.
    """

    def __init__(self) -> None:
        self._subscribers: list[tuple[Handler, frozenset[str] | None]] = []
        self._lock = threading.RLock()

    def subscribe(self, handler: Handler, names: set[str] | None = None) -> None:
        with self._lock:
            self._subscribers.append((handler, frozenset(names) if names else None))

    def publish(self, event: Event) -> None:
        with self._lock:
            for handler, names in self._subscribers:
                if names is not None and event.name not in names:
                    continue
                try:
                    handler(event)
                except Exception:
                    log.exception("event subscriber %r failed on %s", handler, event.name)

    def emit(self, name: str, **fields: Any) -> None:
        run_id = fields.pop("run_id", "")
        stage = fields.pop("stage", None)
        package = fields.pop("package", None)
        self.publish(Event(name, run_id, stage, package, fields))
