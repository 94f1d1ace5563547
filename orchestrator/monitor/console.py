"""The console view of a run: live progress bars on a terminal, plain lines anywhere else.

Text a build printed is never written to the terminal as it is: `printable` shows its control
characters as escapes, so a package cannot clear the screen, move the cursor, set the clipboard
(OSC 52), retitle the window or ring the bell. The log file keeps the bytes as printed.
"""

from __future__ import annotations

import re
import time
from typing import Any

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn

from orchestrator.monitor.events import Event

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


def _finished_text(event: Event) -> str:
    data = event.data
    return (
        f"{data.get('duration_s', 0):.1f}s, cpu {data.get('cpu_seconds') or 0:.1f}s, "
        f"mem peak {_size(data.get('memory_peak_bytes'))}"
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
        handler = getattr(self, "_on_" + event.name.replace(".", "_"), None)
        if handler is not None:
            handler(event)

    def _label(self, event: Event) -> str:
        return f"{event.stage}/{event.package}"

    def _on_run_start(self, event: Event) -> None:
        data = event.data
        self.print(
            f"run {event.run_id}: {data['packages']} package(s) in {', '.join(data['stages'])}"
            f" ({data['already_done']} already done), partition {data['lfs']}"
        )

    def _on_engine_cleanup(self, event: Event) -> None:
        self.print(f"removed {len(event.data['removed'])} container(s) left by a dead run")

    def _on_stage_start(self, event: Event) -> None:
        self.print(f"stage {event.stage}")

    def _on_build_start(self, event: Event) -> None:
        key = (event.stage, event.package)
        attempt = event.data.get("attempt", 1)
        suffix = f" (attempt {attempt})" if attempt > 1 else ""
        if self._progress is not None:
            self._tasks[key] = self._progress.add_task(
                "", total=None, name=self._label(event) + suffix, line=""
            )
        else:
            self._heartbeat[key] = time.monotonic()
            self.print(f"  start  {self._label(event)}{suffix}")

    def _on_build_progress(self, event: Event) -> None:
        key = (event.stage, event.package)
        line = printable(str(event.data.get("line", "")))[:80]
        if self._progress is not None and key in self._tasks:
            self._progress.update(self._tasks[key], line=line)
        elif self._progress is None:
            last = self._heartbeat.get(key, 0.0)
            if time.monotonic() - last >= _HEARTBEAT_S:
                self._heartbeat[key] = time.monotonic()
                self.print(f"  ...    {self._label(event)}: {line}")

    def _end_task(self, event: Event) -> None:
        task = self._tasks.pop((event.stage, event.package), None)
        if self._progress is not None and task is not None:
            self._progress.remove_task(task)

    def _on_build_complete(self, event: Event) -> None:
        self._end_task(event)
        self.print(f"  done   {self._label(event)} in {_finished_text(event)}")

    def _on_build_error(self, event: Event) -> None:
        self._end_task(event)
        self.print(f"  FAILED {self._label(event)}: {event.data.get('reason')}")

    def _on_build_retry(self, event: Event) -> None:
        self.print(f"  retry  {self._label(event)} (attempt {event.data.get('attempt')})")

    def _on_stage_cached(self, event: Event) -> None:
        key = event.data["key"][:12]
        if event.data.get("covered"):
            self.print(f"  cached {event.stage}: contained in the later checkpoint {key}")
        else:
            self.print(f"  cached {event.stage}: its inputs match checkpoint {key}")

    def _on_snapshot_create(self, event: Event) -> None:
        data = event.data
        what = f"{event.stage}/{event.package}" if event.package else str(event.stage)
        kind = "delta" if data.get("delta") else "full"
        self.print(
            f"  checkpoint {what}: {data['key'][:12]} ({kind}, {_size(data.get('archive_bytes'))}, "
            f"{data.get('duration_s', 0):.1f}s)"
        )

    def _on_snapshot_restore(self, event: Event) -> None:
        data = event.data
        self.print(
            f"  restored {data['key'][:12]} into the partition ({data.get('reason')}, "
            f"{data.get('duration_s', 0):.1f}s)"
        )

    def _on_build_skipped(self, event: Event) -> None:
        self.print(f"  skip   {self._label(event)}: {event.data.get('reason')}")
