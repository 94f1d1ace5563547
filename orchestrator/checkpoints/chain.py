"""Delta chains: a delta's base, what a snapshot's archive carries, the layers a restore or
a check replays, and rebasing a kept delta onto a full snapshot.

A delta archive holds only entries whose lstat differs from the parent's manifest (like
git's index: size, mtime, ctime, inode, mode, owner), plus the list of paths to delete.
Unchanged files are never read. The store (`store.py`) owns the snapshot directories, the
atomic writes and which snapshots a prune keeps; this module, what a chain's archives hold.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from orchestrator.checkpoints import archive, digests, extract, tarstream
from orchestrator.checkpoints.extract import Layer
from orchestrator.checkpoints.manifest import (
    ARCHIVE,
    REBASED_ARCHIVE,
    Entry,
    Manifest,
    SnapshotError,
    attach_digests,
    changed_paths,
    check_member,
    members_vs_manifest,
    topmost,
)
from orchestrator.checkpoints.tarstream import ExtractedTree, Member, MemberPolicy, self_and_parents
from orchestrator.checkpoints.treescan import TreeScan
from orchestrator.errors import LfsorchError

if TYPE_CHECKING:
    from orchestrator.checkpoints.store import SnapshotStore


# When a new snapshot is a delta and when it is full. A restore reads every layer's manifest
# (a third of a second each for a whole LFS system) and every archive of the chain, so a chain
# ends at `max_layers` snapshots, or when its deltas would carry more than `max_delta_share`
# of its full base's bytes: a restore then reads at most 1.5 full archives. A fixed depth
# alone made chapter 8, where most packages change a few MiB of a 3 GiB tree, take a full
# archive every 8 packages: 14 full archives, 10.0 of the build's 12.7 GiB of archives
# (`benchmarks/chain.py --replay` gives 5.0 GiB under this policy).
@dataclasses.dataclass(frozen=True)
class ChainPolicy:
    """How long a chain of deltas may grow: in snapshots, and in its deltas' share of the
    tar bytes of the full snapshot it starts from."""

    max_layers: int = 32
    max_delta_share: float = 0.5


DEFAULT_POLICY = ChainPolicy()
# A chain longer than this cannot have been written by any policy: it loops, or was forged.
MAX_CHAIN = 128
# The scratch tree a rebase restores into, in the store; a later prune removes a killed one's.
REBASE_PREFIX = ".rebase-"
# Written beside its final name, renamed into place when complete.
PARTIAL_SUFFIX = ".partial"


def manifests_to(key: str, manifest_of: Callable[[str], Manifest]) -> list[Manifest]:
    """Manifests from the full base snapshot to `key`."""
    chain = [manifest_of(key)]
    while chain[-1].delta_of is not None:
        if len(chain) > MAX_CHAIN:
            raise SnapshotError(f"snapshot {key}: delta chain loops or is too long")
        chain.append(manifest_of(chain[-1].delta_of))
    return chain[::-1]


# --------------------------------------------------------------------------- writing


@dataclasses.dataclass
class DeltaBase:
    """What a new snapshot may be a delta over: the base's manifest (a private copy, the
    tree's stat index applied) and the tar bytes the delta may carry before a full snapshot
    is the better choice (below zero once the chain carries its share, infinite for a
    policy without one)."""

    manifest: Manifest
    budget: float


@dataclasses.dataclass(frozen=True)
class ChainLink:
    """What walking a chain needs of a snapshot, without its entries."""

    delta_of: str | None
    raw_size: int


def delta_base(
    store: SnapshotStore, parent: str | None, tree: Path, policy: ChainPolicy = DEFAULT_POLICY
) -> DeltaBase | None:
    """The base a snapshot of `tree` is a delta over, or None for a full snapshot."""
    if parent is None or not store.has(parent):
        return None
    layers, carried, link = 1, 0, store.link(parent)
    while link.delta_of is not None:
        if layers >= policy.max_layers:
            return None
        layers, carried = layers + 1, carried + link.raw_size
        link = store.link(link.delta_of)
    if layers >= policy.max_layers:
        return None
    # Once the chain carries its share, only an empty delta (a stage's checkpoint over its
    # last package's tree) stays one.
    budget = policy.max_delta_share * link.raw_size - carried
    base = store.read_manifest(parent)  # a private copy: the stat index is applied to it
    apply_stat_index(store.directory(parent), base, tree)
    return DeltaBase(base, budget)


def _tar_bytes(entries: dict[str, Entry], paths: list[str]) -> int:
    """About what tar writes for `paths`: a ustar and a PAX header each (3 blocks), and each
    inode's data once (the other names of a hard link are headers only), in 512-byte blocks."""
    total = 0
    inodes: set[int] = set()
    for path in paths:
        entry = entries[path]
        total += 3 * 512
        if entry.type == "file" and entry.ino not in inodes:
            inodes.add(entry.ino)
            total += -(-entry.size // 512) * 512
    return total


def write_snapshot(
    tree: Path,
    staging: Path,
    *,
    key: str,
    stage: str,
    parent: str | None,
    delta_over: DeltaBase | None,
    metadata: dict[str, Any],
) -> Manifest:
    """Archive `tree` into `staging` (whole, or what changed since `delta_over`, unless that
    is more than its budget); its manifest."""
    base: Manifest | None = None
    archived: Iterable[str]
    if delta_over is None:
        scan = TreeScan(tree)
        # The walk feeds tar as it goes: no separate scan before archiving.
        archived = scan.paths(refuse_block_devices=True)
    else:
        scan = TreeScan(tree, delta_over.manifest.entries)
        archived = list(scan.paths(changed_only=True, refuse_block_devices=True))
        if archived and _tar_bytes(scan.entries, archived) > delta_over.budget:
            archived = list(scan.entries)  # a full snapshot: e.g. after a chown of every file
        else:
            base = delta_over.manifest
    target = staging / ARCHIVE
    # A delta hashes as its base did: its manifest lists the base's digests too.
    algorithm = base.digest if base is not None else digests.DEFAULT
    result = _write_archive(target, tree, archived, algorithm)
    current = scan.finish()
    deleted: list[str] = []
    replaced: list[str] = []
    if base is not None:
        changed = changed_paths(base, current)
        if len(changed) != len(result.members):
            # A hard-link group only partly changed (tar can only link to a member of the
            # same archive): rare, so simply archive the complete list again.
            result = _write_archive(target, tree, changed, algorithm)
        deleted, replaced = _deleted_and_replaced(base, current, changed)
    attach_digests(tree, key, current, result.members)
    if base is not None:
        _inherit_unchanged(base, current)
    return Manifest(
        key=key,
        stage=stage,
        parent=parent,
        delta_of=base.key if base is not None else None,
        created=time.time(),
        metadata=metadata,
        archive_digest=result.digest,
        archive_size=result.size,
        raw_size=result.raw_size,
        deleted=deleted,
        replaced=replaced,
        entries=current,
        digest=algorithm,
    )


def _write_archive(
    target: Path, tree: Path, paths: Iterable[str], algorithm: str
) -> archive.WriteResult:
    with target.open("wb") as out:
        # No fsync: the rename makes an interrupted snapshot invisible, and one damaged by a
        # power cut fails its archive digest, so it is refused, never trusted.
        return archive.write_archive(tree, paths, out, digest=algorithm)


def _deleted_and_replaced(
    base: Manifest, current: dict[str, Entry], changed: list[str]
) -> tuple[list[str], list[str]]:
    """What a restore of the delta deletes first: paths gone since `base`, and paths whose
    entry a member cannot simply overwrite (anything but a directory staying one)."""
    deleted = topmost([p for p in base.entries if p not in current])
    replaced = [
        p for p in changed
        if p in base.entries and (base.entries[p].type != "dir" or current[p].type != "dir")
    ]  # fmt: skip
    return deleted, replaced


def _inherit_unchanged(base: Manifest, current: dict[str, Entry]) -> None:
    """Entries the delta does not carry keep the digest and layer `base` gave them."""
    for path, entry in current.items():
        if entry.layer == "":
            entry.digest = base.entries[path].digest
            entry.layer = base.entries[path].layer


# ---- stat index: lets the first snapshot after a restore stay a small delta


def index_path(directory: Path, tree: Path) -> Path:
    """Where the snapshot in `directory` keeps the stat index of a tree restored from it."""
    where = hashlib.sha256(str(tree.resolve()).encode()).hexdigest()[:16]
    return directory / f"index-{where}.json"


def replace_file(path: Path, data: bytes) -> None:
    """Write `path` whole by rename, through a fresh file: nothing planted in the store (a
    symlink at a fixed scratch name) can redirect the write."""
    handle, scratch = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        os.rename(scratch, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(scratch)
        raise


def write_stat_index(directory: Path, tree: Path, found: dict[str, Entry]) -> None:
    """Record inode/ctime of a tree just restored and verified to equal the snapshot."""
    stats = {path: [e.ino, e.ctime_ns] for path, e in found.items()}
    replace_file(index_path(directory, tree), orjson.dumps(stats))


def apply_stat_index(directory: Path, base: Manifest, tree: Path) -> None:
    index = index_path(directory, tree)
    if not index.is_file():
        return
    with contextlib.suppress(ValueError, OSError):
        stats = orjson.loads(index.read_bytes())
        for path, (ino, ctime_ns) in stats.items():
            entry = base.entries.get(path)
            if entry is not None:
                entry.ino, entry.ctime_ns = ino, ctime_ns


# --------------------------------------------------------------------------- replaying


def layer(
    store: SnapshotStore,
    chain: list[Manifest],
    index: int,
    tree: ExtractedTree,
    on_checked: Callable[[Member], None] | None = None,
) -> Layer:
    """Layer `index` of the chain, checked against its manifest as it streams
    (`on_checked` sees each member that passed).

    The symlinks it must not write through come from `tree`, which the earlier layers'
    members and deletions filled as they streamed, never from a manifest.
    """
    manifest = chain[index]
    policy = MemberPolicy(manifest.label, tree=tree, max_bytes=manifest.raw_size)
    expect = {p: e for p, e in manifest.entries.items() if e.layer == manifest.key}
    seen: set[str] = set()

    def check(member: Member) -> None:
        check_member(manifest, expect, member)
        seen.add(member.name)
        if on_checked is not None:
            on_checked(member)

    def chunks() -> Iterator[bytes]:
        yield from store.archive_chunks(manifest)
        missing = sorted(set(expect) - seen, key=archive.sort_key)
        if missing:
            raise SnapshotError(f"{manifest.label}: archive lacks {missing[0]!r}")

    delete = sorted({*manifest.deleted, *manifest.replaced}, key=archive.sort_key)
    return Layer(
        chunks(),
        policy,
        delete_before=delete if index else [],
        on_member=check,
        new_hasher=digests.hasher_factory(manifest.digest),
    )


def layers(store: SnapshotStore, chain: list[Manifest]) -> list[Layer]:
    """Every layer of the chain, for a restore."""
    tree = ExtractedTree()  # one for the chain: what the earlier layers really made
    return [layer(store, chain, i, tree) for i in range(len(chain))]


def verify(store: SnapshotStore, key: str) -> list[str]:
    """Problems with a stored snapshot chain (see `SnapshotStore.verify`)."""
    problems: list[str] = []
    chain = store.chain(key)
    tree = ExtractedTree()
    built: dict[str, str] = {}

    def note(member: Member) -> None:
        built[member.name] = "file" if member.kind == "hardlink" else member.kind

    for index, manifest in enumerate(chain):
        checked = layer(store, chain, index, tree, on_checked=note)
        _forget_paths(built, checked.delete_before)
        try:
            extract.check_layer(checked)
        except LfsorchError as exc:
            problems.append(exc.message)
            break  # the layers above it would be checked against a tree never built
        problems.extend(_tree_vs_manifest(built, manifest))
    return problems


def _forget_paths(built: dict[str, str], deleted: list[str]) -> None:
    """Drop deleted paths, and everything below them, from a tree of path -> kind."""
    if not deleted:
        return
    gone = set(deleted)
    for path in [p for p in built if any(q in gone for q in self_and_parents(p))]:
        del built[path]


def _tree_vs_manifest(built: dict[str, str], manifest: Manifest) -> list[str]:
    """Where the tree the layers built so far differs from what the manifest lists."""
    differences = [
        f"lists {path!r} as {entry.type}, the archives make it a {built[path]}"
        if path in built
        else f"lists {path!r}, which no archive creates"
        for path, entry in manifest.entries.items()
        if built.get(path) != entry.type
    ]
    differences += [
        f"lacks {path!r}, a {kind} the archives create"
        for path, kind in built.items()
        if path not in manifest.entries
    ]
    return [f"{manifest.label}: manifest {difference}" for difference in differences[:5]]


# --------------------------------------------------------------------------- rebasing


def rebase(store: SnapshotStore, key: str, commit: Callable[[Manifest], None]) -> None:
    """Turn delta `key` into a full snapshot with the same key and the same tree; `commit`
    replaces its manifest (one rename) once the full archive is checked and in place."""
    old = store.read_manifest(key)  # a private copy: it becomes the new manifest
    directory = store.directory(key)
    scratch = Path(tempfile.mkdtemp(prefix=REBASE_PREFIX, dir=store.root))
    written = directory / f"{REBASED_ARCHIVE}{PARTIAL_SUFFIX}"
    try:
        tree = scratch / "tree"
        store.restore(key, tree)  # checked against the manifest, metadata and archive digests
        index_path(directory, tree).unlink(missing_ok=True)  # the scratch tree's stat index
        _write_full(tree, old, written)
        # Read back from disk: the digests of every file against the manifest's.
        problems = _archive_problems(old, written)
        if problems:
            raise SnapshotError(
                f"{old.label}: the full archive written to rebase it does not match its "
                f"manifest ({problems[0]}); the delta was kept",
                hint="`lfsorch snapshots verify` checks the stored chain",
            )
        os.rename(written, directory / REBASED_ARCHIVE)
        commit(old)
    finally:
        written.unlink(missing_ok=True)
        extract.remove_tree(scratch)
    (directory / ARCHIVE).unlink(missing_ok=True)


def _write_full(tree: Path, manifest: Manifest, written: Path) -> None:
    """Archive all of `tree` into `written`; make `manifest` describe it as a full snapshot."""
    with written.open("wb") as out:
        result = archive.write_archive(tree, list(manifest.entries), out, digest=manifest.digest)
    for entry in manifest.entries.values():
        entry.layer = manifest.key
    manifest.delta_of, manifest.deleted, manifest.replaced = None, [], []
    manifest.archive_file = REBASED_ARCHIVE
    manifest.archive_digest, manifest.archive_size = result.digest, result.size
    manifest.raw_size = result.raw_size


def _archive_problems(manifest: Manifest, path: Path) -> list[str]:
    chunks = archive.decompressed_chunks(
        path, manifest.archive_digest, manifest.label, manifest.digest
    )
    try:
        members = tarstream.scan_stream(
            archive.chunk_stream(chunks),
            MemberPolicy(manifest.label, max_bytes=manifest.raw_size),
            emit=None,
            new_hasher=digests.hasher_factory(manifest.digest),
        )
    except LfsorchError as exc:
        return [exc.message]
    return members_vs_manifest(manifest, members)


def relabelled(store: SnapshotStore, key: str) -> Manifest | None:
    """The manifest of `key` with entries whose layer was pruned carried by the chain's
    (rebased) full base; None when none was."""
    chain = store.chain(key)
    present = {manifest.key for manifest in chain}
    if all(e.layer in present for e in chain[-1].entries.values()):
        return None
    manifest = store.read_manifest(key)
    for entry in manifest.entries.values():
        if entry.layer not in present:
            entry.layer = chain[0].key
    return manifest
