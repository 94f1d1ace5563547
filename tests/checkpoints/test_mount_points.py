"""Snapshots of an LFS partition that is a mount point, as $LFS is in the book.

These mount real tmpfs filesystems (root only); no engine: the store's own archives are
extracted with the host's tar.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from orchestrator.checkpoints.manifest import SnapshotError
from orchestrator.checkpoints.store import SnapshotStore
from orchestrator.checkpoints.treescan import verify_tree
from orchestrator.workspace import Workspace
from tests.helpers import BASE_IMAGE, assert_tree_kinds, make_tree, run_build, tree_state


class Mounts:
    def __init__(self) -> None:
        self.points: list[Path] = []

    def tmpfs(self, where: Path) -> Path:
        where.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(where)],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount tmpfs here: {done.stderr.strip()}")
        self.points.append(where)
        return where


@pytest.fixture
def mounts() -> Iterator[Mounts]:
    made = Mounts()
    yield made
    for point in reversed(made.points):
        subprocess.run(["umount", "-l", str(point)], check=False)


def test_restore_into_a_mount_point_replaces_its_contents(tmp_path: Path, mounts: Mounts) -> None:
    source = tmp_path / "source"
    source.mkdir()
    make_tree(source)
    os.chmod(source, 0o755)
    store = SnapshotStore(tmp_path / "snapshots")
    store.create(source, "k1", stage="ch5")
    lfs = mounts.tmpfs(tmp_path / "mnt-lfs")
    (lfs / "stray").write_text("built by a later, failed package")
    (lfs / "usr").mkdir()
    (lfs / "usr/half-installed.so").write_bytes(b"partial")
    os.chmod(lfs, 0o700)

    store.restore("k1", lfs)

    assert os.path.ismount(lfs)
    assert verify_tree(store.manifest("k1"), lfs) == []
    assert_tree_kinds(lfs)
    assert not (lfs / "stray").exists()
    assert not (lfs / "usr/half-installed.so").exists()
    assert sorted(p.name for p in lfs.iterdir() if p.name.startswith(".")) == []
    assert os.stat(lfs).st_mode & 0o777 == 0o755
    # The next snapshot of the restored partition is a delta with nothing in it.
    again = store.create(lfs, "k2", stage="ch5", parent="k1")
    assert store.manifest(again.key).delta_of == "k1"
    assert store.manifest(again.key).raw_size <= 10240


def test_restore_refuses_a_partition_with_mounts_inside(tmp_path: Path, mounts: Mounts) -> None:
    lfs = tmp_path / "lfs"
    lfs.mkdir()
    make_tree(lfs)
    store = SnapshotStore(tmp_path / "snapshots")
    store.create(lfs, "k1", stage="ch5")
    # As after entering the chroot by hand: the host's /dev bound inside the partition.
    host_dev = tmp_path / "host-dev"
    host_dev.mkdir()
    (host_dev / "sda").write_text("a host device node")
    bound = lfs / "dev"
    done = subprocess.run(["mount", "--bind", str(host_dev), str(bound)], capture_output=True)
    if done.returncode != 0:
        pytest.skip("cannot bind-mount here")
    mounts.points.append(bound)
    before = tree_state(lfs)

    with pytest.raises(SnapshotError) as caught:
        store.restore("k1", lfs)

    assert caught.value.message == (
        f"cannot restore into {lfs}: filesystems are mounted inside it ({bound})"
    )
    assert caught.value.hint == (
        f"unmount them first, e.g. `umount -R {bound}`: "
        "a snapshot holds the partition's own files only"
    )
    assert (host_dev / "sda").read_text() == "a host device node"
    assert tree_state(lfs) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []

    with pytest.raises(SnapshotError) as refused:
        store.create(lfs, "k2", stage="ch5")
    assert refused.value.message == (
        f"cannot snapshot {lfs}: filesystems are mounted inside it ({bound})"
    )
    assert store.get("k2") is None


@pytest.mark.docker
def test_run_refuses_a_partition_with_mounts_inside_before_building(
    tmp_path: Path, mounts: Mounts, workspace: Workspace, stage_file: Callable[[str, str], Path]
) -> None:
    lfs = tmp_path / "lfs"
    (lfs / "proc").mkdir(parents=True)
    mounts.tmpfs(lfs / "proc")
    stage = stage_file(
        "one.yaml",
        f"""
        stage: one
        image: {BASE_IMAGE}
        packages:
          - {{name: base, script: "echo built > /mnt/lfs/built"}}
        """,
    )
    with pytest.raises(SnapshotError) as caught:
        run_build([stage], lfs, workspace)
    assert caught.value.message == (
        f"cannot checkpoint {lfs}: filesystems are mounted inside it ({lfs / 'proc'})"
    )
    assert not (lfs / "built").exists()
    assert not workspace.runs_dir.exists() or list(workspace.runs_dir.iterdir()) == []
