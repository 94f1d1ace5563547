"""Images through a registry: push an image and learn the digest it can be pulled by, pull
one by digest and tag it as the name the stages use, ask whether a registry holds a tag.

Every call goes through the engine (`docker.DockerClient`), so the engine's own registry
settings (credentials from `docker login`, `--insecure-registry`) apply.
"""

from __future__ import annotations

import json
from typing import Any

import docker
import docker.errors

from orchestrator.errors import ExitCode, LfsorchError


class RegistryError(LfsorchError):
    """A registry refused or did not answer; nothing was built."""

    exit_code = ExitCode.UNAVAILABLE


_HINT = "check the registry's address, `docker login` to it, or mark it insecure in the engine"


def split_reference(reference: str) -> tuple[str, str]:
    """(repository, tag) of `REPO[:TAG]`; a registry's `host:port` is not a tag."""
    repository, _, tag = reference.rpartition(":")
    if not repository or "/" in tag:
        return reference, "latest"
    return repository, tag


def push(client: docker.DockerClient, image: str, repository: str, tag: str) -> str:
    """Tag `image` as REPOSITORY:TAG, push it, and return `REPOSITORY@sha256:...`, the
    reference it can be pulled by."""
    try:
        client.images.get(image).tag(repository, tag)
        _check_stream(client.api.push(repository, tag=tag, stream=True, decode=True), repository)
        digests = client.images.get(image).attrs.get("RepoDigests") or []
    except docker.errors.APIError as exc:
        raise RegistryError(
            f"cannot push {image} to {repository}: {_explain(exc)}", _HINT
        ) from None
    for digest in digests:
        if digest.startswith(f"{repository}@sha256:"):
            return str(digest)
    raise RegistryError(f"the engine reports no digest of {image} in {repository} after the push")


def pull_as(client: docker.DockerClient, pull_reference: str, image_id: str, name: str) -> None:
    """Pull `pull_reference` (`REPO@sha256:...`), check it is the image `image_id`, and tag
    it as `name`: containers and keys then see that id under the name the stages use."""
    try:
        pulled = client.images.pull(pull_reference)
    except docker.errors.APIError as exc:
        raise RegistryError(f"cannot pull {pull_reference}: {_explain(exc)}", _HINT) from None
    if pulled.id != image_id:
        raise RegistryError(
            f"{pull_reference} is the image {pulled.id}, not {image_id} as the lock says",
            hint="the lock and the registry disagree: write the lock again with `--push`",
        )
    pulled.tag(*split_reference(name))


def has_tag(client: docker.DockerClient, reference: str) -> bool:
    """Whether the registry holds REPO:TAG (asked through the engine, nothing pulled)."""
    try:
        client.images.get_registry_data(reference)
    except docker.errors.NotFound:
        return False
    except docker.errors.APIError as exc:
        if exc.status_code in (401, 403, 404) or "not found" in str(exc).lower():
            return False
        raise RegistryError(
            f"cannot ask the registry for {reference}: {_explain(exc)}", _HINT
        ) from None
    return True


def pull(client: docker.DockerClient, reference: str) -> None:
    try:
        client.images.pull(*split_reference(reference))
    except docker.errors.APIError as exc:
        raise RegistryError(f"cannot pull {reference}: {_explain(exc)}", _HINT) from None


def _check_stream(lines: Any, repository: str) -> None:
    for line in lines:
        if isinstance(line, dict) and line.get("error"):
            raise RegistryError(f"cannot push to {repository}: {line['error']}", _HINT)


def _explain(exc: docker.errors.APIError) -> str:
    text = exc.explanation or str(exc)
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    try:
        return str(json.loads(text).get("message", text))
    except (ValueError, AttributeError):
        return str(text)
