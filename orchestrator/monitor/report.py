"""The build report a jhalfs user reads after a build: time, SBU, CPU, memory, disk per package,
and the recovery decisions taken on the way, attempt by attempt."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from orchestrator.build.state import PackageState, RunState

SBU_REFERENCE = "binutils-pass1"


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
class Report:
    run_id: str
    reference: str
    sbu_s: float | None
    rows: list[ReportRow]

    @property
    def total_wall_s(self) -> float:
        return sum(row.wall_s or 0.0 for row in self.rows)

    def as_json(self) -> dict[str, object]:
        return {
            "run_id": self.run_id,
            "sbu_reference": self.reference,
            "sbu_seconds": self.sbu_s,
            "total_wall_s": round(self.total_wall_s, 3),
            "packages": [asdict(row) for row in self.rows],
        }


def build_report(state: RunState, reference: str = SBU_REFERENCE) -> Report:
    """One Standard Build Unit is the wall time of the reference package in the same record."""
    sbu = next(
        (p.duration_s for p in state.packages if p.name == reference and p.status == "done"),
        None,
    )
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
    return Report(state.run_id, reference, sbu, rows)


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
