"""Checkpoints of the LFS partition between stages: store, manifests, keys, create/restore.

A snapshot is a directory `<store>/<key>/` holding `manifest.json` and `archive.tar.zst`.
It is either full, or a delta over an earlier snapshot (`delta_of`): the delta archive holds
only entries whose lstat differs from the parent's manifest (like git's index: size, mtime,
ctime, inode, mode, owner), plus the list of paths to delete. Unchanged files are never read.
Every manifest is complete: it lists the whole tree, each entry naming the snapshot whose
archive carries it (`layer`), so a restore of a delta replays base, then deltas, and ends
with a tree that must equal the manifest exactly.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator import archive
from orchestrator.archive import ArchiveError, Layer, Member, MemberPolicy, UnsafeArchiveError
from orchestrator.errors import LfsorchError

MANIFEST_VERSION = 1
MANIFEST = "manifest.json"
ARCHIVE = "archive.tar.zst"
IMAGE_RECORD = "image.json"
KEY_LABEL = "org.lfsorch.snapshot.key"
STAGE_LABEL = "org.lfsorch.snapshot.stage"
IMAGE_REPOSITORY = "lfsorch/snapshot"
# Deltas of deltas make restores slower and pruning harder; past this depth, take a full one.
MAX_CHAIN = 8

_KINDS = {
    stat.S_IFREG: "file",
    stat.S_IFDIR: "dir",
    stat.S_IFLNK: "symlink",
    stat.S_IFCHR: "chardev",
    stat.S_IFBLK: "blockdev",
    stat.S_IFIFO: "fifo",
}


class SnapshotError(LfsorchError):
    """A snapshot is missing, inconsistent, or cannot be made or restored."""


def snapshot_key(
    stage_definition: str,
    image_digest: str,
    source_checksums: dict[str, str],
    parent_key: str | None,
) -> str:
    """Content address of a stage's inputs: same inputs, same key, across machines."""
    payload = json.dumps(
        {
            "v": MANIFEST_VERSION,
            "stage": stage_definition,
            "image": image_digest,
            "sources": dict(sorted(source_checksums.items())),
            "parent": parent_key,
        },
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(payload.encode()).hexdigest()


# --------------------------------------------------------------------------- manifest


@dataclass
class Entry:
    """One path of the tree. `ino`/`ctime_ns` are the stat cache, not part of the content."""

    path: str
    type: str
    mode: int
    uid: int
    gid: int
    size: int = 0
    mtime_ns: int = 0
    sha256: str | None = None
    link: str | None = None
    dev: tuple[int, int] | None = None
    xattrs: dict[str, str] = field(default_factory=dict)
    hardlink: str | None = None  # first path (in archive order) of the same inode
    layer: str = ""
    ino: int = 0
    ctime_ns: int = 0

    def to_json(self) -> dict[str, Any]:
        # Hand-written: dataclasses.asdict costs seconds on a 100k-entry manifest.
        data: dict[str, Any] = {
            "path": self.path,
            "type": self.type,
            "mode": self.mode,
            "uid": self.uid,
            "gid": self.gid,
            "size": self.size,
            "mtime_ns": self.mtime_ns,
            "sha256": self.sha256,
            "layer": self.layer,
            "ino": self.ino,
            "ctime_ns": self.ctime_ns,
        }
        if self.link is not None:
            data["link"] = self.link
        if self.dev is not None:
            data["dev"] = list(self.dev)
        if self.xattrs:
            data["xattrs"] = self.xattrs
        if self.hardlink is not None:
            data["hardlink"] = self.hardlink
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Entry:
        # Field by field rather than cls(**data): loading the parent manifest is on the
        # incremental snapshot's fixed cost, and this halves it for 100k entries.
        dev = data.get("dev")
        return cls(
            data["path"],
            data["type"],
            data["mode"],
            data["uid"],
            data["gid"],
            data.get("size", 0),
            data.get("mtime_ns", 0),
            data.get("sha256"),
            data.get("link"),
            (dev[0], dev[1]) if dev is not None else None,
            data.get("xattrs") or {},
            data.get("hardlink"),
            data.get("layer", ""),
            data.get("ino", 0),
            data.get("ctime_ns", 0),
        )

    def content(self) -> tuple[Any, ...]:
        """What must match between tree and manifest (no stat-cache fields, no layer)."""
        return (
            self.type,
            self.mode,
            self.uid,
            self.gid,
            self.size,
            self.mtime_ns,
            self.link,
            self.dev,
            self.xattrs,
        )


@dataclass
class Manifest:
    key: str
    stage: str
    parent: str | None
    delta_of: str | None
    created: float
    metadata: dict[str, Any]
    archive_sha256: str
    archive_size: int
    raw_size: int
    deleted: list[str]
    replaced: list[str]
    entries: dict[str, Entry]
    version: int = MANIFEST_VERSION

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "key": self.key,
            "stage": self.stage,
            "parent": self.parent,
            "delta_of": self.delta_of,
            "created": self.created,
            "metadata": self.metadata,
            "archive": {
                "file": ARCHIVE,
                "sha256": self.archive_sha256,
                "size": self.archive_size,
                "raw_size": self.raw_size,
            },
            "deleted": self.deleted,
            "replaced": self.replaced,
            "entries": [entry.to_json() for entry in self.entries.values()],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        if data.get("version") != MANIFEST_VERSION:
            raise SnapshotError(f"snapshot {data.get('key')}: unknown manifest version")
        from_json = Entry.from_json
        entries = [from_json(item) for item in data["entries"]]
        return cls(
            key=data["key"],
            stage=data["stage"],
            parent=data["parent"],
            delta_of=data["delta_of"],
            created=data["created"],
            metadata=data["metadata"],
            archive_sha256=data["archive"]["sha256"],
            archive_size=data["archive"]["size"],
            raw_size=data["archive"]["raw_size"],
            deleted=data["deleted"],
            replaced=data["replaced"],
            entries={entry.path: entry for entry in entries},
        )

    @property
    def label(self) -> str:
        return f"snapshot {self.stage} ({self.key[:12]})"

    @property
    def tree_bytes(self) -> int:
        return sum(e.size for e in self.entries.values() if e.type == "file" and not e.hardlink)

    def symlinks(self) -> set[str]:
        return {path for path, entry in self.entries.items() if entry.type == "symlink"}


@dataclass(frozen=True)
class SnapshotInfo:
    key: str
    stage: str
    parent: str | None
    delta_of: str | None
    created: float
    archive_size: int
    tree_bytes: int
    entries: int
    path: Path


# --------------------------------------------------------------------------- tree walking


Listing = list[tuple[str, str, os.stat_result]]


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


def _entry(tree: Path, path: str, info: os.stat_result, full: str | None = None) -> Entry:
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
    This is the same lstat trust `_stat_changed` puts in the index to decide what to archive.
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


class _Scan:
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
                entry = _entry(self.tree, path, info, full)
            if refuse_block_devices and entry.type == "blockdev":
                raise SnapshotError(
                    f"{self.tree / path} is a block device; snapshots refuse them "
                    "(restores would too)",
                    hint="remove it; an LFS tree needs no block device nodes",
                )
            self.entries[path] = entry
            if entry.type != "dir" and info.st_nlink > 1:
                self._inodes.setdefault(info.st_ino, []).append(path)
            if not changed_only or (fresh and _stat_changed(old, entry)):
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
    scan = _Scan(tree, known)
    for _ in scan.paths():
        pass
    return scan.finish()


def _stat_changed(old: Entry | None, new: Entry) -> bool:
    if old is None:
        return True
    return (old.type, old.mode, old.uid, old.gid, old.size, old.mtime_ns, old.ino,
            old.ctime_ns, old.link, old.dev) != (new.type, new.mode, new.uid, new.gid,
            new.size, new.mtime_ns, new.ino, new.ctime_ns, new.link, new.dev)  # fmt: skip


def _topmost(paths: list[str]) -> list[str]:
    """Drop paths whose ancestor is also listed (deleting the ancestor removes them)."""
    chosen: list[str] = []
    kept: set[str] = set()
    for path in sorted(paths, key=archive.sort_key):
        parts = path.split("/")
        if any("/".join(parts[:i]) in kept for i in range(1, len(parts))):
            continue
        kept.add(path)
        chosen.append(path)
    return chosen


# --------------------------------------------------------------------------- verification


def verify_tree(
    manifest: Manifest, path: Path, *, content: bool = True, fix_dir_mtimes: bool = False
) -> list[str]:
    """Differences between the tree at `path` and the manifest; empty when they are equal.

    With `content`, regular files are re-hashed (the drift check); a restore skips that
    because it already hashed every member while streaming it. `fix_dir_mtimes` resets
    directory mtimes that extraction disturbed (deleting or replacing a child touches them).
    """
    return _verify(manifest, path, content=content, fix_dir_mtimes=fix_dir_mtimes)[0]


def _verify(
    manifest: Manifest, path: Path, *, content: bool, fix_dir_mtimes: bool
) -> tuple[list[str], dict[str, Entry]]:
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
        if content and want.type == "file" and want.sha256 is not None:
            digest = _file_sha256(path / name)
            if digest != want.sha256:
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


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(archive.CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------- the store

# Aliases: inside SnapshotStore, `list` names the method, not the builtin.
Infos = list[SnapshotInfo]
Chain = list[Manifest]
Keys = list[str]
Layers = list[Layer]


class SnapshotStore:
    """Snapshots under one directory (normally `Workspace.snapshots_dir`)."""

    def __init__(self, root: Path, *, isolate: bool = False) -> None:
        """`isolate`: extract this store's archives in a throwaway container, not with the
        host's tar (images from elsewhere always go through a container)."""
        self.root = root
        self.isolate = isolate

    # ---- reading

    def _dir(self, key: str) -> Path:
        if not key or "/" in key or key.startswith("."):
            raise SnapshotError(f"{key!r} is not a snapshot key")
        return self.root / key

    def manifest(self, key: str) -> Manifest:
        path = self._dir(key) / MANIFEST
        try:
            return Manifest.from_json(json.loads(path.read_text()))
        except FileNotFoundError:
            raise SnapshotError(
                f"no snapshot {key} in {self.root}", hint="`lfsorch snapshots list` shows them"
            ) from None
        except (ValueError, KeyError, TypeError) as exc:
            raise SnapshotError(f"snapshot {key}: manifest {path} is unreadable ({exc})") from None

    def _info(self, manifest: Manifest) -> SnapshotInfo:
        return SnapshotInfo(
            key=manifest.key,
            stage=manifest.stage,
            parent=manifest.parent,
            delta_of=manifest.delta_of,
            created=manifest.created,
            archive_size=manifest.archive_size,
            tree_bytes=manifest.tree_bytes,
            entries=len(manifest.entries),
            path=self._dir(manifest.key),
        )

    def get(self, key: str) -> SnapshotInfo | None:
        """The snapshot with this key, or None (a cache miss)."""
        if not (self._dir(key) / MANIFEST).is_file():
            return None
        return self._info(self.manifest(key))

    def list(self) -> Infos:
        """All complete snapshots, oldest first."""
        if not self.root.is_dir():
            return []
        found = [
            self._info(self.manifest(item.name))
            for item in self.root.iterdir()
            if not item.name.startswith(".") and (item / MANIFEST).is_file()
        ]
        return sorted(found, key=lambda info: (info.created, info.key))

    def find_by_stage(self, stage: str) -> SnapshotInfo | None:
        """The newest snapshot taken after `stage`."""
        matches = [info for info in self.list() if info.stage == stage]
        return matches[-1] if matches else None

    def resolve(self, key_or_stage: str) -> SnapshotInfo:
        """A snapshot by full key, unique key prefix, or stage name (newest)."""
        if "/" not in key_or_stage and not key_or_stage.startswith("."):
            exact = self.get(key_or_stage)
            if exact is not None:
                return exact
        by_stage = self.find_by_stage(key_or_stage)
        if by_stage is not None:
            return by_stage
        prefixed = [info for info in self.list() if info.key.startswith(key_or_stage)]
        if len(prefixed) == 1:
            return prefixed[0]
        raise SnapshotError(
            f"no snapshot matches {key_or_stage!r}"
            + (" (the key prefix is ambiguous)" if prefixed else ""),
            hint="`lfsorch snapshots list` shows keys and stages",
        )

    def chain(self, key: str) -> Chain:
        """Manifests from the full base snapshot to `key`."""
        chain = [self.manifest(key)]
        while chain[-1].delta_of is not None:
            if len(chain) > 4 * MAX_CHAIN:
                raise SnapshotError(f"snapshot {key}: delta chain loops or is too long")
            chain.append(self.manifest(chain[-1].delta_of))
        return chain[::-1]

    # ---- creating

    def create(
        self,
        tree: Path,
        key: str,
        *,
        stage: str,
        parent: str | None = None,
        metadata: dict[str, Any] | None = None,
        full: bool = False,
    ) -> SnapshotInfo:
        """Snapshot `tree` under `key`; a delta over `parent` unless `full` or none fits.

        Idempotent: keys address inputs, so an existing snapshot with this key is returned.
        """
        existing = self.get(key)
        if existing is not None:
            return existing
        tree = Path(tree)
        if not tree.is_dir():
            raise SnapshotError(f"cannot snapshot {tree}: not a directory")
        base = self._delta_base(parent, tree) if not full else None
        self.root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=self.root))
        try:
            manifest = self._write(tree, key, stage, parent, base, metadata or {}, staging)
            (staging / MANIFEST).write_text(json.dumps(manifest.to_json(), separators=(",", ":")))
            os.rename(staging, self._dir(key))
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return self._info(manifest)

    def _delta_base(self, parent: str | None, tree: Path) -> Manifest | None:
        if parent is None or not (self._dir(parent) / MANIFEST).is_file():
            return None
        # Each manifest is parsed once: it is the bulk of an incremental snapshot's fixed cost.
        base = self.manifest(parent)
        depth, below = 1, base.delta_of
        while below is not None and depth < MAX_CHAIN:
            depth += 1
            below = self.manifest(below).delta_of
        if depth >= MAX_CHAIN:
            return None
        self._apply_stat_index(base, tree)
        return base

    def _write(
        self,
        tree: Path,
        key: str,
        stage: str,
        parent: str | None,
        base: Manifest | None,
        metadata: dict[str, Any],
        staging: Path,
    ) -> Manifest:
        scan = _Scan(tree, base.entries if base is not None else None)
        archived = scan.paths(changed_only=base is not None, refuse_block_devices=True)
        target = staging / ARCHIVE
        with target.open("wb") as out:
            # The walk feeds tar as it goes (no separate scan before archiving). No fsync:
            # the rename makes an interrupted snapshot invisible, and one damaged by a power
            # cut fails its archive digest, so it is refused, never trusted.
            result = archive.write_archive(tree, archived, out)
        current = scan.finish()
        deleted: list[str] = []
        replaced: list[str] = []
        if base is not None:
            changed = _changed_paths(base, current)
            if len(changed) != len(result.members):
                # A hard-link group only partly changed (tar can only link to a member of
                # the same archive): rare, so simply archive the complete list again.
                with target.open("wb") as out:
                    result = archive.write_archive(tree, changed, out)
            deleted = _topmost([p for p in base.entries if p not in current])
            replaced = [
                p for p in changed
                if p in base.entries and (base.entries[p].type != "dir" or current[p].type != "dir")
            ]  # fmt: skip
        _attach_digests(tree, key, current, result.members)
        if base is not None:
            for path, entry in current.items():
                if entry.layer == "":
                    entry.sha256 = base.entries[path].sha256
                    entry.layer = base.entries[path].layer
        return Manifest(
            key=key,
            stage=stage,
            parent=parent,
            delta_of=base.key if base is not None else None,
            created=time.time(),
            metadata=metadata,
            archive_sha256=result.sha256,
            archive_size=result.size,
            raw_size=result.raw_size,
            deleted=deleted,
            replaced=replaced,
            entries=current,
        )

    # ---- stat index: lets the first snapshot after a restore stay a small delta

    def _index_path(self, key: str, tree: Path) -> Path:
        where = hashlib.sha256(str(tree.resolve()).encode()).hexdigest()[:16]
        return self._dir(key) / f"index-{where}.json"

    def _write_stat_index(self, key: str, tree: Path, found: dict[str, Entry]) -> None:
        """Record inode/ctime of a tree just restored and verified to equal snapshot `key`."""
        stats = {path: [e.ino, e.ctime_ns] for path, e in found.items()}
        index = self._index_path(key, tree)
        scratch = index.with_suffix(".tmp")
        scratch.write_text(json.dumps(stats, separators=(",", ":")))
        os.rename(scratch, index)

    def _apply_stat_index(self, base: Manifest, tree: Path) -> None:
        index = self._index_path(base.key, tree)
        if not index.is_file():
            return
        with contextlib.suppress(ValueError, OSError):
            stats = json.loads(index.read_text())
            for path, (ino, ctime_ns) in stats.items():
                entry = base.entries.get(path)
                if entry is not None:
                    entry.ino, entry.ctime_ns = ino, ctime_ns

    # ---- checking

    def verify(self, key: str) -> Keys:
        """Problems with a stored snapshot chain: archive digests, members vs manifest."""
        problems: Keys = []
        for manifest in self.chain(key):
            try:
                policy = MemberPolicy(manifest.label, max_bytes=manifest.raw_size)
                chunks = self._chunks(manifest)
                members = archive.scan_stream(archive.chunk_stream(chunks), policy, emit=None)
                problems.extend(_members_vs_manifest(manifest, members))
            except LfsorchError as exc:
                problems.append(exc.message)
        return problems

    def _chunks(self, manifest: Manifest) -> Iterator[bytes]:
        path = self._dir(manifest.key) / ARCHIVE
        if not path.is_file():
            raise SnapshotError(f"{manifest.label}: archive {path} is missing")
        return archive.prefetch(
            archive.decompressed_chunks(path, manifest.archive_sha256, manifest.label)
        )

    # ---- restoring

    def restore(self, key_or_stage: str, target: Path, client: Any = None) -> SnapshotInfo:
        """Make `target` equal the snapshot exactly; on any refusal `target` is untouched."""
        info = self.resolve(key_or_stage)
        chain = self.chain(info.key)
        layers = [self._layer(chain, i) for i in range(len(chain))]
        self._restore_layers(layers, chain[-1], Path(target), client, isolate=self.isolate)
        return info

    def _layer(self, chain: Chain, index: int) -> Layer:
        manifest = chain[index]
        symlinks = chain[index - 1].symlinks() if index else set()
        policy = MemberPolicy(manifest.label, symlinks=symlinks, max_bytes=manifest.raw_size)
        expect = {p: e for p, e in manifest.entries.items() if e.layer == manifest.key}
        seen: set[str] = set()

        def check(member: Member) -> None:
            _check_member(manifest, expect, member)
            seen.add(member.name)

        def chunks() -> Iterator[bytes]:
            yield from self._chunks(manifest)
            missing = sorted(set(expect) - seen, key=archive.sort_key)
            if missing:
                raise SnapshotError(f"{manifest.label}: archive lacks {missing[0]!r}")

        delete = sorted({*manifest.deleted, *manifest.replaced}, key=archive.sort_key)
        return Layer(chunks(), policy, delete_before=delete if index else [], on_member=check)

    def _restore_layers(
        self, layers: Layers, final: Manifest, target: Path, client: Any, *, isolate: bool
    ) -> None:
        """Extract into a fresh sibling directory, check it, then swap it in by rename."""
        if isolate and client is None:
            from orchestrator.engine import connect

            client = connect()
        target = target.absolute()
        if os.path.ismount(target):
            raise SnapshotError(
                f"cannot restore into {target}: it is a mount point, and the restore swaps "
                "the directory by rename",
                hint="restore into a directory on that filesystem and bind-mount it instead",
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.restore-", dir=target.parent))
        try:
            if isolate:
                archive.ContainerExtractor(client, staging).extract(layers)
            else:
                archive.HostExtractor(staging).extract(layers)
            differences, found = _verify(final, staging, content=False, fix_dir_mtimes=True)
            if differences:
                shown = "; ".join(differences[:5])
                more = f" (and {len(differences) - 5} more)" if len(differences) > 5 else ""
                raise SnapshotError(f"{final.label}: restored tree differs: {shown}{more}")
            _swap(staging, target)
        except BaseException:
            if staging.exists():
                archive._rmtree(staging)
            raise
        # Renaming the root changed its ctime; every other inode is as the check saw it.
        found["."] = _entry(target, ".", os.lstat(target))
        self._write_stat_index(final.key, target, found)

    # ---- pruning

    def prune(self, keep_last: int | None = None, max_bytes: int | None = None) -> Keys:
        """Remove old snapshots; never one that a kept snapshot's delta chain needs."""
        snapshots = self.list()
        keep = {info.key for info in snapshots[-keep_last:]} if keep_last else set()
        if keep_last is None:
            keep = {info.key for info in snapshots}
        if max_bytes is not None:
            total = 0
            keep = set()
            for info in reversed(snapshots):
                if keep_last is not None and len(keep) >= keep_last:
                    break
                if total + info.archive_size > max_bytes:
                    break
                keep.add(info.key)
                total += info.archive_size
        needed = set(keep)
        for key in keep:
            needed.update(m.key for m in self.chain(key))
        removed: Keys = [info.key for info in snapshots if info.key not in needed]
        for key in removed:
            shutil.rmtree(self._dir(key))
        return removed

    # ---- image form

    def to_image(self, client: Any, key: str) -> str:
        """Import the snapshot as a single-layer image labelled with its key; return its id."""
        manifest = self.manifest(key)
        chain = self.chain(key)
        with contextlib.ExitStack() as stack:
            if len(chain) == 1:
                chunks: Iterator[bytes] = self._chunks(manifest)
            else:
                scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=self.root)))
                tree = scratch / "tree"
                self.restore(key, tree, client)
                chunks = archive.tar_chunks(tree, list(manifest.entries))
            _check_docker_names(manifest)
            digest = hashlib.sha256()

            def counted() -> Iterator[bytes]:
                for chunk in chunks:
                    digest.update(chunk)
                    yield chunk

            answer = client.api.import_image_from_stream(
                counted(),
                repository=IMAGE_REPOSITORY,
                tag=key,
                changes=[f"LABEL {KEY_LABEL}={key}", f"LABEL {STAGE_LABEL}={manifest.stage}"],
            )
        image_id = _imported_id(answer)
        layers = client.api.inspect_image(image_id)["RootFS"]["Layers"]
        if layers != [f"sha256:{digest.hexdigest()}"]:
            raise SnapshotError(f"{manifest.label}: the engine stored a different layer {layers}")
        record = {"image": image_id, "diff_id": layers[0]}
        (self._dir(key) / IMAGE_RECORD).write_text(json.dumps(record))
        return str(image_id)

    def restore_image(self, client: Any, image: str, target: Path) -> SnapshotInfo:
        """Restore `target` from a snapshot image, checked against the local manifest."""
        attrs = client.api.inspect_image(image)
        key = (attrs.get("Config") or {}).get("Labels", {}).get(KEY_LABEL)
        if not key:
            raise SnapshotError(f"image {image} carries no {KEY_LABEL} label")
        manifest = self.manifest(key)
        layers = attrs["RootFS"]["Layers"]
        if len(layers) != 1:
            raise SnapshotError(f"image {image} has {len(layers)} layers; a snapshot has one")
        policy = MemberPolicy(f"image {image[:19]} ({manifest.label})", max_bytes=1 << 42)
        expect = manifest.entries

        def check(member: Member) -> None:
            _check_member(manifest, expect, member)

        chunks = _saved_layer(client, image, layers[0])
        layer = Layer(chunks, policy, on_member=check)
        self._restore_layers([layer], manifest, Path(target), client, isolate=True)
        return self._info(manifest)


