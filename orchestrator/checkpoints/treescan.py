"""The tree on disk as manifest entries: an lstat walk in archive order, and its checks.

The walk never follows a symlink and yields paths in `archive.sort_key` order, so its names
can feed tar while it runs. An entry a parent manifest already knows, with an untouched
inode, is reused without listxattr/readlink calls. `verify_tree` compares a tree with a
manifest, entry by entry and optionally by content.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

from orchestrator.checkpoints import archive, digests
from orchestrator.checkpoints.manifest import Entry, Manifest, SnapshotError, stat_changed

_KINDS = {
    stat.S_IFREG: "file",
    stat.S_IFDIR: "dir",
    stat.S_IFLNK: "symlink",
    stat.S_IFCHR: "chardev",
    stat.S_IFBLK: "blockdev",
    stat.S_IFIFO: "fifo",
}


Listing = list[tuple[str, str, os.stat_result]]

# lfsorch's own entries at a partition's top (its identity and lock): never part of the tree
# that snapshots, keys, drift checks and restores see, and kept across a restore.
PARTITION_MARKER = ".lfsorch-partition"
PRIVATE_NAMES = frozenset({PARTITION_MARKER})


def _walk(tree: Path) -> Iterator[tuple[str, str, os.stat_result]]:
    """Every path under `tree` as (relative, full, lstat), never following symlinks.

    Yielded in `archive.sort_key` order ("." first, each directory's entries sorted by name,
    a directory's subtree right after it), so nothing has to be sorted afterwards and the
    names can go to tar while the walk is still running.
    """
    root = str(tree)
    yield ".", root, os.lstat(root)
    stack = [iter(_listing(root, ""))]
    while stack:
        for item in stack[-1]:
            yield item
            if stat.S_ISDIR(item[2].st_mode):
                stack.append(iter(_listing(item[1], item[0] + "/")))
                break
        else:
            stack.pop()


def _listing(directory: str, prefix: str) -> Listing:
    with os.scandir(directory) as entries:
        ordered = sorted(entries, key=lambda item: item.name)
    listing: Listing = []
    for item in ordered:
        if not prefix and item.name in PRIVATE_NAMES:
            continue
        info = item.stat(follow_symlinks=False)
        if not stat.S_ISSOCK(info.st_mode):  # runtime artefacts tar cannot store; skipped
            listing.append((prefix + item.name, item.path, info))
    return listing


def _xattrs(path: str) -> dict[str, str]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    return {
        name: os.getxattr(path, name, follow_symlinks=False).hex()
        for name in sorted(names)
        if not name.startswith("system.")  # ACLs: not archived (tar needs --acls for them)
    }


def entry_of(tree: Path, path: str, info: os.stat_result, full: str | None = None) -> Entry:
    """The entry of `path` as it is now. `full` is its path on disk (tree/path if omitted)."""
    kind = _KINDS.get(stat.S_IFMT(info.st_mode))
    if kind is None:
        raise SnapshotError(f"{tree / path}: unsupported file type {oct(info.st_mode)}")
    if full is None:
        full = os.path.join(tree, path)
    entry = Entry(
        path=path,
        type=kind,
        mode=stat.S_IMODE(info.st_mode),
        uid=info.st_uid,
        gid=info.st_gid,
        size=info.st_size if kind == "file" else 0,
        mtime_ns=info.st_mtime_ns,
        ino=info.st_ino,
        ctime_ns=info.st_ctime_ns,
        xattrs=_xattrs(full) if kind != "symlink" else {},
    )
    if kind == "symlink":
        entry.link = os.readlink(full)
    elif kind in ("chardev", "blockdev"):
        entry.dev = (os.major(info.st_rdev), os.minor(info.st_rdev))
    return entry


def _reused(old: Entry | None, info: os.stat_result) -> Entry | None:
    """A copy of `old` if lstat shows the inode untouched since `old` was recorded, else None.

    Setting an xattr or anything else about an inode bumps its ctime, and a symlink's target
    cannot change in place, so equal (inode, ctime, mode, owner, size, mtime) means the xattrs,
    link target and device numbers are still those recorded: no listxattr or readlink needed.
    This is the same lstat trust `stat_changed` puts in the index to decide what to archive.
    """
    if (
        old is None
        or old.ino != info.st_ino
        or old.ctime_ns != info.st_ctime_ns
        or old.mtime_ns != info.st_mtime_ns
        or old.mode != stat.S_IMODE(info.st_mode)
        or _KINDS.get(stat.S_IFMT(info.st_mode)) != old.type
        or old.uid != info.st_uid
        or old.gid != info.st_gid
        or (old.type == "file" and old.size != info.st_size)
    ):
        return None
    return Entry(
        old.path, old.type, old.mode, old.uid, old.gid, old.size, old.mtime_ns, None,
        old.link, old.dev, dict(old.xattrs), None, "", old.ino, old.ctime_ns,
    )  # fmt: skip


class TreeScan:
    """One walk of a tree, building its manifest entries; `paths` drives it lazily."""

    def __init__(self, tree: Path, known: dict[str, Entry] | None = None) -> None:
        self.tree = tree
        self.known = known
        self.entries: dict[str, Entry] = {}
        self._inodes: dict[int, list[str]] = {}

    def paths(
        self, *, changed_only: bool = False, refuse_block_devices: bool = False
    ) -> Iterator[str]:
        """Walk, recording every entry; yield each path (or only those whose lstat differs
        from `known`, the ones a delta must carry)."""
        known = self.known
        for path, full, info in _walk(self.tree):
            old = None if known is None else known.get(path)
            entry = None if old is None else _reused(old, info)
            fresh = entry is None
            if entry is None:
                entry = entry_of(self.tree, path, info, full)
            if refuse_block_devices and entry.type == "blockdev":
                raise SnapshotError(
                    f"{self.tree / path} is a block device; snapshots refuse them "
                    "(restores would too)",
                    hint="remove it; an LFS tree needs no block device nodes",
                )
            self.entries[path] = entry
            if entry.type != "dir" and info.st_nlink > 1:
                self._inodes.setdefault(info.st_ino, []).append(path)
            if not changed_only or (fresh and stat_changed(old, entry)):
                yield path

    def finish(self) -> dict[str, Entry]:
        """The entries in `archive.sort_key` order (the walk's), hard links resolved."""
        for group in self._inodes.values():
            # The first path in archive order carries the data; tar links the later ones.
            for path in group[1:]:
                self.entries[path].hardlink = group[0]
        return self.entries

    def link_groups(self) -> list[list[str]]:
        return [group for group in self._inodes.values() if len(group) > 1]


def scan_tree(tree: Path, *, known: dict[str, Entry] | None = None) -> dict[str, Entry]:
    """Manifest entries (without content digests) of the tree as it is now.

    `known` (a parent manifest's entries with a trusted stat cache) lets unchanged inodes skip
    their listxattr/readlink calls; the result is the same as without it.
    """
    scan = TreeScan(tree, known)
    for _ in scan.paths():
        pass
    return scan.finish()


# --------------------------------------------------------------------------- verification


def verify_tree(
    manifest: Manifest, path: Path, *, content: bool = True, fix_dir_mtimes: bool = False
) -> list[str]:
    """Differences between the tree at `path` and the manifest; empty when they are equal.

    With `content`, regular files are re-hashed (the drift check); a restore skips that
    because it already hashed every member while streaming it. `fix_dir_mtimes` resets
    directory mtimes that extraction disturbed (deleting or replacing a child touches them).
    """
    return diff_tree(manifest, path, content=content, fix_dir_mtimes=fix_dir_mtimes)[0]


def diff_tree(
    manifest: Manifest, path: Path, *, content: bool, fix_dir_mtimes: bool
) -> tuple[list[str], dict[str, Entry]]:
    """`verify_tree`'s differences, and the entries the scan of the tree found."""
    found = scan_tree(path)
    differences: list[str] = []
    expected = manifest.entries
    for name in sorted(set(expected) - set(found), key=archive.sort_key):
        differences.append(f"missing: {name}")
    for name in sorted(set(found) - set(expected), key=archive.sort_key):
        differences.append(f"unexpected: {name}")
    for name, want in expected.items():
        have = found.get(name)
        if have is None:
            continue
        if fix_dir_mtimes and want.type == have.type == "dir" and want.mtime_ns != have.mtime_ns:
            target = path if name == "." else path / name
            os.utime(target, ns=(want.mtime_ns, want.mtime_ns), follow_symlinks=False)
            have.mtime_ns = want.mtime_ns
        differences.extend(_compare(name, want, have))
        if (
            content
            and want.type == "file"
            and want.digest is not None
            and digests.file_digest(path / name, manifest.digest) != want.digest
        ):
            differences.append(f"content differs: {name}")
    return differences, found


def _compare(name: str, want: Entry, have: Entry) -> list[str]:
    fields = ("type", "mode", "uid", "gid", "size", "mtime_ns", "link", "dev", "xattrs")
    out = []
    for attr in fields:
        expected, actual = getattr(want, attr), getattr(have, attr)
        if expected != actual:
            shown = (oct(expected), oct(actual)) if attr == "mode" else (expected, actual)
            out.append(f"{attr} differs: {name} (expected {shown[0]!r}, found {shown[1]!r})")
    if want.hardlink != have.hardlink:
        out.append(f"hard link differs: {name} (expected {want.hardlink}, found {have.hardlink})")
    return out
