"""Checkpoints of the LFS partition between stages: the snapshot store, create/restore.

A snapshot is a directory `<store>/<key>/` holding `manifest.json.zst` (`manifest.json`,
uncompressed, in stores written before) and `archive.tar.zst`.
It is either full, or a delta over an earlier snapshot (`delta_of`, see `chain.py`). Every
manifest is complete: it lists the whole tree, each entry naming the snapshot whose archive
carries it (`layer`), so a restore of a delta replays base, then deltas, and ends with a
tree that must equal the manifest exactly.

`SnapshotStore` is what callers use. It owns the directories, the atomic writes, listing,
lookup and which snapshots a prune keeps; it delegates what archives hold and how a chain
replays to `chain`, the image form to `images`, and putting a restored tree in place to
`swap`.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import zstandard

from orchestrator.checkpoints import archive, chain, extract, images, swap
from orchestrator.checkpoints.chain import PARTIAL_SUFFIX, REBASE_PREFIX
from orchestrator.checkpoints.extract import Layer
from orchestrator.checkpoints.images import IMAGE_REPOSITORY as IMAGE_REPOSITORY
from orchestrator.checkpoints.images import KEY_LABEL as KEY_LABEL
from orchestrator.checkpoints.images import MANIFEST_MEMBER as MANIFEST_MEMBER
from orchestrator.checkpoints.manifest import ARCHIVE_FILES, Manifest, SnapshotError
from orchestrator.checkpoints.mounts import refuse_nested_mounts
from orchestrator.checkpoints.swap import OLD_PREFIX as OLD_PREFIX
from orchestrator.checkpoints.swap import STAGING_PREFIX as STAGING_PREFIX

# Every manifest lists the whole tree (a delta's too): 16 MB of JSON for a whole LFS system,
# 2.5 MB compressed, and a build takes a hundred of them.
MANIFEST = "manifest.json.zst"
PLAIN_MANIFEST = "manifest.json"
MANIFEST_LEVEL = 3
RECENT_MANIFESTS = 4
# Snapshots a prune removes are renamed to this first; a later prune removes a killed one's.
PRUNE_PREFIX = ".pruned-"


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

    def __init__(
        self, root: Path, *, isolate: bool = False, policy: chain.ChainPolicy = chain.DEFAULT_POLICY
    ) -> None:
        """`isolate`: extract this store's archives in a throwaway container, not in the
        host's sandbox (images from elsewhere always go through a container). `policy`: when
        a new snapshot is a delta, and when full."""
        self.root = root
        self.isolate = isolate
        self.policy = policy
        # Deciding between a delta and a full snapshot walks the parent's chain: remembered,
        # so that walk does not parse a whole manifest per layer for every new snapshot.
        self._links: dict[str, chain.ChainLink] = {}
        # Parsing a manifest of a whole root filesystem takes tens of milliseconds, and a
        # restore asks for the same one several times (resolve, chain, check). Keyed by the
        # file's identity too, so a manifest replaced on disk is read again.
        self._recent: dict[str, tuple[tuple[int, int, int], Manifest]] = {}

    # ---- reading

    def directory(self, key: str) -> Path:
        """The directory of snapshot `key` (which may not exist); refuses what is no key."""
        if not key or "/" in key or key.startswith("."):
            raise SnapshotError(f"{key!r} is not a snapshot key")
        return self.root / key

    def manifest_path(self, key: str) -> Path:
        """The manifest file of snapshot `key`: the compressed one unless only a plain one
        (from an older store) is there."""
        directory = self.directory(key)
        plain = directory / PLAIN_MANIFEST
        return (
            plain
            if not (directory / MANIFEST).is_file() and plain.is_file()
            else directory / MANIFEST
        )

    def manifest_json(self, key: str) -> bytes:
        """The manifest of snapshot `key` as JSON bytes, as it was written."""
        return _manifest_bytes(self.manifest_path(key))

    def manifest(self, key: str) -> Manifest:
        """The manifest of snapshot `key`, shared with other callers: do not modify it."""
        try:
            info = self.manifest_path(key).stat()
        except FileNotFoundError:
            self._recent.pop(key, None)
            return self.read_manifest(key)  # raises the readable error
        identity = (info.st_ino, info.st_size, info.st_mtime_ns)
        cached = self._recent.pop(key, None)
        manifest = cached[1] if cached is not None and cached[0] == identity else None
        if manifest is None:
            manifest = self.read_manifest(key)
        self._recent[key] = (identity, manifest)
        while len(self._recent) > RECENT_MANIFESTS:
            del self._recent[next(iter(self._recent))]
        return manifest

    def read_manifest(self, key: str) -> Manifest:
        """The manifest of snapshot `key`, read from disk: a private copy to modify."""
        path = self.manifest_path(key)
        try:
            manifest = Manifest.from_json(orjson.loads(_manifest_bytes(path)))
        except FileNotFoundError:
            raise SnapshotError(
                f"no snapshot {key} in {self.root}", hint="`lfsorch snapshots list` shows them"
            ) from None
        except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
            raise SnapshotError(f"snapshot {key}: manifest {path} is unreadable ({exc})") from None
        if manifest.key != key:  # e.g. a link to another snapshot's manifest
            raise SnapshotError(
                f"snapshot {key}: manifest {path} is unreadable (it is of snapshot "
                f"{str(manifest.key)[:64]!r})"
            )
        return manifest

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
            path=self.directory(manifest.key),
        )

    def link(self, key: str) -> chain.ChainLink:
        """What snapshot `key` is a delta of, and its archive's tar bytes."""
        link = self._links.get(key)
        if link is None:
            manifest = self.manifest(key)
            link = self._links[key] = chain.ChainLink(manifest.delta_of, manifest.raw_size)
        return link

    def has(self, key: str) -> bool:
        """Whether a complete snapshot with this key exists (no manifest is read)."""
        return self.manifest_path(key).is_file()

    def _is_snapshot(self, item: Path) -> bool:
        return not item.name.startswith(".") and self.has(item.name)

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
            if not self._is_snapshot(item):
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
        return chain.manifests_to(key, self.manifest)

    def archive_chunks(self, manifest: Manifest) -> Iterator[bytes]:
        """The decompressed tar stream of a stored snapshot's own archive, digest-checked."""
        path = self.directory(manifest.key) / manifest.archive_file
        if not path.is_file():
            raise SnapshotError(f"{manifest.label}: archive {path} is missing")
        return archive.prefetch(
            archive.decompressed_chunks(
                path, manifest.archive_digest, manifest.label, manifest.digest
            )
        )

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
        delta_over = (
            None if full else chain.delta_base(self, delta_base or parent, tree, self.policy)
        )
        self.root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=self.root))
        try:
            manifest = chain.write_snapshot(
                tree,
                staging,
                key=key,
                stage=stage,
                parent=parent,
                delta_over=delta_over,
                metadata=metadata or {},
            )
            (staging / MANIFEST).write_bytes(_compressed(manifest))
            os.rename(staging, self.directory(key))
            self._links[key] = chain.ChainLink(manifest.delta_of, manifest.raw_size)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return self._info(manifest)

    # ---- checking

    def verify(self, key: str) -> Keys:
        """Problems with a stored snapshot chain, found by running every check a restore
        runs (the same layers, policies and symlink tracking; archive digests, members
        against manifests) without extracting, then comparing the tree the layers build,
        layer by layer, with each manifest."""
        return chain.verify(self, key)

    # ---- restoring

    def restore(self, key_or_stage: str, target: Path, client: Any = None) -> SnapshotInfo:
        """Make `target` equal the snapshot exactly; on any refusal `target` is untouched."""
        info = self.resolve(key_or_stage)
        manifests = self.chain(info.key)
        layers = chain.layers(self, manifests)
        self.restore_layers(layers, manifests[-1], Path(target), client, isolate=self.isolate)
        return info

    def restore_layers(
        self, layers: Layers, final: Manifest, target: Path, client: Any, *, isolate: bool
    ) -> None:
        """Extract `layers` into a fresh directory, check it against `final`, then swap it
        in by rename (`swap.extract_and_swap`)."""
        target = target.absolute()
        refuse_nested_mounts(target, "restore into")
        found = swap.extract_and_swap(layers, final, target, client, isolate=isolate)
        directory = self.directory(final.key)
        if directory.is_dir():  # not yet for an image this store lacks
            chain.write_stat_index(directory, target, found)

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
            chain.rebase(self, key, commit=self._commit_manifest)
        for key in keep:
            relabelled = chain.relabelled(self, key)
            if relabelled is not None:
                self._commit_manifest(relabelled)
        removed = [info.key for info in snapshots if info.key not in keep]
        self._links.clear()
        # Newest first: a delta goes before its base, so a kill leaves no listed orphan.
        for key in reversed(removed):
            doomed = self.root / f"{PRUNE_PREFIX}{key}"
            os.rename(self.directory(key), doomed)
            if doomed.is_symlink():  # the link is the store's; where it leads is not
                doomed.unlink()
            else:
                shutil.rmtree(doomed)
        freed = sum(info.archive_size for info in snapshots) - sum(
            info.archive_size for info in self.list()
        )
        return PruneResult(removed=removed, rebased=rebased, freed_bytes=freed)

    def _commit_manifest(self, manifest: Manifest) -> None:
        """Replace a stored snapshot's manifest in one rename."""
        directory = self.directory(manifest.key)
        chain.replace_file(directory / MANIFEST, _compressed(manifest))
        (directory / PLAIN_MANIFEST).unlink(missing_ok=True)  # the older store's form
        self._links.pop(manifest.key, None)

    def _remove_prune_leftovers(self) -> None:
        """What a killed prune left: scratch trees, half-deleted snapshots, unused archives."""
        if not self.root.is_dir():
            return
        for item in self.root.iterdir():
            if item.name.startswith((REBASE_PREFIX, PRUNE_PREFIX)):
                extract.remove_tree(item)
            elif self._is_snapshot(item):
                in_use = self.manifest(item.name).archive_file
                for name in (*ARCHIVE_FILES, *(n + PARTIAL_SUFFIX for n in ARCHIVE_FILES)):
                    if name != in_use:
                        (item / name).unlink(missing_ok=True)
                for name in (MANIFEST, PLAIN_MANIFEST):
                    (item / (name + PARTIAL_SUFFIX)).unlink(missing_ok=True)
                if (item / MANIFEST).is_file():  # a commit killed before it removed the old form
                    (item / PLAIN_MANIFEST).unlink(missing_ok=True)

    # ---- image form

    def to_image(self, client: Any, key: str) -> str:
        """Import the snapshot as a single-layer image labelled with its key; return its id.

        The layer's first member is the snapshot's manifest (MANIFEST_MEMBER), so a machine
        that pulls the image has what it needs to check the restore without this store.
        """
        return images.to_image(self, client, key)

    def restore_image(self, client: Any, image: str, target: Path) -> SnapshotInfo:
        """Restore `target` from a snapshot image, checked against the manifest it carries.

        Extraction runs in a throwaway container (the image came from elsewhere). A
        snapshot this store lacks is then taken of the restored tree under the image's key,
        so later runs find the checkpoint (a cache hit, `--from`, a delta parent) here too.
        """
        return images.restore_image(self, client, image, target)

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


