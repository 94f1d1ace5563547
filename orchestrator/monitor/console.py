"""The console view of a run: live progress bars on a terminal, plain lines anywhere else.

Text a build printed is never written to the terminal as it is: `printable` shows its control
characters as escapes, so a package cannot clear the screen, move the cursor, set the clipboard
(OSC 52), retitle the window or ring the bell. The log file keeps the bytes as printed.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any, ClassVar

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn

from orchestrator.monitor import events
from orchestrator.monitor.events import Event, PackageEvent

_HEARTBEAT_S = 30.0
# C0 controls but tab and newline, DEL, C1 controls (8-bit CSI and OSC), and the Unicode
# direction overrides and isolates that make text display in another order than it reads.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """`text` with every terminal control character shown as a visible escape (`\\x1b`)."""
    return _CONTROL.sub(_escape, text)


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def _size(value: Any) -> str:
    if not isinstance(value, int):
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.0f}{unit}"
        value //= 1024
    return f"{value}TiB"


def _finished_text(event: events.BuildComplete) -> str:
    return (
        f"{event.duration_s or 0:.1f}s, cpu {event.cpu_seconds or 0:.1f}s, "
        f"mem peak {_size(event.memory_peak_bytes)}"
    )


class ConsoleView:
    """Subscribes to the bus; `live` picks progress bars over plain lines."""

    def __init__(self, console: Console | None = None, live: bool | None = None) -> None:
        self.console = console or Console(highlight=False)
        self.live = self.console.is_terminal if live is None else live
        self._progress: Progress | None = None
        self._tasks: dict[tuple[str | None, str | None], TaskID] = {}
        self._heartbeat: dict[tuple[str | None, str | None], float] = {}

    def __enter__(self) -> ConsoleView:
        if self.live:
            self._progress = Progress(
                SpinnerColumn(),
                TextColumn("[bold]{task.fields[name]}"),
                TimeElapsedColumn(),
                # A build's line is text, never rich markup: `[/usr/lib]` must not be a tag.
                TextColumn("{task.fields[line]}", style="dim", markup=False),
                console=self.console,
                transient=True,
            )
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def print(self, text: str) -> None:
        self.console.print(printable(text), markup=False, highlight=False, soft_wrap=True)

    def __call__(self, event: Event) -> None:
        handler = self._handlers.get(type(event))
        if handler is not None:
            handler(self, event)

    def _label(self, event: PackageEvent) -> str:
        return f"{event.stage}/{event.package}"

    def _on_run_start(self, event: events.RunStart) -> None:
        self.print(
            f"run {event.run_id}: {event.packages} package(s) in {', '.join(event.stages)}"
            f" ({event.already_done} already done), partition {event.lfs}"
        )

    def _on_cleanup(self, event: events.Cleanup) -> None:
        self.print(f"removed {len(event.removed)} container(s) left by a dead run")

    def _on_stage_start(self, event: events.StageStart) -> None:
        self.print(f"stage {event.stage}")

    def _on_build_start(self, event: events.BuildStart) -> None:
        key = (event.stage, event.package)
        suffix = f" (attempt {event.attempt})" if event.attempt > 1 else ""
        if self._progress is not None:
            self._tasks[key] = self._progress.add_task(
                "", total=None, name=self._label(event) + suffix, line=""
            )
        else:
            self._heartbeat[key] = time.monotonic()
            self.print(f"  start  {self._label(event)}{suffix}")

    def _on_build_progress(self, event: events.BuildProgress) -> None:
        key = (event.stage, event.package)
        line = printable(event.line)[:80]
        if self._progress is not None and key in self._tasks:
            self._progress.update(self._tasks[key], line=line)
        elif self._progress is None:
            last = self._heartbeat.get(key, 0.0)
            if time.monotonic() - last >= _HEARTBEAT_S:
                self._heartbeat[key] = time.monotonic()
                self.print(f"  ...    {self._label(event)}: {line}")

    def _end_task(self, event: PackageEvent) -> None:
        task = self._tasks.pop((event.stage, event.package), None)
        if self._progress is not None and task is not None:
            self._progress.remove_task(task)

    def _on_build_complete(self, event: events.BuildComplete) -> None:
        self._end_task(event)
        self.print(f"  done   {self._label(event)} in {_finished_text(event)}")

    def _on_build_error(self, event: events.BuildError) -> None:
        self._end_task(event)
        self.print(f"  FAILED {self._label(event)}: {event.reason}")

    def _on_build_retry(self, event: events.BuildRetry) -> None:
        self.print(f"  retry  {self._label(event)} (attempt {event.attempt})")

    def _on_recovery_decision(self, event: events.RecoveryDecision) -> None:
        then = f": {event.change}" if event.change else ""
        self.print(
            f"  {event.failure_class} failure of {self._label(event)} (attempt {event.attempt}),"
            f" {event.strategy}{then}"
        )

    def _on_stage_cached(self, event: events.StageCached) -> None:
        key = event.key[:12]
        if event.covered:
            self.print(f"  cached {event.stage}: contained in the later checkpoint {key}")
        else:
            self.print(f"  cached {event.stage}: its inputs match checkpoint {key}")

    def _on_snapshot_create(self, event: events.SnapshotCreate) -> None:
        what = f"{event.stage}/{event.package}" if event.package else event.stage
        kind = "delta" if event.delta else "full"
        self.print(
            f"  checkpoint {what}: {event.key[:12]} ({kind}, {_size(event.archive_bytes)}, "
            f"{event.duration_s:.1f}s)"
        )

    def _on_snapshot_restore(self, event: events.SnapshotRestore) -> None:
        self.print(
            f"  restored {event.key[:12]} into the partition ({event.reason}, "
            f"{event.duration_s:.1f}s)"
        )

    def _on_build_skipped(self, event: events.BuildSkipped) -> None:
        self.print(f"  skip   {self._label(event)}: {event.reason}")

    def _on_resource_change(self, event: events.ResourceChange) -> None:
        where = f" ({event.path})" if event.path else ""
        state = "low" if isinstance(event, events.ResourceDepleted) else "enough again"
        self.print(
            f"  host   {event.resource}{where}: {state}, {_size(event.available_bytes)} "
            f"available (threshold {_size(event.threshold_bytes)})"
        )

    def _on_system_error(self, event: events.SystemError) -> None:
        self.print(f"  engine does not answer: {event.reason}")

    # Each kind the console shows, and how; other kinds pass unseen.
    _handlers: ClassVar[dict[type[Event], Callable[[Any, Any], None]]] = {
        events.RunStart: _on_run_start,
        events.Cleanup: _on_cleanup,
        events.StageStart: _on_stage_start,
        events.BuildStart: _on_build_start,
        events.BuildProgress: _on_build_progress,
        events.BuildComplete: _on_build_complete,
        events.BuildError: _on_build_error,
        events.BuildRetry: _on_build_retry,
        events.RecoveryDecision: _on_recovery_decision,
        events.StageCached: _on_stage_cached,
        events.SnapshotCreate: _on_snapshot_create,
        events.SnapshotRestore: _on_snapshot_restore,
        events.BuildSkipped: _on_build_skipped,
        events.ResourceDepleted: _on_resource_change,
        events.ResourceAvailable: _on_resource_change,
        events.SystemError: _on_system_error,
    }
