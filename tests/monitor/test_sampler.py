"""The host sampler: thresholds crossed once each way, the engine's answers, the interval."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.config import load_config
from orchestrator.errors import LfsorchError
from orchestrator.monitor.events import Event, EventBus, ResourceChange, SystemEvent
from orchestrator.monitor.sampler import EnginePing, HostSampler, Thresholds


def sampler_on(
    tmp_path: Path, thresholds: Thresholds, ping: EnginePing | None = None
) -> tuple[HostSampler, list[Event]]:
    bus = EventBus()
    seen: list[Event] = []
    bus.subscribe(seen.append)
    filesystems = {"partition": tmp_path, "workspace": tmp_path / "gone"}
    sampler = HostSampler(bus, "r", filesystems, 60.0, thresholds, engine_ping=ping)
    return sampler, seen


def changes(seen: list[Event]) -> list[tuple[str, str]]:
    return [(e.name, e.resource) for e in seen if isinstance(e, ResourceChange)]


def test_a_resource_below_its_threshold_is_depleted_once_then_available(tmp_path: Path) -> None:
    sampler, seen = sampler_on(tmp_path, Thresholds(free_space_bytes=1 << 62, memory_bytes=0))
    sampler.sample()
    sampler.sample()
    assert changes(seen) == [("resource.depleted", "partition")]
    sample = seen[0]
    assert sample.name == "resource.sample"
    assert sample.data["free_bytes"]["partition"] > 0
    assert sample.data["free_bytes"]["workspace"] is None  # a missing directory is no figure
    sampler._thresholds = Thresholds(free_space_bytes=0, memory_bytes=1 << 62)
    sampler.sample()
    assert changes(seen)[1:] == [
        ("resource.depleted", "memory"),
        ("resource.available", "partition"),
    ]
    depleted = next(e for e in seen if isinstance(e, ResourceChange))
    assert depleted.message().priority == "warning" and depleted.target == "partition"


def test_the_engine_is_ready_in_error_once_and_ready_again(tmp_path: Path) -> None:
    answers = [True, False, False, True]

    def ping() -> None:
        if not answers.pop(0):
            raise ConnectionError("Connection refused\nmore detail")

    sampler, seen = sampler_on(tmp_path, Thresholds(0, 0), ping)
    for _ in range(4):
        sampler.sample()
    sampler.stop("interrupted")
    system = [(e.name, e.data["reason"]) for e in seen if isinstance(e, SystemEvent)]
    assert system == [
        ("system.ready", "answers"),
        ("system.error", "Connection refused"),
        ("system.ready", "answers again"),
        ("system.shutdown", "interrupted"),
    ]
    assert seen[-1].message().priority == "warning"


def test_sampling_runs_in_a_thread_until_stopped(tmp_path: Path) -> None:
    sampler, seen = sampler_on(tmp_path, Thresholds(0, 0))
    sampler.start()
    sampler.stop("finished")
    assert [e.name for e in seen] == ["resource.sample", "system.shutdown"]


def test_a_monitor_interval_too_short_is_refused() -> None:
    with pytest.raises(LfsorchError) as caught:
        load_config(["monitor_interval=0.1s"])
    assert "monitor_interval" in caught.value.message


def test_each_filesystem_sample_reaches_the_space_guard(tmp_path: Path) -> None:
    told: list[tuple[str, int]] = []
    sampler = HostSampler(
        EventBus(),
        "r",
        {"partition": tmp_path, "workspace": tmp_path / "gone"},
        60.0,
        Thresholds(0, 0),
        on_space=lambda name, free: told.append((name, free)),
    )
    sampler.sample()
    # The missing workspace gives no figure, so nothing to act on.
    assert [name for name, _ in told] == ["partition"] and told[0][1] > 0
