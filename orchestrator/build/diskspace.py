"""Free space before a package or a snapshot starts: the partition's and the workspace's
filesystems each keep `recovery.min_free_space`.

When one is short, snapshots are pruned by the retention policy (`recovery.keep_snapshots`,
when set), then the run waits up to `recovery.space_wait` for space; then it stops, its record
saved, naming the filesystem that is full. Nothing is started that could be cut off half
written: a package's files or a snapshot's archive.

During builds the host sampler reports what it sees (`observe`): a package that fails while
its filesystem was below the threshold failed for want of space (ENOSPC), not for its own
fault, and is handled by this strategy rather than by the build retry.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.errors import ExitCode, LfsorchError
from orchestrator.spec.models import Recovery

_POLL_S = 1.0


class DiskFull(LfsorchError):
    exit_code = ExitCode.UNAVAILABLE  # not now: once there is space, the same command goes on


def mount_point(path: Path) -> Path:
    """The mount point of the filesystem holding `path`."""
    path = path.resolve()
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


@dataclass
class SpaceGuard:
    """Checks the named filesystems (`{"partition": lfs, "workspace": root}`)."""

    places: dict[str, Path]
    min_free: int
    wait_s: float
    prune: Callable[[], object] | None = None  # the retention policy, when configured
    # The sampler's last sighting of each place below the threshold: (monotonic time, free).
    _seen_short: dict[str, tuple[float, int]] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def shortage(self) -> tuple[str, Path, int] | None:
        """The first place whose filesystem is below the threshold: (name, path, free)."""
        for name, path in self.places.items():
            free = shutil.disk_usage(path).free
            if free < self.min_free:
                return name, path, free
        return None

    def observe(self, name: str, free: int) -> None:
        """A sample of a place's free space, taken while packages build."""
        if name in self.places and free < self.min_free:
            with self._lock:
                self._seen_short[name] = (time.monotonic(), free)

    def short_since(self, moment: float) -> str | None:
        """Which filesystem was below the threshold at some point since `moment` (a
        `time.monotonic()` value), said for people; None when none was seen short."""
        short = self.shortage()
        if short is None:
            with self._lock:
                seen = [
                    (name, self.places[name], free)
                    for name, (when, free) in self._seen_short.items()
                    if when >= moment
                ]
            short = seen[0] if seen else None
        if short is None:
            return None
        name, path, free = short
        return (
            f"the {name}'s filesystem ({mount_point(path)}) had {_mib(free)} free, less than "
            f"min_free_space {_mib(self.min_free)}"
        )

    def with_policy(self, policy: Recovery) -> SpaceGuard:
        """The same places under a stage's or package's own threshold and wait."""
        # The copy shares the sampler's sightings (the same dict and lock).
        return dataclasses.replace(self, min_free=policy.min_free_space, wait_s=policy.space_wait)

    def ensure(self, before: str) -> None:
        """Return once every filesystem has the space; raise DiskFull when it does not come."""
        short = self.shortage()
        if short is None:
            return
        if self.prune is not None:
            self.prune()
            short = self.shortage()
        deadline = time.monotonic() + self.wait_s
        while short is not None and time.monotonic() < deadline:
            time.sleep(min(_POLL_S, max(0.0, deadline - time.monotonic())))
            short = self.shortage()
        if short is None:
            return
        name, path, free = short
        raise DiskFull(
            f"stopped {before}: the {name}'s filesystem ({mount_point(path)}, holding {path}) "
            f"has {_mib(free)} free, less than min_free_space {_mib(self.min_free)}",
            hint="free space on it (or lower recovery.min_free_space), then run the same "
            "command again: the run continues from its last checkpoint",
        )


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"
