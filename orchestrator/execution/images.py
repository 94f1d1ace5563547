"""The images lfsorch builds in: a Debian base and the LFS build host on top of it.

The base normally comes from a registry (`debian:bookworm`). Build farms are often air-gapped
except for a Debian mirror, so when the pull fails the base is made with debootstrap from the
mirror the machine's apt already uses, and imported into the engine. The host image is then
built from `images/host/Dockerfile` against that local base, never touching a registry.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import docker.errors

from orchestrator.errors import LfsorchError
from orchestrator.execution.engine import image_digest, image_id_or_none
from orchestrator.sources import aptsources
from orchestrator.spec.environment import DEFAULT_PATH
from orchestrator.workspace import Workspace

BASE_IMAGE = "lfsorch/base:bookworm"
HOST_IMAGE = "lfsorch/host:bookworm"
DEFAULT_SUITE = "bookworm"
#: The ordinary base tried before bootstrapping; None in ensure_base skips the pull.
UPSTREAM_BASE = "debian:bookworm"
IMAGES_ENV = "LFSORCH_IMAGES"

# Not org.lfsorch.managed: containers inherit image labels, and that one marks what lfsorch runs.
IMAGE_LABELS = {"org.lfsorch.image.built-by": "lfsorch"}
_TAIL_LINES = 30
_CHUNK = 1 << 20

Progress = Callable[[str], None]


def _quiet(_line: str) -> None:
    """Default progress callback: library callers that pass none get no output."""


class MirrorNotFound(LfsorchError):
    """The machine's apt sources name no usable Debian mirror."""


class BootstrapFailed(LfsorchError):
    """debootstrap or the import of its tree into the engine failed."""


class ImageBuildFailed(LfsorchError):
    """`docker build` of an lfsorch image failed."""


# --------------------------------------------------------------------------- apt sources


def pick_mirror(pairs: Iterable[tuple[str, str]]) -> tuple[str, str]:
    """The first usable main-suite (uri, suite) of PAIRS, or raise MirrorNotFound."""
    for uri, suite in pairs:
        # cdrom: needs a mounted disc, which debootstrap cannot use. bookworm-updates,
        # bookworm-security, bookworm/updates and the like live in other archives (or only
        # hold deltas), so debootstrap cannot start from them.
        if not uri.startswith("cdrom:") and "-" not in suite and "/" not in suite:
            return uri, suite
    raise MirrorNotFound(
        "no Debian mirror found in the apt sources (/etc/apt/sources.list, "
        "/etc/apt/sources.list.d/*.list or *.sources)",
        hint="pass the mirror explicitly, e.g. `lfsorch images bootstrap --mirror URL`",
    )


def apt_mirror(root: Path = Path("/")) -> tuple[str, str]:
    """(uri, suite) of the Debian mirror this machine's apt uses."""
    return pick_mirror(aptsources.deb_pairs(aptsources.machine_entries(root)))


# --------------------------------------------------------------------------- bootstrap


def bootstrap_base(
    client: docker.DockerClient,
    workspace: Workspace,
    *,
    suite: str = DEFAULT_SUITE,
    mirror: str | None = None,
    tag: str = BASE_IMAGE,
    progress: Progress = _quiet,
) -> str:
    """Make TAG from scratch with `debootstrap --variant=minbase`; return the image id."""
    debootstrap = _require_debootstrap()
    if mirror is None:
        mirror, machine_suite = apt_mirror()
        progress(f"using the machine's apt mirror {mirror} (its suite: {machine_suite})")
    previous = image_id_or_none(client, tag)
    workspace.ensure(workspace.images_dir)
    scratch = Path(tempfile.mkdtemp(prefix=f"debootstrap-{suite}-", dir=workspace.images_dir))
    try:
        _run_debootstrap(debootstrap, suite, scratch / "rootfs", mirror, progress)
        image_id = _import_tree(client, scratch / "rootfs", tag, suite, progress)
    finally:
        _remove_tree(scratch)
    if previous is not None and previous != image_id:
        _drop_if_dangling(client, previous)
    progress(f"bootstrapped {tag} ({image_id[:19]})")
    return image_id


def _require_debootstrap() -> str:
    found = shutil.which("debootstrap") or shutil.which("debootstrap", path="/usr/sbin:/sbin")
    if found is None:
        raise BootstrapFailed(
            "debootstrap is not installed, so the base image cannot be made without a registry",
            hint="apt-get install debootstrap",
        )
    if os.geteuid() != 0:
        raise BootstrapFailed(
            "debootstrap must run as root (it creates device nodes and chroots)",
            hint="run `lfsorch images bootstrap` as root, or use sudo",
        )
    return found


