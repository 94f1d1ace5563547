"""One package, attempt by attempt: the job made from the package's inputs, run in the build
environment, its result recorded, and the decision to try again.

This is where an attempt's outcome is read and what follows it is decided; the scheduler only
learns whether the package was built in the end.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.build.diskspace import SpaceGuard
from orchestrator.build.inputs import InputsOf
from orchestrator.build.recorder import RunRecorder
from orchestrator.build.recovery import Decision, PackageRecovery
from orchestrator.build.state import Attempt, PackageState, now_iso
from orchestrator.config import Settings
from orchestrator.execution.environment import BuildEnvironment, BuildJob, BuildResult
from orchestrator.monitor import events
from orchestrator.monitor.events import EventBus
from orchestrator.monitor.metrics import DiskAddedMeter
from orchestrator.spec.graph import StagePlan
from orchestrator.spec.models import Package
from orchestrator.workspace import Workspace


@dataclass
class PackageAttempts:
    """Builds packages of one run, each with its stage's retries."""

    run_id: str
    settings: Settings
    workspace: Workspace
    environment: BuildEnvironment
    inputs_of: InputsOf
    recorder: RunRecorder
    bus: EventBus
    lfs_dir: Path  # resolved
    sources_dir: Path | None
    asset_dirs: dict[str, Path]
    disk_added: DiskAddedMeter = field(default_factory=DiskAddedMeter)
    space: SpaceGuard | None = None  # free space checked before each attempt
    # Set when the run stops: a retry's backoff ends at once.
    stopping: threading.Event = field(default_factory=threading.Event)
    # Packages whose retry waits for their level to be rebuilt one package at a time, with
    # what their earlier attempts decided; `build` takes it up when the package comes again.
    deferred: dict[tuple[str, str], PackageRecovery] = field(default_factory=dict)

    def build(
        self,
        stage_plan: StagePlan,
        package: Package,
        before_retry: Callable[[], None] | None = None,
        level_start: str | None = None,
    ) -> bool:
        """Build one package, each failure classified and handled by its class's strategy
        (`build.recovery`); `before_retry` runs before each retry.

        With `level_start` (the checkpoint before the level it builds in, beside others), a
        failure to retry is not retried here: the package is put in `deferred` and False
        returned, for the caller to rebuild the level one package at a time.
        """
        stage = stage_plan.file.stage
        record = self.recorder.find(stage.stage, package.name)
        policy = stage.recovery_for(package, self.settings.recovery)
        recovery = self.deferred.pop(record.key, None) or PackageRecovery(
            policy, stage.retries_for(package)
        )
        while True:
            if self.space is not None:
                self.space.with_policy(policy).ensure(f"before {stage.stage}/{package.name}")
            job = self.job(stage_plan, package, len(record.attempts) + 1)
            job = recovery.adjustment.apply(job)
            started = time.monotonic()
            result = self._attempt(job, record)
            if result.succeeded:
                return True
            if result.interrupted:
                self._report_failure(record, result, will_retry=False)
                raise KeyboardInterrupt
            short = self.space.with_policy(policy).short_since(started) if self.space else None
            decision = recovery.decide(result, job, level_start, short)
            if decision.failure_class == "system" and decision.retry:
                decision = self._await_engine(job, decision, recovery.policy.engine_wait)
            self._record_decision(record, decision)
            self._report_failure(record, result, decision.retry)
            if not decision.retry:
                return False
            if decision.strategy == "free-space" and self.space is not None:
                # Before the checkpoint is restored over the half-install: prune, wait, or
                # stop with the record saved, naming the filesystem.
                where = f"{stage.stage}/{package.name}"
                self.space.with_policy(policy).ensure(f"before building {where} again")
            if level_start is not None:
                if self.stopping.wait(decision.delay_s):
                    raise KeyboardInterrupt
                self.deferred[record.key] = recovery
                return False
            next_attempt = len(record.attempts) + 1
            self.bus.emit(events.BuildRetry(attempt=next_attempt, **self._about(record)))
            if self.stopping.wait(decision.delay_s):
                raise KeyboardInterrupt
            if before_retry is not None:
                before_retry()

    def _await_engine(self, job: BuildJob, decision: Decision, wait_s: float) -> Decision:
        """The engine went away mid-package: once it answers, what is left of the package's
        container is removed and the package built again (from its checkpoint, where it has
        one of its own); a run never ends for an engine that came back in time."""
        if self.environment.recover(job, wait_s):
            return decision
        reason = f"{decision.reason}; no answer within {wait_s:g}s"
        return Decision("system", "fail", reason)

    def _record_decision(self, record: PackageState, decision: Decision) -> None:
        attempt = record.attempts[-1]
        with self.recorder.recording():
            attempt.failure_class = decision.failure_class
            attempt.strategy = decision.strategy
            attempt.reason = decision.reason
            attempt.change = decision.change
        self.bus.emit(
            events.RecoveryDecision(
                attempt=attempt.number,
                failure_class=decision.failure_class,
                strategy=decision.strategy,
                reason=decision.reason,
                change=decision.change,
                will_retry=decision.retry,
                **self._about(record),
            )
        )

    def _attempt(self, job: BuildJob, record: PackageState) -> BuildResult:
        """Run the next attempt and record how it went."""
        number = job.attempt
        job.log_path.parent.mkdir(parents=True, exist_ok=True)
        with job.log_path.open("a") as log:
            log.write(f"=== lfsorch: {job.stage}/{job.package} attempt {number} ===\n")
        attempt = Attempt(number=number, started=now_iso())
        with self.recorder.recording() as state:
            record.status = "running"
            record.attempts.append(attempt)
            record.log = str(job.log_path)
            state.partition_at = None
        about = self._about(record)
        self.bus.emit(events.BuildStart(attempt=number, log=str(job.log_path), **about))
        with self.disk_added.measure(job.lfs_dir) as added:
            result = self.environment.run(job, functools.partial(self._progress, record))
        with self.recorder.recording():
            record_result(record, attempt, result)
            record.disk_added_bytes = added.bytes
        if result.succeeded:
            self.bus.emit(events.BuildComplete(attempt=number, **_figures(record), **about))
        return result

    def _report_failure(self, record: PackageState, result: BuildResult, will_retry: bool) -> None:
        self.bus.emit(
            events.BuildError(
                attempt=len(record.attempts),
                will_retry=will_retry,
                reason=result.describe(),
                log=str(record.log),
                **_figures(record),
                **self._about(record),
            )
        )

    def _progress(self, record: PackageState, line: str, lines: int) -> None:
        self.bus.emit(events.BuildProgress(line=line, lines=lines, **self._about(record)))

    def _about(self, record: PackageState) -> dict[str, Any]:
        """The fields naming the package in its events: its own name, whatever the
        environment calls it."""
        return {"run_id": self.run_id, "stage": record.stage, "package": record.name}

    def job(self, stage_plan: StagePlan, package: Package, attempt: int) -> BuildJob:
        stage = stage_plan.file.stage
        # The same inputs the package's keys are made of: the two cannot disagree.
        inputs = self.inputs_of.of(stage_plan.file, package, attempt)
        log_path = (
            self.workspace.run_dir(self.run_id) / "logs" / stage.stage / f"{package.name}.log"
        )
        return BuildJob(
            run_id=self.run_id,
            stage=stage.stage,
            package=package.name,
            attempt=attempt,
            image=inputs.image,
            image_id=inputs.image_id,
            script=package.script,
            environment=inputs.environment,
            lfs_dir=self.lfs_dir,
            log_path=log_path,
            timeout_s=stage.timeout_for(package, self.settings.timeout),
            user=inputs.user,
            workdir=inputs.workdir,
            assets_dir=self.asset_dirs.get(stage.stage),
            sources_dir=self.sources_dir if package.sources else None,
            source_files=[source.file for source in package.sources],
            resources=inputs.resources,
            network=inputs.network,
            capabilities=inputs.capabilities,
            build_space=self.settings.build_space,
            chroot=inputs.chroot,
            scratch_dir=self.workspace.run_dir(self.run_id),
        )


