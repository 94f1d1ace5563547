"""Pure logic around the engine: environments, events, stats frames, state records."""

from __future__ import annotations

import json
import os
from pathlib import Path

import zstandard

from orchestrator.build.state import Attempt, PackageState, RunState, load_state, save_state
from orchestrator.monitor.eventlog import JsonEventLog
from orchestrator.monitor.events import BuildComplete, BuildStart, Event, EventBus
from orchestrator.monitor.metrics import FIGURES_FILE_MAX_BYTES, ContainerFigures, DiskAddedMeter
from orchestrator.spec.environment import DEFAULT_PATH, expand_environment


def test_environment_layers_expand_earlier_variables() -> None:
    merged = expand_environment(
        [
            {"LFS": "/mnt/lfs", "MAKEFLAGS": "-j2"},
            {"LFS_TGT": "x86_64-lfs-linux-gnu", "PATH": "$LFS/tools/bin:/usr/bin"},
            {"CONFIG_SITE": "${LFS}/usr/share/config.site", "ODD": "$UNSET/x"},
        ]
    )
    assert merged == {
        "LFS": "/mnt/lfs",
        "MAKEFLAGS": "-j2",
        "LFS_TGT": "x86_64-lfs-linux-gnu",
        "PATH": "/mnt/lfs/tools/bin:/usr/bin",
        "CONFIG_SITE": "/mnt/lfs/usr/share/config.site",
        "ODD": "$UNSET/x",
    }
    assert expand_environment([{}]) == {"PATH": DEFAULT_PATH}


def test_bus_filters_and_survives_a_failing_subscriber() -> None:
    bus = EventBus()
    seen: list[str] = []

    def broken(event: Event) -> None:
        raise RuntimeError("subscriber bug")

    bus.subscribe(broken)
    bus.subscribe(lambda e: seen.append(e.name), BuildComplete)
    bus.emit(BuildStart(run_id="r", stage="s", package="p", attempt=1, log=""))
    bus.emit(BuildComplete(run_id="r", stage="s", package="p", attempt=1, duration_s=1.0))
    assert seen == ["build.complete"]


def test_stats_frames_accumulate_and_zero_frame_is_ignored() -> None:
    figures = ContainerFigures()
    figures.add_frame(
        {
            "cpu_stats": {"cpu_usage": {"total_usage": 2_500_000_000}},
            "memory_stats": {"usage": 10_000, "max_usage": 50_000},
            "blkio_stats": {"io_service_bytes_recursive": []},
            "pids_stats": {"current": 3},
        }
    )
    figures.add_frame({"cpu_stats": {"cpu_usage": {"total_usage": 0}}, "memory_stats": {}})
    assert (figures.cpu_seconds, figures.memory_peak_bytes, figures.frames) == (2.5, 50_000, 1)
    assert (figures.read_bytes, figures.pids_peak, figures.io_source) == (None, 3, "stats")


V1_COUNTERS = """== memory.max_usage_in_bytes
23859200
== cpuacct.usage
33538265
== pids.current
2
== blkio.throttle.io_service_bytes
8:0 Read 4096
8:0 Write 0
Total 4096
== task.io
rchar: 21043138
wchar: 20980914
read_bytes: 40960
write_bytes: 21000192
cancelled_write_bytes: 0
"""

V2_COUNTERS = """== memory.peak
1048576
== cpu.stat
usage_usec 250000
user_usec 200000
== io.stat
8:0 rbytes=100 wbytes=300000000 rios=1 wios=2
259:0 rbytes=50 wbytes=1
== pids.peak
7
== task.io
read_bytes: 0
write_bytes: 200
"""


def test_cgroup_v1_counters_replace_the_stats_frames() -> None:
    figures = ContainerFigures()
    figures.add_frame(
        {"cpu_stats": {"cpu_usage": {"total_usage": 9}}, "memory_stats": {"usage": 9}}
    )
    assert figures.apply_counters(V1_COUNTERS)
    assert (figures.cpu_seconds, figures.memory_peak_bytes) == (0.033538265, 23_859_200)
    # Buffered writes are not in v1's blkio: the task counters have them.
    assert (figures.read_bytes, figures.write_bytes) == (40_960, 21_000_192)
    assert (figures.pids_peak, figures.io_source) == (2, "cgroup")
    figures.add_frame({"cpu_stats": {"cpu_usage": {"total_usage": 9e9}}, "memory_stats": {}})
    assert figures.cpu_seconds == 0.033538265  # a late stats frame changes nothing


