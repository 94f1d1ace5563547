"""What a failed attempt was, and what the next one changes.

Every failure is classified from the attempt's result alone (exit status, the OOM flag and the
memory peak against the limit, the tool's own timer, the engine's errors) as one of:

- configuration: the stage cannot run as written (its user is missing from the image); never
  retried, since the same attempt would fail the same way;
- build: the script exited non-zero; retried `retries` times with backoff, from the
  checkpoint before the package;
- memory: killed at the memory limit; retried with half the make jobs, then at -j1 with the
  limit raised by `memory_factor` up to `memory_cap`;
- time: the timeout was reached; retried once with the timeout raised by `timeout_factor`
  when one is configured, else failed;
- disk: the build filled its build space: failed (more space is the user's decision); or it
  failed while its filesystem was below `min_free_space` (ENOSPC): snapshots are pruned by the
  retention policy, space is waited for up to `space_wait` (then the run stops, its record
  saved, naming the filesystem), and the package is built again from its checkpoint, without
  using up its build retries;
- system: the engine stopped answering or the container vanished; built again once the
  engine answers, without using up the package's retries.

A package that fails beside others (a level of packages at -j N) is not retried in place, on a
partition its own half-install and its neighbours changed: its level is built again from the
checkpoint before it, one package at a time, the failed package with its strategy's changes.
This is also the memory strategy's last step, fewer packages side by side: once -j1 and the
memory cap are used up, a package killed beside others gets one more attempt alone.

The limits a retry changes are output-neutral, so the retry meets the same checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Literal

from orchestrator.build.inputs import without_job_count
from orchestrator.execution.environment import BuildJob, BuildResult
from orchestrator.spec.models import Recovery

FailureClass = Literal["configuration", "build", "memory", "time", "disk", "system"]
# What a script's exit status is when the kernel's SIGKILL ended it (128 + 9).
EXIT_KILLED = 137
# A peak at this share of the limit or above counts as having reached it: the engine's
# figures lag the kill by a stats frame.
NEAR_LIMIT = 0.9
# Builds again after the engine came back; a package that keeps losing its engine is failed.
MAX_SYSTEM_RETRIES = 3
# Builds again once space came back; a package that fills its filesystem each time is failed.
MAX_DISK_RETRIES = 3
_JOBS = re.compile(r"(?:^|\s)(?:-j\s*|--jobs[=\s]\s*)(\d+)(?=\s|$)")
_BARE_JOBS = re.compile(r"(?:^|\s)(?:-j|--jobs)(?=\s|$)")


def job_count(makeflags: str) -> int:
    """The job count MAKEFLAGS asks for: the last `-jN` wins, as in make; a bare `-j`
    (no limit) counts as this host's CPUs."""
    counts = [int(n) for n in _JOBS.findall(makeflags)]
    if counts:
        return max(1, counts[-1])
    return os.cpu_count() or 1 if _BARE_JOBS.search(makeflags) else 1


def with_job_count(makeflags: str, jobs: int) -> str:
    rest = without_job_count(makeflags)
    return f"{rest} -j{jobs}".strip()


@dataclass(frozen=True)
class Adjustment:
    """What the next attempt runs with instead of the package's own settings."""

    jobs: int | None = None
    memory: int | None = None
    timeout_s: float | None = None

    def apply(self, job: BuildJob) -> BuildJob:
        environment = dict(job.environment)
        if self.jobs is not None:
            environment["MAKEFLAGS"] = with_job_count(environment.get("MAKEFLAGS", ""), self.jobs)
        resources = job.resources
        if self.memory is not None:
            resources = resources.model_copy(update={"memory": self.memory})
        timeout_s = self.timeout_s if self.timeout_s is not None else job.timeout_s
        return dataclasses.replace(
            job, environment=environment, resources=resources, timeout_s=timeout_s
        )


@dataclass(frozen=True)
class Decision:
    failure_class: FailureClass
    strategy: str
    reason: str
    change: str | None = None  # what the next attempt changes, for people
    retry: bool = False
    delay_s: float = 0.0
    adjustment: Adjustment = field(default_factory=Adjustment)

    def alone(self, level_start: str) -> Decision:
        """The same retry, made on the level rebuilt one package at a time."""
        rebuilt = level_rebuilt(level_start)
        change = f"{self.change}; {rebuilt}" if self.change else rebuilt
        return dataclasses.replace(self, change=change)


def level_rebuilt(level_start: str) -> str:
    return f"level rebuilt one package at a time from checkpoint {level_start[:12]}"


def classify(
    result: BuildResult, job: BuildJob, short_of_space: str | None = None
) -> tuple[FailureClass, str]:
    """The class of a failed attempt and the evidence for it; `short_of_space` says which
    filesystem was below its threshold during the attempt, if one was."""
    if result.engine_lost:
        return "system", result.error or "the engine stopped answering"
    if result.misconfigured:
        return "configuration", result.describe()
    if result.timed_out:
        return "time", result.describe()
    if result.oom_killed:
        return "memory", result.describe()
    limit, peak = job.resources.memory, result.figures.memory_peak_bytes
    if result.exit_code == EXIT_KILLED and limit and peak and peak >= NEAR_LIMIT * limit:
        return "memory", f"killed (exit status 137) with its memory peak {_mib(peak)} at the limit"
    if result.space_exceeded:
        return "disk", result.describe()
    if short_of_space is not None:
        return "disk", f"{result.describe()} while {short_of_space}"
    return "build", result.describe()


