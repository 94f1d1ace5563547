"""Downloading source files: HTTP with resume, and the progress it reports."""

from __future__ import annotations

import contextlib
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Protocol

import requests
from rich.progress import TaskID

CHUNK = 1 << 20


class Progress(Protocol):
    def begin(self, file: str, total: int | None, url: str, resumed_at: int) -> None: ...
    def advance(self, file: str, n: int) -> None: ...
    def end(self, file: str, message: str) -> None: ...
    def note(self, message: str) -> None: ...


class PlainProgress:
    """One line per event: for logs and pipes, where bars would be noise."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream or sys.stdout

    def _say(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def begin(self, file: str, total: int | None, url: str, resumed_at: int) -> None:
        size = f" ({total} bytes)" if total else ""
        resume = f", resuming at byte {resumed_at}" if resumed_at else ""
        self._say(f"get  {file}{size} from {url}{resume}")

    def advance(self, file: str, n: int) -> None:
        pass

    def end(self, file: str, message: str) -> None:
        self._say(f"ok   {file}: {message}")

    def note(self, message: str) -> None:
        self._say(message)


class RichProgress:
    """Bars on a terminal."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )
        from rich.progress import Progress as RProgress

        self.console = Console()
        self.bars = RProgress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=self.console,
        )
        self.tasks: dict[str, TaskID] = {}

    def __enter__(self) -> RichProgress:
        self.bars.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bars.stop()

    def begin(self, file: str, total: int | None, url: str, resumed_at: int) -> None:
        task = self.bars.add_task(file, total=total, completed=resumed_at)
        self.tasks[file] = task

    def advance(self, file: str, n: int) -> None:
        self.bars.advance(self.tasks[file], n)

    def end(self, file: str, message: str) -> None:
        if file in self.tasks:
            self.bars.remove_task(self.tasks.pop(file))
        self.console.print(f"[green]ok[/] {file}: {message}")

    def note(self, message: str) -> None:
        self.console.print(message)


@contextlib.contextmanager
def open_progress(progress: Progress | None) -> Iterator[Progress]:
    if progress is not None:
        yield progress
    elif sys.stdout.isatty():
        with RichProgress() as bars:
            yield bars
    else:
        yield PlainProgress()


# --------------------------------------------------------------------------- download


def download_part(
    url: str,
    part: Path,
    file: str,
    progress: Progress,
    session: requests.Session,
    timeout: float,
    size_hint: int | None = None,
) -> bool:
    """Fetch `url` into `part`, continuing an existing partial file. True if a Range was used."""
    if url.startswith("file://"):
        shutil.copyfile(url.removeprefix("file://"), part)
        return False
    have = part.stat().st_size if part.exists() else 0
    if size_hint is not None and have == size_hint:
        return False  # complete already: the digest check decides
    headers = {"Range": f"bytes={have}-"} if have else {}
    with session.get(url, headers=headers, stream=True, timeout=timeout) as resp:
        if have and resp.status_code == 416:
            # The server has nothing past our end: the part is complete or longer than the file;
            # the digest check decides, and a bad part is set aside like any bad file.
            return True
        resp.raise_for_status()
        resumed = have > 0 and resp.status_code == 206
        mode = "ab" if resumed else "wb"
        start = have if resumed else 0
        length = resp.headers.get("Content-Length")
        total = start + int(length) if length and length.isdigit() else size_hint
        progress.begin(file, total, url, start)
        with part.open(mode) as out:
            for chunk in resp.iter_content(CHUNK):
                out.write(chunk)
                progress.advance(file, len(chunk))
        return resumed
