"""A snapshot store someone else could write to, and the delta-or-full choice at its edges:
forged sizes, manifests that are huge, FIFOs or another snapshot's, planted symlinks, a kill
between a manifest's two forms, and trees of small files or hard links.

The host's confined tar only: nothing here needs the engine."""

from __future__ import annotations

import os
import time
from pathlib import Path

import orjson
import pytest
import zstandard

from orchestrator.checkpoints import chain
from orchestrator.checkpoints.manifest import SnapshotError
from orchestrator.checkpoints.store import MANIFEST, PLAIN_MANIFEST, SnapshotStore
from orchestrator.checkpoints.treescan import verify_tree
from tests.helpers import as_plain_manifests, snapshot_kinds, tree_state

CAP = 1 << 30


@pytest.fixture
def host_store(tmp_path: Path) -> SnapshotStore:
    return SnapshotStore(tmp_path / "snapshots")


@pytest.fixture
def empty_tree(tmp_path: Path) -> Path:
    root = tmp_path / "empty"
    root.mkdir()
    return root


def test_touching_every_entry_of_a_tree_of_small_files_gives_a_full_snapshot(
    tmp_path: Path, host_store: SnapshotStore
) -> None:
    tree = tmp_path / "small"
    for directory in range(10):
        (tree / f"d{directory}").mkdir(parents=True)
        for index in range(100):
            (tree / f"d{directory}" / f"f{index}").write_bytes(b"x" * 10)
    host_store.create(tree, "base", stage="s")
    later = time.time() + 5
    for path in [tree, *tree.rglob("*")]:  # headers are all a delta would carry
        os.utime(path, (later, later))
    host_store.create(tree, "touched", stage="s", parent="base")
    assert snapshot_kinds(host_store, ["touched"]) == ["full"]


def test_a_package_of_hard_links_stays_a_small_delta(
    tmp_path: Path, host_store: SnapshotStore
) -> None:
    tree = tmp_path / "tree"
    (tree / "lib").mkdir(parents=True)
    (tree / "lib/base.so").write_bytes(os.urandom(2 << 20))
    host_store.create(tree, "base", stage="s")
    (tree / "bin").mkdir()
    (tree / "bin/mke2fs").write_bytes(os.urandom(300 << 10))
    for name in ("mkfs.ext2", "mkfs.ext3", "mkfs.ext4", "e2fsck", "fsck.ext4"):  # one inode
        os.link(tree / "bin/mke2fs", tree / "bin" / name)
    host_store.create(tree, "e2fsprogs", stage="s", parent="base")
    assert snapshot_kinds(host_store, ["e2fsprogs"]) == ["delta"]
    assert host_store.manifest("e2fsprogs").raw_size < 400 << 10


@pytest.mark.parametrize("forged", [None, "12", [1], -1])
def test_a_forged_size_in_the_parent_is_a_readable_refusal(
    tmp_path: Path, host_store: SnapshotStore, forged: object
) -> None:
    tree = tmp_path / "tree"
    (tree / "usr").mkdir(parents=True)
    host_store.create(tree, "k1", stage="a")
    data = orjson.loads(host_store.manifest_json("k1"))
    data["archive"]["raw_size"] = forged
    (host_store.root / "k1" / MANIFEST).write_bytes(zstandard.compress(orjson.dumps(data)))
    (tree / "usr/new").write_text("built")
    before = tree_state(tree)
    with pytest.raises(SnapshotError) as refused:
        SnapshotStore(host_store.root).create(tree, "k2", stage="b", parent="k1")
    size = data["archive"]["size"]
    assert refused.value.message == (f"snapshot k1: archive sizes {(size, forged)!r} are not sizes")
    assert tree_state(tree) == before and not (host_store.root / "k2").exists()