def _run_debootstrap(
    debootstrap: str, suite: str, target: Path, mirror: str, progress: Progress
) -> None:
    command = [debootstrap, "--variant=minbase", suite, str(target), mirror]
    progress("running " + " ".join(command))
    tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            tail.append(line)
            progress(line)
    if proc.returncode != 0:
        detail = "\n".join([*tail, *_debootstrap_log_tail(target)])
        raise BootstrapFailed(
            f"debootstrap {suite} from {mirror} failed (exit {proc.returncode}):\n{detail}",
            hint="check that the mirror carries the suite, or pass another with --mirror",
        )


def _debootstrap_log_tail(target: Path) -> list[str]:
    # debootstrap's console output is terse; the real cause is usually in its own log.
    log = target / "debootstrap" / "debootstrap.log"
    if not log.is_file():
        return []
    return ["--- debootstrap.log ---", *log.read_text(errors="replace").splitlines()[-_TAIL_LINES:]]


def _import_changes(suite: str) -> list[str]:
    # A bare imported tree has no config at all: give it what `docker run IMAGE` expects.
    return [
        'CMD ["/bin/bash"]',
        f"ENV PATH={DEFAULT_PATH}",
        "ENV LANG=C.UTF-8",
        *(f'LABEL {key}="{value}"' for key, value in IMAGE_LABELS.items()),
        'LABEL org.lfsorch.image="base"',
        f'LABEL org.lfsorch.suite="{suite}"',
    ]


def _import_tree(
    client: docker.DockerClient, tree: Path, tag: str, suite: str, progress: Progress
) -> str:
    """Stream TREE into the engine as an image; tar keeps numeric owners, devices and modes."""
    repository, _, version = tag.rpartition(":")
    progress(f"importing {tree} as {tag}")
    command = ["tar", "-C", str(tree), "--numeric-owner", "--xattrs", "-cf", "-", "."]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as tar:
        assert tar.stdout is not None and tar.stderr is not None
        pipe = tar.stdout
        stream = iter(lambda: pipe.read(_CHUNK), b"")
        try:
            answer = client.api.import_image_from_stream(
                stream, repository=repository, tag=version, changes=_import_changes(suite)
            )
        except docker.errors.APIError as exc:
            tar.kill()
            raise BootstrapFailed(f"the engine refused the imported tree: {exc}") from None
        errors = tar.stderr.read().decode(errors="replace").strip()
    if tar.returncode != 0:
        raise BootstrapFailed(f"tar of {tree} failed (exit {tar.returncode}): {errors}")
    return _imported_id(client, answer, tag)


def _imported_id(client: docker.DockerClient, answer: Any, tag: str) -> str:
    # The engine answers with JSON lines, the last one {"status": "sha256:..."} on success.
    text = answer if isinstance(answer, str) else json.dumps(answer)
    for line in reversed(text.strip().splitlines()):
        with contextlib.suppress(ValueError):
            message = json.loads(line)
            if isinstance(message, dict) and message.get("error"):
                raise BootstrapFailed(f"importing {tag} failed: {message['error']}")
    return image_digest(client, tag)


def _remove_tree(path: Path) -> None:
    """Remove a debootstrap tree, unmounting first what a failed run may have left mounted."""
    real = os.path.realpath(path)
    mounts = _mounts_under(real)
    for mount in sorted(mounts, key=len, reverse=True):
        subprocess.run(["umount", "-l", mount], check=False, capture_output=True)
    if _mounts_under(real):
        # Deleting through a live /proc or /sys mount would be wrong; leave it for a human.
        raise BootstrapFailed(f"{path} still has mounts inside; unmount them and delete it")
    shutil.rmtree(path, ignore_errors=True)


def _mounts_under(root: str) -> list[str]:
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return []
    points = [line.split()[1].replace("\\040", " ") for line in lines if len(line.split()) > 1]
    return [point for point in points if point == root or point.startswith(root + "/")]


# --------------------------------------------------------------------------- base and host


def ensure_base(
    client: docker.DockerClient,
    workspace: Workspace,
    *,
    upstream: str | None = UPSTREAM_BASE,
    progress: Progress = _quiet,
) -> str:
    """Return the id of BASE_IMAGE, pulling UPSTREAM or else bootstrapping it if absent."""
    present = image_id_or_none(client, BASE_IMAGE)
    if present is not None:
        progress(f"base: {BASE_IMAGE} is present ({present[:19]})")
        return present
    if upstream is not None:
        pulled = _try_pull(client, upstream, progress)
        if pulled is not None:
            pulled.tag(*BASE_IMAGE.rsplit(":", 1))
            progress(f"base: pulled {upstream} and tagged it {BASE_IMAGE}")
            return str(pulled.id)
    progress(f"base: bootstrapping {BASE_IMAGE} with debootstrap from the apt mirror")
    return bootstrap_base(client, workspace, progress=progress)


