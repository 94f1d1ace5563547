"""The build report a jhalfs user reads after a build: time, SBU, CPU, memory, disk per package,
the recovery decisions taken on the way, attempt by attempt, the run's own wall time, and for a
run under way, how long it has to go."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime

from orchestrator.build.state import PackageState, RunState
from orchestrator.monitor.estimates import SBU_REFERENCE, Estimate

__all__ = [
    "SBU_REFERENCE",
    "Report",
    "ReportRow",
    "ToGo",
    "build_report",
    "sbu_seconds",
    "time_to_go",
]


@dataclass(frozen=True)
class RecoveryStep:
    """One failed attempt and what was decided after it."""

    attempt: int
    failure_class: str | None  # None in records older than failure classes
    strategy: str | None
    reason: str | None
    change: str | None  # what the next attempt changed

    def describe(self) -> str:
        what = f"{self.failure_class} failure" if self.failure_class else "failed"
        then = f", {self.strategy}" if self.strategy else ""
        changed = f"; next: {self.change}" if self.change else ""
        return (
            f"attempt {self.attempt}: {what} ({self.reason or 'no reason recorded'}){then}{changed}"
        )


@dataclass(frozen=True)
class ReportRow:
    stage: str
    package: str
    status: str
    wall_s: float | None
    sbu: float | None
    cpu_seconds: float | None
    memory_peak_bytes: int | None
    disk_added_bytes: int | None
    recovery: list[RecoveryStep]


@dataclass(frozen=True)
class ToGo:
    """What a run under way has left: its packages not built yet, and about how long they take
    (the one building counted with what its estimate has left)."""

    packages: int
    seconds: float
    sources: dict[str, int] = field(default_factory=dict)  # estimates from "history", "book"
    unknown: list[str] = field(default_factory=list)  # `stage/package` that nothing estimates


@dataclass(frozen=True)
class Report:
    run_id: str
    reference: str
    sbu_s: float | None
    rows: list[ReportRow]
    started: str | None = None
    ended: str | None = None  # when it finished, or its last package ended if it was killed
    outcome: str | None = None
    elapsed_s: float | None = None  # from start to end, or to now while under way
    to_go: ToGo | None = None

    @property
    def total_wall_s(self) -> float:
        return sum(row.wall_s or 0.0 for row in self.rows)

    def as_json(self) -> dict[str, object]:
        return {
            "run_id": self.run_id,
            "sbu_reference": self.reference,
            "sbu_seconds": self.sbu_s,
            "total_wall_s": round(self.total_wall_s, 3),
            "started": self.started,
            "ended": self.ended,
            "outcome": self.outcome,
            "elapsed_s": None if self.elapsed_s is None else round(self.elapsed_s, 3),
            "to_go": None if self.to_go is None else asdict(self.to_go),
            "packages": [asdict(row) for row in self.rows],
        }


def _instant(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None  # a hand-edited record: no elapsed time rather than a traceback
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _last_package_end(state: RunState) -> str | None:
    ends = [(moment, p.finished) for p in state.packages if (moment := _instant(p.finished))]
    return max(ends)[1] if ends else None


def sbu_seconds(state: RunState, reference: str = SBU_REFERENCE) -> float | None:
    """One Standard Build Unit: the wall time of the reference package in the same record."""
    return next(
        (p.duration_s for p in state.packages if p.name == reference and p.status == "done"),
        None,
    )


def build_report(
    state: RunState,
    reference: str = SBU_REFERENCE,
    *,
    now: datetime | None = None,
    estimates: Mapping[str, Estimate | None] | None = None,
) -> Report:
    """Per-package figures, SBUs relative to `reference` (`sbu_seconds`), and the run's times.

    `estimates` (by `stage/package`) give a run under way its time to go; `now` is the clock
    for a run under way, the current time unless given.
    """
    sbu = sbu_seconds(state, reference)
    rows = [
        ReportRow(
            stage=p.stage,
            package=p.name,
            status=p.status,
            wall_s=p.duration_s,
            sbu=round(p.duration_s / sbu, 2) if sbu and p.duration_s is not None else None,
            cpu_seconds=p.cpu_seconds,
            memory_peak_bytes=p.memory_peak_bytes,
            disk_added_bytes=p.disk_added_bytes,
            recovery=recovery_steps(p),
        )
        for p in state.packages
    ]
    now = now or datetime.now(UTC)
    under_way = state.under_way()
    ended = state.finished or (None if under_way else _last_package_end(state))
    start = _instant(state.started)
    end = _instant(ended) if ended else (now if under_way else None)  # killed before any end
    elapsed = (end - start).total_seconds() if start and end and end >= start else None
    to_go = time_to_go(state, estimates, now) if under_way and estimates is not None else None
    return Report(
        state.run_id,
        reference,
        sbu,
        rows,
        started=state.started,
        ended=ended,
        outcome=state.outcome_now(),
        elapsed_s=elapsed,
        to_go=to_go,
    )


def time_to_go(state: RunState, estimates: Mapping[str, Estimate | None], now: datetime) -> ToGo:
    """The packages still pending or building, and the sum of what their estimates leave."""
    seconds = 0.0
    sources: dict[str, int] = {}
    unknown: list[str] = []
    left = [p for p in state.packages if p.status in ("pending", "running")]
    for package in left:
        name = f"{package.stage}/{package.name}"
        found = estimates.get(name)
        if found is None:
            unknown.append(name)
            continue
        sources[found.source] = sources.get(found.source, 0) + 1
        remaining = found.seconds
        attempt = package.attempts[-1] if package.attempts else None
        if package.status == "running" and attempt and (begun := _instant(attempt.started)):
            remaining -= max((now - begun).total_seconds(), 0.0)
        seconds += max(remaining, 0.0)
    return ToGo(len(left), seconds, sources, unknown)


def recovery_steps(package: PackageState) -> list[RecoveryStep]:
    return [
        RecoveryStep(
            attempt.number,
            attempt.failure_class,
            attempt.strategy,
            attempt.reason or attempt.error,
            attempt.change,
        )
        for attempt in package.attempts
        if attempt.error or attempt.failure_class
    ]
