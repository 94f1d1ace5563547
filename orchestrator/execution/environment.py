"""What a package attempt needs from wherever it runs, and the one interface that gives it.

A `BuildEnvironment` takes a `BuildJob` (the script, its environment, its limits, its timeout,
the partition, sources and assets to mount, where the log goes) and returns a `BuildResult`
(exit status, why it ended, the figures measured). It writes the script's output to the job's
log as printed, reports progress lines to the caller, and can be interrupted from another
thread. The scheduler and the attempt logic see only this interface; a container on the local
engine (`execution.container.ContainerRunner`) is the first implementation, and
`execution.chroot.ChrootRunner` the one of chroot packages (`ByKind` joins the two).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from orchestrator.errors import LfsorchError
from orchestrator.monitor.metrics import ContainerFigures
from orchestrator.spec.models import Resources

# What the book's chapters 4-6 need as root, measured by dropping each in turn; the README's
# "Security model" gives each one's reason.
BASE_CAPABILITIES = ("CHOWN", "DAC_OVERRIDE", "SETGID", "SETUID")
# What a stage may add by name (`capabilities: [mknod]`); the stage schema allows these alone.
OPTIONAL_CAPABILITIES = ("fowner", "fsetid", "kill", "mknod", "setfcap", "sys_chroot")


@dataclass(frozen=True)
class BuildJob:
    """Everything one package attempt needs, wherever it runs; made by the attempt logic from
    stage, package and configuration."""

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
    capabilities: Sequence[str] = ()  # names from OPTIONAL_CAPABILITIES, lowercase
    build_space: int | None = None  # bytes the container may write outside its mounts
    # The id `image` named when the run's keys were made: the container is made from it, so
    # a tag moved to another image during the run cannot change what the keys describe.
    image_id: str | None = None
    # The container's root filesystem is the partition itself (a chroot stage's package).
    chroot: bool = False
    # Where an attempt may keep a tree of its own outside the partition (a chroot's /build).
    scratch_dir: Path | None = None

    def capability_set(self) -> list[str]:
        unknown = set(self.capabilities) - set(OPTIONAL_CAPABILITIES)
        if unknown:
            raise LfsorchError(f"capabilities not allowed in builds: {', '.join(sorted(unknown))}")
        return sorted({*BASE_CAPABILITIES, *(name.upper() for name in self.capabilities)})


@dataclass
class BuildResult:
    exit_code: int | None
    duration_s: float
    figures: ContainerFigures
    oom_killed: bool = False
    timed_out: bool = False
    interrupted: bool = False
    error: str | None = None
    timeout_s: float | None = None  # the limit that was reached, when timed out
    space_exceeded: bool = False  # the build filled its build space (`error` says how)
    misconfigured: bool = False  # the stage cannot run as written (its user is missing)
    engine_lost: bool = False  # the engine stopped answering or the container vanished

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
            # The limit, not the measured time: that includes starting and killing the container.
            limit = self.timeout_s if self.timeout_s is not None else self.duration_s
            return f"timed out after {limit:.0f}s (container killed)"
        if self.oom_killed:
            return f"killed by the kernel's OOM killer (exit status {self.exit_code})"
        if self.error:
            return self.error
        return f"exit status {self.exit_code}"


# The last line a build printed (cut, decoded for display) and how many lines so far.
ProgressReport = Callable[[str, int], None]


class BuildEnvironment(Protocol):
    """Where package attempts run; one per run, used from several threads at once."""

    def check_images(self, images: Sequence[str]) -> None:
        """Refuse, before anything is built, when a root the plan names is not at hand."""

    def image_id(self, image: str) -> str:
        """What `image` is, for keys: equal ids mean equal roots to build on."""

    def run(self, job: BuildJob, progress: ProgressReport) -> BuildResult:
        """Prepare, run the job's script within its limits and timeout, append its output to
        `job.log_path`, and clean up; an interrupt ends it with `interrupted` set."""

    def interrupt(self) -> None:
        """Stop every running attempt now; later ones end at once as interrupted."""

    def recover(self, job: BuildJob, wait_s: float) -> bool:
        """After an attempt ended with `engine_lost`: wait up to `wait_s` seconds, with
        backoff, for the engine to answer, then remove what is left of `job`'s attempts.
        False when it did not answer in time."""

    def close(self) -> None:
        """Wait until what finished attempts left behind is cleaned up."""


class ByKind:
    """One build environment made of two: chroot packages' jobs go to `chroot`, all others
    to `host`. Interrupts and cleanup reach both."""

    def __init__(self, host: BuildEnvironment, chroot: BuildEnvironment) -> None:
        self.host = host
        self.chroot = chroot

    def _for(self, job: BuildJob) -> BuildEnvironment:
        return self.chroot if job.chroot else self.host

    def check_images(self, images: Sequence[str]) -> None:
        self.host.check_images(images)

    def image_id(self, image: str) -> str:
        return self.host.image_id(image)

    def run(self, job: BuildJob, progress: ProgressReport) -> BuildResult:
        return self._for(job).run(job, progress)

    def interrupt(self) -> None:
        self.host.interrupt()
        self.chroot.interrupt()

    def recover(self, job: BuildJob, wait_s: float) -> bool:
        return self._for(job).recover(job, wait_s)

    def close(self) -> None:
        try:
            self.host.close()
        finally:
            self.chroot.close()
