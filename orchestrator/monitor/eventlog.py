"""The structured event log: one JSON object per line, rotated and compressed with zstd."""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import sys
from pathlib import Path

import zstandard

from orchestrator.monitor import events
from orchestrator.monitor.events import Event


def _compress_rotated(source: str, destination: str) -> None:
    with open(source, "rb") as plain, open(destination, "wb") as packed:
        zstandard.ZstdCompressor(level=10).copy_stream(plain, packed)
    os.remove(source)


PROGRESS_INTERVAL_S = 10.0


class JsonEventLog:
    """A bus subscriber. Progress is logged at most every few seconds per package: the
    package logs hold the output itself."""

    def __init__(self, path: Path, max_bytes: int, backups: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.handlers.RotatingFileHandler(
            path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8"
        )
        handler.namer = lambda name: name + ".zst"
        handler.rotator = _compress_rotated
        handler.setFormatter(logging.Formatter("%(message)s"))
        # A write that fails (a full disk) must not print a traceback per event: the first
        # failure is kept, and the log stops; `failure` tells the caller.
        handler.handleError = self._write_failed  # type: ignore[method-assign]
        self.failure: OSError | None = None
        self._logger = logging.Logger(f"lfsorch.events.{path}", level=logging.INFO)
        self._logger.propagate = False
        self._logger.addHandler(handler)
        self._handler = handler
        self._last_progress: dict[tuple[str | None, str | None], float] = {}

    def __call__(self, event: Event) -> None:
        if isinstance(event, events.BuildProgress):
            key = (event.stage, event.package)
            if event.time - self._last_progress.get(key, 0.0) < PROGRESS_INTERVAL_S:
                return
            self._last_progress[key] = event.time
        self._logger.info(json.dumps(event.as_json(), default=str, sort_keys=False))

    def _write_failed(self, record: logging.LogRecord) -> None:
        error = sys.exc_info()[1]
        if self.failure is None and isinstance(error, OSError):
            self.failure = error
        self._logger.disabled = True

    def close(self) -> None:
        self._handler.close()
