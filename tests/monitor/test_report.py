from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

from orchestrator import api
from orchestrator.build.state import Attempt, PackageState, RunState, save_state
from orchestrator.monitor.estimates import Estimate
from orchestrator.monitor.report import ToGo, build_report, time_to_go
from orchestrator.workspace import Workspace
from tests.helpers import gone_pid, run_cli


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


def _finished_run() -> RunState:
    state = RunState(
        run_id="r",
        lfs="/x",
        files=[],
        started="2026-12-02T10:00:00.000+00:00",
        finished="2026-12-02T12:41:06.500+00:00",
        outcome="succeeded",
    )
    state.packages = [
        PackageState(stage="ch5", name="binutils-pass1", status="done", duration_s=120.0,
                     finished="2026-12-02T10:02:00.000+00:00"),
    ]  # fmt: skip
    return state


def test_a_finished_run_has_its_own_wall_time_and_nothing_to_go() -> None:
    report = build_report(_finished_run(), estimates={"ch5/binutils-pass1": Estimate(1, "book")})
    assert (report.outcome, report.ended, report.elapsed_s) == (
        "succeeded",
        "2026-12-02T12:41:06.500+00:00",
        9666.5,
    )
    assert report.to_go is None
    data = report.as_json()
    assert (data["started"], data["elapsed_s"], data["to_go"]) == (
        "2026-12-02T10:00:00.000+00:00",
        9666.5,
        None,
    )


def test_a_killed_run_ends_with_its_last_package_and_says_its_process_is_gone() -> None:
    state = _finished_run()
    state.finished, state.outcome = None, "running"
    state.owner_pid = gone_pid()
    state.packages.append(
        PackageState(stage="ch5", name="gcc-pass1", status="done", duration_s=900.0,
                     finished="2026-12-02T10:17:00.000+00:00")
    )  # fmt: skip
    state.packages.append(PackageState(stage="ch5", name="glibc", status="running"))
    report = build_report(state, estimates={})
    assert report.outcome == "stopped (its process is gone)"
    assert (report.ended, report.elapsed_s) == ("2026-12-02T10:17:00.000+00:00", 1020.0)
    assert report.to_go is None


def test_a_run_under_way_counts_what_its_packages_have_left() -> None:
    state = RunState(run_id="r", lfs="/x", files=[], started="2026-12-02T10:00:00+00:00")
    assert state.under_way()  # recorded by this process, which runs
    building = PackageState(stage="ch8", name="gcc", status="running")
    building.attempts = [Attempt(number=1, started="2026-12-02T11:00:00+00:00")]
    state.packages = [
        PackageState(stage="ch8", name="glibc", status="done", duration_s=400.0),
        building,
        PackageState(stage="ch8", name="pkgconf", status="pending"),
        PackageState(stage="ch8", name="ncurses", status="pending"),
        PackageState(stage="ch8", name="mystery", status="pending"),
    ]
    found = {
        "ch8/gcc": Estimate(1000.0, "history"),  # 600 s of it already ran
        "ch8/pkgconf": Estimate(5.0, "book"),
        "ch8/ncurses": Estimate(40.0, "history"),
        "ch8/mystery": None,
    }
    now = datetime(2026, 12, 2, 11, 10, tzinfo=UTC)
    report = build_report(state, now=now, estimates=found)
    assert report.outcome == "running" and report.ended is None
    assert report.elapsed_s == 4200.0
    assert report.to_go == ToGo(4, 445.0, {"history": 2, "book": 1}, ["ch8/mystery"])
    # A package that runs past its estimate has nothing left, not a negative time.
    late = datetime(2026, 12, 2, 11, 30, tzinfo=UTC)
    assert time_to_go(state, found, late).seconds == 45.0


