"""lfsorch's own image (the top-level Dockerfile) on the real engine, as a CI runner uses it:
the engine's socket mounted, the workspace and the partition at the same path inside and out.

The image is built once per test run; the engine's layer cache keeps the dependencies' layer
(it depends on pyproject.toml alone), so a rebuild after a code change copies the code and
installs it without dependencies.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from orchestrator.execution import engine, images
from tests.helpers import BASE_IMAGE, REPO, tree_state

pytestmark = pytest.mark.docker

SELF_IMAGE = "lfsorch/lfsorch:test"
SOCKET = "/var/run/docker.sock"


@pytest.fixture(scope="module")
def self_image(docker_client: docker.DockerClient) -> str:
    # CAs this machine added (a TLS-intercepting proxy's), which pip in the build needs.
    found = sorted(Path("/usr/local/share/ca-certificates").glob("**/*.crt"))
    args = {
        "BASE": images.BASE_IMAGE,
        "EXTRA_CA_CERT": "\n".join(path.read_text() for path in found),
    }
    return images.build_image(docker_client, REPO, tag=SELF_IMAGE, buildargs=args)


@pytest.fixture
def demo_stages(tmp_path: Path) -> Path:
    """The demo stage and its assets, in a directory of their own."""
    stages = tmp_path / "stages"
    stages.mkdir()
    shutil.copy(REPO / "stages" / "demo.yaml", stages)
    shutil.copytree(REPO / "stages" / "demo", stages / "demo")
    return stages


def _lfsorch_in_image(
    client: docker.DockerClient,
    image: str,
    args: list[str],
    binds: dict[str, str],
    environment: dict[str, str] | None = None,
) -> tuple[int, str]:
    """`docker run -v SOCKET:SOCKET -v HOST:INSIDE... IMAGE ARGS`: exit status and output."""
    volumes = {SOCKET: {"bind": SOCKET, "mode": "rw"}}
    volumes.update({host: {"bind": inside, "mode": "rw"} for host, inside in binds.items()})
    with engine.managed_container(
        client,
        "test-self-image",
        image=image,
        command=args,
        volumes=volumes,
        environment=environment or {},
    ) as container:
        container.start()
        status = container.wait(timeout=600)
        return int(status["StatusCode"]), container.logs().decode(errors="replace")


@pytest.fixture
def dirs(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A workspace and an empty partition on the host."""
    workspace, lfs = tmp_path / "ws", tmp_path / "lfs"
    workspace.mkdir()
    lfs.mkdir()
    yield workspace, lfs


def test_builds_and_restores_with_the_paths_mapped_the_same(
    docker_client: docker.DockerClient,
    self_image: str,
    demo_stages: Path,
    dirs: tuple[Path, Path],
    tmp_path: Path,
) -> None:
    workspace, lfs = dirs
    second = tmp_path / "lfs2"
    second.mkdir()
    binds = {str(p): str(p) for p in (workspace, lfs, second)}
    binds[str(demo_stages)] = "/stages"  # stage files are read by lfsorch alone: any path
    env = {"LFSORCH_HOME": str(workspace)}

    code, output = _lfsorch_in_image(
        docker_client, self_image, ["run", "/stages/demo.yaml", "--lfs", str(lfs)], binds, env
    )
    assert code == 0, output
    assert "succeeded: 5 done" in output
    release = (lfs / "etc" / "demo-release").read_text()
    assert f"{lfs}/usr/bin/hello" not in release and "/mnt/lfs/usr/bin/hello" in release
    assert (lfs / "usr" / "bin" / "hello").stat().st_mode & 0o111
    assert list((workspace / "snapshots").glob("*/manifest.json.zst")), "a checkpoint was taken"

    # A second, empty partition: the checkpoint is restored, by a container the engine
    # starts (no mount namespace sandbox in an unprivileged container).
    code, output = _lfsorch_in_image(
        docker_client, self_image, ["run", "/stages/demo.yaml", "--lfs", str(second)], binds, env
    )
    assert code == 0, output
    assert "cached" in output
    assert (second / "etc" / "demo-release").read_text() == release


def test_a_partition_mounted_at_another_path_is_refused_before_anything_is_built(
    docker_client: docker.DockerClient,
    self_image: str,
    demo_stages: Path,
    dirs: tuple[Path, Path],
) -> None:
    workspace, lfs = dirs
    inside = f"/srv/lfs-{os.getpid()}"  # no such directory on the engine's host
    assert not os.path.exists(inside)
    binds = {str(workspace): str(workspace), str(lfs): inside, str(demo_stages): "/stages"}
    before = tree_state(workspace), tree_state(lfs)

    code, output = _lfsorch_in_image(
        docker_client,
        self_image,
        ["run", "/stages/demo.yaml", "--lfs", inside],
        binds,
        {"LFSORCH_HOME": str(workspace)},
    )

    assert code == 2, output
    assert output == (
        "error: the Docker engine does not see these directories at the paths lfsorch uses, "
        "so build containers would not get them:\n"
        f"  the LFS partition {inside}: here it is the host's {lfs}, mounted at another path\n"
        "  hint: lfsorch runs in a container here: mount each at the same path inside and "
        f"out: -v {lfs}:{lfs} and --lfs {lfs}\n"
    )
    assert (tree_state(workspace), tree_state(lfs)) == before
    assert not os.path.exists(inside)


