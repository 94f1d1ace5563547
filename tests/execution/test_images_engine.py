"""The base and host images on the real engine."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import docker
import docker.errors
import pytest

from orchestrator.errors import ImageMissing
from orchestrator.execution import engine, images
from orchestrator.workspace import Workspace

pytestmark = pytest.mark.docker

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def client() -> docker.DockerClient:
    return engine.connect()


@pytest.fixture
def scratch_tag(client: docker.DockerClient) -> Iterator[str]:
    """A throwaway tag under lfsorch/, removed (with its image) whatever the test does."""
    tag = f"lfsorch/test-images:{os.getpid()}"
    yield tag
    with contextlib.suppress(docker.errors.ImageNotFound):
        client.images.remove(tag, force=True)


def _run(
    client: docker.DockerClient, image: str, script: str = "", command: list[str] | None = None
) -> tuple[int, str]:
    command = command or ["bash", "-c", script]
    with engine.managed_container(client, "test-images", image=image, command=command) as container:
        container.start()
        status = container.wait(timeout=300)
        return int(status["StatusCode"]), container.logs().decode(errors="replace")


def _dangling(client: docker.DockerClient) -> set[str]:
    return {image.id for image in client.images.list(filters={"dangling": True})}


def test_build_host_meets_lfs_host_requirements(
    client: docker.DockerClient, tmp_path: Path
) -> None:
    lines: list[str] = []
    image_id = images.build_host(client, Workspace(tmp_path), progress=lines.append)

    assert image_id == images.image_digest(client, images.HOST_IMAGE)
    assert any(line.startswith("base: ") for line in lines), "ensure_base must say its path"
    code, output = _run(
        client, images.HOST_IMAGE, "cd /tmp && version-check.sh && id lfs && su lfs -c 'echo $0'"
    )
    assert code == 0, output
    assert "host check: all LFS 11.3 host requirements met" in output
    assert "g++ compilation OK" in output
    assert "uid=" in output and "(lfs)" in output
    assert output.strip().endswith("bash")  # the lfs user's login shell, as chapter 4.3 sets


def test_build_failure_names_the_step_and_its_output(
    client: docker.DockerClient, tmp_path: Path, scratch_tag: str
) -> None:
    before = _dangling(client)
    (tmp_path / "Dockerfile").write_text(
        f"FROM {images.BASE_IMAGE}\nRUN echo preparing-the-boom && exit 3\n"
    )
    with pytest.raises(images.ImageBuildFailed) as caught:
        images.build_image(client, tmp_path, tag=scratch_tag)
    message = str(caught.value)
    assert "Step 2/" in message and "preparing-the-boom" in message
    assert _dangling(client) <= before


def test_rebuild_removes_the_image_it_replaces(
    client: docker.DockerClient, tmp_path: Path, scratch_tag: str
) -> None:
    (tmp_path / "Dockerfile").write_text(f"FROM {images.BASE_IMAGE}\nRUN date +%s%N > /stamp\n")
    first = images.build_image(client, tmp_path, tag=scratch_tag)
    second = images.build_image(client, tmp_path, tag=scratch_tag, nocache=True)

    assert first != second
    assert images.image_id_or_none(client, first) is None
    assert scratch_tag in {tag for info in images.list_images(client) for tag in info.tags}


def test_missing_image_is_image_missing(client: docker.DockerClient) -> None:
    with pytest.raises(ImageMissing, match="lfsorch images build"):
        images.image_digest(client, "lfsorch/does-not-exist:never")


@pytest.mark.slow
def test_bootstrap_from_scratch(
    client: docker.DockerClient, tmp_path: Path, scratch_tag: str
) -> None:
    image_id = images.bootstrap_base(client, Workspace(tmp_path), tag=scratch_tag)

    assert image_id == images.image_digest(client, scratch_tag)
    config = client.images.get(scratch_tag).attrs["Config"]
    assert config["Cmd"] == ["/bin/bash"]
    assert config["Labels"]["org.lfsorch.image"] == "base"
    # Owners and modes must survive the tar: group shadow (42) and the setuid bit.
    code, output = _run(client, scratch_tag, "stat -c '%u:%g %a' /etc/shadow /usr/bin/passwd")
    assert code == 0, output
    assert output.split() == ["0:42", "640", "0:0", "4755"]
    assert not list((tmp_path / "images").iterdir()), "the debootstrap tree must be removed"


@pytest.mark.slow
def test_self_image_runs_lfsorch(client: docker.DockerClient, scratch_tag: str) -> None:
    """The top-level Dockerfile (lfsorch itself, for CI runners) builds and runs."""
    args = {"BASE": images.BASE_IMAGE, "EXTRA_CA_CERT": _local_ca_certs()}
    images.build_image(client, REPO, tag=scratch_tag, buildargs=args)
    code, output = _run(client, scratch_tag, command=["--help"])  # through ENTRYPOINT lfsorch
    assert code == 0, output
    assert "Usage" in output


def _local_ca_certs() -> str:
    # CAs this machine added (e.g. a TLS-intercepting proxy's), which pip in the build needs.
    found = sorted(Path("/usr/local/share/ca-certificates").glob("**/*.crt"))
    return "\n".join(path.read_text() for path in found)
