"""The host, sampled while a run goes: load, available memory, free space of the partition's
and the workspace's filesystems, and whether the container engine answers.

Each sample is a `resource.sample` event; a resource that falls below its threshold is
`resource.depleted` once, and `resource.available` once it is above it again. The engine is
`system.ready` when it answers, `system.error` when it stops answering (once, until it answers
again), and `system.shutdown` when the run ends.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

from orchestrator.monitor import events
from orchestrator.monitor.events import EventBus

# Called once per sample; raises when the engine does not answer.
EnginePing = Callable[[], object]
# Told each filesystem's free space at every sample: (name, free bytes).
SpaceObserver = Callable[[str, int], object]


@dataclass(frozen=True)
class Thresholds:
    free_space_bytes: int
    memory_bytes: int


def free_bytes(path: Path) -> int | None:
    """Free space for an unprivileged writer of the filesystem holding `path`; None when it
    cannot be read (gone, unmounted)."""
    try:
        return psutil.disk_usage(str(path)).free
    except OSError:
        return None


class HostSampler:
    """A thread sampling the host every `interval` seconds until stopped."""

    def __init__(
        self,
        bus: EventBus,
        run_id: str,
        filesystems: dict[str, Path],
        interval: float,
        thresholds: Thresholds,
        engine_ping: EnginePing | None = None,
        on_space: SpaceObserver | None = None,
    ) -> None:
        self._bus = bus
        self._run_id = run_id
        self._filesystems = filesystems
        self._interval = interval
        self._thresholds = thresholds
        self._ping = engine_ping
        self._on_space = on_space
        self._stop = threading.Event()
        self._depleted: set[str] = set()
        self._engine_answers: bool | None = None
        self._thread = threading.Thread(target=self._run, name="host-sampler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, reason: str) -> None:
        """End sampling; `system.shutdown` says how the run ended (its outcome)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self._interval + 30)
        self._bus.emit(events.SystemShutdown(run_id=self._run_id, reason=reason))

    def _run(self) -> None:
        while True:
            # A failed sample must not end the thread, nor the build: the next one may work.
            with contextlib.suppress(Exception):
                self.sample()
            if self._stop.wait(self._interval):
                return

    def sample(self) -> None:
        """Take one sample now and publish what it shows."""
        memory = psutil.virtual_memory().available
        space = {name: free_bytes(path) for name, path in self._filesystems.items()}
        self._bus.emit(
            events.ResourceSample(
                run_id=self._run_id,
                load_average=[round(load, 2) for load in psutil.getloadavg()],
                memory_available_bytes=memory,
                free_bytes=space,
            )
        )
        self._compare("memory", None, memory, self._thresholds.memory_bytes)
        for name, free in space.items():
            if free is not None:
                if self._on_space is not None:
                    self._on_space(name, free)
                path = str(self._filesystems[name])
                self._compare(name, path, free, self._thresholds.free_space_bytes)
        if self._ping is not None:
            self._check_engine(self._ping)

    def _compare(self, resource: str, path: str | None, available: int, threshold: int) -> None:
        below = available < threshold
        if below == (resource in self._depleted):
            return
        kind = events.ResourceDepleted if below else events.ResourceAvailable
        (self._depleted.add if below else self._depleted.discard)(resource)
        self._bus.emit(
            kind(
                run_id=self._run_id,
                resource=resource,
                path=path,
                available_bytes=available,
                threshold_bytes=threshold,
            )
        )

    def _check_engine(self, ping: EnginePing) -> None:
        try:
            ping()
        except Exception as exc:
            if self._engine_answers is not False:
                self._engine_answers = False
                reason = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
                self._bus.emit(events.SystemError(run_id=self._run_id, reason=reason))
            return
        if self._engine_answers is not True:
            reason = "answers" if self._engine_answers is None else "answers again"
            self._engine_answers = True
            self._bus.emit(events.SystemReady(run_id=self._run_id, reason=reason))
