"""Which digest a manifest's files use, how old manifests are read, and what prune keeps."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path
from typing import Any

import blake3
import pytest

from orchestrator.checkpoints import digests
from orchestrator.checkpoints.archive import _TarIndexer
from orchestrator.checkpoints.manifest import (
    ARCHIVE,
    REBASED_ARCHIVE,
    Entry,
    Manifest,
    SnapshotError,
    snapshot_key,
)
from orchestrator.checkpoints.store import SnapshotInfo, _kept
from orchestrator.checkpoints.tarstream import MemberPolicy, scan_stream
from orchestrator.checkpoints.treescan import verify_tree

PAYLOAD = bytes(range(256)) * 300  # several blocks, not a multiple of 512


def _archive_of(data: bytes) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        root = tarfile.TarInfo(".")
        root.type = tarfile.DIRTYPE
        tar.addfile(root)
        info = tarfile.TarInfo("usr/lib/libc.so")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _manifest_json(version: int, **extra: Any) -> dict[str, Any]:
    entry_digest_key = "sha256" if version == 1 else "digest"
    return {
        "version": version,
        "key": "k1",
        "stage": "ch5",
        "parent": None,
        "delta_of": None,
        "created": 1.0,
        "metadata": {},
        "archive": {"file": ARCHIVE, entry_digest_key: "ab" * 32, "size": 10, "raw_size": 20},
        "deleted": [],
        "replaced": [],
        "entries": [
            {"path": ".", "type": "dir", "mode": 0o755, "uid": 0, "gid": 0, "layer": "k1"},
            {
                "path": "f",
                "type": "file",
                "mode": 0o644,
                "uid": 0,
                "gid": 0,
                "size": 3,
                entry_digest_key: "cd" * 32,
                "layer": "k1",
            },
        ],
        **extra,
    }


def test_new_manifests_use_blake3_and_say_so() -> None:
    assert digests.DEFAULT == "blake3"
    manifest = Manifest.from_json(_manifest_json(2, digest="blake3"))
    written = manifest.to_json()
    assert (written["version"], written["digest"]) == (2, "blake3")
    assert written["entries"][1]["digest"] == "cd" * 32
    assert written["archive"]["digest"] == manifest.archive_digest == "ab" * 32
    assert Manifest.from_json(written).entries["f"].digest == "cd" * 32


def test_a_manifest_without_an_algorithm_means_sha256() -> None:
    manifest = Manifest.from_json(_manifest_json(1))
    assert manifest.digest == "sha256"
    assert manifest.entries["f"].digest == "cd" * 32
    assert (manifest.archive_digest, manifest.archive_file) == ("ab" * 32, ARCHIVE)
    # Written back, it names its algorithm: a version-2 manifest of sha256 digests.
    again = Manifest.from_json(manifest.to_json())
    assert (again.version, again.digest, again.entries["f"].digest) == (2, "sha256", "cd" * 32)


def test_unknown_algorithm_version_and_archive_name_are_refused() -> None:
    with pytest.raises(ValueError) as caught:
        Manifest.from_json(_manifest_json(2, digest="md4"))
    assert str(caught.value) == "unknown digest algorithm 'md4' (known: blake3, sha256)"
    with pytest.raises(SnapshotError) as refused:
        Manifest.from_json(_manifest_json(3, digest="blake3"))
    assert refused.value.message == "snapshot k1: unknown manifest version 3"
    hostile = _manifest_json(2, digest="blake3")
    hostile["archive"]["file"] = "../../etc/shadow"
    with pytest.raises(SnapshotError) as named:
        Manifest.from_json(hostile)
    assert named.value.message == "snapshot k1: unknown archive '../../etc/shadow'"
    rebased = _manifest_json(2, digest="blake3")
    rebased["archive"]["file"] = REBASED_ARCHIVE
    assert Manifest.from_json(rebased).archive_file == REBASED_ARCHIVE


@pytest.mark.parametrize("algorithm", ["sha256", "blake3"])
def test_writer_and_verifier_hash_files_with_the_manifests_algorithm(algorithm: str) -> None:
    data = _archive_of(PAYLOAD)
    indexer = _TarIndexer(digests.hasher_factory(algorithm))
    for start in range(0, len(data), 700):  # headers and data cut across chunks
        indexer.feed(data[start : start + 700])
    indexer.close()
    members = scan_stream(
        io.BytesIO(data),
        MemberPolicy("test"),
        emit=None,
        new_hasher=digests.hasher_factory(algorithm),
    )
    expected = (
        hashlib.sha256(PAYLOAD).hexdigest()
        if algorithm == "sha256"
        else blake3.blake3(PAYLOAD).hexdigest()
    )
    assert [m.digest for m in indexer.members] == [None, expected]
    assert [m.sha256 for m in members] == [None, expected]
    assert digests.data_digest(PAYLOAD, algorithm) == expected


@pytest.mark.parametrize("algorithm", ["sha256", "blake3"])
def test_drift_check_hashes_with_the_manifests_algorithm(tmp_path: Path, algorithm: str) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "f").write_bytes(b"one")
    info = (tree / "f").stat()
    root = tree.stat()

    def entry(path: str, kind: str, mode: int, size: int, mtime: int, digest: str | None) -> Entry:
        return Entry(path, kind, mode, 0, 0, size, mtime, digest, layer="k")

    manifest = Manifest(
        "k", "ch5", None, None, 1.0, {}, "", 0, 0, [], [],
        {".": entry(".", "dir", root.st_mode & 0o7777, 0, root.st_mtime_ns, None),
         "f": entry("f", "file", info.st_mode & 0o7777, 3, info.st_mtime_ns,
                    digests.data_digest(b"one", algorithm))},
        digest=algorithm,
    )  # fmt: skip
    assert verify_tree(manifest, tree) == []
    (tree / "f").write_bytes(b"two")  # same size; mtime put back: only the content tells
    os.utime(tree / "f", ns=(info.st_atime_ns, info.st_mtime_ns))
    assert verify_tree(manifest, tree) == ["content differs: f"]


def test_checkpoint_keys_are_unchanged_by_the_manifest_format() -> None:
    """Stored checkpoints stay cache hits: the manifest version is not part of the key."""
    key = snapshot_key("stage: ch5", "sha256:1", {"gcc.tar.xz": "aa"}, "parent")
    assert key == "b0892256b4281d188fd6aeca81868d83ddf23c28c08aba492effd556ccb6e81b"


# --------------------------------------------------------------------------- what prune keeps


def _info(key: str, created: float, size: int, delta_of: str | None) -> SnapshotInfo:
    return SnapshotInfo(key, "s", None, delta_of, created, size, 0, 0, Path(key))


class _Chains:
    """Four snapshots, s1 full (100 bytes) then deltas s2..s4 (10 each), and an unrelated
    full one, f (50), taken last."""

    def __init__(self) -> None:
        self.infos = [
            _info("s1", 1, 100, None),
            _info("s2", 2, 10, "s1"),
            _info("s3", 3, 10, "s2"),
            _info("s4", 4, 10, "s3"),
            _info("f", 5, 50, None),
        ]
        self.by_key = {info.key: info for info in self.infos}

    def chain(self, key: str) -> list[Any]:
        found = [self.by_key[key]]
        while found[-1].delta_of is not None:
            found.append(self.by_key[found[-1].delta_of])
        return [_AsManifest(info) for info in reversed(found)]


class _AsManifest:
    def __init__(self, info: SnapshotInfo) -> None:
        self.key, self.archive_size = info.key, info.archive_size


@pytest.mark.parametrize(
    ("keep_last", "max_bytes", "kept"),
    [
        (None, None, {"s1", "s2", "s3", "s4", "f"}),
        (0, None, set()),
        (1, None, {"f"}),
        (2, None, {"f", "s4"}),
        (None, 49, set()),  # not even the newest fits
        (None, 50, {"f"}),
        (None, 179, {"f"}),  # s4 stands on all of s1..s4: 130 more bytes
        (None, 180, {"f", "s4", "s3", "s2", "s1"}),  # then its chain costs nothing more
        (2, 1000, {"f", "s4"}),
    ],
)
def test_kept_counts_the_chains_kept_deltas_stand_on(
    keep_last: int | None, max_bytes: int | None, kept: set[str]
) -> None:
    chains = _Chains()
    assert _kept(chains.infos, keep_last, max_bytes, chains.chain) == kept
