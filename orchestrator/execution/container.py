"""Building one package in one fresh container.

The container starts as root only long enough to prepare a private build directory (sources
linked in, the main tarball unpacked), then drops to the stage's user and runs the script in a
clean environment (`env -i`, as the book's .bash_profile does). Docker's `wait()` is the truth
about the exit; output, stats and disk use are followed in threads.

Output is read from the container's own attached stream, not from the engine's log copy: the
json-file driver stores text (invalid UTF-8 becomes U+FFFD) and rotates, while the attach stream
carries the bytes as printed, and holds the container back when the reader is slow instead of
dropping anything. The entry script sends stderr into stdout, so the log is one stream in the
order it was written, as a terminal shows it.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import re
import shlex
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import docker
import docker.errors
import requests.exceptions
from docker.models.containers import Container
from docker.types import LogConfig, Mount
from docker.types.daemon import CancellableStream

from orchestrator.errors import ImageMissing, LfsorchError
from orchestrator.execution import engine
from orchestrator.execution.environment import BuildJob, BuildResult, ProgressReport
from orchestrator.monitor.metrics import ContainerFigures

BUILD_DIR = "/build"
LFS_MOUNT = "/mnt/lfs"
SOURCES_MOUNT = "/sources"
STAGE_MOUNT = "/stage"
# Where the entry script leaves the container's counters as it exits: a per-attempt directory
# of the host, so the figures outlive the container and its writable layer.
FIGURES_MOUNT = "/run/lfsorch-figures"
FIGURES_FILE = "counters"
# The engine names a container's host after its random id, and builds embed it (`uname -n`
# in config.log, Perl's Config.pm): one fixed name keeps two builds of the same inputs equal.
BUILD_HOSTNAME = "lfsorch-build"
EXIT_BAD_USER = 219  # unusual on purpose: a script's own 126/127 must not read as this
TARBALL = re.compile(r"\.(tar(\.[a-z0-9]+)?|tgz|tbz2|txz)$")
_PROGRESS_INTERVAL_S = 0.5
_CONTAINER_UNSAFE = re.compile(r"[^a-zA-Z0-9_.-]")
# A progress line is for a glance at the console: longer lines are cut, never held whole.
PROGRESS_LINE_MAX_BYTES = 1024
# What one attempt's log keeps on the workspace's disk: the first LOG_MAX_BYTES and the last
# LOG_TAIL_BYTES, with a note between. A build printing without end (`yes`) must not fill the
# host's disk; the book's test suites print far less.
LOG_MAX_BYTES = 1 << 30
LOG_TAIL_BYTES = 1 << 20
# After the container exits, its stream is waited for as long as bytes still arrive; this long
# a silence means the engine lost the stream, and the log says so.
_STREAM_SILENCE_S = 30.0
_DISK_CHECK_INTERVAL_S = 10.0
# The engine went away: its socket refused or closed mid-request, or, restarted, it no longer
# knows the container. Other engine errors (a refused container) are the stage's.
_ENGINE_GONE = (requests.exceptions.RequestException, docker.errors.NotFound)
_ENGINE_WAIT_FIRST_S = 0.5
_ENGINE_WAIT_LONGEST_S = 10.0
# The engine keeps its own copy of the output (for `docker logs` on a live build); lfsorch never
# reads it, so it only needs to be bounded.
ENGINE_LOG_CONFIG = LogConfig(
    type=LogConfig.types.JSON, config={"max-size": "10m", "max-file": "2"}
)


@dataclass(frozen=True)
class ContainerSetup:
    """What one attempt's container is made of: its root (an image reference or id), its
    command and its mounts; and how much it wrote outside them, for `build_space`."""

    image: str
    command: list[str]
    mounts: list[Mount]
    # Bytes the build wrote outside its mounts that are not in the container's own layer
    # (a /build tree kept on the host); None: none.
    written_elsewhere: Callable[[], int] | None = None
    pinned: bool = False  # `image` is the id the run's keys were made with
    # Writes outside the mounts fail instead of landing in a layer removed with the container.
    read_only_root: bool = False
    # Called once the container runs, before the build may start; raises to stop it.
    after_start: Callable[[Container], None] | None = None


def container_name(job: BuildJob) -> str:
    """Readable and unique: names Docker refuses (`gtk+`) are made safe, and a short hash of
    the real names keeps `gtk+` and `gtk_` apart."""
    unique = hashlib.sha256(f"{job.stage}/{job.package}".encode()).hexdigest()[:8]
    readable = _CONTAINER_UNSAFE.sub("_", f"{job.stage}-{job.package}")
    return f"lfsorch-{job.run_id}-{readable}-{unique}-{job.attempt}"


def _entry_script(job: BuildJob) -> str:
    user = job.user or "0"
    main = job.source_files[0] if job.source_files else ""
    unpack = main if TARBALL.search(main) else ""
    links = " ".join(shlex.quote(name) for name in job.source_files)
    workdir = shlex.quote(job.workdir) if job.workdir else ""
    # The script below runs as root in the fresh container; values are quoted by Python.
    return f"""set -eu
