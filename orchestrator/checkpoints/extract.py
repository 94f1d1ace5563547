"""Extracting validated archive layers into a staging directory with GNU tar, confined.

Every member passes `tarstream.MemberPolicy` before tar sees a byte of it, and tar itself
runs where it can change nothing but the staging directory, so a disagreement between our
parser and tar's, or a hole in the policy, still cannot reach the rest of the machine:

- `SandboxExtractor`: the host's tar in a private mount namespace whose root is a
  throwaway tmpfs holding the staging directory, the system's binaries read-only, and
  nothing else (the host's root is detached), with only the capabilities extraction
  needs. Needs root (as a restore does anyway, for owners and device nodes).
- `ContainerExtractor`: GNU tar in a throwaway container with a read-only root filesystem
  and only the staging directory mounted writable. Used for images from elsewhere, and
  wherever the sandbox cannot be set up.

A delta layer's deletions run inside the same confinement, just before its tar. There is
no unconfined extractor.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import hashlib
import os
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from orchestrator.checkpoints.tarstream import (
    CHUNK,
    RECORD,
    ArchiveError,
    ExtractedTree,
    Member,
    MemberPolicy,
    TarScanner,
)
from orchestrator.errors import EngineUnavailable

EXTRACT_IMAGE = "lfsorch/base:bookworm"
TAR_EXTRACT_ARGS = (
    "--extract",
    # A fifo delivers whatever the writer flushed; let tar reassemble full records.
    "--read-full-records",
    "--numeric-owner",
    "--same-owner",
    "--same-permissions",
    "--xattrs",
    "--xattrs-include=*",
    # Directory mtimes and modes are applied once every member is in place.
    "--delay-directory-restore",
)
# tar converts PAX names from UTF-8 to the locale's charset; in C it keeps the bytes as they
# are, which is how the validator reads them.
CONFINED_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}
# Where tar, sh, xargs and rm and their libraries live; bound read-only into the sandbox
# (with /dev/null, which xargs gives rm as its input).
SYSTEM_DIRS = ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32")
# What tar needs as root to restore owners, modes, device nodes and file capabilities; not
# mount, chroot or any other way out of the sandbox.
EXTRACT_CAPABILITIES = ("chown", "dac_override", "dac_read_search", "fowner", "fsetid",
                        "mknod", "setfcap")  # fmt: skip
# Runs as root in a fresh mount namespace: $1 the sandbox root (an empty directory), $2 the
# staging directory, $3 a directory holding the layer's deletion list; then tar's arguments.
# The tmpfs becomes the namespace's root (pivot_root) and the host's root is detached, so
# nothing else of the machine is reachable from inside, not even by a chroot escape.
_SANDBOX_SCRIPT = r"""
set -eu
root=$1 dest=$2 io=$3
shift 3
mount -t tmpfs -o mode=0755,size=4m,nosuid,nodev lfsorch-extract "$root"
for name in $SYSTEM_DIRS; do
  if [ -L "/$name" ]; then
    ln -s "$(readlink "/$name")" "$root/$name"
  elif [ -d "/$name" ]; then
    mkdir "$root/$name"
    mount --bind "/$name" "$root/$name"
    mount -o remount,bind,ro,nodev "$root/$name"
  fi
done
mkdir "$root/dest" "$root/io" "$root/dev" "$root/proc" "$root/.old"
: > "$root/dev/null"
mount --bind /dev/null "$root/dev/null"
mount --bind "$dest" "$root/dest"
mount -o remount,bind,nosuid,nodev "$root/dest"
mount --bind "$io" "$root/io"
mount -o remount,bind,ro,nosuid,nodev "$root/io"
cd "$root"
pivot_root . .old
cd /
mount -t proc lfsorch-extract /proc
umount -l /.old
umount /proc
rmdir /.old /proc
exec setpriv --no-new-privs --inh-caps=-all --bounding-set="$CAPABILITIES" /bin/sh -c \
  'cd /dest && xargs -0 -r rm -rf -- < /io/delete && exec tar "$@" --file=- -C /dest' sh "$@"
"""


@dataclass
class Layer:
    """One archive to extract, with the deletions to apply to the tree before it."""

    chunks: Iterable[bytes]
    policy: MemberPolicy
    delete_before: list[str] = field(default_factory=list)
    on_member: Callable[[Member], None] | None = None
    # How its manifest hashes file contents (`snapshots verify` compares every file's).
    new_hasher: Callable[[], Any] = hashlib.sha256


class Extractor(Protocol):
    def extract(self, layers: list[Layer]) -> None: ...


def confined_extractor(dest: Path, client: Any = None, *, isolate: bool = False) -> Extractor:
    """The extractor for `dest`: the sandbox on the host, else (or with `isolate`) a container."""
    if not isolate and sandbox_problem() is None:
        return SandboxExtractor(dest)
    if client is None:
        from orchestrator.execution.engine import connect

        try:
            client = connect()
        except EngineUnavailable as exc:
            raise ArchiveError(
                "cannot extract confined: the mount-namespace sandbox is unavailable "
                f"({sandbox_problem()}) and {exc.message}",
                hint="restore as root on a Linux host, or start the Docker engine",
            ) from None
    return ContainerExtractor(client, dest)


def deletion_list(layer: Layer) -> bytes:
    """The layer's deletions, checked and NUL-separated; the symlink set forgets them."""
    for path in layer.delete_before:
        layer.policy.check_path(path)
    layer.policy.tree.forget(layer.delete_before)
    return b"".join(os.fsencode(path) + b"\0" for path in layer.delete_before)


