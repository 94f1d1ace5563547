"""Checkpoints of the LFS partition between stages: the snapshot store, create/restore.

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
import itertools
import json
import os
import shutil
import stat
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker.errors
import orjson

from orchestrator.checkpoints import archive, digests, extract, tarstream
from orchestrator.checkpoints.extract import Layer
from orchestrator.checkpoints.manifest import (
    ARCHIVE,
    ARCHIVE_FILES,
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
from orchestrator.checkpoints.mounts import mounts_below
from orchestrator.checkpoints.tarstream import ExtractedTree, Member, MemberPolicy, self_and_parents
from orchestrator.checkpoints.treescan import PRIVATE_NAMES, TreeScan, diff_tree, entry_of
from orchestrator.errors import LfsorchError

MANIFEST = "manifest.json"
IMAGE_RECORD = "image.json"
KEY_LABEL = "org.lfsorch.snapshot.key"
STAGE_LABEL = "org.lfsorch.snapshot.stage"
IMAGE_REPOSITORY = "lfsorch/snapshot"
# First member of a snapshot image's layer: the manifest, for machines without this store.
MANIFEST_MEMBER = ".lfsorch-snapshot-manifest.json"
MAX_MANIFEST_BYTES = 1 << 30
# Deltas of deltas make restores slower and pruning harder; past this depth, take a full one.
MAX_CHAIN = 8
# Hidden directories a restore into a mount point works in (inside the mount point).
STAGING_PREFIX = ".lfsorch-restore-"
OLD_PREFIX = ".lfsorch-old-"
RECENT_MANIFESTS = 4
# Hidden entries of the store a prune works in; a later prune removes what a killed one left.
REBASE_PREFIX = ".rebase-"
PRUNE_PREFIX = ".pruned-"
PARTIAL_SUFFIX = ".partial"


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


@dataclass(frozen=True)
class PruneResult:
    removed: list[str]
    rebased: list[str]  # kept deltas now full snapshots: their bases were removed
    freed_bytes: int


# --------------------------------------------------------------------------- the store

# Aliases: inside SnapshotStore, `list` names the method, not the builtin.
Infos = list[SnapshotInfo]
Chain = list[Manifest]
Keys = list[str]
Layers = list[Layer]


class SnapshotStore:
    """Snapshots under one directory (normally `Workspace.snapshots_dir`)."""

    def __init__(self, root: Path, *, isolate: bool = False) -> None:
        """`isolate`: extract this store's archives in a throwaway container, not in the
        host's sandbox (images from elsewhere always go through a container)."""
        self.root = root
        self.isolate = isolate
        # Parsing a manifest of a whole root filesystem takes tens of milliseconds, and a
        # restore asks for the same one several times (resolve, chain, check). Keyed by the
        # file's identity too, so a manifest replaced on disk is read again.
        self._recent: dict[str, tuple[tuple[int, int, int], Manifest]] = {}

    # ---- reading

    def _dir(self, key: str) -> Path:
        if not key or "/" in key or key.startswith("."):
            raise SnapshotError(f"{key!r} is not a snapshot key")
        return self.root / key

    def manifest(self, key: str) -> Manifest:
        """The manifest of snapshot `key`, shared with other callers: do not modify it."""
        try:
            info = (self._dir(key) / MANIFEST).stat()
        except FileNotFoundError:
            self._recent.pop(key, None)
            return self._read_manifest(key)  # raises the readable error
        identity = (info.st_ino, info.st_size, info.st_mtime_ns)
        cached = self._recent.pop(key, None)
        manifest = cached[1] if cached is not None and cached[0] == identity else None
        if manifest is None:
            manifest = self._read_manifest(key)
        self._recent[key] = (identity, manifest)
        while len(self._recent) > RECENT_MANIFESTS:
            del self._recent[next(iter(self._recent))]
        return manifest

    def _read_manifest(self, key: str) -> Manifest:
        path = self._dir(key) / MANIFEST
        try:
            return Manifest.from_json(orjson.loads(path.read_bytes()))
        except FileNotFoundError:
            raise SnapshotError(
                f"no snapshot {key} in {self.root}", hint="`lfsorch snapshots list` shows them"
            ) from None
        except (ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
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

    def has(self, key: str) -> bool:
        """Whether a complete snapshot with this key exists (no manifest is read)."""
        return (self._dir(key) / MANIFEST).is_file()

    def get(self, key: str) -> SnapshotInfo | None:
        """The snapshot with this key, or None (a cache miss)."""
        if not self.has(key):
            return None
        return self._info(self.manifest(key))

    def list(self, broken: Keys | None = None) -> Infos:
        """All complete snapshots, oldest first. One whose manifest cannot be read is left
        out (and described in `broken`, when given): it must not hide the others."""
        if not self.root.is_dir():
            return []
        found = []
        for item in self.root.iterdir():
            if item.name.startswith(".") or not (item / MANIFEST).is_file():
                continue
            try:
                found.append(self._info(self.manifest(item.name)))
            except SnapshotError as exc:
                if broken is not None:
                    broken.append(exc.message)
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
        delta_base: str | None = None,
    ) -> SnapshotInfo:
        """Snapshot `tree` under `key`; a delta over `delta_base` (by default `parent`, the
        checkpoint it was built on) unless `full` or none fits.

        Idempotent: keys address inputs, so an existing snapshot with this key is returned.
        """
        existing = self.get(key)
        if existing is not None:
            return existing
        tree = Path(tree)
        if not tree.is_dir():
            raise SnapshotError(f"cannot snapshot {tree}: not a directory")
        refuse_nested_mounts(tree.absolute(), "snapshot")
        base = self._delta_base(delta_base or parent, tree) if not full else None
        self.root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=self.root))
        try:
            manifest = self._write(tree, key, stage, parent, base, metadata or {}, staging)
            (staging / MANIFEST).write_bytes(orjson.dumps(manifest.to_json()))
            os.rename(staging, self._dir(key))
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return self._info(manifest)

    def _delta_base(self, parent: str | None, tree: Path) -> Manifest | None:
        if parent is None or not self.has(parent):
            return None
        # Each manifest is parsed once: it is the bulk of an incremental snapshot's fixed cost.
        base = self._read_manifest(parent)  # a private copy: the stat index is applied to it
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
        scan = TreeScan(tree, base.entries if base is not None else None)
        archived = scan.paths(changed_only=base is not None, refuse_block_devices=True)
        target = staging / ARCHIVE
        # A delta hashes as its base did: its manifest lists the base's digests too.
        algorithm = base.digest if base is not None else digests.DEFAULT
        with target.open("wb") as out:
            # The walk feeds tar as it goes (no separate scan before archiving). No fsync:
            # the rename makes an interrupted snapshot invisible, and one damaged by a power
            # cut fails its archive digest, so it is refused, never trusted.
            result = archive.write_archive(tree, archived, out, digest=algorithm)
        current = scan.finish()
        deleted: list[str] = []
        replaced: list[str] = []
        if base is not None:
            changed = changed_paths(base, current)
            if len(changed) != len(result.members):
                # A hard-link group only partly changed (tar can only link to a member of
                # the same archive): rare, so simply archive the complete list again.
                with target.open("wb") as out:
                    result = archive.write_archive(tree, changed, out, digest=algorithm)
            deleted = topmost([p for p in base.entries if p not in current])
            replaced = [
                p for p in changed
                if p in base.entries and (base.entries[p].type != "dir" or current[p].type != "dir")
            ]  # fmt: skip
        attach_digests(tree, key, current, result.members)
        if base is not None:
            for path, entry in current.items():
                if entry.layer == "":
                    entry.digest = base.entries[path].digest
                    entry.layer = base.entries[path].layer
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

    # ---- stat index: lets the first snapshot after a restore stay a small delta

    def _index_path(self, key: str, tree: Path) -> Path:
        where = hashlib.sha256(str(tree.resolve()).encode()).hexdigest()[:16]
        return self._dir(key) / f"index-{where}.json"

    def _write_stat_index(self, key: str, tree: Path, found: dict[str, Entry]) -> None:
        """Record inode/ctime of a tree just restored and verified to equal snapshot `key`."""
        stats = {path: [e.ino, e.ctime_ns] for path, e in found.items()}
        index = self._index_path(key, tree)
        scratch = index.with_suffix(".tmp")
        scratch.write_bytes(orjson.dumps(stats))
        os.rename(scratch, index)

    def _apply_stat_index(self, base: Manifest, tree: Path) -> None:
        index = self._index_path(base.key, tree)
        if not index.is_file():
            return
        with contextlib.suppress(ValueError, OSError):
            stats = orjson.loads(index.read_bytes())
            for path, (ino, ctime_ns) in stats.items():
                entry = base.entries.get(path)
                if entry is not None:
                    entry.ino, entry.ctime_ns = ino, ctime_ns

    # ---- checking

    def verify(self, key: str) -> Keys:
        """Problems with a stored snapshot chain, found by running every check a restore
        runs (the same layers, policies and symlink tracking; archive digests, members
        against manifests) without extracting, then comparing the tree the layers build,
        layer by layer, with each manifest."""
        problems: Keys = []
        chain = self.chain(key)
        tree = ExtractedTree()
        built: dict[str, str] = {}

        def note(member: Member) -> None:
            built[member.name] = "file" if member.kind == "hardlink" else member.kind

        for index, manifest in enumerate(chain):
            layer = self._layer(chain, index, tree, on_checked=note)
            _forget_paths(built, layer.delete_before)
            try:
                extract.check_layer(layer)
            except LfsorchError as exc:
                problems.append(exc.message)
                break  # the layers above it would be checked against a tree never built
            problems.extend(_tree_vs_manifest(built, manifest))
        return problems

    def _chunks(self, manifest: Manifest) -> Iterator[bytes]:
        path = self._dir(manifest.key) / manifest.archive_file
        if not path.is_file():
            raise SnapshotError(f"{manifest.label}: archive {path} is missing")
        return archive.prefetch(
            archive.decompressed_chunks(
                path, manifest.archive_digest, manifest.label, manifest.digest
            )
        )

    # ---- restoring

    def restore(self, key_or_stage: str, target: Path, client: Any = None) -> SnapshotInfo:
        """Make `target` equal the snapshot exactly; on any refusal `target` is untouched."""
        info = self.resolve(key_or_stage)
        chain = self.chain(info.key)
        tree = ExtractedTree()  # one for the chain: what the earlier layers really made
        layers = [self._layer(chain, i, tree) for i in range(len(chain))]
        self._restore_layers(layers, chain[-1], Path(target), client, isolate=self.isolate)
        return info

    def _layer(
        self,
        chain: Chain,
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
            yield from self._chunks(manifest)
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

    def _restore_layers(
        self, layers: Layers, final: Manifest, target: Path, client: Any, *, isolate: bool
    ) -> None:
        """Extract into a fresh directory, check it, then swap it in by rename.

        The fresh directory is a sibling of `target`, or, when `target` is a mount point
        (an LFS partition mounted at $LFS), a hidden directory inside it whose entries are
        then moved up one by one: rename cannot cross filesystems.
        """
        target = target.absolute()
        refuse_nested_mounts(target, "restore into")
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
        if self._dir(final.key).is_dir():  # not yet for an image this store lacks
            self._write_stat_index(final.key, target, found)

    # ---- pruning

    def prune(self, keep_last: int | None = None, max_bytes: int | None = None) -> PruneResult:
        """Remove old snapshots, keeping the newest `keep_last` and/or the newest whose archives
        fit in `max_bytes`; every kept one stays restorable.

        A kept delta whose base goes is first rebased: its tree is restored from its chain,
        archived whole and checked against its manifest, and only then does its manifest
        switch to the new archive (one rename). Deletions come last, each a rename out of
        sight first, so a kill at any point leaves every listed snapshot complete. Run it
        under the workspace lock (`api.prune_snapshots`): builds add and read snapshots.
        """
        self._remove_prune_leftovers()
        snapshots = self.list()
        keep = _kept(snapshots, keep_last, max_bytes, self.chain)
        rebased = [
            info.key
            for info in snapshots
            if info.key in keep and info.delta_of is not None and info.delta_of not in keep
        ]
        for key in rebased:
            self._rebase(key)
        for key in keep:
            self._relabel_layers(key)
        removed = [info.key for info in snapshots if info.key not in keep]
        # Newest first: a delta goes before its base, so a kill leaves no listed orphan.
        for key in reversed(removed):
            doomed = self.root / f"{PRUNE_PREFIX}{key}"
            os.rename(self._dir(key), doomed)
            if doomed.is_symlink():  # the link is the store's; where it leads is not
                doomed.unlink()
            else:
                shutil.rmtree(doomed)
        freed = sum(info.archive_size for info in snapshots) - sum(
            info.archive_size for info in self.list()
        )
        return PruneResult(removed=removed, rebased=rebased, freed_bytes=freed)

    def _rebase(self, key: str) -> None:
        """Turn delta `key` into a full snapshot with the same key and the same tree."""
        old = self._read_manifest(key)  # a private copy: it becomes the new manifest
        directory = self._dir(key)
        scratch = Path(tempfile.mkdtemp(prefix=REBASE_PREFIX, dir=self.root))
        written = directory / f"{REBASED_ARCHIVE}{PARTIAL_SUFFIX}"
        try:
            tree = scratch / "tree"
            self.restore(key, tree)  # checked against the manifest, metadata and archive digests
            self._index_path(key, tree).unlink(missing_ok=True)  # the scratch tree's stat index
            with written.open("wb") as out:
                result = archive.write_archive(tree, list(old.entries), out, digest=old.digest)
            for entry in old.entries.values():
                entry.layer = key
            old.delta_of, old.deleted, old.replaced = None, [], []
            old.archive_file = REBASED_ARCHIVE
            old.archive_digest, old.archive_size = result.digest, result.size
            old.raw_size = result.raw_size
            # Read back from disk: the digests of every file against the manifest's.
            problems = self._archive_problems(old, written)
            if problems:
                raise SnapshotError(
                    f"{old.label}: the full archive written to rebase it does not match its "
                    f"manifest ({problems[0]}); the delta was kept",
                    hint="`lfsorch snapshots verify` checks the stored chain",
                )
            os.rename(written, directory / REBASED_ARCHIVE)
            self._commit_manifest(old)
        finally:
            written.unlink(missing_ok=True)
            extract.remove_tree(scratch)
        (directory / ARCHIVE).unlink(missing_ok=True)

    def _archive_problems(self, manifest: Manifest, path: Path) -> Keys:
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

    def _relabel_layers(self, key: str) -> None:
        """Entries whose layer was pruned are carried by the chain's (rebased) full base."""
        chain = self.chain(key)
        present = {manifest.key for manifest in chain}
        if all(e.layer in present for e in chain[-1].entries.values()):
            return
        manifest = self._read_manifest(key)
        for entry in manifest.entries.values():
            if entry.layer not in present:
                entry.layer = chain[0].key
        self._commit_manifest(manifest)

    def _commit_manifest(self, manifest: Manifest) -> None:
        """Replace a stored snapshot's manifest in one rename."""
        path = self._dir(manifest.key) / MANIFEST
        partial = path.with_name(MANIFEST + PARTIAL_SUFFIX)
        partial.write_bytes(orjson.dumps(manifest.to_json()))
        os.rename(partial, path)

    def _remove_prune_leftovers(self) -> None:
        """What a killed prune left: scratch trees, half-deleted snapshots, unused archives."""
        if not self.root.is_dir():
            return
        for item in self.root.iterdir():
            if item.name.startswith((REBASE_PREFIX, PRUNE_PREFIX)):
                extract.remove_tree(item)
            elif not item.name.startswith(".") and (item / MANIFEST).is_file():
                in_use = self.manifest(item.name).archive_file
                for name in (*ARCHIVE_FILES, *(n + PARTIAL_SUFFIX for n in ARCHIVE_FILES)):
                    if name != in_use:
                        (item / name).unlink(missing_ok=True)
                (item / (MANIFEST + PARTIAL_SUFFIX)).unlink(missing_ok=True)

    # ---- image form

    def to_image(self, client: Any, key: str) -> str:
        """Import the snapshot as a single-layer image labelled with its key; return its id.

        The layer's first member is the snapshot's manifest (MANIFEST_MEMBER), so a machine
        that pulls the image has what it needs to check the restore without this store.
        """
        manifest = self.manifest(key)
        chain = self.chain(key)
        with contextlib.ExitStack() as stack:
            if len(chain) == 1:
                tree_chunks: Iterator[bytes] = self._chunks(manifest)
            else:
                scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=self.root)))
                tree = scratch / "tree"
                self.restore(key, tree, client)
                tree_chunks = archive.tar_chunks(tree, list(manifest.entries))
            _check_docker_names(manifest)
            digest = hashlib.sha256()
            head = _manifest_member((self._dir(key) / MANIFEST).read_bytes(), manifest.created)

            def counted() -> Iterator[bytes]:
                for chunk in itertools.chain([head], tree_chunks):
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
        """Restore `target` from a snapshot image, checked against the manifest it carries.

        Extraction runs in a throwaway container (the image came from elsewhere). A
        snapshot this store lacks is then taken of the restored tree under the image's key,
        so later runs find the checkpoint (a cache hit, `--from`, a delta parent) here too.
        """
        try:
            attrs = client.api.inspect_image(image)
        except docker.errors.NotFound:
            raise SnapshotError(
                f"no image {image} in the engine",
                hint="`docker pull` it first (or `lfsorch snapshots pull IMAGE`)",
            ) from None
        key = (attrs.get("Config") or {}).get("Labels", {}).get(KEY_LABEL)
        if not key:
            raise SnapshotError(f"image {image} carries no {KEY_LABEL} label")
        self._dir(key)  # refuses a label that is not a key
        layers = attrs["RootFS"]["Layers"]
        if len(layers) != 1:
            raise SnapshotError(f"image {image} has {len(layers)} layers; a snapshot has one")
        source = f"image {image[:19]}"
        embedded, chunks = _split_manifest(_saved_layer(client, image, layers[0]), source)
        try:
            manifest = Manifest.from_json(orjson.loads(embedded))
        except (ValueError, KeyError, TypeError) as exc:
            raise SnapshotError(f"{source}: its snapshot manifest is unreadable ({exc})") from None
        if manifest.key != key:
            raise SnapshotError(
                f"{source}: labelled {key[:12]} but carries the manifest of {manifest.key[:12]}"
            )
        local = self.get(key)
        if local is not None and _contents(self.manifest(key)) != _contents(manifest):
            raise SnapshotError(
                f"{source}: its manifest differs from this store's snapshot {key[:12]}",
                hint="one of them was altered; `lfsorch snapshots verify` checks the local one",
            )
        policy = MemberPolicy(f"{source} ({manifest.label})", max_bytes=1 << 42)
        expect = manifest.entries

        def check(member: Member) -> None:
            check_member(manifest, expect, member)

        layer = Layer(chunks, policy, on_member=check)
        self._restore_layers([layer], manifest, Path(target), client, isolate=True)
        if local is not None:
            return local
        return self.create(
            Path(target),
            key,
            stage=manifest.stage,
            parent=manifest.parent,
            metadata=manifest.metadata,
            full=True,
        )

    def import_image(self, client: Any, image: str) -> SnapshotInfo:
        """Add the snapshot a snapshot image holds to this store, touching no partition.

        A run on a fresh partition then finds it: its stage is a cache hit, and the stages
        before it are covered by it (keys chain).
        """
        self.root.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=".import-", dir=self.root))
        try:
            return self.restore_image(client, image, scratch / "tree")
        finally:
            extract.remove_tree(scratch)