def test_report_prices_what_is_left_from_earlier_runs_then_the_book(tmp_path: Path) -> None:
    """`lfsorch report` on a run under way: the packages an earlier run built are priced by its
    times scaled to this run's SBU, the rest by the stage file's `sbu:`, and one with neither
    is named."""
    stage = tmp_path / "ch5.yaml"
    stage.write_text(
        "stage: ch5\npackages:\n"
        "  - {name: binutils-pass1, sbu: 1, script: 'true'}\n"
        "  - {name: gcc-pass1, sbu: 3.3, depends: [binutils-pass1], script: 'true'}\n"
        "  - {name: glibc, sbu: 1.5, depends: [gcc-pass1], script: 'true'}\n"
        "  - {name: libstdcxx, depends: [glibc], script: 'true'}\n"
    )
    workspace = Workspace(tmp_path / "home")
    earlier = RunState(run_id="20261201-000000-aaaa", lfs="/old", files=[str(stage)],
                       started="2026-12-01T00:00:00+00:00", outcome="succeeded",
                       finished="2026-12-01T01:00:00+00:00", owner_pid=gone_pid())  # fmt: skip
    earlier.packages = [
        PackageState(stage="ch5", name="binutils-pass1", status="done", duration_s=200.0),
        PackageState(stage="ch5", name="gcc-pass1", status="done", duration_s=2400.0),
    ]
    save_state(earlier, workspace.runs_dir / earlier.run_id / "state.json")
    now = RunState(run_id="20261202-000000-bbbb", lfs="/new", files=[str(stage)],
                   started="2026-12-02T00:00:00+00:00")  # fmt: skip
    now.packages = [
        PackageState(stage="ch5", name="binutils-pass1", status="done", duration_s=100.0),
        PackageState(stage="ch5", name="gcc-pass1", status="pending"),
        PackageState(stage="ch5", name="glibc", status="pending"),
        PackageState(stage="ch5", name="libstdcxx", status="pending"),
    ]
    save_state(now, workspace.state_file)
    save_state(now, workspace.runs_dir / now.run_id / "state.json")

    report = api.last_report(workspace=workspace)
    assert report is not None and report.sbu_s == 100.0
    # gcc-pass1 took 12 SBU in the earlier run: 1200 s here; glibc 1.5 SBU from the book.
    assert report.to_go == ToGo(3, 1350.0, {"history": 1, "book": 1}, ["ch5/libstdcxx"])

    shown = run_cli("report", home=workspace.root, check=True).stdout.splitlines()
    assert shown[-1] == (
        "to go: 3 package(s), about 0h 23m for 2 of them (1 from earlier runs, 1 from the "
        "book's SBU); no estimate for ch5/libstdcxx"
    )
    assert shown[-2].startswith("run wall time so far: ")
    assert shown[-2].endswith(" (started 2026-12-02T00:00:00+00:00)")
    data = json.loads(run_cli("report", "--json", home=workspace.root, check=True).stdout)
    assert data["to_go"] == {
        "packages": 3,
        "seconds": 1350.0,
        "sources": {"history": 1, "book": 1},
        "unknown": ["ch5/libstdcxx"],
    }
    assert (data["outcome"], data["ended"]) == ("running", None)

    # The stage file gone: earlier runs alone price what is left.
    stage.unlink()
    report = api.last_report(workspace=workspace)
    assert report is not None and report.to_go is not None
    assert report.to_go.unknown == ["ch5/glibc", "ch5/libstdcxx"]
    assert report.to_go.seconds == 1200.0


def test_a_run_killed_before_any_package_ended_has_no_wall_time() -> None:
    state = RunState(run_id="r", lfs="/x", files=[], owner_pid=gone_pid())
    state.packages = [PackageState(stage="ch5", name="binutils-pass1", status="running")]
    report = build_report(state)
    assert (report.outcome, report.ended, report.elapsed_s) == (
        "stopped (its process is gone)",
        None,
        None,
    )


def test_a_hand_edited_start_time_gives_no_wall_time_rather_than_an_error() -> None:
    state = _finished_run()
    state.started = "yesterday-ish"
    report = build_report(state)
    assert (report.outcome, report.elapsed_s) == ("succeeded", None)
    assert report.as_json()["elapsed_s"] is None
