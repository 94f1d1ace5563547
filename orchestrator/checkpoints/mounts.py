"""What is mounted where, from /proc/self/mountinfo.

An LFS partition is normally a mount point itself ($LFS, /mnt/lfs), and after chapter 7 by
hand it may still have the host's /dev, /proc, /sys and /run bind-mounted below it. A
snapshot must not walk into those, and a restore must never move or delete through them:
removing an old tree with the host's /dev bound inside it would delete the host's devices.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

MOUNTINFO = Path("/proc/self/mountinfo")
_ESCAPE = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    """Mount points escape space, tab, newline and backslash as \\ooo octal."""
    return _ESCAPE.sub(lambda match: chr(int(match.group(1), 8)), field)


def mount_points(mountinfo: Path = MOUNTINFO) -> list[str]:
    """Every mount point this process sees, in mount order."""
    try:
        text = mountinfo.read_text()
    except OSError:
        return []
    return [_unescape(line.split(" ")[4]) for line in text.splitlines() if line.count(" ") >= 4]


def mounts_below(path: Path, mountinfo: Path = MOUNTINFO) -> list[str]:
    """Mount points strictly inside `path` (symlinks in `path` resolved), sorted."""
    root = os.path.realpath(path)
    prefix = root.rstrip("/") + "/"
    return sorted({point for point in mount_points(mountinfo) if point.startswith(prefix)})