def check_layer(layer: Layer) -> None:
    """Everything extraction checks, without extracting: what `snapshots verify` runs."""
    deletion_list(layer)
    scanner = TarScanner(layer.policy.source, on_member=layer.policy.check,
                         on_done=layer.on_member, emit=None,
                         new_hasher=layer.new_hasher)  # fmt: skip
    for chunk in layer.chunks:
        scanner.feed(chunk)
    scanner.close()


def _seed_from_disk(dest: Path, layers: list[Layer]) -> None:
    if layers:
        layers[0].policy.tree.symlinks.update(ExtractedTree.walk(dest).symlinks)


class SandboxExtractor:
    """Extract layers into `dest` with the host's tar, confined to `dest`, one run per layer.

    tar runs in a private mount namespace whose root is a tmpfs holding only `dest`
    (read-write, no device access), the system directories and the deletion list
    (read-only), with the host's root detached and only the capabilities extraction needs:
    a symlink to / leads into that tmpfs, gone when tar exits.
    """

    def __init__(self, dest: Path) -> None:
        self.dest = dest

    def extract(self, layers: list[Layer]) -> None:
        _seed_from_disk(self.dest, layers)
        with tempfile.TemporaryDirectory(prefix="lfsorch-extract-") as io:
            root = Path(io) / "root"
            root.mkdir()
            for layer in layers:
                (Path(io) / "delete").write_bytes(deletion_list(layer))
                self._feed(layer, root, Path(io))

    def _feed(self, layer: Layer, root: Path, io: Path) -> None:
        command = _sandbox_command(root, self.dest, io)
        with tempfile.TemporaryFile() as errors:
            # stderr to a file: a pipe full of tar's warnings would stall it mid-archive.
            with subprocess.Popen(command, stdin=subprocess.PIPE, stderr=errors,
                                  env=_sandbox_env()) as proc:  # fmt: skip
                assert proc.stdin is not None
                pipe = _Pipe(proc.stdin.fileno(), closefd=False)
                try:
                    scanner = _stream_validated(layer, pipe)
                finally:
                    pipe.close()
                    proc.stdin.close()
                    status = proc.wait()
            errors.seek(0)
            text = errors.read(8192).decode(errors="replace").strip()
        if status != 0 or (pipe.broken_at is not None and pipe.broken_at < scanner.end_offset):
            raise ArchiveError(
                f"tar could not extract {layer.policy.source} (exit {status}): {text}"
            )


def _sandbox_command(root: Path, dest: Path, io: Path) -> list[str]:
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", _SANDBOX_SCRIPT,
            "sh", str(root), str(dest), str(io), *TAR_EXTRACT_ARGS]  # fmt: skip


def _sandbox_env() -> dict[str, str]:
    capabilities = ",".join(["-all", *(f"+{name}" for name in EXTRACT_CAPABILITIES)])
    return {**CONFINED_ENV, "SYSTEM_DIRS": " ".join(SYSTEM_DIRS), "CAPABILITIES": capabilities}


@functools.cache
def sandbox_problem() -> str | None:
    """Why the sandbox cannot run here (None if it can): tried once per process."""
    missing = [tool for tool in ("unshare", "pivot_root", "setpriv") if not shutil.which(tool)]
    if missing:
        return f"util-linux's {', '.join(missing)} not installed"
    with tempfile.TemporaryDirectory(prefix="lfsorch-extract-probe-") as io:
        (Path(io) / "root").mkdir()
        (Path(io) / "dest").mkdir()
        (Path(io) / "delete").write_bytes(b"")
        command = _sandbox_command(Path(io) / "root", Path(io) / "dest", Path(io))
        try:
            done = subprocess.run(command, input=bytes(RECORD), capture_output=True,
                                  env=_sandbox_env(), timeout=60, check=False)  # fmt: skip
        except (OSError, subprocess.TimeoutExpired) as exc:
            return str(exc)
    if done.returncode != 0:
        said = done.stderr.decode(errors="replace").strip().splitlines()
        return said[-1] if said else f"exit {done.returncode}"
    return None