@dataclass
class PackageRecovery:
    """The decisions for one package's attempts; remembers what earlier retries used."""

    policy: Recovery
    retries: int  # build retries allowed (the stage's or package's `retries`)
    build_retries: int = 0
    system_retries: int = 0
    disk_retries: int = 0
    time_retried: bool = False
    alone_retried: bool = False  # the memory strategy's last step was used
    adjustment: Adjustment = field(default_factory=Adjustment)

    def decide(
        self,
        result: BuildResult,
        job: BuildJob,
        level_start: str | None = None,
        short_of_space: str | None = None,
    ) -> Decision:
        """`job` is the attempt that failed, with the adjustments it ran with; `level_start`
        the checkpoint before its level when it ran beside others; `short_of_space` the
        filesystem seen below its threshold during the attempt."""
        failure_class, reason = classify(result, job, short_of_space)
        if failure_class == "disk" and not result.space_exceeded:
            decision = self._disk(reason)
        else:
            decision = self._strategy(failure_class, reason, job)
        if level_start is not None:
            decision = self._beside_others(decision, level_start)
        if decision.retry:
            self.adjustment = decision.adjustment
        return decision

    def _strategy(self, failure_class: FailureClass, reason: str, job: BuildJob) -> Decision:
        if failure_class == "build":
            return self._build(reason)
        if failure_class == "memory":
            return self._memory(reason, job)
        if failure_class == "time":
            return self._time(reason, job)
        if failure_class == "system":
            return self._system(reason)
        return Decision(failure_class, "fail", reason)

    def _beside_others(self, decision: Decision, level_start: str) -> Decision:
        if decision.retry:
            return decision.alone(level_start)
        if decision.failure_class == "memory" and not self.alone_retried:
            self.alone_retried = True
            return Decision(
                "memory",
                "fewer-packages",
                decision.reason,
                level_rebuilt(level_start),
                True,
                0.0,
                self.adjustment,
            )
        return decision

    def _build(self, reason: str) -> Decision:
        if self.build_retries >= self.retries:
            why = f"{reason}; no retries left" if self.retries else reason
            return Decision("build", "fail", why)
        self.build_retries += 1
        delay = min(self.policy.backoff * 2 ** (self.build_retries - 1), self.policy.backoff_max)
        change = f"retry {self.build_retries} of {self.retries} after {delay:g}s"
        return Decision("build", "retry", reason, change, True, delay, self.adjustment)

    def _memory(self, reason: str, job: BuildJob) -> Decision:
        jobs = job_count(job.environment.get("MAKEFLAGS", ""))
        if jobs > 1:
            fewer = dataclasses.replace(self.adjustment, jobs=max(1, jobs // 2))
            change = f"MAKEFLAGS -j{fewer.jobs} (was -j{jobs})"
            return Decision("memory", "fewer-jobs", reason, change, True, 0.0, fewer)
        limit, cap = job.resources.memory, self.policy.memory_cap
        if limit is None or limit >= cap:
            why = "no memory limit to raise" if limit is None else f"the cap {_mib(cap)} reached"
            return Decision("memory", "fail", f"{reason}; at -j1 and {why}")
        raised = min(cap, int(limit * self.policy.memory_factor))
        if raised <= limit:
            return Decision("memory", "fail", f"{reason}; memory_factor cannot raise the limit")
        more = dataclasses.replace(self.adjustment, jobs=1, memory=raised)
        change = f"memory limit {_mib(raised)} (was {_mib(limit)})"
        return Decision("memory", "more-memory", reason, change, True, 0.0, more)

    def _time(self, reason: str, job: BuildJob) -> Decision:
        factor = self.policy.timeout_factor
        if factor is None or self.time_retried:
            why = "no timeout_factor configured" if factor is None else "already retried once"
            return Decision("time", "fail", f"{reason}; {why}")
        self.time_retried = True
        longer = dataclasses.replace(self.adjustment, timeout_s=job.timeout_s * factor)
        change = f"timeout {longer.timeout_s:g}s (was {job.timeout_s:g}s)"
        return Decision("time", "longer-timeout", reason, change, True, 0.0, longer)

    def _disk(self, reason: str) -> Decision:
        if self.disk_retries >= MAX_DISK_RETRIES:
            return Decision("disk", "fail", f"{reason}; out of space {MAX_DISK_RETRIES}x")
        self.disk_retries += 1
        change = "built again from its checkpoint once there is space"
        return Decision("disk", "free-space", reason, change, True, 0.0, self.adjustment)

    def _system(self, reason: str) -> Decision:
        if self.system_retries >= MAX_SYSTEM_RETRIES:
            return Decision("system", "fail", f"{reason}; lost the engine {MAX_SYSTEM_RETRIES}x")
        self.system_retries += 1
        change = "built again from its checkpoint once the engine answers"
        return Decision("system", "wait-engine", reason, change, True, 0.0, self.adjustment)


def _mib(size: int) -> str:
    return f"{size / 2**20:.0f}MiB"