def _try_pull(client: docker.DockerClient, ref: str, progress: Progress) -> Any:
    repository, _, tag = ref.rpartition(":")
    progress(f"base: {BASE_IMAGE} absent, trying to pull {ref}")
    try:
        return client.images.pull(repository, tag=tag)
    except docker.errors.APIError as exc:
        reason = str(exc.explanation or exc).strip().splitlines()[0]
        progress(f"base: cannot pull {ref} ({reason})")
        return None


def images_root() -> Path:
    """The directory holding the Dockerfiles (`host/`): $LFSORCH_IMAGES or the checkout's."""
    explicit = os.environ.get(IMAGES_ENV)
    root = Path(explicit) if explicit else Path(__file__).resolve().parents[2] / "images"
    if not (root / "host" / "Dockerfile").is_file():
        raise LfsorchError(
            f"no image definitions at {root} (host/Dockerfile is missing)",
            hint=f"run from a checkout of lfsorch or set {IMAGES_ENV} to its images/ directory",
        )
    return root


def build_host(
    client: docker.DockerClient,
    workspace: Workspace,
    *,
    tag: str = HOST_IMAGE,
    rebuild: bool = False,
    progress: Progress = _quiet,
) -> str:
    """Build the LFS build host from images/host/Dockerfile on the local base; return its id.

    Without REBUILD the engine's layer cache makes an unchanged Dockerfile a no-op.
    """
    context = images_root() / "host"
    ensure_base(client, workspace, progress=progress)
    return build_image(
        client, context, tag=tag, buildargs={"BASE": BASE_IMAGE}, nocache=rebuild, progress=progress
    )


def build_image(
    client: docker.DockerClient,
    context: Path,
    *,
    tag: str,
    buildargs: dict[str, str] | None = None,
    nocache: bool = False,
    progress: Progress = _quiet,
) -> str:
    """Build CONTEXT/Dockerfile as TAG, streaming its output; return the image id."""
    previous = image_id_or_none(client, tag)
    lines = client.api.build(
        path=str(context),
        tag=tag,
        buildargs=buildargs or {},
        labels=IMAGE_LABELS,
        pull=False,  # the base is local (possibly bootstrapped); never reach for a registry
        nocache=nocache,
        rm=True,
        forcerm=True,  # intermediate containers go even when a step fails
        decode=True,
    )
    image_id = _follow_build(lines, tag, progress) or image_digest(client, tag)
    if previous is not None and previous != image_id:
        _drop_if_dangling(client, previous)
    return image_id


def _follow_build(lines: Iterable[dict[str, Any]], tag: str, progress: Progress) -> str | None:
    step_output: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
    step = "(before the first step)"
    image_id: str | None = None
    for message in lines:
        if "error" in message:
            detail = "\n".join(step_output)
            raise ImageBuildFailed(
                f"building {tag} failed at {step}: {message['error'].strip()}\n{detail}",
                hint="fix the Dockerfile or the mirror and rerun `lfsorch images build`",
            )
        aux = message.get("aux")
        if isinstance(aux, dict) and "ID" in aux:
            image_id = str(aux["ID"])
        for line in str(message.get("stream", "")).splitlines():
            if line.startswith("Step "):
                # Only the failing step's output explains a failure; older steps are noise.
                step = line
                step_output.clear()
            step_output.append(line)
            progress(line)
    return image_id


def _drop_if_dangling(client: docker.DockerClient, image_id: str) -> None:
    """Remove an image a rebuild untagged, unless something still uses or names it."""
    with contextlib.suppress(docker.errors.APIError):
        image = client.images.get(image_id)
        if not image.tags:
            client.images.remove(image_id, noprune=False)


@dataclass(frozen=True)
class ImageInfo:
    tags: tuple[str, ...]
    id: str
    size: int
    created: str


def list_images(client: docker.DockerClient) -> list[ImageInfo]:
    """lfsorch's images present in the engine (any tag under `lfsorch/`)."""
    found: list[ImageInfo] = []
    for image in client.images.list():
        tags = tuple(sorted(t for t in image.tags if t.startswith("lfsorch/")))
        if tags:
            attrs = image.attrs
            found.append(
                ImageInfo(tags, str(image.id), int(attrs.get("Size", 0)), attrs.get("Created", ""))
            )
    return sorted(found, key=lambda info: info.tags)