# --------------------------------------------------------------------------- helpers


def _changed_paths(base: Manifest, current: dict[str, Entry]) -> list[str]:
    changed = {path for path, e in current.items() if _stat_changed(base.entries.get(path), e)}
    # A hard-link group travels whole: tar can only link to a member of the same archive.
    leaders = {current[p].hardlink or p for p in changed if current[p].type == "file"}
    for path, entry in current.items():
        if entry.hardlink in leaders or (entry.hardlink is None and path in leaders):
            changed.add(path)
    return sorted(changed, key=archive.sort_key)


def _attach_digests(
    tree: Path, key: str, current: dict[str, Entry], members: list[archive.Archived]
) -> None:
    for member in members:
        entry = current.get(member.name)
        kind = "file" if member.kind == "hardlink" else member.kind
        if entry is None or entry.type != kind or _size_differs(entry, member):
            raise SnapshotError(
                f"{tree}: {member.name!r} changed while it was being archived",
                hint="stop whatever writes to the tree (build containers) and snapshot again",
            )
        entry.layer = key
        if member.kind == "file":
            entry.sha256 = member.sha256
    for entry in current.values():
        if entry.layer == key and entry.hardlink is not None:
            entry.sha256 = current[entry.hardlink].sha256


def _members_vs_manifest(manifest: Manifest, members: list[Member]) -> list[str]:
    expect = {p: e for p, e in manifest.entries.items() if e.layer == manifest.key}
    problems = []
    for member in members:
        try:
            _check_member(manifest, expect, member)
        except UnsafeArchiveError as exc:
            problems.append(exc.message)
    names = {member.name for member in members}
    problems.extend(f"{manifest.label}: archive lacks {p!r}" for p in expect if p not in names)
    return problems


