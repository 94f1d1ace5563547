"""Figures of a build from the container's stats stream, with host figures where it has none."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil


@dataclass
class ContainerFigures:
    """Accumulates Docker stats frames into the figures a package is reported with."""

    cpu_seconds: float | None = None
    memory_peak_bytes: int | None = None
    read_bytes: int | None = None
    write_bytes: int | None = None
    io_source: str | None = None
    frames: int = 0

    def add_frame(self, frame: dict[str, Any]) -> None:
        cpu = frame.get("cpu_stats", {}).get("cpu_usage", {}).get("total_usage", 0)
        memory = frame.get("memory_stats", {})
        usage = memory.get("usage", 0)
        if not cpu and not usage:
            # The stream's last frame after exit is all zeros: it says nothing.
            return
        self.frames += 1
        self.cpu_seconds = max(self.cpu_seconds or 0.0, cpu / 1e9)
        # cgroup v1 reports the kernel's own high-water mark; v2 only the current usage.
        peak = max(memory.get("max_usage", 0), usage)
        self.memory_peak_bytes = max(self.memory_peak_bytes or 0, peak)
        read, write = _blkio_bytes(frame.get("blkio_stats") or {})
        if read is not None and write is not None:
            self.read_bytes = max(self.read_bytes or 0, read)
            self.write_bytes = max(self.write_bytes or 0, write)
            self.io_source = "container"

    def apply_host_io(self, before: HostIO, after: HostIO) -> None:
        """Use the host's disk counters when the engine gave no block I/O figures."""
        if self.io_source == "container":
            return
        self.read_bytes = max(0, after.read_bytes - before.read_bytes)
        self.write_bytes = max(0, after.write_bytes - before.write_bytes)
        self.io_source = "host"


def _blkio_bytes(blkio: dict[str, Any]) -> tuple[int | None, int | None]:
    entries = blkio.get("io_service_bytes_recursive") or []
    if not entries:
        return None, None
    read = sum(e.get("value", 0) for e in entries if str(e.get("op", "")).lower() == "read")
    write = sum(e.get("value", 0) for e in entries if str(e.get("op", "")).lower() == "write")
    return read, write


@dataclass(frozen=True)
class HostIO:
    read_bytes: int
    write_bytes: int

    @classmethod
    def sample(cls) -> HostIO:
        counters = psutil.disk_io_counters()
        if counters is None:
            return cls(0, 0)
        return cls(counters.read_bytes, counters.write_bytes)


def host_summary() -> dict[str, Any]:
    """Host figures recorded with a run: what the build had to work with."""
    memory = psutil.virtual_memory()
    return {
        "cpus": psutil.cpu_count() or 1,
        "memory_total_bytes": memory.total,
        "memory_available_bytes": memory.available,
        "load_average": list(psutil.getloadavg()),
    }


def tree_usage(root: Path) -> int:
    """Bytes a tree occupies on disk, each hard-linked file counted once (like `du -s`)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    pending = [root]
    while pending:
        directory = pending.pop()
        try:
            entries = list(os.scandir(directory))
        except OSError:
            continue
        for entry in entries:
            try:
                info = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if info.st_nlink > 1:
                identity = (info.st_dev, info.st_ino)
                if identity in seen:
                    continue
                seen.add(identity)
            total += info.st_blocks * 512
            if entry.is_dir(follow_symlinks=False):
                pending.append(Path(entry.path))
    return total
