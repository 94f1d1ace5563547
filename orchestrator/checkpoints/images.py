"""Snapshots as single-layer Docker images, so a CI runner can push and pull them.

The layer's first member is the snapshot's manifest (MANIFEST_MEMBER, never extracted), so
a machine that pulls the image can check a restore without the store that made it; the
rest of the layer is validated like an archive and extracted in a throwaway container.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import docker.errors
import orjson

from orchestrator.checkpoints import archive, tarstream
from orchestrator.checkpoints.chain import replace_file
from orchestrator.checkpoints.extract import Layer
from orchestrator.checkpoints.manifest import Manifest, SnapshotError, check_member
from orchestrator.checkpoints.tarstream import Member, MemberPolicy

if TYPE_CHECKING:
    from orchestrator.checkpoints.store import SnapshotInfo, SnapshotStore

IMAGE_RECORD = "image.json"
KEY_LABEL = "org.lfsorch.snapshot.key"
STAGE_LABEL = "org.lfsorch.snapshot.stage"
IMAGE_REPOSITORY = "lfsorch/snapshot"
# First member of a snapshot image's layer: the manifest, for machines without this store.
MANIFEST_MEMBER = ".lfsorch-snapshot-manifest.json"
MAX_MANIFEST_BYTES = 1 << 30


def to_image(store: SnapshotStore, client: Any, key: str) -> str:
    """Import snapshot `key` as a single-layer image labelled with its key; return its id."""
    manifest = store.manifest(key)
    chain = store.chain(key)
    with contextlib.ExitStack() as stack:
        if len(chain) == 1:
            tree_chunks: Iterator[bytes] = store.archive_chunks(manifest)
        else:
            scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=store.root)))
            tree = scratch / "tree"
            store.restore(key, tree, client)
            tree_chunks = archive.tar_chunks(tree, list(manifest.entries))
        _check_docker_names(manifest)
        digest = hashlib.sha256()
        head = _manifest_member(store.manifest_json(key), manifest.created)

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
    replace_file(store.directory(key) / IMAGE_RECORD, json.dumps(record).encode())
    return str(image_id)


def restore_image(store: SnapshotStore, client: Any, image: str, target: Path) -> SnapshotInfo:
    """Restore `target` from a snapshot image (see `SnapshotStore.restore_image`)."""
    key, diff_id = _snapshot_layer(store, client, image)
    source = f"image {image[:19]}"
    embedded, chunks = _split_manifest(_saved_layer(client, image, diff_id), source)
    manifest = _embedded_manifest(embedded, key, source)
    local = store.get(key)
    if local is not None and _contents(store.manifest(key)) != _contents(manifest):
        raise SnapshotError(
            f"{source}: its manifest differs from this store's snapshot {key[:12]}",
            hint="one of them was altered; `lfsorch snapshots verify` checks the local one",
        )
    policy = MemberPolicy(f"{source} ({manifest.label})", max_bytes=1 << 42)
    expect = manifest.entries

    def check(member: Member) -> None:
        check_member(manifest, expect, member)

    layer = Layer(chunks, policy, on_member=check)
    store.restore_layers([layer], manifest, Path(target), client, isolate=True)
    if local is not None:
        return local
    return store.create(
        Path(target),
        key,
        stage=manifest.stage,
        parent=manifest.parent,
        metadata=manifest.metadata,
        full=True,
    )


def _snapshot_layer(store: SnapshotStore, client: Any, image: str) -> tuple[str, str]:
    """The snapshot key an image is labelled with, and the diff id of its one layer."""
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
    store.directory(key)  # refuses a label that is not a key
    layers = attrs["RootFS"]["Layers"]
    if len(layers) != 1:
        raise SnapshotError(f"image {image} has {len(layers)} layers; a snapshot has one")
    return str(key), str(layers[0])


def _embedded_manifest(embedded: bytes, key: str, source: str) -> Manifest:
    try:
        manifest = Manifest.from_json(orjson.loads(embedded))
    except (ValueError, KeyError, TypeError) as exc:
        raise SnapshotError(f"{source}: its snapshot manifest is unreadable ({exc})") from None
    if manifest.key != key:
        raise SnapshotError(
            f"{source}: labelled {key[:12]} but carries the manifest of {manifest.key[:12]}"
        )
    return manifest


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
