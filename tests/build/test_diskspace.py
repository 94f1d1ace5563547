"""Free space before packages and snapshots, and during builds: a partition on a small tmpfs
fills, the run stops before anything is cut off half written, names the full filesystem, and
goes on once there is space; a package that fails for want of space is not retried as a build
failure."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from orchestrator import api
from orchestrator.build.diskspace import DiskFull, SpaceGuard, mount_point
from orchestrator.monitor.events import Event
from orchestrator.workspace import Workspace
from tests.helpers import BASE_IMAGE, run_build, run_cli

WriteStage = Callable[[str, str], Path]
MIB = 1 << 20


def test_short_space_prunes_then_waits_then_names_the_filesystem(tmp_path: Path) -> None:
    pruned: list[bool] = []
    guard = SpaceGuard(
        {"partition": tmp_path, "workspace": tmp_path},
        min_free=1 << 60,
        wait_s=0.2,
        prune=lambda: pruned.append(True),
    )
    with pytest.raises(DiskFull) as caught:
        guard.ensure("before s/p")
    assert pruned == [True]
    assert caught.value.message.startswith(
        f"stopped before s/p: the partition's filesystem ({mount_point(tmp_path)}, "
        f"holding {tmp_path}) has "
    )
    assert caught.value.message.endswith("MiB free, less than min_free_space 1099511627776.0 MiB")
    SpaceGuard({"workspace": tmp_path}, min_free=1, wait_s=0.1).ensure("before s/p")


@pytest.fixture
def small_partition(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs as the partition, unmounted however the test ends."""
    path = tmp_path / "lfs"
    path.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "lfsorch-test", str(path)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False)


@pytest.mark.docker
@pytest.mark.usefixtures("no_leftovers")
def test_full_partition_stops_the_run_which_resumes_once_there_is_space(
    small_partition: Path, workspace: Workspace, stage_file: WriteStage
) -> None:
    path = stage_file(
        "disk.yaml",
        f"""
        stage: disk
        image: {BASE_IMAGE}
        checkpoint: package
        packages:
          - name: filler
            script: head -c 13000000 /dev/zero > /mnt/lfs/filler
          - name: after
            depends: [filler]
            script: echo built >> /mnt/lfs/after
        """,
    )
    overrides = ["recovery.min_free_space=4m", "recovery.space_wait=1s"]
    with pytest.raises(DiskFull) as caught:
        run_build([path], small_partition, workspace, overrides)
    assert caught.value.message.startswith(
        f"stopped before the checkpoint of disk/filler: the partition's filesystem "
        f"({small_partition}, holding {small_partition}) has "
    )
    assert caught.value.message.endswith("MiB free, less than min_free_space 4.0 MiB")
    state = api.last_run()
    assert state is not None and state.outcome == "failed"
    assert [(p.name, p.status) for p in state.packages] == [
        ("filler", "done"),
        ("after", "pending"),
    ]
    # Stopped before the snapshot and before the next package: nothing half written.
    assert (small_partition / "filler").stat().st_size == 13000000
    assert not (small_partition / "after").exists()
    # The one snapshot is the partition as the run found it: none was begun after filler.
    assert len(api.list_snapshots(workspace=workspace)) == 1

    subprocess.run(["mount", "-o", "remount,size=64m", str(small_partition)], check=True)
    state, _ = run_build([path], small_partition, workspace, overrides)
    assert state.outcome == "succeeded"
    assert (small_partition / "after").read_text() == "built\n"
    assert (small_partition / "filler").stat().st_size == 13000000


@pytest.mark.docker
@pytest.mark.usefixtures("no_leftovers")
def test_full_workspace_stops_the_run_before_the_first_package(
    tmp_path: Path, lfs_dir: Path, stage_file: WriteStage
) -> None:
    path = stage_file(
        "ws.yaml",
        f"stage: ws\nimage: {BASE_IMAGE}\npackages: [{{name: p, script: 'echo x > /mnt/lfs/p'}}]\n",
    )
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    root = tmp_path / "home"
    root.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "lfsorch-test", str(root)], check=True)
    try:
        result = run_cli(
            "run", str(path), "--lfs", str(lfs_dir), "-o", "recovery.space_wait=1s", home=root
        )
        status = run_cli("status", "--json", home=root)
    finally:
        subprocess.run(["umount", str(root)], check=False)
    assert result.returncode == 3, result.stderr
    assert result.stderr.startswith(
        f"error: stopped before ws/p: the workspace's filesystem ({root}, holding {root}) has "
    )
    assert "less than min_free_space 1024.0 MiB" in result.stderr
    assert json.loads(status.stdout)["packages"][0]["status"] == "pending"
    assert sorted(p.name for p in lfs_dir.iterdir() if not p.name.startswith(".")) == []


