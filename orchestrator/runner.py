"""Building one package in one fresh container.

The container starts as root only long enough to prepare a private build directory (sources
linked in, the main tarball unpacked), then drops to the stage's user and runs the script in a
clean environment (`env -i`, as the book's .bash_profile does). Docker's `wait()` is the truth
about the exit; logs and stats are read in threads because their streams can outlive it.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import shlex
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import docker
import docker.errors
from docker.models.containers import Container
from docker.types import Mount

from orchestrator import engine, events
from orchestrator.errors import ImageMissing, LfsorchError
from orchestrator.events import EventBus
from orchestrator.metrics import ContainerFigures, HostIO
from orchestrator.models import Resources

BUILD_DIR = "/build"
LFS_MOUNT = "/mnt/lfs"
SOURCES_MOUNT = "/sources"
STAGE_MOUNT = "/stage"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
EXIT_BAD_USER = 219  # unusual on purpose: a script's own 126/127 must not read as this
_TARBALL = re.compile(r"\.(tar(\.[a-z0-9]+)?|tgz|tbz2|txz)$")
_PROGRESS_INTERVAL_S = 0.5
_CONTAINER_UNSAFE = re.compile(r"[^a-zA-Z0-9_.-]")


@dataclass(frozen=True)
class BuildJob:
    """Everything one container needs; built by the scheduler from stage, package and config."""

    run_id: str
    stage: str
    package: str
    attempt: int
    image: str
    script: str
    environment: dict[str, str]
    lfs_dir: Path
    log_path: Path
    timeout_s: float
    user: str | None = None
    workdir: str | None = None
    assets_dir: Path | None = None  # the stage's declared assets, copied; never its directory
    sources_dir: Path | None = None
    source_files: Sequence[str] = ()
    resources: Resources = field(default_factory=Resources)
    network: bool = False

    @property
    def container_name(self) -> str:
        """Readable and unique: names Docker refuses (`gtk+`) are made safe, and a short
        hash of the real names keeps `gtk+` and `gtk_` apart."""
        unique = hashlib.sha256(f"{self.stage}/{self.package}".encode()).hexdigest()[:8]
        readable = _CONTAINER_UNSAFE.sub("_", f"{self.stage}-{self.package}")
        return f"lfsorch-{self.run_id}-{readable}-{unique}-{self.attempt}"


@dataclass
class BuildResult:
    exit_code: int | None
    duration_s: float
    figures: ContainerFigures
    oom_killed: bool = False
    timed_out: bool = False
    interrupted: bool = False
    error: str | None = None

    @property
    def succeeded(self) -> bool:
        # A child killed by the OOM killer can leave a script that carried on and exited 0.
        return (
            self.exit_code == 0
            and not self.oom_killed
            and not self.timed_out
            and not self.interrupted
            and self.error is None
        )

    def describe(self) -> str:
        if self.interrupted:
            return "interrupted"
        if self.timed_out:
            return f"timed out after {self.duration_s:.0f}s (container killed)"
        if self.oom_killed:
            return f"killed by the kernel's OOM killer (exit status {self.exit_code})"
        if self.error:
            return self.error
        return f"exit status {self.exit_code}"


def expand_environment(layers: Sequence[dict[str, str]]) -> dict[str, str]:
    """Merge variable layers in order, expanding $NAME/${NAME} from variables set before."""
    merged: dict[str, str] = {}
    pattern = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")
    for layer in layers:
        for name, value in layer.items():
            merged[name] = pattern.sub(
                lambda m: merged.get(m.group(1) or m.group(2), m.group(0)), value
            )
    merged.setdefault("PATH", DEFAULT_PATH)
    return merged


def _entry_script(job: BuildJob) -> str:
    user = job.user or "0"
    main = job.source_files[0] if job.source_files else ""
    unpack = main if _TARBALL.search(main) else ""
    links = " ".join(shlex.quote(name) for name in job.source_files)
    workdir = shlex.quote(job.workdir) if job.workdir else ""
    # The script below runs as root in the fresh container; values are quoted by Python.
    return f"""set -eu
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
exec "${{drop[@]}}" env -i "HOME=${{home:-/}}" "$@" \\
    bash -eo pipefail -c "$script" {shlex.quote(job.package)}
