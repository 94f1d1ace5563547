"""Every build input in the key, the command line last, --rebuild, packages side by side with
checkpoints, and the scheduler's names and errors: on the real engine."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import docker
import docker.errors
import pytest

from orchestrator import api
from orchestrator.checkpoints.store import SnapshotStore
from orchestrator.errors import LfsorchError
from orchestrator.execution.container import container_name
from orchestrator.execution.environment import BuildJob
from orchestrator.monitor.events import Event
from orchestrator.workspace import Workspace
from tests.helpers import BASE_IMAGE, partition_text, restores, run_build, run_cli, started

pytestmark = [pytest.mark.docker, pytest.mark.usefixtures("no_leftovers")]

WriteStage = Callable[[str, str], Path]


def partition(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    path.mkdir()
    return path


def cached(events: list[Event]) -> list[str]:
    return [str(e.stage) for e in events if e.name == "stage.cached"]


def checkpoints_taken(events: list[Event]) -> list[str | None]:
    return [e.package for e in events if e.name == "snapshot.create"]


@pytest.fixture
def env_stage(stage_file: WriteStage) -> Path:
    return stage_file(
        "env.yaml",
        f"""
        stage: env
        image: {BASE_IMAGE}
        packages:
          - name: write
            script: echo "$FOO ${{LFSORCH_RUN_TESTS:-0}}" > /mnt/lfs/out
        """,
    )


def test_every_configuration_layer_reaches_the_key(
    workspace: Workspace, tmp_path: Path, env_stage: Path
) -> None:
    first = partition(tmp_path, "a")
    state, recorded = run_build([env_stage], first, workspace, ["environment.FOO=a"])
    assert state.outcome == "succeeded"
    assert (first / "out").read_text() == "a 0\n"

    runs = {
        "b": (["environment.FOO=b"], "b 0\n", False),
        "full": (["environment.FOO=a", "profile=full"], "a 1\n", False),
        # The job count is output-neutral: runners of any size share checkpoints.
        "j1": (["environment.FOO=a", "makeflags=-j1"], "a 0\n", True),
        "verbose": (["environment.FOO=a", "makeflags=-j2 V=1"], "a 0\n", False),
    }
    for name, (overrides, expected, hit) in runs.items():
        lfs = partition(tmp_path, name)
        state, recorded = run_build([env_stage], lfs, workspace, overrides)
        assert state.outcome == "succeeded", name
        assert (lfs / "out").read_text() == expected, name
        assert (cached(recorded) == ["env"]) is hit, name
        assert (started(recorded) == []) is hit, name

    manifest = SnapshotStore(workspace.snapshots_dir).manifest(state.checkpoints["env"])
    assert "environment.FOO" in manifest.metadata["inputs"]
    assert "environment.LFSORCH_ATTEMPT" not in manifest.metadata["inputs"]
    assert manifest.metadata["neutral"]["makeflags.jobs"] == "-j2 V=1"
    assert manifest.metadata["definition"]["packages"][0]["environment"]["MAKEFLAGS"] == "V=1"
    shown = run_cli("snapshots", "show", "env", "--definition", check=True).stdout
    hashed_line = next(line for line in shown.splitlines() if line.startswith("hashed:"))
    assert "environment.FOO" in hashed_line and "image" in hashed_line
    neutral = (
        "environment.LFSORCH_ATTEMPT (1), makeflags.jobs (-j2 V=1), "
        "resources.cpus (None), resources.memory (None), resources.pids (None)"
    )
    assert f"neutral:   {neutral}" in shown.splitlines()


def test_command_line_beats_the_stage_file(
    workspace: Workspace, tmp_path: Path, stage_file: WriteStage, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = stage_file(
        "own.yaml",
        f"""
        stage: own
        image: {BASE_IMAGE}
        checkpoint: package
        environment: {{X: stage}}
        packages:
          - {{name: p, environment: {{Y: package}}, script: 'echo "$X $Y" > /mnt/lfs/out'}}
        """,
    )
    store = SnapshotStore(workspace.snapshots_dir)
    lfs = partition(tmp_path, "cli")
    overrides = ["checkpoint=none", "environment.X=cli", "environment.Y=cli"]
    state, recorded = run_build([path], lfs, workspace, overrides)
    assert state.outcome == "succeeded"
    assert (lfs / "out").read_text() == "cli cli\n"
    assert checkpoints_taken(recorded) == [] and store.list() == []

    # A profile's checkpoint is a profile-layer value: the stage file's own one beats it,
    # and the user file's environment is below the stage's variables.
    user_file = tmp_path / "user.yaml"
    user_file.write_text("environment: {X: user}\n")
    monkeypatch.setenv("LFSORCH_CONFIG", str(user_file))
    lfs = partition(tmp_path, "profile")
    state, recorded = run_build([path], lfs, workspace, ["profile=minimal"])
    assert state.outcome == "succeeded"
    assert (lfs / "out").read_text() == "stage package\n"
    # One package: the stage's checkpoint and the package's are one.
    assert checkpoints_taken(recorded) == [None, "p"]
    assert state.checkpoints["own"] == state.checkpoints["own/p"] == state.partition_at


@pytest.fixture
def two_stages(stage_file: WriteStage) -> Path:
    stage_file(
        "one.yaml",
        f"stage: one\nimage: {BASE_IMAGE}\n"
        "packages:\n  - {name: base, script: 'echo one >> /mnt/lfs/one'}\n",
    )
    return stage_file(
        "two.yaml",
        f"stage: two\nrequires: [one]\nimage: {BASE_IMAGE}\n"
        "packages:\n  - {name: top, script: 'echo two >> /mnt/lfs/two'}\n",
    )


def test_rebuild_builds_on_a_partition_already_at_the_checkpoint(
    workspace: Workspace, lfs_dir: Path, two_stages: Path
) -> None:
    state, recorded = run_build([two_stages], lfs_dir, workspace)
    assert started(recorded) == ["one/base", "two/top"]

    state, recorded = run_build([two_stages], lfs_dir, workspace, rebuild=True)
    assert state.outcome == "succeeded"
    assert started(recorded) == ["one/base", "two/top"]
    # Stage two builds on what this run built, not on the older checkpoint of stage one.
    assert restores(recorded) == [("one", "--rebuild: back to the checkpoint before it")]
    # Built again from the partition before each stage, never on top of the old build.
    assert partition_text(lfs_dir) == {"one": "one\n", "two": "two\n"}

    state, recorded = run_build([two_stages], lfs_dir, workspace, rebuild_stages=("two",))
    assert state.outcome == "succeeded"
    assert started(recorded) == ["two/top"]
    assert restores(recorded) == [("two", "--rebuild: back to the checkpoint before it")]
    assert partition_text(lfs_dir) == {"one": "one\n", "two": "two\n"}

    def lfsorch(*args: str) -> subprocess.CompletedProcess[str]:
        return run_cli("run", str(two_stages), "--lfs", str(lfs_dir), *args, timeout=120)

    done = lfsorch("--rebuild-stage", "one")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "start  one/base" in done.stdout and "start  two/top" not in done.stdout
    assert "cached two" in done.stdout
    refused = lfsorch("--rebuild-stage", "three")
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines()[0] == (
        "error: --rebuild-stage three: no such stage in this plan"
    )
    assert partition_text(lfs_dir) == {"one": "one\n", "two": "two\n"}


@pytest.fixture
def levels(stage_file: WriteStage) -> Path:
    stamp = "date +%s.%N > /mnt/lfs/{0}.start; sleep 2; date +%s.%N > /mnt/lfs/{0}.end"
    return stage_file(
        "levels.yaml",
        f"""
        stage: levels
        image: {BASE_IMAGE}
        checkpoint: package
        packages:
          - {{name: a, script: "{stamp.format("a")}"}}
          - {{name: b, script: "{stamp.format("b")}"}}
          - {{name: c, depends: [a, b], script: "echo c >> /mnt/lfs/c"}}
          - name: d
            depends: [a]
            script: |
              if [ -e /mnt/lfs/half ]; then echo "built on half-installed files"; exit 9; fi
              echo partial > /mnt/lfs/half
              [ "$LFSORCH_ATTEMPT" -gt 1 ]  # fails the first time, in the first run
              rm /mnt/lfs/half
        """,
    )


def test_a_level_builds_side_by_side_and_is_one_checkpoint(
    workspace: Workspace, tmp_path: Path, levels: Path
) -> None:
    lfs = partition(tmp_path, "j2")
    state, recorded = run_build([levels], lfs, workspace, parallel=2)
    assert state.outcome == "failed"

    def stamp(name: str) -> float:
        return float((lfs / name).read_text())

    assert stamp("a.start") < stamp("b.end") and stamp("b.start") < stamp("a.end")
    assert checkpoints_taken(recorded) == [None, "a, b"]
    assert (lfs / "c").read_text() == "c\n" and (lfs / "half").exists()

    state, recorded = run_build([levels], lfs, workspace, parallel=2)
    assert state.outcome == "succeeded", [p.model_dump() for p in state.packages]
    assert restores(recorded) == [("levels", "resume: back to the last checkpoint")]
    assert sorted(started(recorded)) == ["levels/c", "levels/d"]
    assert checkpoints_taken(recorded) == ["c, d", None]
    assert (lfs / "c").read_text() == "c\n"  # its level was rolled back, then built again
    assert not (lfs / "half").exists()

    # At -j 1, a checkpoint after every package, as before.
    _, recorded = run_build([levels], partition(tmp_path, "j1"), Workspace(tmp_path / "w1"))
    assert started(recorded) == ["levels/a", "levels/b", "levels/c", "levels/d"]
    assert checkpoints_taken(recorded) == [None, "a", "b", "c"]  # d failed its first attempt


def test_names_docker_refuses_stay_apart_and_keep_their_progress(
    workspace: Workspace, lfs_dir: Path, stage_file: WriteStage
) -> None:
    path = stage_file(
        "names.yaml",
        f"""
        stage: names
        image: {BASE_IMAGE}
        packages:
          - name: gtk+
            script: for i in 1 2 3 4; do echo plus$i; sleep 0.5; done; echo > /mnt/lfs/plus
          - {{name: gtk_, script: "sleep 1; echo > /mnt/lfs/underscore"}}
        """,
    )
    state, recorded = run_build([path], lfs_dir, workspace, parallel=2)
    assert state.outcome == "succeeded", [p.model_dump() for p in state.packages]
    assert sorted(p.name for p in state.packages if p.status == "done") == ["gtk+", "gtk_"]
    assert (lfs_dir / "plus").is_file() and (lfs_dir / "underscore").is_file()
    progress = {e.package for e in recorded if e.name == "build.progress"}
    assert "gtk+" in progress


def test_a_real_error_beside_a_running_build_is_reported(
    workspace: Workspace,
    lfs_dir: Path,
    stage_file: WriteStage,
    docker_client: docker.DockerClient,
) -> None:
    """Another user takes the next container's name while a build runs: that container
    cannot be created, and that, not the interrupt of the build beside it, is what the run
    says. (Removing the image's tag no longer does it: containers are made from the id.)"""
    path = stage_file(
        "vanish.yaml",
        f"""
        stage: vanish
        image: {BASE_IMAGE}
        checkpoint: none
        packages:
          - {{name: slow, script: "sleep 30"}}
          - {{name: quick, script: "true"}}
          - {{name: next, depends: [quick], script: "true"}}
        """,
    )
    squatters: list[str] = []

    def take_the_name(event: Event) -> None:
        if event.name == "build.complete" and event.package == "quick":
            job = BuildJob(event.run_id or "", "vanish", "next", 1, BASE_IMAGE, "", {},
                           lfs_dir, lfs_dir, 1.0)  # fmt: skip
            squatters.append(
                docker_client.containers.create(BASE_IMAGE, name=container_name(job)).id
            )

    try:
        with pytest.raises(LfsorchError) as caught:
            run_build([path], lfs_dir, workspace, subscribers=[take_the_name], parallel=2)
    finally:
        for squatter in squatters:
            docker_client.api.remove_container(squatter, force=True)
    assert caught.value.message.startswith("vanish/next: the engine refused the container: ")
    record = api.last_run(workspace)
    assert record is not None and record.outcome == "failed"
