"""Two snapshots of the same inputs compared entry by entry, and their files read back.

What two builds may legitimately differ in is left out: the stat cache (inode, ctime), which
archive carries an entry, and modification times. A build writes its files at the time it
runs; SOURCE_DATE_EPOCH fixes the dates tools write *into* files (archive headers, gzip
headers, .pyc), never the mtime the kernel gives a file it writes, so two real builds always
differ there and comparing mtimes would report every file.
"""

from __future__ import annotations

import shutil
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.checkpoints import archive
from orchestrator.checkpoints.manifest import Entry, Manifest, SnapshotError
from orchestrator.checkpoints.store import SnapshotStore
from orchestrator.checkpoints.tarstream import canonical_name

# The kinds of difference, in the order a report lists them.
ONLY_IN_A = "only in build a"
ONLY_IN_B = "only in build b"
TYPE = "type"
CONTENT = "content"
MODE = "mode"
OWNER = "owner"
LINK_TARGET = "link target"
DEVICE = "device numbers"
XATTRS = "xattrs"
HARD_LINK = "hard link"
MTIMES_NOT_COMPARED = (
    "mtimes are not compared: a build gives the files it writes the time it runs, and "
    "SOURCE_DATE_EPOCH fixes only the dates tools write into files, so two builds always "
    "differ there"
)


@dataclass(frozen=True)
class EntryDifference:
    """One path whose entries differ; `kinds` in report order, each with its two values."""

    path: str
    kinds: list[str]
    values: dict[str, tuple[Any, Any]] = field(default_factory=dict)

    def describe(self) -> str:
        """`usr/bin/x: mode (0o755 / 0o700), owner (0:0 / 1000:1000)`."""
        parts = []
        for kind in self.kinds:
            shown = self.values.get(kind)
            parts.append(kind if shown is None else f"{kind} ({shown[0]} / {shown[1]})")
        return f"{self.path}: {', '.join(parts)}"

    def as_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "kinds": self.kinds,
            "values": {kind: list(pair) for kind, pair in self.values.items()},
        }


def compare_manifests(a: Manifest, b: Manifest) -> tuple[int, list[EntryDifference]]:
    """How many paths are identical in both, and how every other path differs, in archive
    order (a directory before what it holds)."""
    identical = 0
    differences: list[EntryDifference] = []
    for path in sorted(set(a.entries) | set(b.entries), key=archive.sort_key):
        left, right = a.entries.get(path), b.entries.get(path)
        if left is None or right is None:
            differences.append(EntryDifference(path, [ONLY_IN_B if left is None else ONLY_IN_A]))
            continue
        same_digests = a.digest == b.digest
        found = entry_difference(path, left, right, same_digests)
        if found is None:
            identical += 1
        else:
            differences.append(found)
    return identical, differences


def entry_difference(
    path: str, a: Entry, b: Entry, compare_digests: bool = True
) -> EntryDifference | None:
    """How entry `a` differs from `b` (None: not at all, mtimes aside)."""
    values: dict[str, tuple[Any, Any]] = {}
    if a.type != b.type:
        values[TYPE] = (a.type, b.type)
    elif a.type == "file" and (a.size != b.size or (compare_digests and a.digest != b.digest)):
        values[CONTENT] = (f"{a.size} bytes", f"{b.size} bytes")
    if a.mode != b.mode:
        values[MODE] = (oct(a.mode), oct(b.mode))
    if (a.uid, a.gid) != (b.uid, b.gid):
        values[OWNER] = (f"{a.uid}:{a.gid}", f"{b.uid}:{b.gid}")
    if a.type == b.type and a.link != b.link:
        values[LINK_TARGET] = (a.link, b.link)
    if a.type == b.type and a.dev != b.dev:
        values[DEVICE] = (_device(a.dev), _device(b.dev))
    if a.xattrs != b.xattrs:
        values[XATTRS] = (_names(a.xattrs), _names(b.xattrs))
    if a.type == b.type and a.hardlink != b.hardlink:
        values[HARD_LINK] = (a.hardlink or "none", b.hardlink or "none")
    if not values:
        return None
    return EntryDifference(path, list(values), values)


def _names(xattrs: dict[str, str]) -> str:
    return ",".join(sorted(xattrs)) or "none"


def _device(dev: tuple[int, int] | None) -> str:
    return "none" if dev is None else f"{dev[0]}:{dev[1]}"


def content_differs(difference: EntryDifference) -> bool:
    return CONTENT in difference.kinds


def extract_files(store: SnapshotStore, manifest: Manifest, wanted: dict[str, Path]) -> None:
    """Write the content each regular file `path` of `wanted` has in snapshot `manifest` to
    `wanted[path]`.

    The bytes come from the archive of the snapshot that carries each entry (for a hard link,
    its group's first path), read once per archive; only those members' data is written,
    under names the caller chose, so nothing in an archive decides where anything goes.
    """
    by_layer: dict[str, dict[str, list[Path]]] = {}
    for path, dest in wanted.items():
        entry = manifest.entries.get(path)
        if entry is None or entry.type != "file":
            raise SnapshotError(f"{manifest.label}: {path!r} is no regular file")
        members = by_layer.setdefault(entry.layer or manifest.key, {})
        members.setdefault(entry.hardlink or path, []).append(dest)
    for layer, members in by_layer.items():
        carrier = manifest if layer == manifest.key else store.manifest(layer)
        _copy_members(store, carrier, members)


def _copy_members(store: SnapshotStore, carrier: Manifest, members: dict[str, list[Path]]) -> None:
    left = dict(members)
    stream = archive.chunk_stream(store.archive_chunks(carrier))
    with tarfile.open(fileobj=stream, mode="r|") as archived:
        for member in archived:
            dests = left.pop(canonical_name(member.name), None)
            data = archived.extractfile(member) if dests else None
            if dests is None or data is None:
                continue
            with dests[0].open("wb") as out:
                while chunk := data.read(1 << 20):
                    out.write(chunk)
            for other in dests[1:]:
                shutil.copyfile(dests[0], other)
            if not left:
                return
    raise SnapshotError(f"{carrier.label}: the archive lacks {', '.join(map(repr, left))}")
