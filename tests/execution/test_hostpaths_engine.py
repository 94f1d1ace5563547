"""The path check on the real engine: a process in another mount namespace than the engine's
(here a private one, with a tmpfs over the partition's path) is refused before anything is
built; the engine's own namespace needs no probe at all."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import docker
import pytest

from orchestrator.execution import engine, hostpaths
from orchestrator.execution.hostpaths import EnginePathMismatch, SharedPath
from tests.helpers import BASE_IMAGE, REPO, tree_state

pytestmark = pytest.mark.docker


def test_the_engine_here_shares_this_process_paths() -> None:
    """The tests run beside the engine: no probe container is needed for a run."""
    assert hostpaths.engine_shares_mounts()


def test_the_probe_accepts_directories_the_engine_mounts_as_they_are(
    docker_client: docker.DockerClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hostpaths, "engine_shares_mounts", lambda: False)
    (tmp_path / "lfs").mkdir()
    paths = [
        SharedPath("the LFS partition", tmp_path / "lfs", "--lfs"),
        SharedPath("the workspace", tmp_path / "ws-not-made-yet", "LFSORCH_HOME"),
    ]
    hostpaths.check_engine_paths(docker_client, paths, ["lfsorch/none:missing", BASE_IMAGE])


@pytest.mark.skipif(shutil.which("unshare") is None, reason="util-linux's unshare missing")
def test_a_partition_the_engine_sees_elsewhere_is_refused(
    docker_client: docker.DockerClient, tmp_path: Path
) -> None:
    lfs, home, stages = tmp_path / "lfs", tmp_path / "home", tmp_path / "stages"
    lfs.mkdir()
    (lfs / "keep").write_text("host's partition\n")
    stages.mkdir()
    (stages / "one.yaml").write_text(
        f"stage: one\nimage: {BASE_IMAGE}\npackages:\n"
        "  - name: write\n    script: echo built > /mnt/lfs/built\n"
    )
    before = tree_state(lfs)
    # In a private mount namespace a tmpfs hides the partition: lfsorch there sees an empty
    # directory where the engine sees the host's.
    script = f'mount -t tmpfs none "$1" && shift && exec "{sys.executable}" -m orchestrator "$@"'
    command = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh"]
    command += [str(lfs), "run", str(stages / "one.yaml"), "--lfs", str(lfs)]
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        cwd=REPO,
        env={"PATH": "/usr/bin:/bin", "LFSORCH_HOME": str(home), "PYTHONPATH": str(REPO)},
        timeout=300,
    )

    assert done.returncode == 2, done.stderr
    opening = (
        "lfsorch runs in a container here: mount each at the same path inside and out: "
        if hostpaths.in_container()
        else "the engine runs in another mount namespace: give each the same path in both: "
    )
    assert done.stderr == (
        "error: the Docker engine does not see these directories at the paths lfsorch uses, "
        "so build containers would not get them:\n"
        f"  the LFS partition {lfs}: the engine has another directory at that path\n"
        f"  hint: {opening}-v {lfs}:{lfs} and --lfs {lfs}\n"
    )
    assert tree_state(lfs) == before
    assert not home.exists()


def test_an_engine_with_another_kernel_is_refused(
    docker_client: docker.DockerClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The boot id the probe reads is the engine's kernel's; this process reads another one
    (as on a runner that talks to an engine elsewhere over tcp://)."""
    monkeypatch.setattr(hostpaths, "engine_shares_mounts", lambda: False)
    monkeypatch.setattr(hostpaths, "_read_boot_id", lambda: "another-kernel")
    paths = [SharedPath("the LFS partition", tmp_path, "--lfs")]
    with pytest.raises(EnginePathMismatch) as caught:
        hostpaths.check_engine_paths(docker_client, paths, [BASE_IMAGE])
    assert str(caught.value) == (
        f"the Docker engine at {engine.endpoint()} runs on another machine (its "
        "kernel's boot id is not this one's): it cannot bind-mount this machine's "
        "directories into build containers\n  hint: run lfsorch on the engine's machine, or "
        "in a container there with the engine's socket and the directories mounted at the "
        "same path inside and out"
    )


def test_the_refusal_is_an_error_with_exit_status_2() -> None:
    assert EnginePathMismatch("x").exit_code == 2
