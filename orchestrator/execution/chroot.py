"""Chroot packages: a fresh container per attempt whose root filesystem is the partition.

The container's image holds only the usr-merge links (`bin`, `lib`, `sbin` -> `usr/...`); each
real top-level directory of the partition is bound onto it, with the partition's own
etc/hosts, etc/hostname and etc/resolv.conf bound over the engine's. The engine then gives the
container its own /dev (with /dev/pts at gid=5,mode=620, as the book mounts it), /proc, /sys
and /dev/shm, which is what the book prepares by hand before `chroot`: nothing is mounted on
the host and nothing needs `--privileged`. /build is a fresh directory of the run outside the
partition, /sources the verified cache (read-only), /run a tmpfs.

Everything else (labels, the attached log stream, the figures trap, the timeout, the
`build_space` watch, the engine-loss recovery) is the host-image container's
(`execution.container`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import shlex
import shutil
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import docker
import docker.errors
from docker.models.containers import Container
from docker.types import Mount

from orchestrator.errors import LfsorchError
from orchestrator.execution import chrootroot, engine
from orchestrator.execution.container import (
    BUILD_DIR,
    COUNTERS_TRAP,
    SOURCES_MOUNT,
    TARBALL,
    ContainerRunner,
    ContainerSetup,
    lfsorch_mounts,
)
from orchestrator.execution.environment import BuildJob
from orchestrator.execution.images import IMAGE_LABELS
from orchestrator.spec.environment import CHROOT_PATH

ROOT_IMAGE = "lfsorch/chroot-root:usrmerge"
ROOT_CONTENT = f"{engine.LABEL_PREFIX}.image.content"
# A chroot package's /build, in its run's directory; what a kill leaves, the next run removes
# (`checkpoints.leftovers`).
CHROOT_BUILD_PREFIX = ".chroot-build-"
# The book's `chroot` command line: `env -i HOME=/root TERM="$TERM" PS1=... PATH=...`. No
# terminal is attached, so TERM says so.
BOOK_ENVIRONMENT = (
    "HOME=/root",
    "TERM=dumb",
    r"PS1=(lfs chroot) \u:\w\$ ",
    f"PATH={CHROOT_PATH}",
)
RUN_TMPFS_BYTES = 64 << 20
# A FIFO in /build the entry script reads one line from before anything else runs: lfsorch
# writes `go` once it has seen that the engine bound what was checked.
START_GATE = ".lfsorch-start"
GATE_WAIT_S = 120.0


def root_image_tar() -> bytes:
    """A tar of the three usr-merge links and nothing else; the same bytes every time."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name in chrootroot.USR_MERGED:
            member = tarfile.TarInfo(name)
            member.type, member.linkname, member.mode = tarfile.SYMTYPE, f"usr/{name}", 0o777
            tar.addfile(member)
    return buffer.getvalue()


def ensure_root_image(client: docker.DockerClient) -> str:
    """The id of the root image, imported from memory (no registry) when the engine lacks it
    or holds something else under its name."""
    content = root_image_tar()
    digest = hashlib.sha256(content).hexdigest()
    with contextlib.suppress(docker.errors.ImageNotFound):
        image = client.images.get(ROOT_IMAGE)
        if (image.labels or {}).get(ROOT_CONTENT) == digest:
            return str(image.id)
    repository, tag = ROOT_IMAGE.rsplit(":", 1)
    # Image labels only: containers inherit them, and `managed` marks what lfsorch runs.
    labels = {**IMAGE_LABELS, ROOT_CONTENT: digest}
    changes = [f"LABEL {name}={value}" for name, value in labels.items()]
    try:
        client.api.import_image_from_data(content, repository=repository, tag=tag, changes=changes)
        return str(client.images.get(ROOT_IMAGE).id)
    except docker.errors.APIError as exc:
        raise LfsorchError(
            f"the engine refused to import the chroot root image {ROOT_IMAGE}: "
            f"{exc.explanation or exc}"
        ) from None


