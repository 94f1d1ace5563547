"""A kill stops a command as Ctrl-C does.

CI runners, `timeout` and `docker stop` end a command with SIGTERM. Python's default for it
exits at once, which would leave the command's build containers running and its record
unsaved; raised as KeyboardInterrupt, it takes the same path as Ctrl-C: running containers
are stopped and removed, the record is saved, exit status 130."""

from __future__ import annotations

import signal
from types import FrameType


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def stop_on_sigterm() -> None:
    signal.signal(signal.SIGTERM, _raise_interrupt)
