"""Checkpoints during runs on the real engine: cache hits, resume onto a checkpoint, --from,
the drift check, and per-package checkpoints."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import docker
import pytest

from orchestrator import api
from orchestrator.build.checkpointing import PartitionDrift
from orchestrator.checkpoints.store import SnapshotStore
from orchestrator.workspace import Workspace
from tests.helpers import (
    BASE_IMAGE,
    partition_text,
    restores,
    run_build,
    run_cli,
    start_cli,
    started,
    wait_for_container,
)

pytestmark = [pytest.mark.docker, pytest.mark.usefixtures("no_leftovers")]

WriteStage = Callable[[str, str], Path]


@pytest.fixture
def two_stages(stage_file: WriteStage) -> list[Path]:
    stage_file(
        "one.yaml",
        f"""
        stage: one
        image: {BASE_IMAGE}
        packages:
          - {{name: base, script: "mkdir -p /mnt/lfs/usr && echo one > /mnt/lfs/usr/one"}}
        """,
    )
    two = stage_file(
        "two.yaml",
        f"""
        stage: two
        requires: [one]
        image: {BASE_IMAGE}
        assets: [control]
        packages:
          - {{name: a, script: "echo a >> /mnt/lfs/usr/a"}}
          - name: b
            depends: [a]
            script: |
              if [ -e /mnt/lfs/usr/half ]; then echo "built on half-installed files"; exit 9; fi
              echo partial > /mnt/lfs/usr/half
              if [ -e /stage/control/hold ]; then sleep 300; fi
              if [ -e /stage/control/fail ]; then exit 4; fi
              rm /mnt/lfs/usr/half
              echo b > /mnt/lfs/usr/b
        """,
    )
    (two.parent / "control").mkdir()
    return [two]


def test_cache_hit_restores_instead_of_building(
    workspace: Workspace, tmp_path: Path, two_stages: list[Path]
) -> None:
    first = tmp_path / "first"
    first.mkdir()
    state, recorded = run_build(two_stages, first, workspace)
    assert state.outcome == "succeeded"
    assert started(recorded) == ["one/base", "two/a", "two/b"]
    assert [e.stage for e in recorded if e.name == "snapshot.create"] == ["(initial)", "one", "two"]

    # Each manifest records what its key was made of.
    manifest = SnapshotStore(workspace.snapshots_dir).manifest(state.checkpoints["two"])
    assert manifest.metadata["image"] == docker.from_env().images.get(BASE_IMAGE).id
    assert manifest.metadata["sources"] == {}
    assert manifest.metadata["definition"]["stage"] == "two"
    assert [p["name"] for p in manifest.metadata["definition"]["packages"]] == ["a", "b"]
    shown = run_cli("snapshots", "show", "two", check=True).stdout
    assert f"image:     {manifest.metadata['image']}" in shown
    assert "built by:  a, b  (--definition)" in shown

    second = tmp_path / "second"
    second.mkdir()
    state, recorded = run_build(two_stages, second, workspace)
    assert state.outcome == "succeeded"
    assert started(recorded) == []
    assert [e.stage for e in recorded if e.name == "stage.cached"] == ["one", "two"]
    assert (
        partition_text(second)
        == partition_text(first)
        == {
            "usr": "<dir>",
            "usr/a": "a\n",
            "usr/b": "b\n",
            "usr/one": "one\n",
        }
    )

    third = tmp_path / "third"
    third.mkdir()
    _, recorded = run_build(two_stages, third, workspace, rebuild=True)
    assert started(recorded) == ["one/base", "two/a", "two/b"]


def test_a_second_partition_builds_on_a_stage_from_the_cache(
    workspace: Workspace, tmp_path: Path, two_stages: list[Path]
) -> None:
    first = tmp_path / "first"
    first.mkdir()
    assert run_build(two_stages, first, workspace)[0].outcome == "succeeded"
    # Stage two changes: on a new partition, stage one comes from the cache, two is built on
    # it. The restore keeps the partition's marker, and must keep the checkpoint's root too.
    two = two_stages[0]
    two.write_text(two.read_text().replace('"echo a >>', '"echo a2 >>'))
    second = tmp_path / "second"
    second.mkdir()
    state, recorded = run_build(two_stages, second, workspace)
    assert state.outcome == "succeeded", state.packages
    assert [e.stage for e in recorded if e.name == "stage.cached"] == ["one"]
    assert started(recorded) == ["two/a", "two/b"]
    assert partition_text(second) == {
        "usr": "<dir>",
        "usr/a": "a2\n",
        "usr/b": "b\n",
        "usr/one": "one\n",
    }


def test_failed_build_resumes_on_the_restored_checkpoint(
    workspace: Workspace, lfs_dir: Path, two_stages: list[Path]
) -> None:
    fail = two_stages[0].parent / "control/fail"
    fail.touch()
    state, _ = run_build(two_stages, lfs_dir, workspace)
    assert state.outcome == "failed"
    assert (lfs_dir / "usr/half").read_text() == "partial\n"  # half-installed, as it failed

    fail.unlink()
    state, recorded = run_build(two_stages, lfs_dir, workspace)
    assert state.outcome == "succeeded", [p.model_dump() for p in state.packages]
    assert restores(recorded) == [("two", "resume: back to the last checkpoint")]
    assert started(recorded) == ["two/a", "two/b"]
    assert partition_text(lfs_dir) == {
        "usr": "<dir>",
        "usr/a": "a\n",
        "usr/b": "b\n",
        "usr/one": "one\n",
    }


def test_killed_run_resumes_on_the_restored_checkpoint(
    workspace: Workspace,
    lfs_dir: Path,
    two_stages: list[Path],
    docker_client: docker.DockerClient,
) -> None:
    hold = two_stages[0].parent / "control/hold"
    hold.touch()
    process = start_cli("run", str(two_stages[0]), "--lfs", str(lfs_dir), stdout=subprocess.DEVNULL)
    wait_for_container(docker_client, "b", owner=process.pid)
    # The container runs before its script has written anything: kill once b is half done.
    deadline = time.monotonic() + 60
    while not (lfs_dir / "usr/half").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    process.kill()
    process.wait(timeout=30)
    assert (lfs_dir / "usr/half").exists()

    hold.unlink()
    state, recorded = run_build(two_stages, lfs_dir, workspace)
    assert [e.name for e in recorded][:2] == ["engine.cleanup", "run.start"]
    assert restores(recorded) == [("two", "resume: back to the last checkpoint")]
    assert started(recorded) == ["two/a", "two/b"]
    assert state.outcome == "succeeded"
    assert (lfs_dir / "usr/a").read_text() == "a\n"  # not "a\na\n": a was undone, then rebuilt
    assert not (lfs_dir / "usr/half").exists()


def test_from_stage_restores_the_checkpoint_before_it(
    workspace: Workspace, lfs_dir: Path, two_stages: list[Path]
) -> None:
    run_build(two_stages, lfs_dir, workspace)
    (lfs_dir / "usr/stray").write_text("made by hand\n")
    state, recorded = run_build(two_stages, lfs_dir, workspace, from_stage="two")
    assert state.outcome == "succeeded"
    assert restores(recorded) == [("two", "--from")]
    assert started(recorded) == ["two/a", "two/b"]
    assert not (lfs_dir / "usr/stray").exists()
    assert (lfs_dir / "usr/a").read_text() == "a\n"


def test_drift_is_refused_with_what_differs(
    workspace: Workspace, lfs_dir: Path, two_stages: list[Path], stage_file: WriteStage
) -> None:
    run_build(two_stages, lfs_dir, workspace)
    three = stage_file(
        "three.yaml",
        f"stage: three\nrequires: [two]\nimage: {BASE_IMAGE}\n"
        "packages:\n  - {name: c, script: 'touch /mnt/lfs/usr/c'}\n",
    )
    (lfs_dir / "usr/stray").write_text("made by hand\n")
    (lfs_dir / "usr/one").write_text("edited\n")
    with pytest.raises(PartitionDrift) as caught:
        run_build([three], lfs_dir, workspace)
    message = caught.value.message
    assert message.startswith(f"the partition {lfs_dir.resolve()} changed since checkpoint ")
    lines = message.splitlines()[1:]
    assert lines[0] == "  unexpected: usr/stray"
    assert "  size differs: usr/one (expected 4, found 7)" in lines
    assert not (lfs_dir / "usr/c").exists()


def test_package_checkpoints_resume_after_the_last_good_package(
    workspace: Workspace, lfs_dir: Path, stage_file: WriteStage
) -> None:
    path = stage_file(
        "steps.yaml",
        f"""
        stage: steps
        image: {BASE_IMAGE}
        checkpoint: package
        packages:
          - {{name: p1, script: "echo 1 >> /mnt/lfs/log"}}
          - {{name: p2, depends: [p1], script: "echo 2 >> /mnt/lfs/log"}}
          - name: p3
            depends: [p2]
            script: |
              echo 3-partial >> /mnt/lfs/log
              [ "$LFSORCH_ATTEMPT" -gt 1 ]  # fails the first time, in the first run
              echo 3 >> /mnt/lfs/log
        """,
    )
    state, recorded = run_build([path], lfs_dir, workspace)
    assert state.outcome == "failed"
    assert [e.package for e in recorded if e.name == "snapshot.create"] == [None, "p1", "p2"]

    state, recorded = run_build([path], lfs_dir, workspace)
    assert state.outcome == "succeeded"
    assert restores(recorded) == [("steps", "resume: back to the last checkpoint")]
    assert started(recorded) == ["steps/p3"]
    assert (lfs_dir / "log").read_text() == "1\n2\n3-partial\n3\n"


def test_retry_starts_from_the_checkpoint_before_the_package(
    workspace: Workspace, lfs_dir: Path, stage_file: WriteStage
) -> None:
    path = stage_file(
        "flaky.yaml",
        f"""
        stage: flaky
        image: {BASE_IMAGE}
        checkpoint: package
        retries: 1
        packages:
          - {{name: p1, script: "echo 1 > /mnt/lfs/p1"}}
          - name: p2
            depends: [p1]
            script: |
              if [ -e /mnt/lfs/half ]; then echo "built on half-installed files"; exit 9; fi
              echo partial > /mnt/lfs/half
              [ "$LFSORCH_ATTEMPT" -gt 1 ] || exit 4
              rm /mnt/lfs/half
              echo 2 > /mnt/lfs/p2
        """,
    )
    state, recorded = run_build([path], lfs_dir, workspace)
    assert state.outcome == "succeeded"
    p2 = state.find("flaky", "p2")
    assert p2 is not None and [a.exit_code for a in p2.attempts] == [4, 0]
    assert restores(recorded) == [("flaky", "retry p2: back to the checkpoint before it")]
    assert partition_text(lfs_dir) == {"p1": "1\n", "p2": "2\n"}
    # The stage's checkpoint is the tree of its last package's: an empty delta over that one,
    # while its key still chains from the checkpoint before the stage.
    store = SnapshotStore(workspace.snapshots_dir)
    stage_snapshot = store.manifest(state.checkpoints["flaky"])
    assert stage_snapshot.delta_of == state.checkpoints["flaky/p2"]
    assert stage_snapshot.parent == state.base_key
    assert [e.path for e in stage_snapshot.entries.values() if e.layer == stage_snapshot.key] == []


def test_command_line_from_and_rebuild(
    workspace: Workspace, lfs_dir: Path, two_stages: list[Path]
) -> None:
    def lfsorch(*args: str) -> str:
        done = run_cli("run", str(two_stages[0]), "--lfs", str(lfs_dir), *args, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    lfsorch()
    assert "(--from, " in lfsorch("--from", "two")
    assert "start  one/base" in lfsorch("--rebuild", "--from", "one")


@pytest.mark.parametrize("arrival", ["pull", "restore"])
def test_another_machine_continues_after_a_snapshot_image(
    workspace: Workspace,
    tmp_path: Path,
    two_stages: list[Path],
    docker_client: docker.DockerClient,
    arrival: str,
) -> None:
    first = tmp_path / "first"
    first.mkdir()
    state, _ = run_build(two_stages, first, workspace)
    assert state.outcome == "succeeded"
    store = SnapshotStore(workspace.snapshots_dir)
    key = store.resolve("two").key
    assert store.manifest(key).metadata["chain"] == {
        "first_stage": "one",
        "base": state.base_key,
    }
    image_id = store.to_image(docker_client, key)
    # Another workspace, as on another runner: only the image of the last stage, which
    # arrives by `snapshots pull` (the store only) or by a restore straight into the partition.
    elsewhere = Workspace(tmp_path / "other-home")
    partition = tmp_path / "partition"
    try:
        if arrival == "pull":
            added = SnapshotStore(elsewhere.snapshots_dir).import_image(docker_client, image_id)
            assert added.stage == "two"
            partition.mkdir()
        else:
            info = api.restore(image_id, partition, image=True, workspace=elsewhere)
            assert info.key == key
        state, recorded = run_build(two_stages, partition, elsewhere)
    finally:
        docker_client.images.remove(image_id, force=True)
    assert state.outcome == "succeeded"
    assert started(recorded) == []
    cached = [(e.stage, e.data.get("covered", False)) for e in recorded if e.name == "stage.cached"]
    assert cached == [("one", True), ("two", False)]
    assert partition_text(partition) == partition_text(first)
