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

from orchestrator.checkpoints.manifest import SnapshotError

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


def refuse_nested_mounts(tree: Path, doing: str) -> None:
    """Refuse to work on a tree with filesystems mounted inside it (chapter 7's /dev etc.)."""
    nested = mounts_below(tree)
    if nested:
        more = f" and {len(nested) - 3} more" if len(nested) > 3 else ""
        raise SnapshotError(
            f"cannot {doing} {tree}: filesystems are mounted inside it "
            f"({', '.join(nested[:3])}{more})",
            hint=f"unmount them first, e.g. `umount -R {nested[0]}`: "
            "a snapshot holds the partition's own files only",
        )
