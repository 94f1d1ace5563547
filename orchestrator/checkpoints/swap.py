"""The last step of a restore: extract into a fresh directory, check it against the manifest,
then put it in place of the target by rename.

The fresh directory is a sibling of the target, or, when the target is a mount point (an LFS
partition mounted at $LFS), a hidden directory inside it whose entries are then moved up one
by one: rename cannot cross filesystems.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path
from typing import Any

from orchestrator.checkpoints import extract
from orchestrator.checkpoints.extract import Layer
from orchestrator.checkpoints.manifest import Entry, Manifest, SnapshotError
from orchestrator.checkpoints.treescan import PRIVATE_NAMES, diff_tree, entry_of

# Hidden directories a restore into a mount point works in (inside the mount point).
STAGING_PREFIX = ".lfsorch-restore-"
OLD_PREFIX = ".lfsorch-old-"


def extract_and_swap(
    layers: list[Layer], final: Manifest, target: Path, client: Any, *, isolate: bool
) -> dict[str, Entry]:
    """Make absolute `target` equal `final` from `layers`; on any refusal it is untouched.

    Returns the entries of the restored tree as found on disk (the stat index of `target`).
    """
    in_place = os.path.ismount(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(
        tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=target)
        if in_place
        else tempfile.mkdtemp(prefix=f".{target.name}.restore-", dir=target.parent)
    )
    try:
        extract.confined_extractor(staging, client, isolate=isolate).extract(layers)
        differences, found = diff_tree(final, staging, content=False, fix_dir_mtimes=True)
        if differences:
            shown = "; ".join(differences[:5])
            more = f" (and {len(differences) - 5} more)" if len(differences) > 5 else ""
            raise SnapshotError(f"{final.label}: restored tree differs: {shown}{more}")
        moved = _swap_contents(staging, target) if in_place else _swap(staging, target)
    except BaseException:
        if staging.exists():
            extract.remove_tree(staging)
        raise
    # A rename changes the ctime of what it moves; every other inode is as checked.
    for path in moved:
        found[path] = entry_of(target, path, os.lstat(target / path))
    return found


def _swap(staging: Path, target: Path) -> list[str]:
    """Put `staging` in place of `target` by rename; the old tree is removed afterwards.

    Returns the paths (relative to `target`) whose inodes were renamed.
    """
    if not target.exists() and not target.is_symlink():
        os.rename(staging, target)
        return ["."]
    if not target.is_dir() or target.is_symlink():
        raise SnapshotError(f"cannot restore over {target}: it is not a directory")
    restored_root = os.lstat(staging)  # before moving the marker in changes its mtime
    for name in PRIVATE_NAMES:  # the partition's identity and lock stay with it
        if os.path.lexists(target / name):
            os.rename(target / name, staging / name)
    os.utime(staging, ns=(restored_root.st_atime_ns, restored_root.st_mtime_ns))
    trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.rename(target, trash / "tree")
    os.rename(staging, target)
    extract.remove_tree(trash)
    return ["."]


def _swap_contents(staging: Path, target: Path) -> list[str]:
    """Replace what mount point `target` holds with what `staging` (inside it) holds.

    The old entries go into a hidden directory first, so a crash leaves them recoverable
    rather than half deleted, and the root directory takes the restored root's owner,
    mode, xattrs and times last. Returns the top-level names moved.
    """
    restored_root = os.lstat(staging)  # before moving its entries changes its mtime
    trash = Path(tempfile.mkdtemp(prefix=OLD_PREFIX, dir=target))
    for name in sorted(os.listdir(target)):
        if name not in (staging.name, trash.name) and name not in PRIVATE_NAMES:
            os.rename(target / name, trash / name)
    moved = sorted(os.listdir(staging))
    for name in moved:
        os.rename(staging / name, target / name)
    _copy_xattrs(staging, target)
    os.chown(target, restored_root.st_uid, restored_root.st_gid)
    os.chmod(target, stat.S_IMODE(restored_root.st_mode))
    os.rmdir(staging)
    extract.remove_tree(trash)
    os.utime(target, ns=(restored_root.st_atime_ns, restored_root.st_mtime_ns))
    return [".", *moved]


def _copy_xattrs(source: Path, target: Path) -> None:
    wanted = {
        name: os.getxattr(source, name, follow_symlinks=False)
        for name in os.listxattr(source, follow_symlinks=False)
        if not name.startswith("system.")
    }
    for name in os.listxattr(target, follow_symlinks=False):
        if not name.startswith("system.") and name not in wanted:
            os.removexattr(target, name, follow_symlinks=False)
    for name, value in wanted.items():
        os.setxattr(target, name, value, follow_symlinks=False)
