"""Snapshots against the real engine: round trips, refusals, deltas, the image form."""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
import tarfile
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest
import zstandard

from orchestrator.checkpoints import images
from orchestrator.checkpoints.archive import sort_key
from orchestrator.checkpoints.chain import ChainPolicy
from orchestrator.checkpoints.digests import data_digest
from orchestrator.checkpoints.manifest import ARCHIVE, Manifest, SnapshotError, snapshot_key
from orchestrator.checkpoints.store import (
    KEY_LABEL,
    MANIFEST,
    MANIFEST_MEMBER,
    PLAIN_MANIFEST,
    SnapshotStore,
)
from orchestrator.checkpoints.tarstream import UnsafeArchiveError
from orchestrator.checkpoints.treescan import PARTITION_MARKER, scan_tree, verify_tree
from tests.helpers import as_plain_manifests, assert_tree_kinds, snapshot_kinds, tree_state

pytestmark = [pytest.mark.docker, pytest.mark.usefixtures("no_leftovers")]


def test_round_trip_keeps_every_kind_of_entry(
    tree: Path, store: SnapshotStore, tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    info = store.create(tree, "k-ch5", stage="ch5", metadata={"image": "sha256:abc"})
    assert store.verify("k-ch5") == []
    target = tmp_path / "restored"
    store.restore("ch5", target, docker_client)
    assert verify_tree(store.manifest(info.key), target) == []
    assert_tree_kinds(target)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".restored")]


