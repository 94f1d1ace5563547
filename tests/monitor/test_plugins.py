from __future__ import annotations

import sys
import types

import pytest

from orchestrator.errors import ConfigError
from orchestrator.monitor.events import (
    BuildComplete,
    BuildError,
    EventBus,
    Message,
    RunComplete,
    RunStart,
)
from orchestrator.monitor.plugins import PluginBridge, hookimpl, plugin_manager


def test_plugin_hooks_see_a_run(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, object]] = []
    module = types.ModuleType("lfsorch_test_plugin")

    @hookimpl
    def lfsorch_run_start(run_id: str, stages: list[str]) -> None:
        calls.append(("start", stages))

    @hookimpl
    def lfsorch_package_done(run_id: str, stage: str, package: str, ok: bool) -> None:
        calls.append(("done", (package, ok)))

    @hookimpl
    def lfsorch_run_end(run_id: str, outcome: str) -> None:
        calls.append(("end", outcome))

    @hookimpl
    def lfsorch_event(message: Message) -> None:
        calls.append(("message", (message.event, message.priority, message.target)))

    module.lfsorch_event = lfsorch_event  # type: ignore[attr-defined]
    module.lfsorch_run_start = lfsorch_run_start  # type: ignore[attr-defined]
    module.lfsorch_package_done = lfsorch_package_done  # type: ignore[attr-defined]
    module.lfsorch_run_end = lfsorch_run_end  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, module.__name__, module)

    bus = EventBus()
    bus.subscribe(PluginBridge(plugin_manager([module.__name__])))
    bus.emit(RunStart(run_id="r", lfs="/l", stages=["ch5"], packages=2, already_done=0, host={}))
    failed = {"run_id": "r", "stage": "ch5", "attempt": 1, "reason": "exit status 1", "log": ""}
    bus.emit(BuildError(package="gcc", will_retry=True, **failed))
    bus.emit(BuildComplete(run_id="r", stage="ch5", package="gcc", attempt=2))
    bus.emit(BuildError(package="glibc", will_retry=False, **failed))
    bus.emit(RunComplete(run_id="r", outcome="failed"))
    assert [call for call in calls if call[0] != "message"] == [
        ("start", ["ch5"]),
        ("done", ("gcc", True)),
        ("done", ("glibc", False)),
        ("end", "failed"),
    ]
    # Plugins see each event as the message the event log holds.
    assert [call[1] for call in calls if call[0] == "message"] == [
        ("run.start", "info", "run r"),
        ("build.error", "warning", "ch5/gcc"),
        ("build.complete", "info", "ch5/gcc"),
        ("build.error", "error", "ch5/glibc"),
        ("run.complete", "error", "run r"),
    ]


def test_missing_plugin_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as caught:
        plugin_manager(["no_such_lfsorch_plugin"])
    assert caught.value.message.startswith("plugin module 'no_such_lfsorch_plugin' cannot be")
