"""Runs with a lock (on the engine): the lock beside the stage file is used, a difference is
refused before any container starts and names what differs, and `--stop-after` ends a run
at a checkpoint."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import docker
import pytest

from orchestrator.workspace import Workspace
from tests.helpers import BASE_IMAGE, partition_text, run_cli, tree_state

pytestmark = [pytest.mark.docker]

WriteStage = Callable[[str, str], Path]


@pytest.fixture
def three(stage_file: WriteStage) -> Path:
    return stage_file(
        "three.yaml",
        f"""
        stage: three
        image: {BASE_IMAGE}
        checkpoint: package
        packages:
          - {{name: a, script: echo a > /mnt/lfs/a}}
          - {{name: b, depends: [a], script: echo b > /mnt/lfs/b}}
          - {{name: c, depends: [b], script: echo c > /mnt/lfs/c}}
        """,
    )


def test_a_run_uses_the_lock_beside_its_stage_file_or_refuses(
    workspace: Workspace,
    lfs_dir: Path,
    three: Path,
    docker_client: docker.DockerClient,
    no_leftovers: None,
) -> None:
    home = workspace.root
    made = run_cli("lock", str(three), home=home)
    assert made.returncode == 0, made.stderr
    lock = three.parent / "lfsorch.lock"
    base_id = docker_client.images.get(BASE_IMAGE).id
    assert json.loads(lock.read_text())["images"] == {BASE_IMAGE: {"id": base_id, "pull": None}}
    before = tree_state(lfs_dir)

    differing = run_cli(
        "run", str(three), "--lfs", str(lfs_dir), "-o", "source_date_epoch=5",
        "-o", "environment.FOO=1", home=home,
    )  # fmt: skip
    assert differing.returncode == 2
    assert differing.stderr.splitlines()[:3] == [
        f"error: the inputs differ from the lock {lock} (2 difference(s)); nothing was built:",
        "  source_date_epoch: locked 1677628800, the run uses 5",
        '  environment.FOO: locked (unset), the run uses "1"',
    ]
    assert not workspace.runs_dir.exists()  # refused before the run had a record
    assert tree_state(lfs_dir) == before

    # A lock naming an image nobody has, and no reference to pull it by: refused, and the
    # engine's own tag stays where it was.
    data = json.loads(lock.read_text())
    data["images"][BASE_IMAGE]["id"] = "sha256:" + "ef" * 32
    other = three.parent / "other.lock"
    other.write_text(json.dumps(data))
    refused = run_cli("run", str(three), "--lfs", str(lfs_dir), "--lock", str(other), home=home)
    assert refused.returncode == 2
    assert refused.stderr.splitlines()[1] == (
        f"  image {BASE_IMAGE}: locked sha256:{'ef' * 32}, the engine has {base_id}"
    )
    assert docker_client.images.get(BASE_IMAGE).id == base_id
    assert tree_state(lfs_dir) == before

    data["sources"] = {"../x": "00"}
    other.write_text(json.dumps(data))
    hostile = run_cli("run", str(three), "--lfs", str(lfs_dir), "--lock", str(other), home=home)
    assert hostile.returncode == 2
    assert hostile.stderr.startswith(f"error: {other}: not a valid lock: sources.../x.[key]:")
    assert tree_state(lfs_dir) == before

    built = run_cli("run", str(three), "--lfs", str(lfs_dir), home=home)
    assert built.returncode == 0, built.stdout + built.stderr
    assert partition_text(lfs_dir) == {"a": "a\n", "b": "b\n", "c": "c\n"}
    ignored = run_cli("run", str(three), "--lfs", str(lfs_dir), "--no-lock",
                      "-o", "environment.FOO=1", home=home)  # fmt: skip
    assert ignored.returncode == 0, ignored.stdout + ignored.stderr


def test_only_a_lock_the_user_names_moves_an_image_tag_and_never_before_the_rest_matches(
    workspace: Workspace,
    lfs_dir: Path,
    stage_file: WriteStage,
    docker_client: docker.DockerClient,
    no_leftovers: None,
) -> None:
    # A tag of this test's own, held by the base image; the lock wants the host image there.
    repository, tag = "lfsorch-test/locktag", f"t{os.getpid()}"
    name = f"{repository}:{tag}"
    base_id = docker_client.images.get(BASE_IMAGE).id
    host_id = docker_client.images.get("lfsorch/host:bookworm").id
    docker_client.images.get(BASE_IMAGE).tag(repository, tag)
    stage = stage_file(
        "tagged.yaml",
        f"""
        stage: tagged
        image: {name}
        packages:
          - {{name: a, script: echo a > /mnt/lfs/a}}
        """,
    )
    home = workspace.root
    try:
        made = run_cli("lock", str(stage), home=home)
        assert made.returncode == 0, made.stderr
        beside = stage.parent / "lfsorch.lock"
        data = json.loads(beside.read_text())
        data["images"][name]["id"] = host_id
        beside.write_text(json.dumps(data))
        before = tree_state(lfs_dir)

        found = run_cli("run", str(stage), "--lfs", str(lfs_dir), home=home)
        assert (found.returncode, found.stderr.splitlines()[1]) == (
            2,
            f"  image {name}: locked {host_id}, the engine has {base_id}",
        )
        assert docker_client.images.get(name).id == base_id  # a found lock moves no tag

        named_but_other = run_cli(
            "run", str(stage), "--lfs", str(lfs_dir), "--lock", str(beside),
            "-o", "environment.FOO=1", home=home,
        )  # fmt: skip
        assert named_but_other.returncode == 2
        assert named_but_other.stderr.splitlines()[1:3] == [
            f"  image {name}: locked {host_id}, the engine has {base_id}",
            '  environment.FOO: locked (unset), the run uses "1"',
        ]
        assert docker_client.images.get(name).id == base_id  # refused before any change
        assert tree_state(lfs_dir) == before

        named = run_cli("run", str(stage), "--lfs", str(lfs_dir), "--lock", str(beside), home=home)
        assert named.returncode == 0, named.stdout + named.stderr
        assert docker_client.images.get(name).id == host_id
        assert partition_text(lfs_dir) == {"a": "a\n"}
    finally:
        docker_client.images.remove(name)


def test_stop_after_ends_the_run_at_a_checkpoint(
    workspace: Workspace, lfs_dir: Path, three: Path, stage_file: WriteStage, no_leftovers: None
) -> None:
    home = workspace.root

    def lfsorch(*args: str, path: Path = three) -> tuple[int, str]:
        result = run_cli("run", str(path), "--lfs", str(lfs_dir), *args, home=home)
        return result.returncode, result.stdout + result.stderr

    code, output = lfsorch("--stop-after", "three/b")
    assert code == 0, output
    assert "start  three/b" in output and "three/c" not in output
    assert partition_text(lfs_dir) == {"a": "a\n", "b": "b\n"}
    code, output = lfsorch()
    assert code == 0, output
    assert "start  three/c" in output and "start  three/a" not in output
    assert partition_text(lfs_dir) == {"a": "a\n", "b": "b\n", "c": "c\n"}

    code, output = lfsorch("--stop-after", "three/zzz")
    assert (code, output.splitlines()[0]) == (
        2, "error: --stop-after three/zzz: no package zzz in stage three"
    )  # fmt: skip
    code, output = lfsorch("--stop-after", "four")
    assert (code, output.splitlines()[0]) == (
        2, "error: --stop-after four: no such stage in this plan"
    )  # fmt: skip
    whole = stage_file(
        "whole.yaml",
        f"stage: whole\nimage: {BASE_IMAGE}\npackages:\n  - {{name: x, script: 'true'}}\n",
    )
    code, output = lfsorch("--stop-after", "whole/x", path=whole)
    assert (code, output.splitlines()[0]) == (
        2,
        "error: --stop-after whole/x: no checkpoint follows each package of whole in this run",
    )
    assert partition_text(lfs_dir) == {"a": "a\n", "b": "b\n", "c": "c\n"}


def test_a_ci_job_names_what_it_cannot_use(
    workspace: Workspace, lfs_dir: Path, three: Path, tmp_path: Path
) -> None:
    home = workspace.root
    base = ["ci", "job", str(three), "--lfs", str(lfs_dir), "--registry", "127.0.0.1:9/x"]
    no_lock = run_cli(*base, "--until", "three", home=home)
    assert (no_lock.returncode, no_lock.stderr.splitlines()[0]) == (
        2, f"error: no lock beside {three}: a CI job builds a lock's inputs"
    )  # fmt: skip
    assert run_cli("lock", str(three), home=home).returncode == 0
    unknown = run_cli(*base, "--until", "three/zzz", home=home)
    assert (unknown.returncode, unknown.stderr.splitlines()[0]) == (
        2, "error: --until three/zzz: no such stage or package in this plan"
    )  # fmt: skip
    before = tree_state(lfs_dir)
    unreachable = run_cli(*base, "--until", "three", home=home)
    assert unreachable.returncode == 3
    assert unreachable.stderr.startswith(
        "error: cannot ask the registry for 127.0.0.1:9/x/snapshot:"
    )
    assert tree_state(lfs_dir) == before and not workspace.runs_dir.exists()


def test_a_lock_of_other_stages_beside_is_left_alone(
    workspace: Workspace, lfs_dir: Path, three: Path, stage_file: WriteStage
) -> None:
    home = workspace.root
    assert run_cli("lock", str(three), home=home).returncode == 0
    other = stage_file(
        "other.yaml",
        f"stage: other\nimage: {BASE_IMAGE}\npackages:\n  - {{name: x, script: 'true'}}\n",
    )
    alone = run_cli("run", str(other), "--lfs", str(lfs_dir), home=home)
    assert alone.returncode == 0, alone.stdout + alone.stderr
    after = stage_file(
        "after.yaml",
        f"stage: after\nimage: {BASE_IMAGE}\nrequires: [three]\n"
        "packages:\n  - {name: y, script: 'true'}\n",
    )
    partly = run_cli("run", str(after), "--lfs", str(lfs_dir), home=home)
    assert partly.returncode == 2
    assert partly.stderr.splitlines()[1] == "  stage after: not in the lock (it locks three)"
