"""Snapshot manifests: every path of a tree with its metadata, and the checks against them.

Every manifest is complete: it lists the whole tree, each entry naming the snapshot whose
archive carries it (`layer`), so a restore of a delta replays base, then deltas, and ends
with a tree that must equal the manifest exactly. The entries' `ino`/`ctime_ns` are a stat
cache (like git's index): a delta carries only the entries whose lstat differs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.checkpoints import archive, digests, tarstream
from orchestrator.checkpoints.tarstream import Member, UnsafeArchiveError
from orchestrator.errors import LfsorchError

# 1: the archive's and the files' digests are sha256. 2: the manifest names the algorithm.
MANIFEST_VERSION = 2
READABLE_VERSIONS = (1, 2)
# Part of every checkpoint key: bumping it would turn every stored checkpoint into a miss.
KEY_VERSION = 1
ARCHIVE = "archive.tar.zst"
# The archive a delta is rebased into (`SnapshotStore.prune`): a new name, so the switch from
# the delta to it is one atomic rename of the manifest.
REBASED_ARCHIVE = "archive-full.tar.zst"
ARCHIVE_FILES = (ARCHIVE, REBASED_ARCHIVE)


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
            "v": KEY_VERSION,
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
    digest: str | None = None  # of a regular file's content, in the manifest's algorithm
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
            "digest": self.digest,
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
            data["digest"] if "digest" in data else data.get("sha256"),  # version 1: sha256
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
    archive_digest: str  # of the compressed archive, in `digest` like the files
    archive_size: int
    raw_size: int
    deleted: list[str]
    replaced: list[str]
    entries: dict[str, Entry]
    version: int = MANIFEST_VERSION  # as read
    digest: str = digests.DEFAULT  # the algorithm of the entries' content digests
    archive_file: str = ARCHIVE

    def to_json(self) -> dict[str, Any]:
        return {
            "version": MANIFEST_VERSION,  # the format written, whatever `version` was read
            "key": self.key,
            "stage": self.stage,
            "parent": self.parent,
            "delta_of": self.delta_of,
            "created": self.created,
            "metadata": self.metadata,
            "digest": self.digest,
            "archive": {
                "file": self.archive_file,
                "digest": self.archive_digest,
                "size": self.archive_size,
                "raw_size": self.raw_size,
            },
            "deleted": self.deleted,
            "replaced": self.replaced,
            "entries": [entry.to_json() for entry in self.entries.values()],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        version = data.get("version")
        if version not in READABLE_VERSIONS:
            raise SnapshotError(
                f"snapshot {data.get('key')}: unknown manifest version {version!r}",
                hint="a newer lfsorch wrote it; upgrade to read it",
            )
        digest = data["digest"] if version >= 2 else digests.LEGACY
        digests.hasher_factory(digest)  # refuses an unknown algorithm before any use
        archive_file = data["archive"].get("file", ARCHIVE)
        if archive_file not in ARCHIVE_FILES:
            raise SnapshotError(f"snapshot {data.get('key')}: unknown archive {archive_file!r}")
        sizes = (data["archive"]["size"], data["archive"]["raw_size"])
        if not all(type(size) is int and size >= 0 for size in sizes):
            raise SnapshotError(
                f"snapshot {data.get('key')}: archive sizes {sizes!r} are not sizes"
            )
        if not all(isinstance(data[name], str | None) for name in ("parent", "delta_of")):
            raise SnapshotError(f"snapshot {data.get('key')}: parent or base is not a key")
        from_json = Entry.from_json
        entries = [from_json(item) for item in data["entries"]]
        return cls(
            key=data["key"],
            stage=data["stage"],
            parent=data["parent"],
            delta_of=data["delta_of"],
            created=data["created"],
            metadata=data["metadata"],
            archive_digest=data["archive"]["digest" if version >= 2 else "sha256"],
            archive_size=data["archive"]["size"],
            raw_size=data["archive"]["raw_size"],
            deleted=data["deleted"],
            replaced=data["replaced"],
            entries={entry.path: entry for entry in entries},
            version=version,
            digest=digest,
            archive_file=archive_file,
        )

    @property
    def label(self) -> str:
        return f"snapshot {self.stage} ({self.key[:12]})"

    @property
    def tree_bytes(self) -> int:
        return sum(e.size for e in self.entries.values() if e.type == "file" and not e.hardlink)

    def symlinks(self) -> set[str]:
        return {path for path, entry in self.entries.items() if entry.type == "symlink"}


# --------------------------------------------------------------------------- comparisons


def stat_changed(old: Entry | None, new: Entry) -> bool:
    """Whether lstat shows `new` differs from `old` (the test for what a delta carries)."""
    if old is None:
        return True
    return (old.type, old.mode, old.uid, old.gid, old.size, old.mtime_ns, old.ino,
            old.ctime_ns, old.link, old.dev) != (new.type, new.mode, new.uid, new.gid,
            new.size, new.mtime_ns, new.ino, new.ctime_ns, new.link, new.dev)  # fmt: skip


def topmost(paths: list[str]) -> list[str]:
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


def changed_paths(base: Manifest, current: dict[str, Entry]) -> list[str]:
    """Paths a delta over `base` must carry, whole hard-link groups included."""
    changed = {path for path, e in current.items() if stat_changed(base.entries.get(path), e)}
    # A hard-link group travels whole: tar can only link to a member of the same archive.
    leaders = {current[p].hardlink or p for p in changed if current[p].type == "file"}
    for path, entry in current.items():
        if entry.hardlink in leaders or (entry.hardlink is None and path in leaders):
            changed.add(path)
    return sorted(changed, key=archive.sort_key)


def attach_digests(
    tree: Path, key: str, current: dict[str, Entry], members: list[archive.Archived]
) -> None:
    """Record in `current` the digests and layer of what was just archived under `key`."""
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
            entry.digest = member.digest
    for entry in current.values():
        if entry.layer == key and entry.hardlink is not None:
            entry.digest = current[entry.hardlink].digest


def _size_differs(entry: Entry, member: archive.Archived) -> bool:
    if member.kind == "hardlink":
        return tarstream.canonical_name(member.linkname) != entry.hardlink
    return member.kind == "file" and member.size != entry.size


def members_vs_manifest(manifest: Manifest, members: list[Member]) -> list[str]:
    """Problems of an archive's members against the entries its manifest says it carries."""
    expect = {p: e for p, e in manifest.entries.items() if e.layer == manifest.key}
    problems = []
    for member in members:
        try:
            check_member(manifest, expect, member)
        except UnsafeArchiveError as exc:
            problems.append(exc.message)
    names = {member.name for member in members}
    problems.extend(f"{manifest.label}: archive lacks {p!r}" for p in expect if p not in names)
    return problems


def check_member(manifest: Manifest, expect: dict[str, Entry], member: Member) -> None:
    """Refuse a member that is not the entry `expect` names for it."""
    entry = expect.get(member.name)
    if entry is None:
        raise UnsafeArchiveError(manifest.label, member.name, "is not in the manifest")
    kind = "file" if member.kind == "hardlink" else member.kind
    if (kind, member.uid, member.gid) != (entry.type, entry.uid, entry.gid):
        raise UnsafeArchiveError(manifest.label, member.name, "does not match the manifest")
    # Extraction skips hashing (the archive digest covers it); `verify` hashes in the
    # manifest's algorithm.
    digest = member.sha256 or entry.digest
    if member.kind == "file" and (member.size, digest) != (entry.size, entry.digest):
        # Only seen after the data streamed; the staging tree is discarded on this error.
        raise UnsafeArchiveError(manifest.label, member.name, "has content the manifest lacks")
