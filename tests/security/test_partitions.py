"""Partitions: records per partition, the refusal list, the partition lock, containers of
other runs at restore time, and what killed snapshots and restores leave behind."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import docker
import pytest

from orchestrator import api
from orchestrator.checkpoints.store import SnapshotStore
from orchestrator.checkpoints.treescan import PARTITION_MARKER
from orchestrator.execution import engine
from orchestrator.workspace import Workspace
from tests.helpers import BASE_IMAGE, run_cli, start_cli

WriteStage = Callable[[str, str], Path]
Canary = Callable[[], dict[str, tuple[bytes | None, int]]]

PARTITION_HINT = (
    "  hint: pass a directory of its own, e.g. --lfs /mnt/lfs or a new empty directory\n"
)
WORKSPACE_HINT = "  hint: set LFSORCH_HOME to a directory of its own, e.g. ~/.local/share/lfsorch"


def partition_files(root: Path) -> dict[str, bytes | None]:
    """The partition's own files and their bytes (lfsorch's marker left out)."""
    return {
        str(path.relative_to(root)): path.read_bytes() if path.is_file() else None
        for path in sorted(root.rglob("*"))
        if path.relative_to(root).parts[0] != PARTITION_MARKER
    }


def wait_for(condition: Callable[[], object], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def running(client: docker.DockerClient, package: str) -> bool:
    filters = {"label": f"{engine.PACKAGE}={package}", "status": "running"}
    return bool(client.containers.list(filters=filters))


# ------------------------------------------------------------------ records per partition


@pytest.mark.docker
@pytest.mark.usefixtures("no_leftovers")
def test_a_run_on_another_partition_does_not_change_how_this_one_resumes(
    workspace: Workspace, tmp_path: Path, half_built: Path
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    first = api.run([half_built], a, overrides=["environment.FAIL=1"], workspace=workspace)
    assert first.outcome == "failed"
    assert (a / "count").read_text() == "line\n"  # half installed
    other = api.run([half_built], b, workspace=workspace)
    assert other.outcome == "succeeded"

    again = api.run([half_built], a, workspace=workspace)

    assert again.outcome == "succeeded"
    # Resumed from the checkpoint after `first`, not from a fresh checkpoint of the
    # half-built tree: `second` ran once on a tree without its first attempt's line.
    assert (a / "count").read_text() == "line\n"
    assert (b / "count").read_text() == "line\n"
    record_a = api.last_run(workspace, lfs_dir=a)
    record_b = api.last_run(workspace, lfs_dir=b)
    assert record_a is not None and record_b is not None
    assert (record_a.run_id, record_b.run_id) == (again.run_id, other.run_id)
    assert record_a.partition != record_b.partition
    runs = api.recent_runs(workspace=workspace)
    assert [(r.run_id, r.lfs, r.outcome) for r in runs] == [
        (again.run_id, str(a), "succeeded"),
        (other.run_id, str(b), "succeeded"),
        (first.run_id, str(a), "failed"),
    ]
    status = run_cli("status", "--json", "--lfs", str(b))
    assert status.returncode == 0, status.stderr
    assert f'"run_id": "{other.run_id}"' in status.stdout


def test_a_copied_partition_is_a_new_partition(workspace: Workspace, tmp_path: Path) -> None:
    from orchestrator.partition import Partition

    original = tmp_path / "a"
    original.mkdir()
    first = Partition.checked(original, workspace).identity()
    subprocess.run(["cp", "-a", str(original), str(tmp_path / "copy")], check=True)
    copy = Partition.checked(tmp_path / "copy", workspace).identity()
    assert first is not None and copy is not None and first != copy
    assert Partition.checked(original, workspace).identity() == first


# ------------------------------------------------------------------ refusal list

SYSTEM = [
    ("/", "/", "it is the root directory"),
    ("/usr", "/usr", "it is a system directory"),
    ("/etc/", "/etc", "it is a system directory"),
    ("/tmp", "/tmp", "it is a system directory"),
    ("/home", "/home", "it is a system directory"),
    ("/var/tmp/..", "/var/tmp/.. (= /var)", "it is a system directory"),
]


@pytest.mark.parametrize(("given", "shown", "reason"), SYSTEM)
@pytest.mark.parametrize("checkpoint", ["none", "stage"])
def test_run_refuses_system_directories(
    workspace: Workspace, stage_file: WriteStage, canary: Canary,
    given: str, shown: str, reason: str, checkpoint: str,
) -> None:  # fmt: skip
    path = stage_file(
        "s.yaml", f"stage: s\nimage: {BASE_IMAGE}\npackages: [{{name: a, script: 'true'}}]\n"
    )
    before = canary()
    result = run_cli("run", str(path), "--lfs", given, "-o", f"checkpoint={checkpoint}")
    assert result.returncode == 2
    assert (
        result.stderr
        == f"error: cannot use {shown} as the LFS partition: {reason}\n" + PARTITION_HINT
    )
    assert not os.path.lexists(Path(os.path.realpath(given)) / PARTITION_MARKER)
    assert not workspace.root.exists()
    assert canary() == before


@pytest.mark.parametrize(("given", "shown", "reason"), SYSTEM)
def test_restore_refuses_system_directories(
    workspace: Workspace, canary: Canary, given: str, shown: str, reason: str
) -> None:
    before = canary()
    result = run_cli("restore", "anything", "--lfs", given)
    assert result.returncode == 2
    assert (
        result.stderr
        == f"error: cannot use {shown} as the LFS partition: {reason}\n" + PARTITION_HINT
    )
    assert not os.path.lexists(Path(os.path.realpath(given)) / PARTITION_MARKER)
    assert canary() == before


@pytest.mark.parametrize(
    "command", [["snapshots", "list"], ["snapshots", "prune", "--keep", "1"], ["cleanup"]]
)
def test_snapshots_and_cleanup_refuse_a_system_workspace(
    command: list[str], canary: Canary
) -> None:
    before = canary()
    result = run_cli(*command, env={"LFSORCH_HOME": "/usr"})
    assert result.returncode == 2
    assert result.stderr == (
        "error: cannot use /usr as the workspace: it is a system directory\n"
        + WORKSPACE_HINT
        + "\n"
    )
    assert not os.path.lexists("/usr/snapshots") and not os.path.lexists("/usr/run.lock")
    assert canary() == before


def test_overlapping_workspace_and_partition_are_refused(
    tmp_path: Path, stage_file: WriteStage, canary: Canary
) -> None:
    stage = stage_file(
        "s.yaml", f"stage: s\nimage: {BASE_IMAGE}\npackages: [{{name: a, script: 'true'}}]\n"
    )
    lfs = tmp_path / "lfs"
    (lfs / "usr").mkdir(parents=True)
    (lfs / "usr" / "keep").write_bytes(b"keep\n")
    before, files = canary(), partition_files(lfs)

    inside = run_cli("run", str(stage), "--lfs", str(lfs), env={"LFSORCH_HOME": str(lfs / "ws")})
    assert inside.returncode == 2
    assert inside.stderr == (
        f"error: cannot use {lfs} as the LFS partition: it contains the workspace {lfs}/ws, and "
        "a restore would delete the snapshots it restores from\n"
        + WORKSPACE_HINT + ", outside the partition\n"
    )  # fmt: skip
    restore = run_cli("restore", "s", "--lfs", str(lfs), env={"LFSORCH_HOME": str(lfs)})
    assert restore.returncode == 2
    assert restore.stderr == (
        f"error: cannot use {lfs} as the LFS partition: it is the workspace itself\n"
        + PARTITION_HINT
    )
    workspace = tmp_path / "ws"
    nested = run_cli(
        "run", str(stage), "--lfs", str(workspace / "lfs"), env={"LFSORCH_HOME": str(workspace)}
    )
    assert nested.returncode == 2
    assert nested.stderr == (
        f"error: cannot use {workspace}/lfs as the LFS partition: it is inside the workspace "
        f"{workspace}\n" + PARTITION_HINT
    )
    assert partition_files(lfs) == files and canary() == before
    assert not (lfs / "ws").exists() and not (lfs / PARTITION_MARKER).exists()
    assert not workspace.exists()


def test_a_workspace_inside_a_known_partition_is_refused(tmp_path: Path) -> None:
    lfs = tmp_path / "lfs"
    (lfs / PARTITION_MARKER).mkdir(parents=True)
    result = run_cli("snapshots", "list", env={"LFSORCH_HOME": str(lfs / "deep" / "ws")})
    assert result.returncode == 2
    assert result.stderr == (
        f"error: the workspace {lfs}/deep/ws is inside the LFS partition {lfs}: a restore of the "
        "partition would delete the snapshots it restores from\n" + WORKSPACE_HINT + "\n"
    )
    assert sorted(p.name for p in lfs.iterdir()) == [PARTITION_MARKER]


def test_a_marker_replaced_by_a_symlink_is_not_followed(
    workspace: Workspace, tmp_path: Path, canary: Canary
) -> None:
    lfs = tmp_path / "lfs"
    lfs.mkdir()
    os.symlink(tmp_path / "canary" / "dir", lfs / PARTITION_MARKER)
    snapshot_of(workspace, tmp_path / "canary", "x")
    before = canary()
    result = run_cli("restore", "x", "--lfs", str(lfs))
    assert result.returncode == 1
    assert f"{lfs}/{PARTITION_MARKER} is not the directory lfsorch keeps there" in result.stderr
    assert canary() == before


# ------------------------------------------------------------------ lock and containers


def snapshot_of(workspace: Workspace, tree: Path, stage: str) -> str:
    key = (stage.encode().hex() * 64)[:64]
    SnapshotStore(workspace.snapshots_dir).create(tree, key, stage=stage)
    return key


@pytest.mark.docker
@pytest.mark.usefixtures("no_leftovers")
def test_one_run_at_a_time_per_partition_across_workspaces(
    workspace: Workspace, tmp_path: Path, stage_file: WriteStage, docker_client: docker.DockerClient
) -> None:
    stage = stage_file(
        "slow.yaml",
        f"stage: slow\nimage: {BASE_IMAGE}\ncheckpoint: none\n"
        "packages: [{name: sleeper, script: 'sleep 60'}]\n",
    )
    lfs = tmp_path / "lfs"
    lfs.mkdir()
    other = Workspace(tmp_path / "other")
    seed = tmp_path / "seed"
    seed.mkdir()
    snapshot_of(other, seed, "seed")
    first = start_cli("run", str(stage), "--lfs", str(lfs))
    try:
        wait_for(lambda: running(docker_client, "sleeper"), "the first run's container")
        env = {"LFSORCH_HOME": str(other.root)}
        hint = (
            "  hint: wait for it to finish: one run or restore at a time per partition, "
            "from any workspace\n"
        )
        busy = f"error: another lfsorch process (pid {first.pid}) is using the partition {lfs}\n"
        second = run_cli("run", str(stage), "--lfs", str(lfs), env=env)
        assert (second.returncode, second.stderr) == (3, busy + hint)
        restore = run_cli("restore", "seed", "--lfs", str(lfs), env=env)
        assert (restore.returncode, restore.stderr) == (3, busy + hint)
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=60)
    assert first.returncode == 130


@pytest.mark.docker
def test_restore_refuses_while_a_live_container_mounts_the_partition(
    workspace: Workspace, tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    lfs = tmp_path / "lfs"
    lfs.mkdir()
    (lfs / "mine").write_bytes(b"mine\n")
    snapshot_of(workspace, tmp_path / "lfs", "base")
    (lfs / "later").write_bytes(b"later\n")
    files = partition_files(lfs)
    name = f"lfsorch-test-live-{os.getpid()}"
    container = docker_client.containers.run(
        BASE_IMAGE,
        ["sleep", "120"],
        name=name,
        detach=True,
        labels=engine.owner_labels("build", run="live-run"),
        mounts=[docker.types.Mount("/mnt/lfs", str(lfs), type="bind")],
    )
    # A live build of another partition, with a tmpfs (no source) as chroot builds have.
    elsewhere = docker_client.containers.run(
        BASE_IMAGE,
        ["sleep", "120"],
        name=f"{name}-elsewhere",
        detach=True,
        labels=engine.owner_labels("build", run="other-run"),
        mounts=[docker.types.Mount("/run", None, type="tmpfs")],
    )
    other = tmp_path / "other"
    other.mkdir()
    try:
        result = run_cli("restore", "base", "--lfs", str(lfs))
        unrelated = run_cli("restore", "base", "--lfs", str(other))
    finally:
        container.remove(force=True)
        elsewhere.remove(force=True)
    assert unrelated.returncode == 0, unrelated.stderr
    assert partition_files(other) == {"mine": b"mine\n"}
    assert result.returncode == 3
    assert result.stderr == (
        f"error: live lfsorch containers use the partition {lfs}: {name} (run live-run)\n"
        "  hint: wait for that run to finish or stop it (Ctrl-C); containers of runs that are "
        "gone are removed by `lfsorch cleanup`\n"
    )
    assert partition_files(lfs) == files


@pytest.mark.docker
@pytest.mark.usefixtures("no_leftovers")
def test_restore_removes_the_orphan_of_a_killed_run_first(
    workspace: Workspace, tmp_path: Path, stage_file: WriteStage,
    docker_client: docker.DockerClient, canary: Canary,
) -> None:  # fmt: skip
    stage = stage_file(
        "orphan.yaml",
        f"""
        stage: orphan
        image: {BASE_IMAGE}
        packages:
          - name: writer
            script: while true; do echo x >> /mnt/lfs/orphan; sleep 0.1; done
        """,
    )
    lfs = tmp_path / "lfs"
    lfs.mkdir()
    (lfs / "mine").write_bytes(b"mine\n")
    files, before = partition_files(lfs), canary()
    run = start_cli("run", str(stage), "--lfs", str(lfs))
    wait_for(lambda: (lfs / "orphan").exists(), "the package to write")
    run.kill()  # the tool dies; its container goes on writing into the partition
    run.communicate(timeout=30)
    assert running(docker_client, "writer")

    result = run_cli("restore", "(initial)", "--lfs", str(lfs))

    assert result.returncode == 0, result.stderr
    # Any lfsorch command on this engine may have reaped the orphan first (another run, on a
    # shared engine); when it was still there, the restore says it removed it.
    assert re.fullmatch(r"(removed container lfsorch-\S+ of a run that is gone\n)?", result.stderr)
    assert not running(docker_client, "writer")
    time.sleep(1)  # nothing writes into the restored partition any more
    assert partition_files(lfs) == files
    assert canary() == before
    record = api.last_run(workspace, lfs_dir=lfs)
    assert record is not None
    assert record.partition_at == SnapshotStore(workspace.snapshots_dir).resolve("(initial)").key
    assert (record.outcome, [p.status for p in record.packages]) == ("interrupted", ["pending"])


# ------------------------------------------------------------------ leftovers and signals


def big_snapshot(workspace: Workspace, tmp_path: Path) -> Path:
    tree = tmp_path / "big"
    for number in range(400):
        directory = tree / f"d{number // 40}"
        directory.mkdir(parents=True, exist_ok=True)
        (directory / f"f{number}").write_bytes(os.urandom(64 * 1024))
    SnapshotStore(workspace.snapshots_dir).create(tree, "b" * 64, stage="big")
    lfs = tmp_path / "lfs"
    (lfs / "usr").mkdir(parents=True)
    (lfs / "usr" / "old").write_bytes(b"old\n")
    return lfs


def staging_beside(lfs: Path) -> list[str]:
    return sorted(p.name for p in lfs.parent.iterdir() if p.name.startswith(f".{lfs.name}."))


@pytest.mark.docker
def test_sigterm_stops_a_restore_with_a_message_and_leaves_nothing(
    workspace: Workspace, tmp_path: Path, canary: Canary
) -> None:
    lfs = big_snapshot(workspace, tmp_path)
    files, before = partition_files(lfs), canary()
    restore = start_cli("restore", "big", "--lfs", str(lfs), stderr=subprocess.PIPE)
    wait_for(lambda: staging_beside(lfs), "the restore's staging directory")
    restore.send_signal(signal.SIGTERM)
    _, stderr = restore.communicate(timeout=60)
    assert restore.returncode == 130
    assert stderr.endswith(
        f"error: interrupted: the restore into {lfs} did not finish\n"
        "  hint: run the same `lfsorch restore` again; it removes what this one left\n"
    )
    assert staging_beside(lfs) == []
    assert partition_files(lfs) == files
    assert canary() == before


@pytest.mark.docker
def test_what_a_killed_restore_leaves_is_removed_by_the_next_one_and_by_cleanup(
    workspace: Workspace, tmp_path: Path, canary: Canary
) -> None:
    lfs = big_snapshot(workspace, tmp_path)
    before = canary()
    restore = start_cli("restore", "big", "--lfs", str(lfs))
    wait_for(lambda: staging_beside(lfs), "the restore's staging directory")
    restore.kill()
    restore.communicate(timeout=30)
    left = staging_beside(lfs)
    assert left and left[0].startswith(f".{lfs.name}.restore-")

    again = run_cli("restore", "big", "--lfs", str(lfs))

    assert again.returncode == 0, again.stderr
    assert (
        f"removed {lfs.parent / left[0]}, left by an interrupted snapshot or restore"
        in again.stderr
    )
    assert staging_beside(lfs) == []
    assert partition_files(lfs) == partition_files(tmp_path / "big")

    # What a kill during a snapshot or an in-place restore leaves, made by hand; and what is
    # not lfsorch's (another partition's name, a symlink standing in for a leftover).
    store = workspace.snapshots_dir
    (store / f".{'c' * 64}.abcd1234").mkdir()
    (store / f".{'c' * 64}.abcd1234" / "archive.tar.zst").write_bytes(b"partial")
    (lfs / ".lfsorch-restore-abcd1234" / "usr").mkdir(parents=True)
    os.symlink(tmp_path / "canary" / "dir", lfs / ".lfsorch-old-abcd1234")
    (tmp_path / ".lfs.old-abcd1234" / "tree").mkdir(parents=True)
    (tmp_path / ".other.restore-abcd1234").mkdir()
    result = run_cli("cleanup")
    assert result.returncode == 0, result.stderr
    assert "removed 4 leftover staging path(s)" in result.stdout
    assert not (store / f".{'c' * 64}.abcd1234").exists()
    assert not os.path.lexists(lfs / ".lfsorch-old-abcd1234")
    assert not (lfs / ".lfsorch-restore-abcd1234").exists()
    assert not (tmp_path / ".lfs.old-abcd1234").exists()
    assert (tmp_path / ".other.restore-abcd1234").is_dir()
    assert partition_files(lfs) == partition_files(tmp_path / "big")
    assert canary() == before


@pytest.mark.parametrize("mounted", [False, True], ids=["directory", "mount-point"])
def test_restore_keeps_the_partition_identity(
    workspace: Workspace, tmp_path: Path, mounted: bool
) -> None:
    from orchestrator.partition import Partition

    if mounted and os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    source = tmp_path / "source"
    (source / "usr").mkdir(parents=True)
    (source / "usr" / "file").write_bytes(b"restored\n")
    snapshot_of(workspace, source, "base")
    lfs = tmp_path / "lfs"
    lfs.mkdir()
    if mounted:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(lfs)], check=True)
    try:
        (lfs / "stale").write_bytes(b"stale\n")
        identity = Partition.checked(lfs, workspace).identity()
        api.restore("base", lfs, workspace=workspace)
        api.restore("base", lfs, workspace=workspace)
        assert Partition.checked(lfs, workspace).identity() == identity
        assert partition_files(lfs) == partition_files(source)
        assert sorted(p.name for p in lfs.iterdir()) == [PARTITION_MARKER, "usr"]
        record = api.last_run(workspace, lfs_dir=lfs)
        assert record is not None and record.partition == identity
    finally:
        if mounted:
            subprocess.run(["umount", str(lfs)], check=True)