def entry_script(job: BuildJob) -> str:
    """Run by the partition's own bash as PID 1: unpack, enter, run the script in the book's
    clean environment, and leave the figures on the way out."""
    main = job.source_files[0] if job.source_files else ""
    unpack = main if TARBALL.search(main) else ""
    workdir = shlex.quote(job.workdir) if job.workdir else ""
    book = " ".join(shlex.quote(variable) for variable in BOOK_ENVIRONMENT)
    # Plain POSIX shell and only tar among outside programs: it also runs where the
    # partition's /usr/bin/bash is a smaller shell.
    return f"""set -eu
exec 2>&1
{COUNTERS_TRAP}
gate=
read -r gate < {BUILD_DIR}/{START_GATE} || true
if [ "$gate" != go ]; then exit 1; fi
cd {BUILD_DIR}
unpack={shlex.quote(unpack)}
if [ -n "$unpack" ]; then
    tar -xf {SOURCES_MOUNT}/"$unpack" --no-same-owner
    count=0
    for entry in {BUILD_DIR}/* {BUILD_DIR}/.[!.]* {BUILD_DIR}/..?*; do
        if [ -d "$entry" ] && [ ! -L "$entry" ]; then count=$((count + 1)); top=$entry; fi
    done
    if [ "$count" = 1 ]; then cd "$top"; fi
fi
workdir={workdir}
if [ -n "$workdir" ]; then cd "$workdir"; fi
script=$1
shift
# Not `exec`: this shell stays PID 1, reaps the build and then runs the EXIT trap.
env -i {book} "$@" {chrootroot.SHELL} --login -eo pipefail -c "$script" {shlex.quote(job.package)}
"""


def chroot_command(job: BuildJob) -> list[str]:
    # The book's chroot shell has hashing on (no `+h` from chapter 7 on: the new tools are
    # where they stay); the umask is the one its chapters assume.
    script = "umask 022\n" + job.script
    variables = [f"{name}={value}" for name, value in job.environment.items()]
    return [chrootroot.SHELL, "-c", entry_script(job), "lfsorch", script, *variables]


def chroot_mounts(
    job: BuildJob, top: chrootroot.ChrootTop, build_dir: Path, figures_dir: Path
) -> list[Mount]:
    """The partition's top-level directories and essential files, and lfsorch's own mounts.
    Bind mounts of missing sources are refused by the engine, never created."""
    lfs = job.lfs_dir
    mounts = [Mount(f"/{name}", str(lfs / name), type="bind") for name in top.directories]
    mounts += [Mount(f"/{n}", str(lfs / n), type="bind") for n in chrootroot.ESSENTIAL_FILES]
    mounts += [
        Mount("/run", None, type="tmpfs", tmpfs_size=RUN_TMPFS_BYTES, tmpfs_mode=0o755),
        Mount(BUILD_DIR, str(build_dir), type="bind"),
    ]
    return mounts + lfsorch_mounts(job, figures_dir)


def check_partition(lfs: Path) -> chrootroot.ChrootTop:
    """Everything the container needs from the partition, checked before it is made."""
    top = chrootroot.survey_top(lfs)
    chrootroot.check_essential_files(lfs)
    chrootroot.check_shell(lfs)
    return top


class ChrootRunner(ContainerRunner):
    """The build environment of chroot packages: the host-image container's machinery with
    the partition as the root filesystem."""

    def __init__(self, client: docker.DockerClient) -> None:
        super().__init__(client)
        self._image_lock = threading.Lock()
        self._root_image: str | None = None

    def root_image(self) -> str:
        with self._image_lock:
            if self._root_image is None or not engine.image_id_or_none(
                self._client, self._root_image
            ):
                self._root_image = ensure_root_image(self._client)
            return self._root_image

    @contextlib.contextmanager
    def _setup(self, job: BuildJob, figures_dir: Path) -> Iterator[ContainerSetup]:
        top = check_partition(job.lfs_dir)
        image = self.root_image()
        scratch = job.scratch_dir or job.log_path.parent
        scratch.mkdir(parents=True, exist_ok=True)
        # mkdtemp's 0700 keeps the host's users out of what root builds there (setuid
        # programs, say); inside, /build is the open directory below it.
        private = Path(tempfile.mkdtemp(prefix=CHROOT_BUILD_PREFIX, dir=scratch))
        build_dir = private / "build"
        try:
            build_dir.mkdir(mode=0o755)
            for name in job.source_files:
                os.symlink(f"{SOURCES_MOUNT}/{name}", build_dir / name)
            mounts = chroot_mounts(job, top, build_dir, figures_dir)
            identities = chrootroot.bound_identities(job.lfs_dir, top)
            gate = StartGate(job, build_dir, identities, [mount["Target"] for mount in mounts])
            _note_skipped(job, top)
            yield ContainerSetup(
                image,
                chroot_command(job),
                mounts,
                written_elsewhere=lambda: tree_size(build_dir),
                read_only_root=True,
                after_start=gate.open,
            )
        finally:
            shutil.rmtree(private, ignore_errors=True)