exec 2>&1
{COUNTERS_TRAP}
user={shlex.quote(user)}
if [ "$user" = 0 ] || [ "$user" = root ]; then
    drop=()
    home=/root
elif id "$user" >/dev/null 2>&1; then
    gid=$(id -g "$user")
    home=$(getent passwd "$user" | cut -d: -f6 || true)
    drop=(setpriv --reuid="$user" --regid="$gid" --init-groups)
else
    case "$user" in
        *[!0-9]*) echo "lfsorch: user '$user' does not exist in image {shlex.quote(job.image)}" >&2
                  exit {EXIT_BAD_USER} ;;
    esac
    home=/
    drop=(setpriv --reuid="$user" --regid="$user" --clear-groups)
fi
mkdir -p {BUILD_DIR}
for name in {links}; do ln -s {SOURCES_MOUNT}/"$name" {BUILD_DIR}/"$name"; done
if [ ${{#drop[@]}} -gt 0 ]; then
    chown -h "$user:${{gid:-$user}}" {BUILD_DIR} {BUILD_DIR}/* 2>/dev/null || true
fi
cd {BUILD_DIR}
unpack={shlex.quote(unpack)}
if [ -n "$unpack" ]; then
    "${{drop[@]}}" tar -xf {SOURCES_MOUNT}/"$unpack" --no-same-owner
    top=$(find {BUILD_DIR} -mindepth 1 -maxdepth 1 -type d)
    if [ -n "$top" ] && [ "$(printf '%s\\n' "$top" | wc -l)" = 1 ]; then cd "$top"; fi
fi
workdir={workdir}
if [ -n "$workdir" ]; then cd "$workdir"; fi
script=$1
shift
# Not `exec`: this shell stays PID 1, reaps the build and then runs the EXIT trap.
"${{drop[@]}}" env -i "HOME=${{home:-/}}" "$@" \\
    bash -eo pipefail -c "$script" {shlex.quote(job.package)}
"""


# The counters of the container's own cgroup, v2 or v1, whichever is mounted, and PID 1's task
# I/O counters, which include those of every process it reaped; written to the figures mount.
COUNTERS_COPY = f"""{{
    if [ -f /sys/fs/cgroup/cgroup.controllers ]; then
        files="memory.peak cpu.stat io.stat pids.peak"
        dirs=/sys/fs/cgroup
    else
        files="memory/memory.max_usage_in_bytes cpuacct/cpuacct.usage pids/pids.current
               blkio/blkio.throttle.io_service_bytes"
        dirs=v1
    fi
    for file in $files; do
        echo "== ${{file##*/}}"
        if [ "$dirs" = v1 ]; then cat "/sys/fs/cgroup/$file"; else cat "$dirs/$file"; fi
    done
    echo "== task.io"
    cat /proc/1/io
}} > {FIGURES_MOUNT}/{FIGURES_FILE} 2>/dev/null"""

# Run as root by PID 1 on every exit it lives to see (a failed build too); the exit status is
# kept. A container lfsorch kills never sees its exit: `kill_keeping_counters` runs the same
# copy in it first.
COUNTERS_TRAP = f"""lfsorch_counters() {{
    status=$?
    set +e
    {COUNTERS_COPY}
    exit "$status"
}}
trap lfsorch_counters EXIT"""
# How long a kill waits for the counters to be copied: a container under memory pressure may
# be slow to start one more process, and the kill must come.
_COUNTERS_COPY_WAIT_S = 10.0


def kill_keeping_counters(containers: Sequence[Container]) -> None:
    """Copy each container's counters with the entry script's own routine (`docker exec`, as
    root), then kill it: a build killed for its timeout, its build space or an interrupt keeps
    exact figures. The copies run side by side, each bounded by `_COUNTERS_COPY_WAIT_S`."""
    command = ["bash", "-c", COUNTERS_COPY]

    def copy(container: Container) -> None:
        # Attached to its (empty) output: unattached, the call returns once the copy starts,
        # and the kill could come before it wrote.
        with contextlib.suppress(*_ENGINE_GONE, docker.errors.APIError):
            container.exec_run(command, user="0:0")

    copies = [threading.Thread(target=copy, args=(c,), daemon=True) for c in containers]
    for thread in copies:
        thread.start()
    deadline = time.monotonic() + _COUNTERS_COPY_WAIT_S
    for thread in copies:
        thread.join(max(0.0, deadline - time.monotonic()))
    for container in containers:
        with contextlib.suppress(*_ENGINE_GONE, docker.errors.APIError):
            container.kill()


def container_command(job: BuildJob) -> list[str]:
    """`bash -c ENTRY lfsorch SCRIPT NAME=VALUE...`: the script and the environment travel as
    arguments (any byte but NUL, which no environment value holds), so nothing is copied into
    the container before it starts."""
    # The book's .bashrc: `set +h` so new tools in $LFS/tools/bin are found at once.
    script = "set +h\numask 022\n" + job.script
    variables = [f"{name}={value}" for name, value in job.environment.items()]
    return ["bash", "-c", _entry_script(job), "lfsorch", script, *variables]


def _mounts(job: BuildJob, figures_dir: Path) -> list[Mount]:
    # Mount(type="bind") refuses a missing source, unlike `volumes=` which would create a
    # root-owned empty directory and build into it.
    return [Mount(LFS_MOUNT, str(job.lfs_dir), type="bind"), *lfsorch_mounts(job, figures_dir)]


def lfsorch_mounts(job: BuildJob, figures_dir: Path) -> list[Mount]:
    """What every build container gets from lfsorch, whatever its root: the attempt's figures
    directory, and the stage's assets and the verified sources, both read-only."""
    mounts = [Mount(FIGURES_MOUNT, str(figures_dir), type="bind")]
    if job.assets_dir is not None:
        mounts.append(Mount(STAGE_MOUNT, str(job.assets_dir), type="bind", read_only=True))
    if job.sources_dir is not None:
        mounts.append(Mount(SOURCES_MOUNT, str(job.sources_dir), type="bind", read_only=True))
    return mounts


