"""Extracting validated archive layers into a staging directory with GNU tar.

Every member passes `tarstream.MemberPolicy` before tar sees a byte of it. The store's own
archives are extracted with the host's tar (`HostExtractor`); anything from elsewhere goes
through GNU tar inside a throwaway container that sees only the empty staging directory
(`ContainerExtractor`), so even a disagreement between our parser and tar's is confined there.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shlex
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.tarstream import CHUNK, ArchiveError, Member, MemberPolicy, TarScanner

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


@dataclass
class Layer:
    """One archive to extract, with the deletions to apply to the tree before it."""

    chunks: Iterable[bytes]
    policy: MemberPolicy
    delete_before: list[str] = field(default_factory=list)
    on_member: Callable[[Member], None] | None = None


class ContainerExtractor:
    """Extract validated layers into `dest` with GNU tar in a throwaway container.

    The container has no network and only `dest` (read-write) plus a directory of fifos
    (read-only) mounted. Layer i goes through fifo i to the i-th tar process: opening fifo i
    for writing succeeds only once tar i opened it, i.e. after tar i-1 finished, which is the
    moment the host may apply layer i's deletions.
    """

    def __init__(self, client: Any, dest: Path, *, image: str = EXTRACT_IMAGE) -> None:
        self.client = client
        self.dest = dest
        self.image = image

    def extract(self, layers: list[Layer], *, purpose: str = "snapshot-restore") -> None:
        from orchestrator.engine import managed_container

        with tempfile.TemporaryDirectory(prefix=".lfsorch-fifo-", dir=self.dest.parent) as io:
            fifos = [Path(io) / str(i) for i in range(len(layers))]
            for fifo in fifos:
                os.mkfifo(fifo, 0o600)
            script = (
                f"set -e; for i in $(seq 0 {len(layers) - 1}); do "
                f'tar {shlex.join(TAR_EXTRACT_ARGS)} -f "/io/$i" -C /dest; done'
            )
            with managed_container(
                self.client,
                purpose,
                image=self.image,
                command=["/bin/sh", "-c", script],
                network_mode="none",
                volumes={
                    str(self.dest): {"bind": "/dest", "mode": "rw"},
                    io: {"bind": "/io", "mode": "ro"},
                },
                cap_drop=["NET_RAW", "AUDIT_WRITE"],
            ) as container:
                container.start()
                for fifo, layer in zip(fifos, layers, strict=True):
                    self._feed(container, fifo, layer)
                status = container.wait(timeout=600)
                code = status.get("StatusCode", -1)
                if code != 0:
                    logs = container.logs().decode(errors="replace").strip()
                    raise ArchiveError(f"tar in the restore container failed (exit {code}): {logs}")

    def _feed(self, container: Any, fifo: Path, layer: Layer) -> None:
        fd = _open_fifo_for_writing(fifo, container)
        # The reader is waiting for data, so the previous layer is complete: safe to delete.
        for path in layer.delete_before:
            remove_path(self.dest, path, layer.policy)
        pipe = _Pipe(fd)
        try:
            scanner = _stream_validated(layer, pipe)
        finally:
            pipe.close()
        if pipe.broken_at is not None and pipe.broken_at < scanner.end_offset:
            logs = container.logs().decode(errors="replace").strip()
            raise ArchiveError(f"tar in the restore container stopped reading early: {logs}")


class HostExtractor:
    """Extract validated layers into `dest` with the host's GNU tar, one process per layer.

    Used for the store's own archives: measured on the 2-core reference machine, tar in a
    container ran 1.4-2x slower than on the host (cgroup scheduling under load), which alone
    breaks the restore throughput target. Safety then rests on three layers: every member
    passed `MemberPolicy` before tar saw a byte of it (ustar/PAX only, allowlisted records,
    so our parse and tar's agree); GNU tar itself skips '..' members, strips leading '/'
    and creates link targets that are absolute or contain '..' as placeholders until the
    end; and everything lands in a fresh staging directory that is discarded on any error.
    """

    def __init__(self, dest: Path) -> None:
        self.dest = dest

    def extract(self, layers: list[Layer]) -> None:
        for layer in layers:
            for path in layer.delete_before:
                remove_path(self.dest, path, layer.policy)
            self._feed(layer)

    def _feed(self, layer: Layer) -> None:
        command = ["tar", *TAR_EXTRACT_ARGS, "--file=-", "-C", str(self.dest)]
        with subprocess.Popen(command, stdin=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
            assert proc.stdin is not None and proc.stderr is not None
            pipe = _Pipe(proc.stdin.fileno(), closefd=False)
            try:
                scanner = _stream_validated(layer, pipe)
            finally:
                pipe.close()
                proc.stdin.close()
                errors = proc.stderr.read().decode(errors="replace").strip()
                status = proc.wait()
        if status != 0 or (pipe.broken_at is not None and pipe.broken_at < scanner.end_offset):
            raise ArchiveError(f"tar could not extract {layer.policy.source} (exit {status}): "
                               f"{errors}")  # fmt: skip


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


def remove_path(root: Path, relative: str, policy: MemberPolicy) -> None:
    """Delete `relative` under `root` without following any symlink on the way."""
    policy.check_path(relative)
    target = root / relative
    try:
        info = target.lstat()
    except FileNotFoundError:
        info = None
    if info is not None and stat.S_ISDIR(info.st_mode):
        remove_tree(target)
    elif info is not None:
        target.unlink()
    policy.symlinks.discard(relative)


def remove_tree(path: Path) -> None:
    """Remove the directory `path` and everything below it, read-only directories included."""

    # shutil.rmtree does not follow symlinks, but read-only dirs need their mode lifted.
    def _retry(func: Callable[..., Any], target: str, _exc: Any) -> None:
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(target), 0o700)
        func(target)

    shutil.rmtree(path, onerror=_retry)
