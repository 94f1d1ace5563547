"""The Docker engine: connection, the labels on every container lfsorch starts, and cleanup.

Every container carries labels naming its owner process (pid, start time, host), so a later
run can tell containers of a live run from leftovers of a crashed one and remove the latter.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import docker.errors
import psutil
from docker.models.containers import Container

from orchestrator.errors import EngineUnavailable, ImageMissing

LABEL_PREFIX = "org.lfsorch"
MANAGED = f"{LABEL_PREFIX}.managed"
RUN = f"{LABEL_PREFIX}.run"
STAGE = f"{LABEL_PREFIX}.stage"
PACKAGE = f"{LABEL_PREFIX}.package"
PURPOSE = f"{LABEL_PREFIX}.purpose"
OWNER_PID = f"{LABEL_PREFIX}.owner.pid"
OWNER_START = f"{LABEL_PREFIX}.owner.start"
OWNER_HOST = f"{LABEL_PREFIX}.owner.host"
# Set when lfsorch itself runs in a container of the same engine (a CI job's `docker run`
# with the engine's socket): its host name is that container's, so its liveness is the
# container's.
OWNER_CONTAINER = f"{LABEL_PREFIX}.owner.container"
_HOSTNAME_SOURCE = re.compile(r"/containers/([0-9a-f]{64})/hostname$")

_ENGINE_HINT = (
    "start the Docker engine (for example `dockerd &`) or point DOCKER_HOST at one; "
    "`lfsorch validate`, `plan` and `schema` work without it"
)


def connect(timeout: int | None = 600) -> docker.DockerClient:
    """Return a client for the engine, or raise EngineUnavailable with what to do.

    `timeout=None` suits builds: waits and log streams last as long as a package builds.
    """
    try:
        client = docker.from_env(version="auto", timeout=timeout)
        client.ping()
    except docker.errors.DockerException:
        raise EngineUnavailable(
            f"no Docker engine answers at {endpoint()}: {_ENGINE_HINT}"
        ) from None
    return client


def endpoint() -> str:
    return os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"


def _own_process_start() -> str:
    return f"{psutil.Process(os.getpid()).create_time():.2f}"


def owner_labels(purpose: str, **extra: str) -> dict[str, str]:
    """Labels for a container started by this process."""
    labels = {
        MANAGED: "true",
        PURPOSE: purpose,
        OWNER_PID: str(os.getpid()),
        OWNER_START: _own_process_start(),
        OWNER_HOST: socket.gethostname(),
    }
    container = own_container_id()
    if container is not None:
        labels[OWNER_CONTAINER] = container
    labels.update({f"{LABEL_PREFIX}.{key}": value for key, value in extra.items()})
    return labels


@functools.cache
def own_container_id() -> str | None:
    """The id of the container this process runs in; None on a host. The engine binds the
    container's /etc/hostname from the container's own directory in its data root, named by
    its id (only that mount is read: a host's mount table can name other containers'
    directories)."""
    try:
        text = Path("/proc/self/mountinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        fields = line.split(" ")
        if len(fields) > 4 and fields[4] == "/etc/hostname":
            found = _HOSTNAME_SOURCE.search(fields[3])
            if found:
                return found.group(1)
    return None


def owner_alive(labels: dict[str, str], client: docker.DockerClient | None = None) -> bool:
    if labels.get(OWNER_HOST) != socket.gethostname():
        # Another machine's or another container's run. A container of this engine is
        # judged by the engine: gone or stopped, its builds are leftovers. Anything else
        # cannot be judged from here, so it is kept.
        owner = labels.get(OWNER_CONTAINER)
        if client is None or not owner:
            return True
        return _container_running(client, owner)
    try:
        pid = int(labels.get(OWNER_PID, "0"))
        process = psutil.Process(pid)
    except (ValueError, psutil.NoSuchProcess, psutil.AccessDenied):
        return False
    return f"{process.create_time():.2f}" == labels.get(OWNER_START)


def _container_running(client: docker.DockerClient, container_id: str) -> bool:
    try:
        attrs = client.api.inspect_container(container_id)
    except docker.errors.NotFound:
        return False
    except docker.errors.APIError:
        return True
    return bool((attrs.get("State") or {}).get("Running"))


def managed_containers(
    client: docker.DockerClient, *, running: bool = False
) -> list[dict[str, Any]]:
    """lfsorch's containers as the engine lists them (Id, Names, Labels, Mounts, State), in
    one call: inspecting each afterwards races with containers other runs remove meanwhile."""
    filters: dict[str, Any] = {"label": f"{MANAGED}=true"}
    if running:
        filters["status"] = "running"
    return list(client.api.containers(all=not running, filters=filters))


def container_name(listed: dict[str, Any]) -> str:
    names = listed.get("Names") or [listed.get("Id", "?")[:12]]
    return str(names[0]).lstrip("/")


def reap_leftovers(client: docker.DockerClient) -> list[str]:
    """Remove containers left by lfsorch processes that no longer exist; return their names."""
    removed: list[str] = []
    for listed in managed_containers(client):
        if owner_alive(listed.get("Labels") or {}, client):
            continue
        with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
            client.api.remove_container(listed["Id"], force=True)
            removed.append(container_name(listed))
    return removed


def remove_quietly(container: Container) -> None:
    """Kill and remove a container, ignoring that it may already be gone."""
    with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
        container.remove(force=True)


@contextlib.contextmanager
def managed_container(
    client: docker.DockerClient, purpose: str, labels: dict[str, str] | None = None, **create: Any
) -> Iterator[Container]:
    """Create a labelled container and remove it on every way out (error, Ctrl-C)."""
    all_labels = owner_labels(purpose)
    all_labels.update(labels or {})
    container = client.containers.create(labels=all_labels, **create)
    try:
        yield container
    finally:
        remove_quietly(container)


def image_id_or_none(client: docker.DockerClient, ref: str) -> str | None:
    try:
        return str(client.images.get(ref).id)
    except docker.errors.ImageNotFound:
        return None


def image_digest(client: docker.DockerClient, ref: str) -> str:
    """The image id (`sha256:...`) REF names: a content address, used in snapshot keys."""
    found = image_id_or_none(client, ref)
    if found is None:
        raise ImageMissing(
            f"image {ref} is not in the engine", hint="build it with `lfsorch images build`"
        )
    return found