@pytest.mark.parametrize("form", [MANIFEST, PLAIN_MANIFEST])
def test_a_sparse_terabyte_manifest_is_refused_unread(
    empty_tree: Path, host_store: SnapshotStore, form: str
) -> None:
    tree = empty_tree
    host_store.create(tree, "good", stage="a")
    host_store.create(tree, "huge", stage="b")
    (host_store.root / "huge" / MANIFEST).unlink()
    with (host_store.root / "huge" / form).open("wb") as handle:
        handle.truncate(1 << 40)  # sparse: no disk, and it must cost no memory either
    broken: list[str] = []
    assert [info.key for info in host_store.list(broken)] == ["good"]
    path = host_store.root / "huge" / form
    assert broken == [f"snapshot huge: manifest {path} is unreadable (over {CAP} bytes)"]


def test_a_fifo_for_a_manifest_is_refused_without_blocking(
    empty_tree: Path, host_store: SnapshotStore
) -> None:
    tree = empty_tree
    host_store.create(tree, "k1", stage="a")
    path = host_store.root / "k1" / MANIFEST
    path.unlink()
    os.mkfifo(path)
    with pytest.raises(SnapshotError) as refused:
        SnapshotStore(host_store.root).read_manifest("k1")
    assert refused.value.message == (
        f"snapshot k1: manifest {path} is unreadable (not a regular file)"
    )


def test_a_manifest_of_another_snapshot_is_refused(
    empty_tree: Path, host_store: SnapshotStore
) -> None:
    tree = empty_tree
    host_store.create(tree, "k1", stage="a")
    (tree / "other").write_text("other")
    host_store.create(tree, "k2", stage="b", full=True)
    copied = host_store.root / "k1" / MANIFEST
    copied.write_bytes((host_store.root / "k2" / MANIFEST).read_bytes())
    broken: list[str] = []
    assert [info.key for info in SnapshotStore(host_store.root).list(broken)] == ["k2"]
    assert broken == [f"snapshot k1: manifest {copied} is unreadable (it is of snapshot 'k2')"]
    # A link to it is not even opened.
    copied.unlink()
    copied.symlink_to(host_store.root / "k2" / MANIFEST)
    with pytest.raises(SnapshotError, match="is unreadable"):
        SnapshotStore(host_store.root).read_manifest("k1")


def test_planted_symlinks_do_not_redirect_the_stat_index(
    tree: Path, host_store: SnapshotStore, tmp_path: Path
) -> None:
    host_store.create(tree, "k1", stage="a")
    target = tmp_path / "restored"
    victims = [tmp_path / "victim-scratch", tmp_path / "victim-index"]
    for victim in victims:
        victim.write_text("precious\n")
    index = chain.index_path(host_store.root / "k1", target.absolute())
    index.with_suffix(".tmp").symlink_to(victims[0])  # the scratch name written before
    index.symlink_to(victims[1])
    host_store.restore("k1", target)
    assert verify_tree(host_store.manifest("k1"), target) == []
    assert [victim.read_text() for victim in victims] == ["precious\n"] * 2
    assert not index.is_symlink() and orjson.loads(index.read_bytes())


def test_a_commit_killed_between_the_two_forms_leaves_no_stale_manifest(
    tree: Path, host_store: SnapshotStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    host_store.create(tree, "base", stage="a")
    (tree / "usr/bin/new").write_text("built")
    host_store.create(tree, "tip", stage="b", parent="base")
    as_plain_manifests(host_store, "base", "tip")
    unlink = Path.unlink

    def killed_at_the_plain_manifest(self: Path, missing_ok: bool = False) -> None:
        if self.name == PLAIN_MANIFEST:
            raise KeyboardInterrupt
        unlink(self, missing_ok=missing_ok)

    with monkeypatch.context() as patch:
        patch.setattr(Path, "unlink", killed_at_the_plain_manifest)
        with pytest.raises(KeyboardInterrupt):
            SnapshotStore(host_store.root).prune(keep_last=1)  # rebases tip, is killed
    assert sorted(p.name for p in (host_store.root / "tip").glob("manifest.json*")) == [
        PLAIN_MANIFEST,
        MANIFEST,
    ]
    again = SnapshotStore(host_store.root)
    again.prune(keep_last=1)
    assert [info.key for info in again.list()] == ["tip"]
    assert not (host_store.root / "tip" / PLAIN_MANIFEST).exists()
    again.restore("tip", tmp_path / "restored")
    assert verify_tree(again.manifest("tip"), tmp_path / "restored") == []
