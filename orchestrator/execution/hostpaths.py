"""Whether the Docker engine sees the directories lfsorch bind-mounts where lfsorch sees them.

Build containers get the partition, the sources view, per-attempt directories and the stage
assets as bind mounts, and a restore in a container mounts its staging directory: the engine
resolves each source path in its own filesystem. When lfsorch itself runs in a container
(the top-level Dockerfile's image with the engine's socket mounted), a path there can name
another directory on the engine's host, or none; a build would then write where nobody looks,
or fail half-way. So before anything is built, unless the engine is known to share this
process's mount namespace, a tiny container bind-mounts every such directory and prints the
kernel's boot id and each directory's device and inode number. The same boot id means the
same kernel, where a (device, inode) pair names one directory whatever path leads to it; so
equal pairs prove the engine mounts the very directories lfsorch uses. Nothing is written:
a marker file at the partition's top would change its mtime, which checkpoints record.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import socket
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import docker.errors
from docker.types import Mount

from orchestrator.errors import ExitCode, LfsorchError
from orchestrator.execution import engine

PROBE_MOUNT = "/lfsorch-probe"
BOOT_ID = "/proc/sys/kernel/random/boot_id"
_PROBE_TIMEOUT_S = 120
_NO_SOURCE = re.compile(r"bind source path does not exist: (.*)$")


class EnginePathMismatch(LfsorchError):
    """The engine would bind-mount other directories than the ones lfsorch uses."""

    exit_code = ExitCode.USER_ERROR


@dataclass(frozen=True)
class SharedPath:
    """A directory build containers get as a bind mount, and how a user points lfsorch at it."""

    role: str  # "the LFS partition"
    path: Path  # absolute, as this process sees it
    option: str = ""  # "--lfs", "LFSORCH_HOME": how to name the directory lfsorch uses


def check_engine_paths(
    client: docker.DockerClient, paths: list[SharedPath], images: list[str]
) -> None:
    """Refuse, before anything is built, when the engine would mount other directories.

    `images` are those the run uses; the probe runs in the first the engine has (with none,
    nothing can be built either, and the run's own image check says so).
    """
    if engine_shares_mounts():
        return
    image = next((ref for ref in images if engine.image_id_or_none(client, ref)), None)
    if image is None:
        return
    targets = _existing(paths)
    seen = _probe(client, image, targets)
    if seen.boot_id != _read_boot_id():
        raise EnginePathMismatch(
            f"the Docker engine at {engine.endpoint()} runs on another machine (its kernel's "
            "boot id is not this one's): it cannot bind-mount this machine's directories "
            "into build containers",
            hint="run lfsorch on the engine's machine, or in a container there with the "
            "engine's socket and the directories mounted at the same path inside and out",
        )
    mounts = _own_mounts(client)
    problems = [
        _problem(shared, target, seen.identities.get(str(target)), mounts)
        for shared, target in targets
    ]
    found = [problem for problem in problems if problem is not None]
    if found:
        raise EnginePathMismatch(
            "the Docker engine does not see these directories at the paths lfsorch uses, so "
            "build containers would not get them:\n  " + "\n  ".join(p[0] for p in found),
            hint=_advice_opening() + "; ".join(p[1] for p in found),
        )


def _advice_opening() -> str:
    if in_container():
        return "lfsorch runs in a container here: mount each at the same path inside and out: "
    return "the engine runs in another mount namespace: give each the same path in both: "


# --------------------------------------------------------------------------- detection


def engine_shares_mounts() -> bool:
    """True when the engine's process is in this process's mount namespace, with the same
    root: then every path means the same to both. False when it is not, or cannot be told
    (a remote engine, a socket whose peer is in another PID namespace)."""
    peer = _socket_peer_pid()
    if not peer:
        return False
    try:
        same_namespace = os.readlink(f"/proc/{peer}/ns/mnt") == os.readlink("/proc/self/ns/mnt")
        root, own_root = os.stat(f"/proc/{peer}/root"), os.stat("/")
    except OSError:
        return False
    return same_namespace and (root.st_dev, root.st_ino) == (own_root.st_dev, own_root.st_ino)


def _socket_peer_pid() -> int:
    """The pid (in this PID namespace) of the process behind the engine's unix socket; 0 for
    another transport, a peer this namespace cannot see, or no answer."""
    endpoint = engine.endpoint()
    if not endpoint.startswith("unix://"):
        return 0
    ucred = struct.Struct("3i")
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(endpoint.removeprefix("unix://"))
        pid, _uid, _gid = ucred.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, ucred.size)
        )
        return pid
    return 0


def in_container() -> bool:
    """Whether this process runs in a container (Docker's or Podman's marker file, or a
    container cgroup); used only to word the advice."""
    if os.path.exists("/.dockerenv") or os.path.exists("/run/.containerenv"):
        return True
    try:
        text = Path("/proc/1/cgroup").read_text()
    except OSError:
        return False
    return any(word in text for word in ("docker", "kubepods", "containerd", "libpod"))


# --------------------------------------------------------------------------- the probe


@dataclass(frozen=True)
class _Seen:
    boot_id: str
    identities: dict[str, tuple[int, int] | None]  # path here -> (dev, ino) the engine mounted


def _existing(paths: list[SharedPath]) -> list[tuple[SharedPath, Path]]:
    """Each path, or its nearest existing ancestor (lfsorch creates the rest below it);
    a directory named twice is probed once."""
    targets: list[tuple[SharedPath, Path]] = []
    seen: set[Path] = set()
    for shared in paths:
        target = Path(os.path.realpath(shared.path))
        while not target.is_dir() and target != target.parent:
            target = target.parent
        if target not in seen:
            seen.add(target)
            targets.append((shared, target))
    return targets


def _probe(
    client: docker.DockerClient, image: str, targets: list[tuple[SharedPath, Path]]
) -> _Seen:
    """Run the probe; a directory the engine has no source for is reported as None."""
    missing: set[str] = set()
    while True:
        mounted = [(i, t) for i, (_s, t) in enumerate(targets) if str(t) not in missing]
        try:
            output = _run_probe(client, image, mounted)
        except docker.errors.APIError as exc:
            # The engine refuses a bind mount whose source it lacks: note it, probe the rest.
            said = _NO_SOURCE.search(str(exc.explanation or ""))
            path = said.group(1).strip() if said else None
            if path is None or path in missing or path not in {str(t) for _i, t in mounted}:
                raise LfsorchError(
                    f"the Docker engine refused the container that checks the paths it "
                    f"mounts: {exc.explanation or exc}"
                ) from None
            missing.add(path)
            continue
        return _parse(output, mounted, missing)


def _run_probe(client: docker.DockerClient, image: str, mounted: list[tuple[int, Path]]) -> str:
    mounts = [Mount(f"{PROBE_MOUNT}/{i}", str(t), type="bind", read_only=True) for i, t in mounted]
    script = f"cat {BOOT_ID}" + "".join(
        f"; stat -c '{i} %d %i' {shlex.quote(f'{PROBE_MOUNT}/{i}')}" for i, _t in mounted
    )
    with engine.managed_container(
        client,
        "path-check",
        image=image,
        command=["sh", "-c", script],
        user="0:0",
        network_mode="none",
        mounts=mounts,
        cap_drop=["ALL"],
        security_opt=["no-new-privileges"],
    ) as container:
        container.start()
        status = container.wait(timeout=_PROBE_TIMEOUT_S)
        output = container.logs(stdout=True, stderr=True).decode(errors="replace")
        if status.get("StatusCode") != 0:
            raise LfsorchError(
                f"the container that checks the paths the engine mounts failed: {output.strip()}"
            )
        return output


def _parse(output: str, mounted: list[tuple[int, Path]], missing: set[str]) -> _Seen:
    lines = output.split()
    boot_id, fields = (lines[0], lines[1:]) if lines else ("", [])
    by_index = {
        int(fields[n]): (int(fields[n + 1]), int(fields[n + 2]))
        for n in range(0, len(fields) - 2, 3)
    }
    identities: dict[str, tuple[int, int] | None] = {path: None for path in missing}
    for index, target in mounted:
        identities[str(target)] = by_index.get(index)
    return _Seen(boot_id, identities)


def _read_boot_id() -> str:
    try:
        return Path(BOOT_ID).read_text().strip()
    except OSError:
        return ""


# --------------------------------------------------------------------------- the advice


def _problem(
    shared: SharedPath,
    target: Path,
    identity: tuple[int, int] | None,
    mounts: list[tuple[str, str]],
) -> tuple[str, str] | None:
    """(what is wrong, what to do) for one directory, or None when the engine sees it."""
    here = os.stat(target)
    if identity == (here.st_dev, here.st_ino):
        return None
    wanted = Path(os.path.realpath(shared.path))
    source = _host_source(wanted, mounts)
    what = f"{shared.role} {shared.path}"
    if source is not None and source != str(wanted):
        what += f": here it is the host's {source}, mounted at another path"
    elif identity is None:
        what += ": the engine has no directory at that path"
    else:
        what += ": the engine has another directory at that path"
    host = source or str(wanted)
    fix = f"-v {host}:{host}"
    if shared.option == "--lfs":
        fix += f" and --lfs {host}"
    elif shared.option:
        fix += f" and -e {shared.option}={host}"
    return what, fix


def _own_mounts(client: docker.DockerClient) -> list[tuple[str, str]]:
    """(destination, host source) of this container's bind mounts, longest destination
    first; empty when this process is not in a container the engine knows."""
    container_id = engine.own_container_id()
    if container_id is None:
        return []
    try:
        attrs: dict[str, Any] = client.api.inspect_container(container_id)
    except docker.errors.DockerException:
        return []
    pairs = [
        (str(m.get("Destination", "")), str(m.get("Source", "")))
        for m in attrs.get("Mounts") or []
        if m.get("Type") == "bind"
    ]
    return sorted(pairs, key=lambda pair: len(pair[0]), reverse=True)


def _host_source(target: Path, mounts: list[tuple[str, str]]) -> str | None:
    """The host path this container has `target` from, when a bind mount covers it."""
    for destination, source in mounts:
        if target == Path(destination) or Path(destination) in target.parents:
            return str(Path(source) / target.relative_to(destination))
    return None
