"""Plugin hooks: named points where third-party code sees a run, as Fedora mock's plugins do.

A plugin is a module (named in the `plugins` configuration key, or registered under the
`lfsorch` entry-point group) with functions marked `@hookimpl` named after the hooks below.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence

import pluggy

from orchestrator.errors import ConfigError
from orchestrator.monitor import events
from orchestrator.monitor.events import Event, Message

PROJECT = "lfsorch"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class HookSpecs:
    @hookspec
    def lfsorch_event(self, event: Event, message: Message) -> None:
        """Every event on the bus (`build.start`, `build.complete`, `build.error`, ...): the
        typed event, and the same as the message protocol's `Message` (what the JSON event
        log holds). A plugin names the arguments it wants."""

    @hookspec
    def lfsorch_run_start(self, run_id: str, stages: list[str]) -> None:
        """A run begins, before the first container."""

    @hookspec
    def lfsorch_package_done(self, run_id: str, stage: str, package: str, ok: bool) -> None:
        """A package finished (ok) or failed for good, after its last attempt."""

    @hookspec
    def lfsorch_run_end(self, run_id: str, outcome: str) -> None:
        """A run ended: succeeded, failed or interrupted."""


def plugin_manager(modules: Sequence[str] = ()) -> pluggy.PluginManager:
    manager = pluggy.PluginManager(PROJECT)
    manager.add_hookspecs(HookSpecs)
    manager.load_setuptools_entrypoints(PROJECT)
    for name in modules:
        try:
            manager.register(importlib.import_module(name), name=name)
        except ImportError as exc:
            raise ConfigError(
                f"plugin module {name!r} cannot be imported: {exc}",
                hint="fix the `plugins` configuration key or install the plugin",
            ) from None
    return manager


class PluginBridge:
    """A bus subscriber that calls the plugins' hooks."""

    def __init__(self, manager: pluggy.PluginManager) -> None:
        self._hook = manager.hook

    def __call__(self, event: Event) -> None:
        self._hook.lfsorch_event(event=event, message=event.message())
        if isinstance(event, events.RunStart):
            self._hook.lfsorch_run_start(run_id=event.run_id, stages=event.stages)
        elif isinstance(event, events.BuildComplete) or (
            isinstance(event, events.BuildError) and not event.will_retry
        ):
            # A package's last word: built, or failed with no attempt left.
            self._hook.lfsorch_package_done(
                run_id=event.run_id,
                stage=event.stage,
                package=event.package,
                ok=isinstance(event, events.BuildComplete),
            )
        elif isinstance(event, events.RunComplete):
            self._hook.lfsorch_run_end(run_id=event.run_id, outcome=event.outcome)