def test_a_sampled_shortage_during_the_attempt_counts_after_the_space_came_back(
    tmp_path: Path,
) -> None:
    guard = SpaceGuard({"partition": tmp_path}, min_free=1, wait_s=0.0)
    before = time.monotonic()
    guard.observe("partition", 0)
    guard.observe("elsewhere", 0)  # not one of its places
    assert guard.short_since(before) == (
        f"the partition's filesystem ({mount_point(tmp_path)}) had 0.0 MiB free, less than "
        "min_free_space 0.0 MiB"
    )
    assert guard.short_since(time.monotonic()) is None  # seen before that moment


# A package that fills the partition: ENOSPC half way through its file.
FILLING_STAGE = f"""
stage: fill
image: {BASE_IMAGE}
checkpoint: package
retries: 2
packages:
  - name: base
    script: echo base > /mnt/lfs/base
  - name: filler
    depends: [base]
    script: head -c 20000000 /dev/zero > /mnt/lfs/filler
"""


@pytest.mark.docker
@pytest.mark.usefixtures("no_leftovers")
def test_a_build_out_of_space_waits_for_space_then_builds_again_from_its_checkpoint(
    small_partition: Path, workspace: Workspace, stage_file: WriteStage
) -> None:
    path = stage_file("fill.yaml", FILLING_STAGE)

    def more_space_soon(event: Event) -> None:
        if event.name == "recovery.decision":
            grow = ["mount", "-o", "remount,size=64m", str(small_partition)]
            threading.Timer(2.0, subprocess.run, [grow], {"check": True}).start()

    overrides = ["recovery.min_free_space=4m", "recovery.space_wait=60s"]
    state, recorded = run_build(
        [path], small_partition, workspace, overrides, subscribers=[more_space_soon]
    )
    assert state.outcome == "succeeded"
    filler = state.find("fill", "filler")
    assert filler is not None
    first, second = filler.attempts
    assert (first.failure_class, first.strategy) == ("disk", "free-space")
    assert first.reason == (
        f"exit status 1 while the partition's filesystem ({small_partition}) had 0.0 MiB free, "
        "less than min_free_space 4.0 MiB"
    )
    assert first.change == "built again from its checkpoint once there is space"
    assert second.failure_class is None
    assert (small_partition / "filler").stat().st_size == 20000000
    restores = [e.data["reason"] for e in recorded if e.name == "snapshot.restore"]
    assert restores == ["retry filler: back to the checkpoint before it"]


@pytest.mark.docker
@pytest.mark.usefixtures("no_leftovers")
def test_a_build_out_of_space_stops_the_run_naming_the_filesystem_never_retried_as_build(
    small_partition: Path, workspace: Workspace, stage_file: WriteStage
) -> None:
    path = stage_file("fill.yaml", FILLING_STAGE)
    overrides = ["recovery.min_free_space=4m", "recovery.space_wait=1s"]
    with pytest.raises(DiskFull) as caught:
        run_build([path], small_partition, workspace, overrides)
    assert caught.value.message.startswith(
        f"stopped before building fill/filler again: the partition's filesystem "
        f"({small_partition}, holding {small_partition}) has "
    )
    state = api.last_run()
    assert state is not None and state.outcome == "failed"
    filler = state.find("fill", "filler")
    assert filler is not None
    (attempt,) = filler.attempts  # its two build retries untouched
    assert (attempt.failure_class, attempt.strategy) == ("disk", "free-space")
    # Once there is space, the same command builds it again from the checkpoint before it.
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_partition)], check=True)
    state, _ = run_build([path], small_partition, workspace, overrides)
    assert state.outcome == "succeeded"
    assert (small_partition / "filler").stat().st_size == 20000000
    assert (small_partition / "base").read_text() == "base\n"