class StartGate:
    """Holds a chroot container's build until the binds are known to be the checked ones.

    The checks read the partition before the engine binds it; a top-level directory swapped
    for a symlink in between (by a `chroot: false` package of the same partition running
    beside, say) would be followed on the host. Once the container runs, its binds are read
    through /proc/PID/root and compared, by device, inode and type, with what was checked,
    and its mount table must hold nothing else of the host's; only then does the entry script
    get its `go`.
    """

    def __init__(
        self,
        job: BuildJob,
        build_dir: Path,
        identities: dict[str, chrootroot.Identity],
        targets: list[str],
    ):
        self._job = job
        self._build_dir = build_dir
        self._identities = identities
        self._targets = targets
        self._fifo = build_dir / START_GATE
        os.mkfifo(self._fifo, 0o600)

    def open(self, container: Container) -> None:
        container.reload()
        pid = int(container.attrs.get("State", {}).get("Pid") or 0)
        if pid <= 0:
            return  # it already ended: nothing waits at the gate
        root = Path(f"/proc/{pid}/root")
        if self._shows_our_build_dir(root):
            chrootroot.check_bound(self._job.lfs_dir, self._identities, self._targets, root)
        else:
            # lfsorch in a container of its own without the host's process namespace.
            with self._job.log_path.open("a") as log:
                log.write(
                    "lfsorch: the binds were not compared with the checked partition (the "
                    "engine's processes are not visible here)\n"
                )
        writer = self._wait_for_reader(container)
        if writer is None:
            return
        try:
            os.unlink(self._fifo)  # before `go`: the build never sees the gate
            os.write(writer, b"go\n")
        finally:
            os.close(writer)

    def _shows_our_build_dir(self, root: Path) -> bool:
        try:
            theirs, ours = os.stat(root / BUILD_DIR.lstrip("/")), os.stat(self._build_dir)
        except OSError:
            return False
        return (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino)

    def _wait_for_reader(self, container: Container) -> int | None:
        """The gate opened for writing once the entry script reads it; None when the
        container ended first."""
        deadline = time.monotonic() + GATE_WAIT_S
        next_look = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            try:
                return os.open(self._fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as exc:
                if exc.errno != errno.ENXIO:
                    raise
            if time.monotonic() >= next_look:
                next_look = time.monotonic() + 0.5
                container.reload()
                if container.status != "running":
                    return None
            time.sleep(0.005)
        raise LfsorchError(
            f"{self._job.stage}/{self._job.package}: the chroot container did not reach its "
            f"start within {GATE_WAIT_S:.0f}s",
            hint="the machine may be overloaded; run again",
        )


def _note_skipped(job: BuildJob, top: chrootroot.ChrootTop) -> None:
    if not top.skipped:
        return
    names = ", ".join(top.skipped)
    with job.log_path.open("a") as log:
        log.write(f"lfsorch: not visible in the chroot (not directories): {names}\n")


def tree_size(root: Path) -> int:
    """Bytes allocated under `root`, links not followed."""
    total = 0
    pending = [str(root)]
    while pending:
        with contextlib.suppress(OSError), os.scandir(pending.pop()) as entries:
            for entry in entries:
                with contextlib.suppress(OSError):
                    info = entry.stat(follow_symlinks=False)
                    total += info.st_blocks * 512
                    if entry.is_dir(follow_symlinks=False):
                        pending.append(entry.path)
    return total