def test_cgroup_v2_counters() -> None:
    figures = ContainerFigures()
    assert figures.apply_counters(V2_COUNTERS)
    assert (figures.cpu_seconds, figures.memory_peak_bytes, figures.pids_peak) == (0.25, 1 << 20, 7)
    assert (figures.read_bytes, figures.write_bytes) == (150, 300_000_001)


def test_forged_or_empty_counters_leave_the_stats_figures(tmp_path: Path) -> None:
    figures = ContainerFigures()
    figures.add_frame({"cpu_stats": {"cpu_usage": {"total_usage": 10**9}}, "memory_stats": {}})
    hostile = "== memory.max_usage_in_bytes\n" + "9" * 400 + "\n== cpuacct.usage\n-5\n"
    assert not figures.apply_counters(hostile)
    assert not figures.apply_counters("")
    huge = tmp_path / "counters"
    huge.write_text("== cpuacct.usage\n" + " " * FIGURES_FILE_MAX_BYTES + "\n5\n")
    assert not figures.read_counters_file(huge)  # read only up to the cap
    assert not figures.read_counters_file(tmp_path / "missing")
    # What a build running as root could leave in its place: none is read, none blocks.
    secret = tmp_path / "secret"
    secret.write_text(V1_COUNTERS)
    (tmp_path / "link").symlink_to(secret)
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "directory").mkdir()
    for name in ("link", "fifo", "directory"):
        assert not figures.read_counters_file(tmp_path / name), name
    assert (figures.cpu_seconds, figures.io_source) == (1.0, "stats")


def test_state_round_trip_and_status_json(tmp_path: Path) -> None:
    state = RunState(run_id="r1", lfs="/mnt/x", files=["a.yaml"])
    record = PackageState(stage="s", name="p", status="failed", exit_code=2)
    record.attempts.append(Attempt(number=1, started="t", exit_code=2, error="exit status 2"))
    state.packages.append(record)
    path = tmp_path / "state.json"
    save_state(state, path)
    loaded = load_state(path)
    assert loaded == state
    assert loaded is not None
    package = loaded.status_json()["packages"][0]  # type: ignore[index]
    assert package["attempts"] == 1
    assert {"stage", "name", "status", "exit_code", "oom_killed", "duration_s", "cpu_seconds",
            "memory_peak_bytes", "read_bytes", "write_bytes"} <= set(package)  # fmt: skip


def test_event_log_rotates_and_compresses(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    log = JsonEventLog(path, max_bytes=2048, backups=2)
    for number in range(200):
        log(
            BuildComplete(run_id="r", stage="s", package=f"p{number}", attempt=1, duration_s=number)
        )
    log.close()
    rotated = sorted(p.name for p in tmp_path.iterdir())
    assert rotated == ["events.jsonl", "events.jsonl.1.zst", "events.jsonl.2.zst"]
    packed = path.with_name("events.jsonl.1.zst").read_bytes()
    text = zstandard.ZstdDecompressor().decompressobj().decompress(packed)
    first = json.loads(text.decode().splitlines()[0])
    assert first["event"] == "build.complete" and first["payload"]["context"]["stage"] == "s"


def test_disk_added_is_given_only_to_an_attempt_that_ran_alone(tmp_path: Path) -> None:
    meter = DiskAddedMeter()
    with meter.measure(tmp_path) as alone:
        (tmp_path / "alone").write_bytes(b"x" * 100_000)
    assert alone.bytes is not None and alone.bytes >= 100_000 and not alone.shared
    with meter.measure(tmp_path) as first:
        with meter.measure(tmp_path) as second:
            (tmp_path / "second").write_bytes(b"x" * 100_000)
        (tmp_path / "first").write_bytes(b"x" * 10)
    assert (first.bytes, first.shared, second.bytes, second.shared) == (None, True, None, True)
    with meter.measure(tmp_path) as later:
        pass
    assert (later.bytes, later.shared) == (0, False)
