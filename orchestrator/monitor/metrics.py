"""Figures of a build: exact ones from the container's own counters, read as it ends.

The container's entry script copies its cgroup's counters (v1 or v2, whichever it finds under
/sys/fs/cgroup) and its first process's task I/O counters to a small file in a bind-mounted
directory, on any exit it lives to see. A container killed from outside (timeout, interrupt)
never gets there; its figures then come from Docker's stats frames, and `source` says so.

I/O is always the container's own. The task counters (`/proc/1/io`, which a parent inherits
from every child it reaps) count the bytes the container's processes sent to storage, also the
ones written back after they ended; cgroup v1's blkio counts only direct and synchronous I/O.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

# What the entry script writes is read up to this size: a build running as root could replace
# the file, and a hostile one must not make lfsorch read gigabytes.
FIGURES_FILE_MAX_BYTES = 64 * 1024
_SECTION = re.compile(r"^== (\S+)$")
# Counters are bounded so a forged file cannot put absurd numbers in the record.
_COUNTER_MAX = 1 << 62


@dataclass
class ContainerFigures:
    """The figures a package attempt is reported with."""

    cpu_seconds: float | None = None
    memory_peak_bytes: int | None = None
    read_bytes: int | None = None
    write_bytes: int | None = None
    pids_peak: int | None = None
    # "cgroup": read by the container itself as it ended (exact); "stats": Docker's stats
    # frames, for a container killed before it could read them (a lower bound).
    io_source: str | None = None
    frames: int = 0
    # Frames arrive in the stats thread, possibly still after the exact figures were read.
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add_frame(self, frame: dict[str, Any]) -> None:
        """A Docker stats frame: live figures, kept until the exact ones replace them."""
        with self._lock:
            self._add_frame(frame)

    def _add_frame(self, frame: dict[str, Any]) -> None:
        cpu = frame.get("cpu_stats", {}).get("cpu_usage", {}).get("total_usage", 0)
        memory = frame.get("memory_stats", {})
        usage = memory.get("usage", 0)
        if (not cpu and not usage) or self.io_source == "cgroup":
            # The stream's last frame after exit is all zeros: it says nothing.
            return
        self.frames += 1
        self.cpu_seconds = max(self.cpu_seconds or 0.0, cpu / 1e9)
        # cgroup v1 reports the kernel's own high-water mark; v2 only the current usage.
        peak = max(memory.get("max_usage", 0), usage)
        self.memory_peak_bytes = max(self.memory_peak_bytes or 0, peak)
        pids = frame.get("pids_stats", {}).get("current")
        if isinstance(pids, int):
            self.pids_peak = max(self.pids_peak or 0, pids)
        read, write = _blkio_bytes(frame.get("blkio_stats") or {})
        if read is not None and write is not None:
            self.read_bytes = max(self.read_bytes or 0, read)
            self.write_bytes = max(self.write_bytes or 0, write)
        self.io_source = "stats"

    def apply_counters(self, text: str) -> bool:
        """The file the entry script wrote as the container ended; False when it holds no
        figures (then the stats frames stand)."""
        counters = CgroupCounters.parse(text)
        if counters.cpu_seconds is None and counters.memory_peak_bytes is None:
            return False
        with self._lock:
            self._apply(counters)
        return True

    def _apply(self, counters: CgroupCounters) -> None:
        self.cpu_seconds = counters.cpu_seconds
        self.memory_peak_bytes = counters.memory_peak_bytes
        self.read_bytes = counters.read_bytes
        self.write_bytes = counters.write_bytes
        # v2 keeps a peak; v1 only the count at the end, so the frames' largest may be larger.
        self.pids_peak = _larger(counters.pids_peak, self.pids_peak)
        self.io_source = "cgroup"

    def read_counters_file(self, path: Path) -> bool:
        """The file as the container left it: a regular file only, never followed through a
        link nor waited on (a FIFO or device the build put there instead)."""
        try:
            descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            return False
        try:
            if not stat.S_ISREG(os.fstat(descriptor).st_mode):
                return False
            data = os.read(descriptor, FIGURES_FILE_MAX_BYTES)
        except OSError:
            return False
        finally:
            os.close(descriptor)
        return self.apply_counters(data.decode(errors="replace"))


@dataclass
class CgroupCounters:
    """The counters of one container, from either cgroup version."""

    cpu_seconds: float | None = None
    memory_peak_bytes: int | None = None
    read_bytes: int | None = None
    write_bytes: int | None = None
    pids_peak: int | None = None

    @classmethod
    def parse(cls, text: str) -> CgroupCounters:
        sections = _sections(text)
        counters = cls()
        if "memory.peak" in sections or "cpu.stat" in sections:  # cgroup v2
            counters.memory_peak_bytes = _integer(sections.get("memory.peak", ""))
            usage_us = _keyed(sections.get("cpu.stat", "")).get("usage_usec")
            counters.cpu_seconds = usage_us / 1e6 if usage_us is not None else None
            counters.pids_peak = _integer(sections.get("pids.peak", ""))
            read, write = _io_stat(sections.get("io.stat", ""))
        else:
            counters.memory_peak_bytes = _integer(sections.get("memory.max_usage_in_bytes", ""))
            usage_ns = _integer(sections.get("cpuacct.usage", ""))
            counters.cpu_seconds = usage_ns / 1e9 if usage_ns is not None else None
            counters.pids_peak = _integer(sections.get("pids.current", ""))
            read, write = _blkio_lines(sections.get("blkio.throttle.io_service_bytes", ""))
        task = _keyed(sections.get("task.io", "").replace(":", " "))
        counters.read_bytes = _larger(read, task.get("read_bytes"))
        counters.write_bytes = _larger(write, task.get("write_bytes"))
        return counters


def _sections(text: str) -> dict[str, str]:
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        heading = _SECTION.match(line)
        if heading:
            current = sections.setdefault(heading.group(1), [])
        elif current is not None:
            current.append(line)
    return {name: "\n".join(lines) for name, lines in sections.items()}


def _integer(text: str) -> int | None:
    text = text.strip()
    if not text.isdigit() or len(text) > 19:
        return None
    value = int(text)
    return value if value <= _COUNTER_MAX else None


def _keyed(text: str) -> dict[str, int]:
    """`name value` lines (cpu.stat, /proc/PID/io)."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and (value := _integer(parts[1])) is not None:
            values[parts[0]] = value
    return values