__all__ = ["PruneResult", "SnapshotInfo", "SnapshotStore"]


def _compressed(manifest: Manifest) -> bytes:
    return zstandard.ZstdCompressor(level=MANIFEST_LEVEL).compress(orjson.dumps(manifest.to_json()))


def _manifest_bytes(path: Path) -> bytes:
    """A manifest file's JSON, decompressed in pieces against the cap: a frame's own size
    field is not to be trusted."""
    data = _read_capped(path, images.MAX_MANIFEST_BYTES)
    if path.name != MANIFEST:
        return data
    out = bytearray()
    try:
        with zstandard.ZstdDecompressor().stream_reader(data) as reader:
            while piece := reader.read(1 << 20):
                out += piece
                if len(out) > images.MAX_MANIFEST_BYTES:
                    raise ValueError(f"over {images.MAX_MANIFEST_BYTES} bytes decompressed")
    except zstandard.ZstdError as exc:
        raise ValueError(f"not zstd data: {exc}") from None
    return bytes(out)


def _read_capped(path: Path, cap: int) -> bytes:
    """A regular file's bytes, refused past `cap` before it is read (the store is not
    trusted: a sparse terabyte, a FIFO or a device must not reach memory)."""
    handle = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(handle, "rb") as source:
        info = os.fstat(source.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ValueError("not a regular file")
        if info.st_size > cap:
            raise ValueError(f"over {cap} bytes")
        data = source.read(cap + 1)
    if len(data) > cap:
        raise ValueError(f"over {cap} bytes")
    return data