class ContainerExtractor:
    """Extract validated layers into `dest` with GNU tar in a throwaway container.

    The container has no network, a read-only root filesystem, and only `dest` (read-write)
    plus a directory of fifos (read-only) mounted. Layer i's deletion list goes through fifo
    `delete-i` to the i-th `rm`, its archive through fifo `i` to the i-th tar: opening
    `delete-i` for writing succeeds only once tar i-1 has finished.
    """

    def __init__(self, client: Any, dest: Path, *, image: str = EXTRACT_IMAGE) -> None:
        self.client = client
        self.dest = dest
        self.image = image

    def extract(self, layers: list[Layer], *, purpose: str = "snapshot-restore") -> None:
        from orchestrator.execution.engine import managed_container

        _seed_from_disk(self.dest, layers)
        with tempfile.TemporaryDirectory(prefix=".lfsorch-fifo-", dir=self.dest.parent) as io:
            for i in range(len(layers)):
                os.mkfifo(Path(io) / str(i), 0o600)
                os.mkfifo(Path(io) / f"delete-{i}", 0o600)
            script = (
                f"set -e; cd /dest; for i in $(seq 0 {len(layers) - 1}); do "
                'xargs -0 -r rm -rf -- < "/io/delete-$i"; '
                f'tar {shlex.join(TAR_EXTRACT_ARGS)} -f "/io/$i" -C /dest; done'
            )
            with managed_container(
                self.client,
                purpose,
                image=self.image,
                command=["/bin/sh", "-c", script],
                environment=dict(CONFINED_ENV),
                network_mode="none",
                read_only=True,
                volumes={
                    str(self.dest): {"bind": "/dest", "mode": "rw"},
                    io: {"bind": "/io", "mode": "ro"},
                },
                cap_drop=["NET_RAW", "AUDIT_WRITE"],
            ) as container:
                container.start()
                for i, layer in enumerate(layers):
                    self._feed(container, Path(io), i, layer)
                status = container.wait(timeout=600)
                code = status.get("StatusCode", -1)
                if code != 0:
                    logs = container.logs().decode(errors="replace").strip()
                    raise ArchiveError(f"tar in the restore container failed (exit {code}): {logs}")

    def _feed(self, container: Any, io: Path, index: int, layer: Layer) -> None:
        deletions = deletion_list(layer)
        fd = _open_fifo_for_writing(io / f"delete-{index}", container)
        with os.fdopen(fd, "wb") as listing:
            listing.write(deletions)
        pipe = _Pipe(_open_fifo_for_writing(io / str(index), container))
        try:
            scanner = _stream_validated(layer, pipe)
        finally:
            pipe.close()
        if pipe.broken_at is not None and pipe.broken_at < scanner.end_offset:
            logs = container.logs().decode(errors="replace").strip()
            raise ArchiveError(f"tar in the restore container stopped reading early: {logs}")


def _stream_validated(layer: Layer, pipe: _Pipe) -> TarScanner:
    """Pass the layer to tar through `pipe`, each member only after it passed the policy."""
    scanner = TarScanner(
        layer.policy.source,
        on_member=layer.policy.check,
        on_done=layer.on_member,
        emit=pipe.write,
        # The archive digest, checked against the manifest, already covers every byte;
        # re-hashing each file would cost a core-second per GB for nothing.
        hash_data=False,
    )
    for chunk in layer.chunks:
        scanner.feed(chunk)
    scanner.close()
    return scanner


class _Pipe:
    """Writer to tar's pipe or fifo that notes, instead of raising, when the reader has gone.

    tar may exit as soon as it has read the end-of-archive blocks; whether it stopped too
    early is judged from where the pipe broke, and the stream is still read to its end so
    the archive digest and every remaining member are checked.
    """

    def __init__(self, fd: int, *, closefd: bool = True) -> None:
        self._fd = fd
        self._closefd = closefd
        self.written = 0
        self.broken_at: int | None = None
        with contextlib.suppress(OSError):
            # The scanner hands over about a chunk at a time; a 64 KiB pipe would split each
            # into sixteen wake-ups of tar.
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, CHUNK)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.broken_at is not None:
            return
        view = memoryview(data)
        try:
            while view:
                count = os.write(self._fd, view)
                self.written += count
                view = view[count:]
        except BrokenPipeError:
            self.broken_at = self.written

    def close(self) -> None:
        if self._closefd:
            with contextlib.suppress(OSError):
                os.close(self._fd)


def _open_fifo_for_writing(fifo: Path, container: Any, timeout: float = 120.0) -> int:
    """Open the fifo once the container's tar opened it, failing if the container died."""
    deadline = time.monotonic() + timeout
    checks = 0
    while True:
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                raise
        else:
            os.set_blocking(fd, True)
            return fd
        checks += 1
        if checks % 50 == 0:
            container.reload()
            if container.status not in ("created", "running"):
                logs = container.logs().decode(errors="replace").strip()
                raise ArchiveError(f"the restore container exited before reading: {logs}")
        if time.monotonic() > deadline:
            raise ArchiveError("the restore container did not start reading within 120 s")
        time.sleep(0.002)


def remove_tree(path: Path) -> None:
    """Remove the directory `path` and everything below it, read-only directories included."""

    # shutil.rmtree does not follow symlinks, but read-only dirs need their mode lifted.
    def _retry(func: Callable[..., Any], target: str, _exc: Any) -> None:
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(target), 0o700)
        func(target)

    shutil.rmtree(path, onerror=_retry)
