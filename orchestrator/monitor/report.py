"""The build report a jhalfs user reads after a build: time, SBU, CPU, memory, disk per package."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from orchestrator.build.state import RunState

SBU_REFERENCE = "binutils-pass1"


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
        )
        for p in state.packages
    ]
    return Report(state.run_id, reference, sbu, rows)