def _check_member(manifest: Manifest, expect: dict[str, Entry], member: Member) -> None:
    entry = expect.get(member.name)
    if entry is None:
        raise UnsafeArchiveError(manifest.label, member.name, "is not in the manifest")
    kind = "file" if member.kind == "hardlink" else member.kind
    if (kind, member.uid, member.gid) != (entry.type, entry.uid, entry.gid):
        raise UnsafeArchiveError(manifest.label, member.name, "does not match the manifest")
    digest = member.sha256 or entry.sha256  # extraction skips hashing: the archive digest covers it
    if member.kind == "file" and (member.size, digest) != (entry.size, entry.sha256):
        # Only seen after the data streamed; the staging tree is discarded on this error.
        raise UnsafeArchiveError(manifest.label, member.name, "has content the manifest lacks")


def _check_docker_names(manifest: Manifest) -> None:
    for path in manifest.entries:
        if os.path.basename(path).startswith(".wh."):
            raise SnapshotError(
                f"{manifest.label}: {path!r} would be read as a whiteout by the engine",
                hint="keep the snapshot as an archive; image form cannot hold this name",
            )


def _imported_id(answer: Any) -> str:
    for line in reversed(str(answer).strip().splitlines()):
        with contextlib.suppress(ValueError):
            status = json.loads(line).get("status", "")
            if status.startswith("sha256:"):
                return str(status)
    raise SnapshotError(f"the engine did not report an imported image: {answer}")