def test_restore_over_an_existing_tree_removes_what_the_snapshot_lacks(
    tree: Path, store: SnapshotStore, tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    store.create(tree, "k1", stage="ch5")
    (tree / "stray-file").write_text("built later")
    (tree / "usr/bin/bash").write_bytes(b"changed")
    store.restore("k1", tree, docker_client)
    assert not (tree / "stray-file").exists()
    assert_tree_kinds(tree)
    assert verify_tree(store.manifest("k1"), tree) == []


def test_restore_keeps_the_partition_marker_and_the_snapshots_root(
    tree: Path, store: SnapshotStore, tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    store.create(tree, "k1", stage="ch5")
    partition = tmp_path / "partition"
    (partition / PARTITION_MARKER).mkdir(parents=True)
    (partition / PARTITION_MARKER / "lock").write_text("4242\n")
    store.restore("k1", partition, docker_client)
    assert (partition / PARTITION_MARKER / "lock").read_text() == "4242\n"
    # The root's mtime too: the next build's drift check compares it with the checkpoint.
    assert verify_tree(store.manifest("k1"), partition) == []


def test_manifests_are_compressed_and_an_older_stores_plain_ones_still_read(
    tree: Path, store: SnapshotStore, tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    for index in range(300):
        (tree / "usr/bin" / f"tool{index}").write_text(f"tool {index}\n")
    store.create(tree, "k1", stage="ch5")
    directory = store.root / "k1"
    text = store.manifest_json("k1")
    assert not (directory / PLAIN_MANIFEST).exists()
    assert (directory / MANIFEST).stat().st_size < len(text) / 4
    as_plain_manifests(store, "k1")  # as a store written before compression holds it
    older = SnapshotStore(store.root, isolate=store.isolate)
    assert [info.key for info in older.list()] == ["k1"] and older.has("k1")
    assert older.manifest_json("k1") == text
    _restores_exactly(older, "k1", tmp_path / "restored", docker_client)
    (tree / "usr/bin/tool0").write_text("rebuilt\n")
    assert older.create(tree, "k2", stage="ch6", parent="k1").delta_of == "k1"
    _restores_exactly(older, "k2", tmp_path / "restored", docker_client)


def test_a_manifest_that_decompresses_past_the_cap_is_refused(
    tree: Path, store: SnapshotStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.create(tree, "good", stage="ch5")
    store.create(tree, "bomb", stage="ch6")
    monkeypatch.setattr(images, "MAX_MANIFEST_BYTES", 1 << 20)
    (store.root / "bomb" / MANIFEST).write_bytes(zstandard.compress(b"{" * (8 << 20)))
    broken: list[str] = []
    assert [info.key for info in store.list(broken)] == ["good"]
    path = store.root / "bomb" / MANIFEST
    assert broken == [
        f"snapshot bomb: manifest {path} is unreadable (over 1048576 bytes decompressed)"
    ]


def test_same_tree_gives_the_same_archive(tree: Path, store: SnapshotStore) -> None:
    first = store.create(tree, "a", stage="ch5", full=True)
    second = store.create(tree, "b", stage="ch5", full=True)
    digest = lambda key: store.manifest(key).archive_digest  # noqa: E731
    assert digest("a") == digest("b")
    assert (first.path / ARCHIVE).read_bytes() == (second.path / ARCHIVE).read_bytes()


def test_snapshot_key_depends_on_every_input() -> None:
    sources = {"gcc.tar.xz": "aa", "bash.tar.gz": "bb"}
    base = snapshot_key("stage: ch5", "sha256:1", sources, None)
    assert base == snapshot_key("stage: ch5", "sha256:1", dict(reversed(sources.items())), None)
    assert len(base) == 64
    assert base != snapshot_key("stage: ch6", "sha256:1", sources, None)
    assert base != snapshot_key("stage: ch5", "sha256:2", sources, None)
    assert base != snapshot_key("stage: ch5", "sha256:1", {**sources, "gcc.tar.xz": "ab"}, None)
    assert base != snapshot_key("stage: ch5", "sha256:1", sources, "parent")


# --------------------------------------------------------------------------- refusals


def _crafted(*members: tuple[tarfile.TarInfo, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        root = tarfile.TarInfo(".")
        root.type, root.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(root)
        for info, data in members:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data else None)
    return buffer.getvalue()


def _member(name: str, kind: bytes = tarfile.REGTYPE, **attrs: object) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode = kind, 0o644
    for key, value in attrs.items():
        setattr(info, key, value)
    return info


_KINDS = {tarfile.REGTYPE: "file", tarfile.DIRTYPE: "dir", tarfile.SYMTYPE: "symlink",
          tarfile.LNKTYPE: "file", tarfile.BLKTYPE: "blockdev"}  # fmt: skip


def _plant(store: SnapshotStore, key: str, raw_tar: bytes) -> None:
    """Swap a snapshot's archive for a hostile one with a manifest forged to match it, as an
    attacker with write access to the store would: only the member rules stand in the way."""
    compressed = zstandard.ZstdCompressor(level=3).compress(raw_tar)
    directory = store.root / key
    (directory / ARCHIVE).write_bytes(compressed)
    manifest = json.loads(store.manifest_json(key))
    manifest["archive"].update(
        digest=data_digest(compressed, manifest["digest"]),
        size=len(compressed),
        raw_size=len(raw_tar),
    )
    entries = []
    with tarfile.open(fileobj=io.BytesIO(raw_tar)) as tar:
        for info in tar:
            data = tar.extractfile(info).read() if info.isreg() else b""  # type: ignore[union-attr]
            entries.append(
                {"path": info.name.removeprefix("./") or ".", "type": _KINDS[info.type],
                 "mode": info.mode, "uid": info.uid, "gid": info.gid, "size": len(data),
                 "digest": data_digest(data, manifest["digest"]) if info.isreg() else None,
                 "link": info.linkname or None, "layer": key}
            )  # fmt: skip
    manifest["entries"] = entries
    (directory / MANIFEST).write_bytes(zstandard.compress(json.dumps(manifest).encode()))


def _attacks(outside: Path) -> Iterator[tuple[str, bytes, str]]:
    sentinel = outside / "sentinel"
    yield (
        "traversal",
        _crafted((_member("usr/../../outside/sentinel"), b"pwned")),
        "member 'usr/../../outside/sentinel' escapes the tree ('..' component)",
    )
    yield (
        "absolute",
        _crafted((_member(str(sentinel)), b"pwned")),
        f"member '{sentinel}' escapes the tree (absolute path)",
    )
    yield (
        "symlink-then-write",
        _crafted(
            (_member("escape", tarfile.SYMTYPE, linkname=str(outside)), b""),
            (_member("escape/sentinel"), b"pwned"),
        ),
        "member 'escape/sentinel' lies below symlink 'escape' (would write through it)",
    )
    yield (
        "hard-link-outside",
        _crafted((_member("hl", tarfile.LNKTYPE, linkname=str(sentinel)), b"")),
        f"member 'hl' is a hard link to '{sentinel}', "
        "which is not an earlier regular file of the archive",
    )
    yield (
        "block-device",
        _crafted((_member("dev/sda", tarfile.BLKTYPE, devmajor=8, devminor=0), b"")),
        "member 'dev/sda' is a block device (8:0), never allowed",
    )


def test_hostile_archives_are_refused_and_touch_nothing(
    tree: Path, store: SnapshotStore, tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "sentinel").write_text("original")
    store.create(tree, "victim", stage="ch5")
    label = f"snapshot ch5 ({'victim'[:12]})"
    for name, raw, reason in _attacks(outside):
        _plant(store, "victim", raw)
        before_tree, before_outside = tree_state(tree), tree_state(outside)
        with pytest.raises(UnsafeArchiveError) as caught:
            store.restore("victim", tree, docker_client)
        assert caught.value.message == f"{label}: {reason}", name
        assert tree_state(tree) == before_tree, name
        assert tree_state(outside) == before_outside, name
        assert (outside / "sentinel").read_text() == "original"
        leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".lfs")]
        assert leftovers == [], name


def test_tampered_archive_digest_is_refused(
    tree: Path, store: SnapshotStore, tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    store.create(tree, "k1", stage="ch5")
    archive_path = store.root / "k1" / ARCHIVE
    data = bytearray(archive_path.read_bytes())
    data[-1] ^= 0xFF  # inside the zstd frame checksum: still decodes, digest differs
    archive_path.write_bytes(bytes(data))
    target = tmp_path / "target"
    with pytest.raises(Exception, match=r"corrupt|sha256"):
        store.restore("k1", target, docker_client)
    assert not target.exists()
    assert store.verify("k1") != []


# --------------------------------------------------------------------------- deltas


def test_incremental_snapshot_restores_exactly_including_deletions(
    tree: Path, store: SnapshotStore, tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    (tree / "usr/lib").mkdir()
    for index in range(50):
        (tree / "usr/lib" / f"lib{index}.so").write_bytes(os.urandom(20_000))
    base = store.create(tree, "base", stage="ch5")
    (tree / "usr/bin/su").write_bytes(b"new su")  # content change, mode kept
    os.chmod(tree / "usr/bin/su", 0o4755)
    shutil.rmtree(tree / "home")  # deleted directory with contents
    (tree / "usr/lib/lib7.so").unlink()  # deleted file
    os.unlink(tree / "bin")  # symlink replaced by a directory
    (tree / "bin").mkdir()
    (tree / "bin/ls").write_text("ls")
    (tree / "etc").mkdir()
    (tree / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    os.chmod(tree / "usr/lib/lib3.so", 0o600)  # metadata-only change
    os.link(tree / "usr/bin/wall", tree / "etc/wall-link")  # new hard link to an old file

    delta = store.create(tree, "delta", stage="ch6", parent="base")
    manifest = store.manifest("delta")
    assert delta.delta_of == "base"
    assert manifest.deleted == ["home", "usr/lib/lib7.so"]
    assert "bin" in manifest.replaced
    carried = {p for p, e in manifest.entries.items() if e.layer == "delta"}
    assert "usr/lib/lib10.so" not in carried and "usr/lib/lib3.so" in carried
    assert delta.archive_size < base.archive_size / 4
    assert store.verify("delta") == []

    for target in (tmp_path / "fresh", tree.parent / "lfs-copy"):
        if target.name == "lfs-copy":
            store.restore("base", target, docker_client)  # restore the delta over its base
        store.restore("delta", target, docker_client)
        assert verify_tree(manifest, target) == []
        assert verify_tree(manifest, tree) == []
        assert not (target / "home").exists() and not (target / "usr/lib/lib7.so").exists()
        assert (target / "bin").is_dir() and not (target / "bin").is_symlink()
        assert (target / "usr/bin/su").read_bytes() == b"new su"
        assert stat.S_IMODE(os.lstat(target / "usr/bin/su").st_mode) == 0o4755
        wall, link = os.lstat(target / "usr/bin/wall"), os.lstat(target / "etc/wall-link")
        assert wall.st_ino == link.st_ino


def test_first_snapshot_after_a_restore_stays_small(
    tree: Path, store: SnapshotStore, tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    store.create(tree, "base", stage="ch5")
    target = tmp_path / "resumed"
    store.restore("base", target, docker_client)
    (target / "new-file").write_text("built after resume")
    store.create(target, "next", stage="ch6", parent="base")
    carried = {p for p, e in store.manifest("next").entries.items() if e.layer == "next"}
    assert carried == {".", "new-file"}


def _restores_exactly(
    store: SnapshotStore, key: str, target: Path, client: docker.DockerClient
) -> None:
    store.restore(key, target, client)
    assert verify_tree(store.manifest(key), target) == []
    assert store.verify(key) == []


def test_small_deltas_chain_until_the_policy_depth(
    tree: Path, store: SnapshotStore, tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    (tree / "usr/lib").mkdir()
    (tree / "usr/lib/big.so").write_bytes(os.urandom(1 << 20))
    keys = [f"k{index:02d}" for index in range(12)]
    for index, key in enumerate(keys):
        (tree / f"usr/bin/tool{index}").write_bytes(os.urandom(1000))  # a package's worth
        store.create(tree, key, stage="ch8", parent=keys[index - 1] if index else None)
    # Twelve layers: deeper than a fixed depth of 8 would allow, well under the default 32.
    assert snapshot_kinds(store, keys) == ["full"] + ["delta"] * 11
    _restores_exactly(store, keys[-1], tmp_path / "tip", docker_client)

    store.policy = ChainPolicy(max_layers=5)
    more = [f"m{index:02d}" for index in range(7)]
    for index, key in enumerate(more):
        os.unlink(tree / f"usr/bin/tool{index}")
        store.create(tree, key, stage="ch8", parent=more[index - 1] if index else keys[-1])
    # The chain already had 12 layers, so the first is full; then 4 deltas, then full again.
    assert snapshot_kinds(store, more) == ["full"] + ["delta"] * 4 + ["full", "delta"]
    _restores_exactly(store, more[-1], tmp_path / "tip", docker_client)


def test_a_delta_larger_than_its_budget_is_written_full(
    tree: Path, store: SnapshotStore, tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    (tree / "usr/lib").mkdir()
    for index in range(8):
        (tree / f"usr/lib/lib{index}.so").write_bytes(os.urandom(200_000))
    store.create(tree, "before-chown", stage="ch6")
    # Section 7.2's chown: every file changes owner, so a delta would carry the whole tree.
    for path in [tree, *tree.rglob("*")]:
        os.lchown(path, 0, 0)
    info = store.create(tree, "after-chown", stage="ch7", parent="before-chown")
    assert info.delta_of is None
    manifest = store.manifest("after-chown")
    assert {entry.layer for entry in manifest.entries.values()} == {"after-chown"}
    # The same archive as a snapshot asked to be full.
    alone = SnapshotStore(tmp_path / "alone", isolate=store.isolate)
    alone.create(tree, "after-chown", stage="ch7", full=True)
    assert manifest.archive_digest == alone.manifest("after-chown").archive_digest
    _restores_exactly(store, "after-chown", tmp_path / "restored", docker_client)


def test_deltas_that_add_up_past_the_share_end_the_chain(
    tree: Path, store: SnapshotStore, tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    (tree / "usr/lib").mkdir()
    (tree / "usr/lib/base.so").write_bytes(os.urandom(4 << 20))
    keys = ["base", "gcc", "glibc", "perl", "python"]
    for index, key in enumerate(keys):
        if index:  # each package adds a fifth of the base: 2 fit in half of it, 3 do not
            (tree / f"usr/lib/{key}.so").write_bytes(os.urandom(900 << 10))
        store.create(tree, key, stage="ch8", parent=keys[index - 1] if index else None)
    assert snapshot_kinds(store, keys) == ["full", "delta", "delta", "full", "delta"]
    _restores_exactly(store, "python", tmp_path / "tip", docker_client)


def test_choosing_a_delta_reads_each_manifest_of_the_chain_once(
    tree: Path, store: SnapshotStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tree / "usr/lib").mkdir()
    (tree / "usr/lib/big.so").write_bytes(os.urandom(1 << 20))
    keys = [f"k{index}" for index in range(7)]

    def build(index: int, on: SnapshotStore) -> None:
        (tree / f"usr/bin/tool{index}").write_text(keys[index])
        on.create(tree, keys[index], stage="ch8", parent=keys[index - 1] if index else None)

    for index in range(5):
        build(index, store)
    assert snapshot_kinds(store, keys[:5]) == ["full"] + ["delta"] * 4
    # A new process (a resume): the chain is walked from its manifests once, then remembered.
    store = SnapshotStore(store.root, isolate=store.isolate)
    read: list[str] = []
    original = store.read_manifest

    def counting(key: str) -> Manifest:
        read.append(key)
        return original(key)

    monkeypatch.setattr(store, "read_manifest", counting)
    build(5, store)
    assert sorted(read) == ["k0", "k1", "k2", "k3", "k4", "k4"]  # the links, and the base
    read.clear()
    build(6, store)
    assert read == ["k5"]  # only the delta's base: its entries are what the delta is over
    assert snapshot_kinds(store, keys) == ["full"] + ["delta"] * 6


def test_drift_check_reports_changes(tree: Path, store: SnapshotStore) -> None:
    store.create(tree, "k1", stage="ch5")
    (tree / "home/tester/notes").write_text("HELLO\n")
    os.chmod(tree / "usr/bin/su", 0o755)
    os.unlink(tree / "usr/bin/rel")
    differences = verify_tree(store.manifest("k1"), tree)
    assert "missing: usr/bin/rel" in differences
    assert "content differs: home/tester/notes" in differences
    assert "mode differs: usr/bin/su (expected '0o4755', found '0o755')" in differences


# --------------------------------------------------------------------------- image form


def test_image_round_trip(
    tree: Path, store: SnapshotStore, tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    store.create(tree, "img-base", stage="ch5")
    (tree / "added").write_text("delta content")
    store.create(tree, "img-delta", stage="ch6", parent="img-base")
    image_id = store.to_image(docker_client, "img-delta")
    try:
        image = docker_client.images.get(image_id)
        assert image.labels[KEY_LABEL] == "img-delta"
        assert len(image.attrs["RootFS"]["Layers"]) == 1
        target = tmp_path / "from-image"
        store.restore_image(docker_client, image_id, target)
        assert verify_tree(store.manifest("img-delta"), target) == []
        assert_tree_kinds(target)
        assert (target / "added").read_text() == "delta content"
        assert not (target / MANIFEST_MEMBER).exists()

        # Another machine: only the image, an empty store. The restore is checked against the
        # manifest the image carries, and the store then holds the checkpoint for later runs.
        elsewhere = SnapshotStore(tmp_path / "other-machine")
        other_target = tmp_path / "other-lfs"
        info = elsewhere.restore_image(docker_client, image_id, other_target)
        assert (info.key, info.stage, info.parent) == ("img-delta", "ch6", "img-base")
        assert verify_tree(elsewhere.manifest("img-delta"), other_target) == []
        assert_tree_kinds(other_target)
        assert not (other_target / MANIFEST_MEMBER).exists()
        again = tmp_path / "other-lfs-again"
        elsewhere.restore("ch6", again)
        assert verify_tree(store.manifest("img-delta"), again) == []
    finally:
        docker_client.images.remove(image_id, force=True)


def test_image_without_a_manifest_is_refused(
    tree: Path, tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    store = SnapshotStore(tmp_path / "snapshots")
    raw = _crafted((_member("etc/passwd"), b"root::0:0::/:/bin/sh"))
    answer = docker_client.api.import_image_from_stream(
        iter([raw]), repository="lfsorch/snapshot", tag="forged",
        changes=[f"LABEL {KEY_LABEL}=forged"],
    )  # fmt: skip
    image_id = next(json.loads(line)["status"] for line in answer.splitlines() if "sha256:" in line)
    try:
        target = tmp_path / "target"
        with pytest.raises(SnapshotError) as caught:
            store.restore_image(docker_client, image_id, target)
        assert caught.value.message == (
            f"image {image_id[:19]}: the layer does not start with a snapshot manifest (found '.')"
        )
        assert not target.exists() and store.list() == []
    finally:
        docker_client.images.remove(image_id, force=True)


# --------------------------------------------------------------------------- streaming walk


def test_walk_order_is_archive_order_and_tar_gets_the_same(
    tree: Path, store: SnapshotStore
) -> None:
    """The walk feeds tar while it runs, so it must itself produce `sort_key` order."""
    for name in ("a", "a-b", "a.b", "a/b", "a/b-c", "a/b/c", "ab", "B", "a0"):
        path = tree / "order" / name
        if name in ("a", "a/b"):
            path.mkdir(parents=True, exist_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(name)
    found = list(scan_tree(tree))
    assert found == sorted(found, key=sort_key)
    store.create(tree, "k", stage="ch5", full=True)
    manifest = store.manifest("k")
    members = [m.name for m in _archive_members(store.root / "k" / ARCHIVE)]
    assert members == list(manifest.entries) == found


def _archive_members(path: Path) -> list[tarfile.TarInfo]:
    raw = zstandard.ZstdDecompressor().stream_reader(path.open("rb")).read()
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        members = tar.getmembers()
    for member in members:
        member.name = member.name.removeprefix("./") or "."
    return members


def test_block_device_is_refused_before_anything_is_stored(
    tree: Path, store: SnapshotStore
) -> None:
    os.mknod(tree / "dev/sda", 0o600 | stat.S_IFBLK, os.makedev(8, 0))
    with pytest.raises(SnapshotError, match="block device"):
        store.create(tree, "k", stage="ch5")
    assert store.get("k") is None
    assert not store.root.exists() or list(store.root.iterdir()) == []


def test_delta_notices_xattr_and_link_changes_on_unchanged_files(
    tree: Path, store: SnapshotStore, tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    """Unchanged inodes reuse the parent's xattrs: a changed xattr must show in ctime."""
    store.create(tree, "base", stage="ch5")
    os.setxattr(tree / "usr/bin/bash", "user.lfs.note", b"chapter 8")
    os.setxattr(tree / "usr/bin/su", "user.lfs.extra", b"new")
    os.unlink(tree / "usr/bin/rel")
    os.symlink("../bin/other", tree / "usr/bin/rel")
    store.create(tree, "delta", stage="ch6", parent="base")
    manifest = store.manifest("delta")
    assert manifest.entries["usr/bin/bash"].xattrs == {"user.lfs.note": b"chapter 8".hex()}
    assert manifest.entries["usr/bin/su"].xattrs == {"user.lfs.extra": b"new".hex()}
    assert manifest.entries["usr/bin/rel"].link == "../bin/other"
    assert verify_tree(manifest, tree) == []
    store.restore("delta", tmp_path / "out", docker_client)
    assert os.getxattr(tmp_path / "out/usr/bin/bash", "user.lfs.note") == b"chapter 8"
    assert verify_tree(manifest, tmp_path / "out") == []


def test_missing_image_is_a_readable_error(
    tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    store = SnapshotStore(tmp_path / "snapshots")
    with pytest.raises(SnapshotError) as caught:
        store.restore_image(docker_client, "lfsorch/snapshot:absent", tmp_path / "lfs")
    assert caught.value.message == "no image lfsorch/snapshot:absent in the engine"
    assert not (tmp_path / "lfs").exists()