class LineTracker:
    """Counts output lines and keeps the last complete one, cut to a cap, whatever the output.

    Only the bytes after the last newline are kept (also cut to the cap), so a flood without
    newlines costs no more memory than a short line.
    """

    def __init__(self, cap: int = PROGRESS_LINE_MAX_BYTES) -> None:
        self._cap = cap
        self._partial = b""
        self.count = 0
        self.last = b""

    def feed(self, chunk: bytes) -> bool:
        """Take the next bytes of output; True when at least one line was completed."""
        newlines = chunk.count(b"\n")
        if not newlines:
            if len(self._partial) < self._cap:
                self._partial += chunk[: self._cap - len(self._partial)]
            return False
        self.count += newlines
        end = chunk.rfind(b"\n")
        if newlines == 1:
            self.last = (self._partial + chunk[: min(end, self._cap)])[: self._cap]
        else:
            start = chunk.rfind(b"\n", 0, end) + 1
            self.last = chunk[start : min(end, start + self._cap)]
        self._partial = chunk[end + 1 : end + 1 + self._cap]
        return True

    def finish(self) -> None:
        """The output ended: a last line without a newline still counts."""
        if self._partial:
            self.count += 1
            self.last, self._partial = self._partial, b""

    @property
    def last_text(self) -> str:
        return self.last.decode(errors="replace").rstrip()


