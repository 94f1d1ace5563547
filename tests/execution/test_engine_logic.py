"""Pure logic around the engine: environments, events, stats frames, state records."""

from __future__ import annotations

import json
from pathlib import Path

import zstandard

from orchestrator.build.state import Attempt, PackageState, RunState, load_state, save_state
from orchestrator.monitor.eventlog import JsonEventLog
from orchestrator.monitor.events import BuildComplete, BuildStart, Event, EventBus
from orchestrator.monitor.metrics import ContainerFigures, HostIO
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
        }
    )
    figures.add_frame({"cpu_stats": {"cpu_usage": {"total_usage": 0}}, "memory_stats": {}})
    assert (figures.cpu_seconds, figures.memory_peak_bytes, figures.frames) == (2.5, 50_000, 1)
    figures.apply_host_io(HostIO(100, 200), HostIO(150, 500))
    assert (figures.read_bytes, figures.write_bytes, figures.io_source) == (50, 300, "host")


def test_block_io_from_the_container_wins_over_host_counters() -> None:
    figures = ContainerFigures()
    figures.add_frame(
        {
            "cpu_stats": {"cpu_usage": {"total_usage": 1}},
            "memory_stats": {"usage": 1},
            "blkio_stats": {
                "io_service_bytes_recursive": [
                    {"op": "Read", "value": 7},
                    {"op": "Write", "value": 9},
                    {"op": "Total", "value": 16},
                ]
            },
        }
    )
    figures.apply_host_io(HostIO(0, 0), HostIO(1000, 1000))
    assert (figures.read_bytes, figures.write_bytes, figures.io_source) == (7, 9, "container")


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
    assert first["event"] == "build.complete" and first["stage"] == "s"