# --------------------------------------------------------------------------- helpers


def _forget_paths(built: dict[str, str], deleted: list[str]) -> None:
    """Drop deleted paths, and everything below them, from a tree of path -> kind."""
    if not deleted:
        return
    gone = set(deleted)
    for path in [p for p in built if any(q in gone for q in self_and_parents(p))]:
        del built[path]


def _tree_vs_manifest(built: dict[str, str], manifest: Manifest) -> Keys:
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


def _kept(
    snapshots: Infos,
    keep_last: int | None,
    max_bytes: int | None,
    chain: Callable[[str], Chain],
) -> set[str]:
    """The snapshots a prune keeps: the newest `keep_last`, and (with `max_bytes`) the newest
    ones whose archives, with those of the chains they stand on, fit in `max_bytes`.

    A chain's archives are counted whole: rebasing a delta onto a full snapshot yields an
    archive no larger than its chain's, whose bytes then hold superseded files too.
    """
    newest_first = snapshots[::-1]
    if keep_last is not None:
        newest_first = newest_first[:keep_last]
    if max_bytes is None:
        return {info.key for info in newest_first}
    keep: set[str] = set()
    counted: dict[str, int] = {}
    for info in newest_first:
        needed = {m.key: m.archive_size for m in chain(info.key) if m.key not in counted}
        if sum(counted.values()) + sum(needed.values()) > max_bytes:
            break
        counted.update(needed)
        keep.add(info.key)
    return keep


