"""Shared fixtures (plain helpers and constants are in tests/helpers.py). Tests marked
`docker` use the real engine; without one they are skipped, except in CI (CI=true), where a
missing engine is a failure, never a silent skip."""

from __future__ import annotations

import contextlib
import os
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import docker
import pytest

from orchestrator.errors import EngineUnavailable
from orchestrator.execution import engine
from orchestrator.workspace import Workspace
from tests.helpers import BASE_IMAGE


def _engine() -> docker.DockerClient | None:
    try:
        return engine.connect(timeout=None)
    except EngineUnavailable:
        return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not any(item.get_closest_marker("docker") for item in items):
        return
    if _engine() is not None:
        return
    if os.environ.get("CI"):
        raise pytest.UsageError("CI: tests marked `docker` need a running Docker engine")
    skip = pytest.mark.skip(reason="no Docker engine answers (start dockerd to run these)")
    for item in items:
        if item.get_closest_marker("docker"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def docker_client() -> docker.DockerClient:
    client = _engine()
    assert client is not None
    # What an lfsorch process that no longer exists left on the engine (a build killed with
    # the machine's last session, say) is not this test session's leftover: the tool's own
    # cleanup removes it first, as any command of it would.
    engine.reap_leftovers(client)
    return client


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Workspace:
    root = tmp_path / "home"
    monkeypatch.setenv("LFSORCH_HOME", str(root))
    # Keep a developer's own config files out of the tests.
    monkeypatch.setenv("LFSORCH_CONFIG", str(tmp_path / "no-user-config.yaml"))
    return Workspace(root)


@pytest.fixture
def lfs_dir(tmp_path: Path) -> Path:
    path = tmp_path / "lfs"
    path.mkdir()
    return path


@pytest.fixture
def stage_file(tmp_path: Path) -> Iterator[object]:
    """Write a stage file from YAML text: `stage_file("name.yaml", text)` -> Path."""

    def write(name: str, text: str) -> Path:
        path = tmp_path / "stages" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip())
        return path

    yield write


@pytest.fixture
def no_leftovers(docker_client: docker.DockerClient) -> Iterator[None]:
    """Fail a test that leaves any lfsorch container behind."""
    yield
    # Containers of other live lfsorch processes (a parallel test session) are not ours.
    # The engine's own list (one call): inspecting each container afterwards races with
    # other sessions removing theirs.
    left = [
        listed
        for listed in engine.managed_containers(docker_client)
        if (listed.get("Labels") or {}).get(engine.OWNER_PID) == str(os.getpid())
        or not engine.owner_alive(listed.get("Labels") or {})
    ]
    names = [engine.container_name(listed) for listed in left]
    for listed in left:
        with contextlib.suppress(docker.errors.NotFound):
            docker_client.api.remove_container(listed["Id"], force=True)
    assert names == [], f"containers left behind: {names}"


@pytest.fixture
def canary(tmp_path: Path) -> Callable[[], dict[str, tuple[bytes | None, int]]]:
    """Files outside every partition and workspace (a directory, a file, a setuid file).
    Returns a function giving each entry's bytes and mode, to compare before and after."""
    root = tmp_path / "canary"
    (root / "dir").mkdir(parents=True)
    (root / "dir" / "file").write_bytes(b"canary\n")
    setuid = root / "setuid"
    setuid.write_bytes(b"#!/bin/sh\nexit 0\n")
    os.chmod(setuid, 0o4755)

    def state() -> dict[str, tuple[bytes | None, int]]:
        return {
            str(path.relative_to(root)): (
                path.read_bytes() if path.is_file() else None,
                os.lstat(path).st_mode,
            )
            for path in [root, *sorted(root.rglob("*"))]
        }

    return state


@pytest.fixture
def half_built(stage_file: Callable[[str, str], Path]) -> Path:
    """A package that installs half of itself and then fails while FAIL is set."""
    return stage_file(
        "half.yaml",
        f"""
        stage: half
        image: {BASE_IMAGE}
        checkpoint: package
        packages:
          - name: first
            script: echo first > /mnt/lfs/first
          - name: second
            depends: [first]
            script: |
              echo line >> /mnt/lfs/count
              [ -z "${{FAIL:-}}" ]
        """,
    )