def record_result(record: PackageState, attempt: Attempt, result: BuildResult) -> None:
    attempt.duration_s = round(result.duration_s, 3)
    attempt.exit_code = result.exit_code
    attempt.oom_killed = result.oom_killed
    attempt.timed_out = result.timed_out
    attempt.interrupted = result.interrupted
    attempt.error = None if result.succeeded else result.describe()
    record.exit_code = result.exit_code
    record.oom_killed = result.oom_killed
    record.timed_out = result.timed_out
    record.duration_s = attempt.duration_s
    record.cpu_seconds = result.figures.cpu_seconds
    record.memory_peak_bytes = result.figures.memory_peak_bytes
    record.read_bytes = result.figures.read_bytes
    record.write_bytes = result.figures.write_bytes
    record.io_source = result.figures.io_source
    record.pids_peak = result.figures.pids_peak
    record.finished = now_iso()
    if result.interrupted:
        record.status = "pending"
    else:
        record.status = "done" if result.succeeded else "failed"


def _figures(record: PackageState) -> dict[str, Any]:
    return {
        "duration_s": record.duration_s,
        "exit_code": record.exit_code,
        "oom_killed": record.oom_killed,
        "timed_out": record.timed_out,
        "cpu_seconds": record.cpu_seconds,
        "memory_peak_bytes": record.memory_peak_bytes,
        "read_bytes": record.read_bytes,
        "write_bytes": record.write_bytes,
        "io_source": record.io_source,
        "pids_peak": record.pids_peak,
        "disk_added_bytes": record.disk_added_bytes,
    }