def _saved_layer(client: Any, image: str, diff_id: str) -> Iterator[bytes]:
    """The image's single layer tar exactly as imported, checked against its diff id."""
    import tarfile

    stream = archive.chunk_stream(client.api.get_image(image, chunk_size=archive.CHUNK))
    found = 0
    with tarfile.open(fileobj=stream, mode="r|") as outer:
        for item in outer:
            if not item.name.endswith("/layer.tar"):
                continue
            found += 1
            data = outer.extractfile(item)
            assert data is not None
            digest = hashlib.sha256()
            while chunk := data.read(archive.CHUNK):
                digest.update(chunk)
                yield chunk
            if f"sha256:{digest.hexdigest()}" != diff_id:
                raise SnapshotError(f"image {image}: saved layer does not match {diff_id}")
    if found != 1:
        raise SnapshotError(f"image {image}: expected one layer in the saved image, got {found}")


def _swap(staging: Path, target: Path) -> None:
    """Put `staging` in place of `target` by rename; the old tree is removed afterwards."""
    if not target.exists() and not target.is_symlink():
        os.rename(staging, target)
        return
    if not target.is_dir() or target.is_symlink():
        raise SnapshotError(f"cannot restore over {target}: it is not a directory")
    trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.rename(target, trash / "tree")
    os.rename(staging, target)
    archive._rmtree(trash)


__all__ = [
    "ArchiveError",
    "Entry",
    "Manifest",
    "SnapshotError",
    "SnapshotInfo",
    "SnapshotStore",
    "UnsafeArchiveError",
    "snapshot_key",
    "verify_tree",
]


def _size_differs(entry: Entry, member: archive.Archived) -> bool:
    if member.kind == "hardlink":
        return archive.canonical_name(member.linkname) != entry.hardlink
    return member.kind == "file" and member.size != entry.size
