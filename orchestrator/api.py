"""The library API behind the CLI; tests call these directly."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

from orchestrator import engine
from orchestrator.build import Build, RunOptions
from orchestrator.config import Config, load_config
from orchestrator.console import ConsoleView
from orchestrator.eventlog import JsonEventLog
from orchestrator.events import EventBus
from orchestrator.graph import Plan, load_plan
from orchestrator.state import PackageState, RunState, load_state
from orchestrator.workspace import Workspace


def validate(paths: Sequence[Path]) -> Plan:
    """Check stage files without Docker; raise StageFileError listing every problem."""
    return load_plan(paths)


@contextlib.contextmanager
def event_bus(workspace: Workspace, config: Config, view: ConsoleView | None) -> Iterator[EventBus]:
    bus = EventBus()
    log = JsonEventLog(
        workspace.logs_dir / "events.jsonl",
        config.settings.log_max_bytes,
        config.settings.log_backups,
    )
    bus.subscribe(log)
    try:
        if view is None:
            yield bus
        else:
            with view:
                bus.subscribe(view)
                yield bus
    finally:
        log.close()


def run(
    paths: Sequence[Path],
    lfs_dir: Path,
    *,
    overrides: Sequence[str] = (),
    parallel: int | None = None,
    workspace: Workspace | None = None,
    view: ConsoleView | None = None,
) -> RunState:
    """Build every package of the given stages (and the stages they require)."""
    config = load_config(overrides)
    plan = load_plan(paths)
    workspace = workspace or Workspace.from_env()
    client = engine.connect(timeout=None)
    options = RunOptions(lfs_dir=lfs_dir, parallel=parallel or config.settings.parallel_builds)
    with event_bus(workspace, config, view) as bus:
        build = Build(plan, config.settings, workspace, client, bus, options)
        return build.run()


def last_run(workspace: Workspace | None = None) -> RunState | None:
    return load_state((workspace or Workspace.from_env()).state_file)


def log_tail(package: PackageState, lines: int) -> list[str]:
    if not package.log or lines <= 0:
        return []
    try:
        with open(package.log, "rb") as handle:
            handle.seek(0, 2)
            size = handle.tell()
            handle.seek(max(0, size - 64 * 1024))
            text = handle.read().decode(errors="replace")
    except OSError:
        return []
    return text.splitlines()[-lines:]


def cleanup(workspace: Workspace | None = None) -> list[str]:
    """Remove containers left behind by lfsorch processes that no longer exist."""
    return engine.reap_leftovers(engine.connect())