def test_a_workspace_only_inside_the_container_is_refused(
    docker_client: docker.DockerClient,
    self_image: str,
    demo_stages: Path,
    dirs: tuple[Path, Path],
) -> None:
    """The image's default workspace (/var/lib/lfsorch) is in its own filesystem: the
    engine would mount another directory (its host's /var/lib) for the run directories."""
    workspace, lfs = dirs
    binds = {str(lfs): str(lfs), str(demo_stages): "/stages"}
    before = tree_state(lfs)

    code, output = _lfsorch_in_image(
        docker_client, self_image, ["run", "/stages/demo.yaml", "--lfs", str(lfs)], binds
    )

    assert code == 2, output
    assert output == (
        "error: the Docker engine does not see these directories at the paths lfsorch uses, "
        "so build containers would not get them:\n"
        "  the workspace /var/lib/lfsorch: the engine has another directory at that path\n"
        "  hint: lfsorch runs in a container here: mount each at the same path inside and "
        "out: -v /var/lib/lfsorch:/var/lib/lfsorch and -e LFSORCH_HOME=/var/lib/lfsorch\n"
    )
    assert tree_state(lfs) == before
    assert list(workspace.iterdir()) == []


def test_verify_reproducible_runs_from_the_image(
    docker_client: docker.DockerClient, self_image: str, tmp_path: Path
) -> None:
    """The two builds' partitions are made inside the workspace's `verify/`, which the
    engine sees at the same path: both builds run, and diffoscope (in the image) shows the
    difference."""
    workspace, stages = tmp_path / "ws", tmp_path / "stages"
    workspace.mkdir()
    stages.mkdir()
    (stages / "clock.yaml").write_text(
        f"stage: clock\nimage: {images.BASE_IMAGE}\npackages:\n"
        "  - name: clock\n    script: date +%s%N > /mnt/lfs/stamp\n"
    )
    binds = {str(workspace): str(workspace), str(stages): "/stages"}

    code, output = _lfsorch_in_image(
        docker_client,
        self_image,
        ["verify-reproducible", "/stages/clock.yaml"],
        binds,
        {"LFSORCH_HOME": str(workspace)},
    )

    assert code == 1, output
    assert output.count("done   clock/clock") == 2
    report = output[output.index("not reproducible") :].splitlines()
    assert report[:3] == [
        "not reproducible: the first stage that differs is clock",
        "clock: 1 differ",
        "  stamp: content (20 bytes / 20 bytes)",
    ]
    assert report[4:7] == ["diffoscope stamp:", "  | --- a/stamp", "  | +++ b/stamp"]
    assert list((workspace / "verify").iterdir()) == []


def test_builds_of_a_killed_lfsorch_container_are_leftovers_to_a_run_on_the_host(
    docker_client: docker.DockerClient, self_image: str, dirs: tuple[Path, Path], tmp_path: Path
) -> None:
    """lfsorch in a container labels its builds with that container's host name, which no
    process on the host has; the container's id goes with it, so once the engine says that
    container is gone, a run on the host removes what it left."""
    workspace, lfs = dirs
    stages = tmp_path / "held"
    stages.mkdir()
    (stages / "held.yaml").write_text(
        f"stage: held\nimage: {BASE_IMAGE}\npackages:\n"
        "  - {name: held-by-test, script: 'sleep 300'}\n"
    )
    volumes = {SOCKET: {"bind": SOCKET, "mode": "rw"}}
    volumes.update({str(p): {"bind": str(p), "mode": "rw"} for p in (workspace, lfs)})
    volumes[str(stages)] = {"bind": "/stages", "mode": "ro"}
    with engine.managed_container(
        docker_client,
        "test-self-image",
        image=self_image,
        command=["run", "/stages/held.yaml", "--lfs", str(lfs)],
        volumes=volumes,
        environment={"LFSORCH_HOME": str(workspace)},
    ) as runner:
        runner.start()
        # The build's container (the runner's engine-path probe is another, short-lived).
        owned_by_runner = {
            "label": [f"{engine.OWNER_CONTAINER}={runner.id}", f"{engine.PACKAGE}=held-by-test"]
        }
        deadline = time.monotonic() + 120
        while not docker_client.containers.list(filters=owned_by_runner):
            runner.reload()
            assert runner.status == "running", runner.logs().decode(errors="replace")
            assert time.monotonic() < deadline, "the build container never started"
            time.sleep(0.2)
        kept = engine.reap_leftovers(docker_client)
        assert docker_client.containers.list(filters=owned_by_runner), kept  # its owner runs
        runner.kill()  # no chance to clean up
        runner.wait(timeout=60)
        removed = engine.reap_leftovers(docker_client)
    assert [name for name in removed if "held-by-test" in name], removed
    assert docker_client.containers.list(all=True, filters=owned_by_runner) == []
