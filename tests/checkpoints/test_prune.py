"""Pruning the snapshot store: under the workspace lock, rebasing kept deltas whose bases go,
surviving a kill at the worst moment, and stores written with sha256 manifests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import docker
import pytest

from orchestrator import api
from orchestrator.checkpoints import digests
from orchestrator.checkpoints.manifest import REBASED_ARCHIVE
from orchestrator.checkpoints.store import MANIFEST, PLAIN_MANIFEST, SnapshotStore
from orchestrator.checkpoints.treescan import verify_tree
from orchestrator.workspace import Workspace, WorkspaceBusy
from tests.helpers import BASE_IMAGE, REPO, run_cli, start_cli, wait_for_container

pytestmark = [pytest.mark.docker, pytest.mark.usefixtures("no_leftovers")]


def exact_state(root: Path) -> dict[str, tuple[object, ...]]:
    """Everything a restore must reproduce, read from the tree itself (not a manifest)."""
    state: dict[str, tuple[object, ...]] = {}
    inodes: dict[int, str] = {}
    for path in [root, *sorted(root.rglob("*"))]:
        info = os.lstat(path)
        name = str(path.relative_to(root))
        if path.is_symlink():
            content: object = os.readlink(path)
        elif path.is_file():
            content = path.read_bytes()
            content = (content, inodes.setdefault(info.st_ino, name))  # hard-link groups
        else:
            content = info.st_rdev
        xattrs = {} if path.is_symlink() else {
            key: os.getxattr(path, key, follow_symlinks=False)
            for key in os.listxattr(path, follow_symlinks=False)
        }  # fmt: skip
        state[name] = (info.st_mode, info.st_uid, info.st_gid, info.st_mtime_ns, content, xattrs)
    return state


def store_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def chain_of_four(tree: Path, store: SnapshotStore) -> None:
    """s1 full, then deltas s2 <- s3 <- s4, each changing, adding and deleting something."""
    (tree / "usr/lib").mkdir()
    for index in range(40):
        (tree / "usr/lib" / f"lib{index}.so").write_bytes(os.urandom(30_000))
    store.create(tree, "s1", stage="ch5")
    (tree / "usr/lib/lib1.so").write_bytes(os.urandom(30_000))
    (tree / "etc").mkdir()
    (tree / "etc/passwd").write_text("root:x:0:0::/root:/bin/bash\n")
    store.create(tree, "s2", stage="ch6", parent="s1")
    (tree / "usr/lib/lib2.so").unlink()
    os.link(tree / "usr/lib/lib3.so", tree / "usr/lib/lib3-link.so")
    os.chmod(tree / "usr/lib/lib4.so", 0o600)
    store.create(tree, "s3", stage="ch7", parent="s2")
    os.unlink(tree / "bin")  # a symlink becomes a directory
    (tree / "bin").mkdir()
    (tree / "bin/ls").write_text("ls")
    (tree / "usr/lib/lib1.so").write_bytes(os.urandom(30_000))
    store.create(tree, "s4", stage="ch8", parent="s3")
    assert [store.manifest(k).delta_of for k in ("s1", "s2", "s3", "s4")] == [
        None, "s1", "s2", "s3"
    ]  # fmt: skip


def test_keep_one_of_four_chained_snapshots_rebases_it_and_it_restores_exactly(
    tree: Path, store: SnapshotStore, tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    chain_of_four(tree, store)
    before = store_bytes(store.root)
    result = store.prune(keep_last=1)
    assert (result.removed, result.rebased) == (["s1", "s2", "s3"], ["s4"])
    assert [info.key for info in store.list()] == ["s4"]
    manifest = store.manifest("s4")
    assert manifest.delta_of is None and {e.layer for e in manifest.entries.values()} == {"s4"}
    assert sorted(p.name for p in store.root.iterdir()) == ["s4"]
    assert sorted(p.name for p in (store.root / "s4").iterdir()) == sorted(
        [MANIFEST, REBASED_ARCHIVE]
    )
    assert store_bytes(store.root) < before
    assert result.freed_bytes > 0
    assert store.verify("s4") == []

    target = tmp_path / "restored"
    store.restore("s4", target, docker_client)
    assert exact_state(target) == exact_state(tree)
    assert verify_tree(manifest, target) == []  # content too
    # The partition's stat cache survived the rebase: a snapshot after it is a small delta.
    (tree / "new").write_text("after prune")
    store.create(tree, "s5", stage="ch9", parent="s4")
    carried = {p for p, e in store.manifest("s5").entries.items() if e.layer == "s5"}
    assert carried == {".", "new"}


def test_keep_two_rebases_only_the_lowest_kept_delta(
    tree: Path, store: SnapshotStore, tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    chain_of_four(tree, store)
    result = store.prune(keep_last=2)
    assert (result.removed, result.rebased) == (["s1", "s2"], ["s3"])
    assert store.manifest("s4").delta_of == "s3"  # s4 stays a small delta of the rebased s3
    assert {e.layer for e in store.manifest("s4").entries.values()} == {"s3", "s4"}
    assert store.verify("s3") == [] and store.verify("s4") == []
    target = tmp_path / "restored"
    store.restore("s4", target, docker_client)
    assert exact_state(target) == exact_state(tree)


def test_max_size_keeps_the_newest_chains_that_fit(tree: Path, store: SnapshotStore) -> None:
    chain_of_four(tree, store)
    sizes = {info.key: info.archive_size for info in store.list()}
    assert store.prune(max_bytes=sum(sizes.values())).removed == []
    result = store.prune(max_bytes=sizes["s1"] - 1)  # no chain fits: s4 stands on s1
    assert [info.key for info in store.list()] == []
    assert result.removed == ["s1", "s2", "s3", "s4"]


KILL_AT = {
    # after the full archive is in place, before the manifest switches to it
    "switch": "SnapshotStore._commit_manifest",
    # while a removed snapshot is being deleted, half of it gone
    "delete": "shutil.rmtree",
}


@pytest.mark.parametrize("moment", sorted(KILL_AT))
def test_a_killed_prune_leaves_every_listed_snapshot_whole(
    tree: Path, tmp_path: Path, docker_client: docker.DockerClient, moment: str
) -> None:
    store = SnapshotStore(tmp_path / "snapshots")
    chain_of_four(tree, store)
    script = textwrap.dedent(f"""
        import os, signal, shutil
        from pathlib import Path
        from orchestrator.checkpoints import store as snapshots

        remove = shutil.rmtree

        def die(*args, **kwargs):
            if {moment!r} == "delete":
                if not Path(args[0]).name.startswith(snapshots.PRUNE_PREFIX):
                    return remove(*args, **kwargs)  # scratch trees, not a snapshot
                (Path(args[0]) / {MANIFEST!r}).unlink()  # half deleted
            os.kill(os.getpid(), signal.SIGKILL)

        if {moment!r} == "delete":
            shutil.rmtree = die
        else:
            snapshots.SnapshotStore._commit_manifest = die
        snapshots.SnapshotStore(Path({str(store.root)!r})).prune(keep_last=1)
    """)
    killed = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    listed = [info.key for info in store.list()]
    # Removed newest first: a kill never leaves a delta whose base is gone.
    expected = ["s1", "s2", "s3", "s4"] if moment == "switch" else ["s1", "s2", "s4"]
    assert listed == expected
    for key in listed:
        assert store.verify(key) == [], key
    target = tmp_path / "restored"
    store.restore("s4", target, docker_client)
    assert exact_state(target) == exact_state(tree)

    result = store.prune(keep_last=1)  # the next prune finishes the job and tidies up
    assert [info.key for info in store.list()] == ["s4"]
    assert sorted(p.name for p in store.root.iterdir()) == ["s4"]
    stored = {p.name for p in (store.root / "s4").iterdir() if not p.name.startswith("index-")}
    assert stored == {MANIFEST, REBASED_ARCHIVE}  # (index-*: the stat cache of `target`)
    assert result.rebased == (["s4"] if moment == "switch" else [])  # or already was
    store.restore("s4", target, docker_client)
    assert exact_state(target) == exact_state(tree)


# --------------------------------------------------------------------------- old manifests


def as_version_one(store: SnapshotStore, key: str) -> None:
    """Rewrite a manifest exactly as lfsorch wrote them before manifests named their digest
    (and before they were compressed)."""
    data = json.loads(store.manifest_json(key))
    (store.root / key / MANIFEST).unlink()
    path = store.root / key / PLAIN_MANIFEST
    assert data.pop("digest") == "sha256"
    data["version"] = 1
    data["archive"]["sha256"] = data["archive"].pop("digest")
    for entry in data["entries"]:
        entry["sha256"] = entry.pop("digest")
    path.write_text(json.dumps(data))


@pytest.fixture
def sha256_store(
    tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[SnapshotStore, Path]:
    """A store of four chained snapshots written before BLAKE3, and a copy of its last tree."""
    store = SnapshotStore(tmp_path / "snapshots")
    with monkeypatch.context() as patch:
        patch.setattr(digests, "DEFAULT", digests.SHA256)
        chain_of_four(tree, store)
    for key in ("s1", "s2", "s3", "s4"):
        as_version_one(store, key)
    return store, tree


def test_a_store_of_sha256_manifests_still_verifies_restores_and_prunes(
    sha256_store: tuple[SnapshotStore, Path], tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    store, tree = sha256_store
    manifest = store.manifest("s4")
    assert (manifest.version, manifest.digest) == (1, "sha256")
    assert store.verify("s4") == []
    target = tmp_path / "restored"
    store.restore("s4", target, docker_client)
    assert exact_state(target) == exact_state(tree)
    assert verify_tree(manifest, target) == []  # the drift check hashes with sha256
    (target / "usr/bin/su").write_bytes(b"SU binary")  # same size as before
    os.utime(target / "usr/bin/su", ns=(0, manifest.entries["usr/bin/su"].mtime_ns))
    assert verify_tree(manifest, target) == ["content differs: usr/bin/su"]

    # A delta over an old snapshot keeps its base's algorithm; a full snapshot uses BLAKE3.
    (tree / "later").write_text("built later")
    store.create(tree, "s5", stage="ch9", parent="s4")
    store.create(tree, "f6", stage="ch9", full=True)
    assert (store.manifest("s5").digest, store.manifest("f6").digest) == ("sha256", "blake3")
    assert store.verify("s5") == [] and store.verify("f6") == []

    result = store.prune(keep_last=2)
    assert result.rebased == ["s5"]
    rebased = store.manifest("s5")
    assert (rebased.version, rebased.digest, rebased.delta_of) == (2, "sha256", None)
    assert store.verify("s5") == []
    store.restore("s5", target, docker_client)
    assert exact_state(target) == exact_state(tree)


# --------------------------------------------------------------------------- the lock


def test_prune_refuses_while_a_run_holds_the_workspace(
    workspace: Workspace,
    lfs_dir: Path,
    tree: Path,
    tmp_path: Path,
    docker_client: docker.DockerClient,
) -> None:
    store = SnapshotStore(workspace.snapshots_dir)
    chain_of_four(tree, store)
    stored = {
        p.relative_to(store.root): p.read_bytes() for p in store.root.rglob("*") if p.is_file()
    }
    stage = tmp_path / "hold.yaml"
    stage.write_text(
        f"stage: hold\nimage: {BASE_IMAGE}\ncheckpoint: none\n"
        "packages:\n  - {name: holder, script: 'sleep 300'}\n"
    )
    run = start_cli("run", str(stage), "--lfs", str(lfs_dir))
    try:
        wait_for_container(docker_client, "holder", owner=run.pid)
        prune = run_cli("snapshots", "prune", "--keep", "1", timeout=60)
        assert prune.returncode == WorkspaceBusy.exit_code != 0
        assert prune.stdout == ""
        assert prune.stderr == (
            f"error: another lfsorch run holds the workspace {workspace.root} "
            f"(pid {run.pid})\n  hint: wait for it to finish, or use another LFSORCH_HOME\n"
        )
        with pytest.raises(WorkspaceBusy):
            api.prune_snapshots(keep_last=1, workspace=workspace)
        after = {p.relative_to(store.root): p.read_bytes() for p in store.root.rglob("*")
                 if p.is_file()}  # fmt: skip
        assert after == stored
    finally:
        run.send_signal(signal.SIGINT)
        run.communicate(timeout=60)
    prune = run_cli("snapshots", "prune", "--keep", "1", timeout=120)
    assert prune.returncode == 0, prune.stderr
    lines = prune.stdout.splitlines()
    assert lines[:4] == [
        "rebased s4 onto a full snapshot (its base was removed)",
        "removed s1",
        "removed s2",
        "removed s3",
    ]
    assert lines[4].startswith("3 snapshot(s) removed, ") and lines[4].endswith(" freed")
    assert [info.key for info in store.list()] == ["s4"]