def _check_docker_names(manifest: Manifest) -> None:
    for path in manifest.entries:
        if os.path.basename(path).startswith(".wh."):
            raise SnapshotError(
                f"{manifest.label}: {path!r} would be read as a whiteout by the engine",
                hint="keep the snapshot as an archive; image form cannot hold this name",
            )


def _manifest_member(manifest_json: bytes, created: float) -> bytes:
    """The tar member (header, data, padding) that carries a manifest in an image layer."""
    info = tarfile.TarInfo(MANIFEST_MEMBER)
    info.size = len(manifest_json)
    info.mode = 0o644
    info.mtime = int(created)
    header = info.tobuf(format=tarfile.USTAR_FORMAT)
    return header + manifest_json + bytes(tarstream.padded_size(info.size) - info.size)


def _split_manifest(chunks: Iterator[bytes], source: str) -> tuple[bytes, Iterator[bytes]]:
    """Take the manifest member off the head of a layer; return it and the rest of the layer.

    The rest is a tar stream of its own (members start on block boundaries), which goes
    through the usual validation; this member is never extracted.
    """
    buffer = bytearray()

    def fill(size: int) -> None:
        while len(buffer) < size:
            chunk = next(chunks, None)
            if chunk is None:
                raise SnapshotError(f"{source}: the layer ends inside its snapshot manifest")
            buffer.extend(chunk)

    fill(tarstream.BLOCK)
    try:
        header = bytes(buffer[: tarstream.BLOCK])
        info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
    except tarfile.TarError as exc:
        reason = f"the layer does not start with a tar header ({exc})"
        raise SnapshotError(f"{source}: {reason}") from None
    if info.name != MANIFEST_MEMBER or not info.isreg() or info.size > MAX_MANIFEST_BYTES:
        raise SnapshotError(
            f"{source}: the layer does not start with a snapshot manifest (found {info.name!r})",
            hint="only images made by `lfsorch snapshots image` can be restored",
        )
    end = tarstream.BLOCK + tarstream.padded_size(info.size)
    fill(end)
    manifest_json = bytes(buffer[tarstream.BLOCK : tarstream.BLOCK + info.size])
    rest = bytes(buffer[end:])
    return manifest_json, itertools.chain([rest] if rest else [], chunks)