"""


def container_command(job: BuildJob) -> list[str]:
    """`bash -c ENTRY lfsorch SCRIPT NAME=VALUE...`: the script and the environment travel as
    arguments (any byte but NUL, which no environment value holds), so nothing is copied into
    the container before it starts."""
    # The book's .bashrc: `set +h` so new tools in $LFS/tools/bin are found at once.
    script = "set +h\numask 022\n" + job.script
    variables = [f"{name}={value}" for name, value in job.environment.items()]
    return ["bash", "-c", _entry_script(job), "lfsorch", script, *variables]


def _mounts(job: BuildJob) -> list[Mount]:
    # Mount(type="bind") refuses a missing source, unlike `volumes=` which would create a
    # root-owned empty directory and build into it.
    mounts = [Mount(LFS_MOUNT, str(job.lfs_dir), type="bind")]
    if job.assets_dir is not None:
        mounts.append(Mount(STAGE_MOUNT, str(job.assets_dir), type="bind", read_only=True))
    if job.sources_dir is not None:
        mounts.append(Mount(SOURCES_MOUNT, str(job.sources_dir), type="bind", read_only=True))
    return mounts


class _LogPump:
    """Copies the container's output to the log file and reports lines, throttled."""

    def __init__(self, container: Container, path: Path, on_line: Callable[[str, int], None]):
        self._container = container
        self._path = path
        self._on_line = on_line
        self._lock = threading.Lock()
        self._closed = False
        self.lines = 0
        self.thread = threading.Thread(target=self._run, name=f"logs-{container.name}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        pending = b""
        last_report = 0.0
        last_line = ""
        with contextlib.suppress(Exception), self._path.open("ab") as log_file:
            for chunk in self._container.logs(stream=True, follow=True):
                with self._lock:
                    if self._closed:
                        return
                    log_file.write(chunk)
                pending += chunk
                *complete, pending = pending.split(b"\n")
                if complete:
                    self.lines += len(complete)
                    last_line = complete[-1].decode(errors="replace").rstrip()
                    now = time.monotonic()
                    if now - last_report >= _PROGRESS_INTERVAL_S:
                        last_report = now
                        self._on_line(last_line, self.lines)
            if pending:
                self.lines += 1

    def finish(self) -> None:
        """Wait briefly for the stream; if it hangs after exit, take the logs in one piece."""
        self.thread.join(timeout=5)
        if not self.thread.is_alive():
            return
        with self._lock:
            self._closed = True
        with contextlib.suppress(docker.errors.APIError):
            self._path.write_bytes(self._container.logs(stdout=True, stderr=True))


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
    """Runs build jobs; knows its live containers so an interrupt can stop them all."""

    def __init__(self, client: docker.DockerClient, bus: EventBus) -> None:
        self._client = client
        self._bus = bus
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

    def close(self) -> None:
        """Wait until every finished container is removed."""
        self._removals.shutdown(wait=True)

    def interrupt(self) -> None:
        """Kill every running container; their builds end as interrupted."""
        self._interrupted.set()
        with self._lock:
            containers = list(self._live.values())
        for container in containers:
            with contextlib.suppress(docker.errors.APIError):
                container.kill()

    def _create(self, job: BuildJob) -> Container:
        resources = job.resources
        labels = engine.owner_labels(
            "build", run=job.run_id, stage=job.stage, package=job.package, attempt=str(job.attempt)
        )
        try:
            container = self._client.containers.create(
                job.image,
                command=container_command(job),
                name=job.container_name,
                user="0:0",
                working_dir="/",
                labels=labels,
                mounts=_mounts(job),
                network_mode="bridge" if job.network else "none",
                nano_cpus=int(resources.cpus * 1e9) if resources.cpus else None,
                mem_limit=resources.memory,
                memswap_limit=resources.memory,
                pids_limit=resources.pids,
            )
        except docker.errors.ImageNotFound:
            self.check_image(job.image)
            raise
        except docker.errors.APIError as exc:
            raise LfsorchError(
                f"{job.stage}/{job.package}: the engine refused the container: "
                f"{exc.explanation or exc}"
            ) from None
        return container

    def run(self, job: BuildJob) -> BuildResult:
        job.log_path.parent.mkdir(parents=True, exist_ok=True)
        figures = ContainerFigures()
        if self._interrupted.is_set():
            return BuildResult(None, 0.0, figures, interrupted=True)
        container = self._create(job)
        with self._lock:
            self._live[container.id] = container
        timed_out = threading.Event()

        def on_timeout() -> None:
            timed_out.set()
            with contextlib.suppress(docker.errors.APIError):
                container.kill()

        def on_line(line: str, count: int) -> None:
            self._bus.emit(
                events.BUILD_PROGRESS,
                run_id=job.run_id,
                stage=job.stage,
                package=job.package,
                line=line,
                lines=count,
            )

        timer = threading.Timer(job.timeout_s, on_timeout)
        timer.daemon = True
        started = time.monotonic()
        try:
            host_before = HostIO.sample()
            container.start()
            timer.start()
            logs = _LogPump(container, job.log_path, on_line)
            stats = _StatsPump(container, figures)
            logs.start()
            stats.start()
            status = container.wait()
            duration = time.monotonic() - started
            timer.cancel()
            logs.finish()
            # The stats stream can outlive the container; removal below ends it.
            figures.apply_host_io(host_before, HostIO.sample())
            container.reload()
            state = container.attrs.get("State", {})
            return BuildResult(
                exit_code=int(status.get("StatusCode", state.get("ExitCode", -1))),
                duration_s=duration,
                figures=figures,
                oom_killed=bool(state.get("OOMKilled")),
                timed_out=timed_out.is_set(),
                interrupted=self._interrupted.is_set() and not timed_out.is_set(),
                error=_wrapper_error(status),
            )
        finally:
            timer.cancel()
            with self._lock:
                self._live.pop(container.id, None)
            self._removals.submit(engine.remove_quietly, container)


def _wrapper_error(status: dict[str, object]) -> str | None:
    if status.get("StatusCode") == EXIT_BAD_USER:
        return "the stage's user does not exist in the image (see the log)"
    error = status.get("Error")
    if isinstance(error, dict) and error.get("Message"):
        return str(error["Message"])
    return None
