"""The library API behind the CLI; tests call these directly."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import docker

from orchestrator import engine, sources
from orchestrator.build import Build, RunOptions, workspace_lock
from orchestrator.config import Config, load_config
from orchestrator.console import ConsoleView
from orchestrator.eventlog import JsonEventLog
from orchestrator.events import EventBus
from orchestrator.graph import Plan, load_plan
from orchestrator.manifest import SnapshotError
from orchestrator.plugins import PluginBridge, plugin_manager
from orchestrator.snapshots import SnapshotInfo, SnapshotStore
from orchestrator.state import PackageState, RunState, load_state, save_state
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
    bus.subscribe(PluginBridge(plugin_manager(config.settings.plugins)))
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
    config: Config | None = None,
    parallel: int | None = None,
    rebuild: bool = False,
    rebuild_stages: Sequence[str] = (),
    from_stage: str | None = None,
    workspace: Workspace | None = None,
    view: ConsoleView | None = None,
) -> RunState:
    """Build every package of the given stages (and the stages they require)."""
    config = config or load_config(overrides)
    plan = load_plan(paths)
    workspace = workspace or Workspace.from_env()
    client = engine.connect(timeout=None)
    options = RunOptions(
        lfs_dir=lfs_dir,
        parallel=parallel or config.settings.parallel_builds,
        rebuild=rebuild,
        rebuild_stages=tuple(rebuild_stages),
        from_stage=from_stage,
    )
    sources_dir = verified_sources(plan, workspace, config.settings.source_set)
    with event_bus(workspace, config, view) as bus:
        build = Build(plan, config.settings, workspace, client, bus, options, sources_dir)
        return build.run()


def verified_sources(plan: Plan, workspace: Workspace, source_set: str) -> Path | None:
    """The cache directory of the plan's sources, after checking every file in it at once."""
    needed = {
        f"{stage_plan.name}/{package.name}": package.sources
        for stage_plan in plan.stages
        for package in stage_plan.file.stage.packages
        if package.sources
    }
    if not needed:
        return None
    cache_dir = sources.cache_dir_for(workspace, source_set)
    sources.verify(needed, cache_dir)
    return cache_dir


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


def cleanup() -> list[str]:
    """Remove containers left behind by lfsorch processes that no longer exist."""
    return engine.reap_leftovers(engine.connect())


def pull_snapshot(image: str, *, workspace: Workspace | None = None) -> SnapshotInfo:
    """Add a snapshot image's snapshot to the store, pulling the image if the engine lacks it."""
    workspace = workspace or Workspace.from_env()
    client = engine.connect(timeout=None)
    try:
        try:
            client.images.get(image)
        except docker.errors.ImageNotFound:
            client.images.pull(image)
    except docker.errors.APIError as exc:
        raise SnapshotError(
            f"cannot pull {image}: {exc.explanation or exc}",
            hint="`docker login` to the registry, or `docker load` the image first",
        ) from None
    with workspace_lock(workspace):
        return SnapshotStore(workspace.snapshots_dir).import_image(client, image)


def restore(
    key_or_stage: str, lfs_dir: Path, *, image: bool = False, workspace: Workspace | None = None
) -> SnapshotInfo:
    """Make the partition equal a snapshot (or a snapshot image, with `image`); the run record
    learns where the partition is.

    A workspace with no run record yet (a fresh runner that restored a pulled image) gets one
    that continues the snapshot's chain of keys, so the next `lfsorch run` of the same stages
    builds only what comes after it.
    """
    workspace = workspace or Workspace.from_env()
    store = SnapshotStore(workspace.snapshots_dir)
    lfs = str(lfs_dir.resolve())
    with workspace_lock(workspace):
        if image:
            info = store.restore_image(engine.connect(timeout=None), key_or_stage, lfs_dir)
        else:
            info = store.restore(key_or_stage, lfs_dir)
        state = load_state(workspace.state_file)
        if state is None:
            chain = store.manifest(info.key).metadata.get("chain") or {}
            state = RunState(
                run_id=f"restore-{info.key[:12]}",
                lfs=lfs,
                files=[],
                outcome="succeeded",
                base_stage=chain.get("first_stage"),
                base_key=chain.get("base"),
            )
        if state.lfs == lfs:
            state.partition_at = info.key
            save_state(state, workspace.state_file)
    return info