def _contents(manifest: Manifest) -> dict[str, tuple[Any, ...]]:
    return {path: entry.content() for path, entry in manifest.entries.items()}


def _imported_id(answer: Any) -> str:
    for line in reversed(str(answer).strip().splitlines()):
        with contextlib.suppress(ValueError):
            status = json.loads(line).get("status", "")
            if status.startswith("sha256:"):
                return str(status)
    raise SnapshotError(f"the engine did not report an imported image: {answer}")


def _saved_layer(client: Any, image: str, diff_id: str) -> Iterator[bytes]:
    """The image's single layer tar exactly as imported, checked against its diff id."""
    stream = archive.chunk_stream(client.api.get_image(image, chunk_size=tarstream.CHUNK))
    found = 0
    with tarfile.open(fileobj=stream, mode="r|") as outer:
        for item in outer:
            if not item.name.endswith("/layer.tar"):
                continue
            found += 1
            data = outer.extractfile(item)
            assert data is not None
            digest = hashlib.sha256()
            while chunk := data.read(tarstream.CHUNK):
                digest.update(chunk)
                yield chunk
            if f"sha256:{digest.hexdigest()}" != diff_id:
                raise SnapshotError(f"image {image}: saved layer does not match {diff_id}")
    if found != 1:
        raise SnapshotError(f"image {image}: expected one layer in the saved image, got {found}")


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


def _swap(staging: Path, target: Path) -> list[str]:
    """Put `staging` in place of `target` by rename; the old tree is removed afterwards.

    Returns the paths (relative to `target`) whose inodes were renamed.
    """
    if not target.exists() and not target.is_symlink():
        os.rename(staging, target)
        return ["."]
    if not target.is_dir() or target.is_symlink():
        raise SnapshotError(f"cannot restore over {target}: it is not a directory")
    for name in PRIVATE_NAMES:  # the partition's identity and lock stay with it
        if os.path.lexists(target / name):
            os.rename(target / name, staging / name)
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


__all__ = ["PruneResult", "SnapshotInfo", "SnapshotStore"]