def _io_stat(text: str) -> tuple[int | None, int | None]:
    """cgroup v2 `io.stat`: `MAJ:MIN rbytes=N wbytes=N ...` per device."""
    read = write = 0
    for line in text.splitlines():
        for entry in line.split()[1:]:
            name, _, value = entry.partition("=")
            number = _integer(value) or 0
            if name == "rbytes":
                read += number
            elif name == "wbytes":
                write += number
    return (read, write) if text.strip() else (None, None)


def _blkio_lines(text: str) -> tuple[int | None, int | None]:
    """cgroup v1 `blkio.throttle.io_service_bytes`: `MAJ:MIN Read N` per device and op."""
    read = write = 0
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3 and (number := _integer(parts[2])) is not None:
            if parts[1] == "Read":
                read += number
            elif parts[1] == "Write":
                write += number
    return (read, write) if text.strip() else (None, None)


def _larger(first: int | None, second: int | None) -> int | None:
    known = [value for value in (first, second) if value is not None]
    return max(known) if known else None


def _blkio_bytes(blkio: dict[str, Any]) -> tuple[int | None, int | None]:
    entries = blkio.get("io_service_bytes_recursive") or []
    if not entries:
        return None, None
    read = sum(e.get("value", 0) for e in entries if str(e.get("op", "")).lower() == "read")
    write = sum(e.get("value", 0) for e in entries if str(e.get("op", "")).lower() == "write")
    return read, write


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


@dataclass
class DiskAdded:
    """What one attempt added to the partition; None when another attempt ran beside it."""

    bytes: int | None = None
    shared: bool = False


class DiskAddedMeter:
    """Measures the space each attempt adds to the partition (its tree before and after), and
    gives no figure for an attempt that another one overlapped: the partition's growth is then
    theirs together, and cannot be told apart. Their own `write_bytes` remain."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._numbers = itertools.count()
        self._running: dict[int, DiskAdded] = {}

    @contextlib.contextmanager
    def measure(self, root: Path) -> Iterator[DiskAdded]:
        added = DiskAdded()
        with self._lock:
            number = next(self._numbers)
            if self._running:
                added.shared = True
                for other in self._running.values():
                    other.shared = True
            self._running[number] = added
        try:
            before = tree_usage(root) if not added.shared else 0
            yield added
            if not added.shared:
                after = tree_usage(root)
                with self._lock:
                    # A neighbour that started during the last scan makes it shared too.
                    if not added.shared:
                        added.bytes = after - before
        finally:
            with self._lock:
                self._running.pop(number, None)
