from __future__ import annotations

from orchestrator.build.state import PackageState, RunState
from orchestrator.monitor.report import build_report


def test_sbu_is_relative_to_binutils_pass1_of_the_same_record() -> None:
    state = RunState(run_id="r", lfs="/x", files=[])
    state.packages = [
        PackageState(stage="ch5", name="binutils-pass1", status="done", duration_s=120.0,
                     cpu_seconds=230.0, memory_peak_bytes=600 << 20, disk_added_bytes=80 << 20),
        PackageState(stage="ch5", name="gcc-pass1", status="done", duration_s=1200.0),
        PackageState(stage="ch5", name="glibc", status="failed", duration_s=30.0),
        PackageState(stage="ch6", name="m4", status="pending"),
    ]  # fmt: skip
    report = build_report(state)
    assert report.sbu_s == 120.0
    assert [(r.package, r.sbu) for r in report.rows] == [
        ("binutils-pass1", 1.0),
        ("gcc-pass1", 10.0),
        ("glibc", 0.25),
        ("m4", None),
    ]
    data = report.as_json()
    assert data["total_wall_s"] == 1350.0
    assert data["packages"][0] == {  # type: ignore[index]
        "stage": "ch5",
        "package": "binutils-pass1",
        "status": "done",
        "wall_s": 120.0,
        "sbu": 1.0,
        "cpu_seconds": 230.0,
        "memory_peak_bytes": 600 << 20,
        "disk_added_bytes": 80 << 20,
        "recovery": [],
    }


def test_no_reference_means_no_sbu() -> None:
    state = RunState(run_id="r", lfs="/x", files=[])
    state.packages = [PackageState(stage="demo", name="hello", status="done", duration_s=1.0)]
    report = build_report(state)
    assert report.sbu_s is None and report.rows[0].sbu is None