class _LogPump:
    """Appends the container's attached output to the log file, bytes as printed, and reports
    progress lines, throttled. Memory stays bounded: chunks go to the file as they come."""

    def __init__(
        self, stream: CancellableStream, path: Path, name: str, on_line: Callable[[str, int], None]
    ) -> None:
        self._stream = stream
        self._path = path
        self._on_line = on_line
        self._lock = threading.Lock()
        self._closed = False
        self.lines = LineTracker()
        self.last_activity = time.monotonic()
        self.failure: str | None = None
        self._kept = 0  # bytes of this attempt written to the log
        self._left_out = 0
        self._tail: collections.deque[bytes] = collections.deque()
        self._tail_bytes = 0
        self.thread = threading.Thread(target=self._run, name=f"logs-{name}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        # The stream is drained to its end whatever happens here: an unread stream holds the
        # container back (the engine blocks its output), which would hang the build.
        log_file = self._open()
        last_report = 0.0
        try:
            for chunk in self._stream:
                with self._lock:
                    if self._closed:
                        return
                    if log_file is not None:
                        log_file = self._write(log_file, chunk)
                self.last_activity = time.monotonic()
                if self.lines.feed(chunk) and self.last_activity - last_report >= (
                    _PROGRESS_INTERVAL_S
                ):
                    last_report = self.last_activity
                    with contextlib.suppress(Exception):  # a subscriber's bug is not the build's
                        self._on_line(self.lines.last_text, self.lines.count)
        except (OSError, docker.errors.DockerException) as exc:
            self.failure = f"lfsorch: the output stream broke off: {exc}"
        finally:
            self.lines.finish()
            if log_file is not None:
                with contextlib.suppress(OSError):
                    self._write_tail(log_file)
                    log_file.close()

    def _open(self) -> BinaryIO | None:
        try:
            # Unbuffered: each chunk is on disk once written, before any note `finish` appends.
            return self._path.open("ab", buffering=0)
        except OSError as exc:
            self.failure = f"lfsorch: the log could not be written: {exc}"
            return None

    def _write(self, log_file: BinaryIO, chunk: bytes) -> BinaryIO | None:
        room = max(0, LOG_MAX_BYTES - self._kept)
        if len(chunk) > room:
            self._keep_tail(chunk[room:])
            chunk = chunk[:room]
        try:
            log_file.write(chunk)
            self._kept += len(chunk)
        except OSError as exc:
            self.failure = f"lfsorch: the log could not be written: {exc}"
            with contextlib.suppress(OSError):
                log_file.close()
            return None
        return log_file

    def _keep_tail(self, chunk: bytes) -> None:
        """Output past the log's limit: only its last LOG_TAIL_BYTES are kept, in memory."""
        self._left_out += len(chunk)
        self._tail.append(chunk)
        self._tail_bytes += len(chunk)
        while self._tail and self._tail_bytes - len(self._tail[0]) >= LOG_TAIL_BYTES:
            self._tail_bytes -= len(self._tail.popleft())

    def _write_tail(self, log_file: BinaryIO) -> None:
        if not self._left_out:
            return
        tail = b"".join(self._tail)[-LOG_TAIL_BYTES:]
        log_file.write(
            f"\nlfsorch: {self._left_out - len(tail)} bytes of output left out here (the log "
            f"keeps the first {LOG_MAX_BYTES} bytes of an attempt and its last "
            f"{len(tail)})\n".encode()
        )
        log_file.write(tail)

    def finish(self) -> None:
        """Called once the container exited: wait until the stream ends; give up only after a
        long silence since the exit or the last bytes, and say so in the log."""
        exited = time.monotonic()
        while True:
            self.thread.join(timeout=1.0)
            if not self.thread.is_alive():
                break
            if time.monotonic() - max(exited, self.last_activity) > _STREAM_SILENCE_S:
                with self._lock:
                    self._closed = True
                self.failure = (
                    f"lfsorch: the output stream was silent {_STREAM_SILENCE_S:.0f}s after the "
                    "container exited; the log may be incomplete"
                )
                with contextlib.suppress(Exception):
                    self._stream.close()
                break
        if self.failure:
            with contextlib.suppress(OSError), self._path.open("ab") as log_file:
                log_file.write(f"\n{self.failure}\n".encode())


class _DiskWatch:
    """Kills the container once what it wrote outside its mounts (`/build`, `/tmp`: its own
    writable layer) passes `limit` bytes. Checked by the engine's size figure at intervals:
    overlay2 on ext4 has no per-container size option."""

    def __init__(
        self,
        client: docker.DockerClient,
        container: Container,
        limit: int,
        elsewhere: Callable[[], int] | None = None,
    ) -> None:
        self._client = client
        self._container = container
        self._limit = limit
        self._elsewhere = elsewhere
        self._stop = threading.Event()
        self.used: int | None = None
        self.exceeded = False
        self.thread = threading.Thread(target=self._run, name=f"disk-{container.name}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(_DISK_CHECK_INTERVAL_S):
            with contextlib.suppress(docker.errors.APIError):
                listed = self._client.api.containers(
                    all=True, filters={"id": self._container.id}, size=True
                )
                self.used = int(listed[0].get("SizeRw") or 0) if listed else None
            if self.used is not None and self._elsewhere is not None:
                with contextlib.suppress(OSError):
                    self.used += self._elsewhere()
            if self.used is not None and self.used > self._limit and not self._stop.is_set():
                self.exceeded = True
                kill_keeping_counters([self._container])
                return

    def describe(self) -> str:
        return (
            f"wrote {_gib(self.used or 0)} outside its mounts (/build and the container's own "
            f"files), more than build_space ({_gib(self._limit)}); container killed"
        )


def _gib(size: int) -> str:
    return f"{size / (1 << 30):.2f} GiB"


class _StatsPump:
    def __init__(self, container: Container, figures: ContainerFigures):
        self._container = container
        self._figures = figures
        self.thread = threading.Thread(
            target=self._run, name=f"stats-{container.name}", daemon=True
        )

    def _run(self) -> None:
        with contextlib.suppress(Exception):
            for frame in self._container.stats(stream=True, decode=True):
                self._figures.add_frame(frame)

    def start(self) -> None:
        self.thread.start()


class ContainerRunner:
    """The build environment of a fresh container per attempt on the local engine; knows its
    live containers so an interrupt can stop them all."""

    def __init__(self, client: docker.DockerClient) -> None:
        self._client = client
        self._lock = threading.Lock()
        self._live: dict[str, Container] = {}
        self._interrupted = threading.Event()
        # Removal is off the critical path, as the daemon does for `docker run --rm`;
        # `close()` waits for it, so no container outlives the run.
        self._removals = ThreadPoolExecutor(max_workers=1, thread_name_prefix="remove")

    def check_image(self, image: str) -> None:
        try:
            self._client.images.get(image)
        except docker.errors.ImageNotFound:
            raise ImageMissing(
                f"image '{image}' is not in the Docker engine",
                hint="build it with `lfsorch images build` (or name another image in the stage)",
            ) from None

    def check_images(self, images: Sequence[str]) -> None:
        missing = []
        for image in sorted(set(images)):
            try:
                self.check_image(image)
            except LfsorchError:
                missing.append(image)
        if missing:
            raise LfsorchError(
                f"image(s) not in the Docker engine: {', '.join(missing)}",
                hint="build the host image with `lfsorch images build`",
            )

    def image_id(self, image: str) -> str:
        """The image's id. A missing image is reported by `check_images`, with every other
        missing one, before anything is built or recorded."""
        return engine.image_id_or_none(self._client, image) or f"missing {image}"

    def close(self) -> None:
        """Wait until every finished container is removed."""
        self._removals.shutdown(wait=True)

    def interrupt(self) -> None:
        """Kill every running container; their builds end as interrupted."""
        self._interrupted.set()
        with self._lock:
            containers = list(self._live.values())
        kill_keeping_counters(containers)

    def recover(self, job: BuildJob, wait_s: float) -> bool:
        deadline = time.monotonic() + wait_s
        delay = _ENGINE_WAIT_FIRST_S
        while not self._answers():
            if self._interrupted.is_set() or time.monotonic() + delay > deadline:
                return False
            time.sleep(delay)
            delay = min(delay * 2, _ENGINE_WAIT_LONGEST_S)
        labels = [f"{engine.RUN}={job.run_id}", f"{engine.STAGE}={job.stage}"]
        labels.append(f"{engine.PACKAGE}={job.package}")
        with contextlib.suppress(*_ENGINE_GONE, docker.errors.APIError):
            for listed in self._client.api.containers(all=True, filters={"label": labels}):
                with contextlib.suppress(docker.errors.APIError):
                    self._client.api.remove_container(listed["Id"], force=True)
        return self._answers()

    def _answers(self) -> bool:
        try:
            return bool(self._client.ping())
        except (docker.errors.DockerException, requests.exceptions.RequestException):
            return False

    @contextlib.contextmanager
    def _setup(self, job: BuildJob, figures_dir: Path) -> Iterator[ContainerSetup]:
        """The container of a host-image build: the stage's image (pinned to the id the keys
        were made with), the partition at /mnt/lfs."""
        pinned = job.image_id if job.image_id and job.image_id.startswith("sha256:") else None
        yield ContainerSetup(
            pinned or job.image,
            container_command(job),
            _mounts(job, figures_dir),
            pinned=pinned is not None,
        )

    def _create(self, job: BuildJob, setup: ContainerSetup) -> Container:
        resources = job.resources
        labels = engine.owner_labels(
            "build", run=job.run_id, stage=job.stage, package=job.package, attempt=str(job.attempt)
        )
        try:
            container = self._client.containers.create(
                setup.image,
                command=setup.command,
                name=container_name(job),
                hostname=BUILD_HOSTNAME,
                user="0:0",
                working_dir="/",
                labels=labels,
                mounts=setup.mounts,
                read_only=setup.read_only_root,
                network_mode="bridge" if job.network else "none",
                nano_cpus=int(resources.cpus * 1e9) if resources.cpus else None,
                mem_limit=resources.memory,
                memswap_limit=resources.memory,
                pids_limit=resources.pids,
                cap_drop=["ALL"],
                cap_add=job.capability_set(),
                security_opt=["no-new-privileges"],
                log_config=ENGINE_LOG_CONFIG,
            )
        except docker.errors.ImageNotFound:
            self.check_image(job.image)
            if not setup.pinned:
                raise
            raise LfsorchError(
                f"image {job.image} is no longer the image {setup.image} the run started with, "
                "and that one is gone from the engine",
                hint="run again: the next run uses the image the name points to now",
            ) from None
        except docker.errors.APIError as exc:
            raise LfsorchError(
                f"{job.stage}/{job.package}: the engine refused the container: "
                f"{exc.explanation or exc}"
            ) from None
        return container

    def run(self, job: BuildJob, progress: ProgressReport) -> BuildResult:
        job.log_path.parent.mkdir(parents=True, exist_ok=True)
        figures = ContainerFigures()
        if self._interrupted.is_set():
            return BuildResult(None, 0.0, figures, interrupted=True)
        # Next to the log, in the run's own directory; gone once the figures are read.
        figures_dir = Path(tempfile.mkdtemp(prefix=".counters-", dir=job.log_path.parent))
        try:
            with self._setup(job, figures_dir) as setup:
                result = self._run_container(job, setup, figures, progress)
            if not result.engine_lost:
                figures.read_counters_file(figures_dir / FIGURES_FILE)
            return result
        finally:
            shutil.rmtree(figures_dir, ignore_errors=True)

    def _run_container(
        self,
        job: BuildJob,
        setup: ContainerSetup,
        figures: ContainerFigures,
        progress: ProgressReport,
    ) -> BuildResult:
        started = time.monotonic()
        try:
            container = self._create(job, setup)
        except _ENGINE_GONE as exc:
            return _engine_lost(job, "creating its container", started, figures, exc)
        with self._lock:
            self._live[container.id] = container
        try:
            return self._follow(job, container, figures, progress, setup)
        except _ENGINE_GONE as exc:
            return _engine_lost(job, "the build", started, figures, exc)
        finally:
            with self._lock:
                self._live.pop(container.id, None)
            self._removals.submit(engine.remove_quietly, container)

    def _follow(
        self,
        job: BuildJob,
        container: Container,
        figures: ContainerFigures,
        progress: ProgressReport,
        setup: ContainerSetup,
    ) -> BuildResult:
        """Start the container and follow it to its end: output, stats, disk, timeout."""
        timed_out = threading.Event()

        def on_timeout() -> None:
            timed_out.set()
            kill_keeping_counters([container])

        timer = threading.Timer(job.timeout_s, on_timeout)
        timer.daemon = True
        # Attached before the start, so not one byte of output is missed.
        stream = container.attach(stdout=True, stderr=True, stream=True, logs=False)
        logs = _LogPump(stream, job.log_path, container.name or container_name(job), progress)
        disk = None
        if job.build_space:
            disk = _DiskWatch(self._client, container, job.build_space, setup.written_elsewhere)
        started = time.monotonic()
        try:
            container.start()
            timer.start()
            logs.start()
            _StatsPump(container, figures).start()
            if setup.after_start is not None:
                setup.after_start(container)
            if disk is not None:
                disk.start()
            status = container.wait()
            duration = time.monotonic() - started
            timer.cancel()
            if disk is not None:
                disk.stop()
            logs.finish()
            # The stats stream can outlive the container; removal ends it.
            container.reload()
        finally:
            timer.cancel()
            with contextlib.suppress(Exception):
                stream.close()
        state = container.attrs.get("State", {})
        return BuildResult(
            exit_code=int(status.get("StatusCode", state.get("ExitCode", -1))),
            duration_s=duration,
            figures=figures,
            oom_killed=bool(state.get("OOMKilled")),
            timed_out=timed_out.is_set(),
            timeout_s=job.timeout_s if timed_out.is_set() else None,
            interrupted=self._interrupted.is_set() and not timed_out.is_set(),
            error=disk.describe() if disk and disk.exceeded else _wrapper_error(status),
            space_exceeded=bool(disk and disk.exceeded),
            misconfigured=status.get("StatusCode") == EXIT_BAD_USER,
        )


def _engine_lost(
    job: BuildJob, during: str, started: float, figures: ContainerFigures, exc: Exception
) -> BuildResult:
    return BuildResult(
        exit_code=None,
        duration_s=time.monotonic() - started,
        figures=figures,
        engine_lost=True,
        error=f"the engine at {engine.endpoint()} stopped answering during {during} "
        f"({exc.__class__.__name__})",
    )


def _wrapper_error(status: dict[str, object]) -> str | None:
    if status.get("StatusCode") == EXIT_BAD_USER:
        return "the stage's user does not exist in the image (see the log)"
    error = status.get("Error")
    if isinstance(error, dict) and error.get("Message"):
        return str(error["Message"])
    return None
