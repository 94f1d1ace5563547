"""Typed events: subscribed to by kind, written to the event log as the name plus the fields."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.monitor.eventlog import JsonEventLog
from orchestrator.monitor.events import (
    BuildComplete,
    BuildProgress,
    Event,
    EventBus,
    PackageEvent,
    RunComplete,
    StageCached,
)


def test_a_subscriber_gets_the_kinds_it_names_and_their_subkinds() -> None:
    bus = EventBus()
    packages: list[str] = []
    every: list[str] = []
    bus.subscribe(lambda event: packages.append(event.name), PackageEvent)
    bus.subscribe(lambda event: every.append(event.name))
    bus.emit(BuildProgress(run_id="r", stage="s", package="p", line="x", lines=1))
    bus.emit(StageCached(run_id="r", stage="s", key="k"))
    bus.emit(BuildComplete(run_id="r", stage="s", package="p", attempt=1))
    assert packages == ["build.progress", "build.complete"]
    assert every == ["build.progress", "stage.cached", "build.complete"]


def test_fields_are_checked_where_the_event_is_made() -> None:
    with pytest.raises(TypeError, match="reason"):
        RunComplete(run_id="r", reason="x")  # type: ignore[call-arg]
    with pytest.raises(AttributeError):
        RunComplete(run_id="r", outcome="failed").outcome = "succeeded"  # type: ignore[misc]


def test_the_log_line_is_a_message_of_the_protocol(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    log = JsonEventLog(path, max_bytes=1 << 20, backups=1)
    event = BuildProgress(
        run_id="r", stage="ch5", package="libstdc++", line="make", lines=3, time=12.34567
    )
    log(event)
    log(RunComplete(run_id="r", outcome="failed", time=13.0))
    log.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines == [
        {
            "event": "build.progress",
            "timestamp": "1970-01-01T00:00:12.345+00:00",
            "source": "builder",
            "target": "ch5/libstdc++",
            "priority": "debug",
            "payload": {
                "data": {"line": "make", "lines": 3},
                "context": {"run_id": "r", "stage": "ch5", "package": "libstdc++"},
            },
        },
        {
            "event": "run.complete",
            "timestamp": "1970-01-01T00:00:13.000+00:00",
            "source": "scheduler",
            "target": "run r",
            "priority": "error",
            "payload": {"data": {"outcome": "failed"}, "context": {"run_id": "r"}},
        },
    ]
    assert list(lines[0]) == ["event", "timestamp", "source", "target", "priority", "payload"]
    assert isinstance(event, Event) and event.data == {"line": "make", "lines": 3}
