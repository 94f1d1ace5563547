"""The image a stage names by tag is moved to another image while a run builds (someone runs
`lfsorch images build` meanwhile): the run's keys name the image id taken at its start, so
every later package must still build in that image, not in whatever the tag names now."""

from __future__ import annotations

import contextlib
import io
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import docker
import pytest

from orchestrator import api
from orchestrator.workspace import Workspace
from tests.helpers import BASE_IMAGE

pytestmark = [pytest.mark.docker, pytest.mark.usefixtures("no_leftovers")]

TAG = "lfsorch-attack/moving:tag"


@pytest.fixture
def moving_tag(docker_client: docker.DockerClient) -> Iterator[tuple[str, str]]:
    """TAG on the base image, and the id of another image (the base plus /etc/moved)."""
    dockerfile = f"FROM {BASE_IMAGE}\nRUN echo moved > /etc/moved\n".encode()
    other, _ = docker_client.images.build(fileobj=io.BytesIO(dockerfile), rm=True)
    docker_client.images.get(BASE_IMAGE).tag(TAG)
    yield TAG, other.id
    for image in (TAG, other.id):
        with contextlib.suppress(docker.errors.APIError):
            docker_client.images.remove(image, force=True)


def test_a_tag_moved_during_the_run_does_not_change_the_image_of_later_packages(
    workspace: Workspace,
    lfs_dir: Path,
    tmp_path: Path,
    stage_file: Callable[[str, str], Path],
    moving_tag: tuple[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tag, other_id = moving_tag
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "retag.py").write_text(
        textwrap.dedent(
            f"""
            import docker, pluggy

            @pluggy.HookimplMarker("lfsorch")
            def lfsorch_package_done(run_id, stage, package, ok):
                if package == "first":
                    docker.from_env().images.get({other_id!r}).tag({tag!r})
            """
        )
    )
    monkeypatch.syspath_prepend(str(plugins))
    monkeypatch.delitem(sys.modules, "retag", raising=False)
    stage = stage_file(
        "s.yaml",
        f"""
        stage: s
        image: {tag}
        checkpoint: none
        packages:
          - name: first
            script: "true"
          - name: second
            depends: [first]
            script: "cat /etc/moved > /mnt/lfs/seen 2>&1 || echo original > /mnt/lfs/seen"
        """,
    )
    state = api.run([stage], lfs_dir, overrides=["plugins=[retag]"], workspace=workspace)
    assert state.outcome == "succeeded"
    assert (lfs_dir / "seen").read_text() == "original\n"
