"""Hidden staging directories left by a kill during a snapshot or a restore.

Each is removed only by a command that holds the lock of what it belongs to: the workspace
lock for the snapshot store and the run records, the partition's lock for a restore's
directories inside or beside the partition. Nothing else is ever removed by pattern.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
from pathlib import Path

from orchestrator.checkpoints.extract import remove_tree
from orchestrator.checkpoints.swap import OLD_PREFIX, STAGING_PREFIX
from orchestrator.execution.chroot import CHROOT_BUILD_PREFIX
from orchestrator.workspace import Workspace

FIFO_PREFIX = ".lfsorch-fifo-"
_MKDTEMP = "[a-z0-9_]{8}"
# In the store: a snapshot being written (".<key>.xxxxxxxx"), an image import, a scratch tree.
_STORE_STAGING = re.compile(rf"\..+|tmp{_MKDTEMP}")
_STATE_SCRATCH = re.compile(r"\.state-.+\.json")
_CHROOT_BUILD = re.compile(rf"{re.escape(CHROOT_BUILD_PREFIX)}{_MKDTEMP}")


def _remove(path: Path) -> bool:
    """Remove a leftover without following a symlink that may stand in its place."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return False
    if stat.S_ISDIR(info.st_mode):
        remove_tree(path)
    else:
        os.unlink(path)
    return True


def _matching(directory: Path, pattern: re.Pattern[str]) -> list[Path]:
    try:
        names = os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return [directory / name for name in sorted(names) if pattern.fullmatch(name)]


def partition_leftovers(partition: Path) -> list[Path]:
    """A restore's staging and old trees, inside the partition (a mount point) or beside it."""
    inside = re.compile(
        "("
        + "|".join(re.escape(p) for p in (STAGING_PREFIX, OLD_PREFIX, FIFO_PREFIX))
        + ")"
        + _MKDTEMP
    )
    beside = re.compile(rf"\.{re.escape(partition.name)}\.(restore|old)-{_MKDTEMP}")
    return _matching(partition, inside) + _matching(partition.parent, beside)


def workspace_leftovers(workspace: Workspace) -> list[Path]:
    """Snapshots never finished, scratch trees, half-written run records, and the /build
    trees of chroot packages whose run was killed."""
    found = _matching(workspace.snapshots_dir, _STORE_STAGING)
    with contextlib.suppress(OSError):
        for snapshot in workspace.snapshots_dir.iterdir():
            found += _matching(snapshot, re.compile(r"index-.+\.tmp"))
    for directory in (workspace.root, workspace.partitions_dir, workspace.runs_dir):
        found += _matching(directory, _STATE_SCRATCH)
        with contextlib.suppress(OSError):
            for child in directory.iterdir():
                if directory != workspace.root:
                    found += _matching(child, _STATE_SCRATCH)
                if directory == workspace.runs_dir:
                    found += _matching(child, _CHROOT_BUILD)
    return found


def remove_leftovers(paths: list[Path]) -> list[str]:
    """Remove them; return what was removed."""
    return [str(path) for path in paths if _remove(path)]
