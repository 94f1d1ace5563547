"""The library API behind the CLI; tests call these directly."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import docker

from orchestrator.build import records, reproducible
from orchestrator.build.scheduler import Build, RunOptions, new_run_id
from orchestrator.build.state import PackageState, RunState, load_state, save_state
from orchestrator.checkpoints import leftovers
from orchestrator.checkpoints.extract import EXTRACT_IMAGE
from orchestrator.checkpoints.manifest import Manifest, SnapshotError
from orchestrator.checkpoints.store import PruneResult, SnapshotInfo, SnapshotStore
from orchestrator.config import Config, load_config
from orchestrator.errors import EngineUnavailable, ExitCode, LfsorchError, local_file_error
from orchestrator.execution import engine, hostpaths, images, registry
from orchestrator.execution.chroot import ChrootRunner
from orchestrator.execution.container import ContainerRunner
from orchestrator.execution.environment import BuildEnvironment, ByKind
from orchestrator.lockfile import (
    Lock,
    LockedImage,
    LockMismatch,
    differences,
    lock_beside,
    make_lock,
    plan_images,
    read_lock,
    write_lock,
)
from orchestrator.monitor.console import ConsoleView
from orchestrator.monitor.estimates import History, estimate
from orchestrator.monitor.eventlog import JsonEventLog
from orchestrator.monitor.events import Event, EventBus
from orchestrator.monitor.plugins import PluginBridge, plugin_manager
from orchestrator.monitor.report import SBU_REFERENCE, Report, build_report, sbu_seconds
from orchestrator.partition import Partition, PartitionBusy, refuse_unsafe_workspace
from orchestrator.sources import cache as sources
from orchestrator.sources.sets import Source, SourceSet, default_set_dirs, load_source_set
from orchestrator.spec.graph import Plan, load_plan
from orchestrator.spec.models import stage_json_schema
from orchestrator.workspace import HOME_ENV, Workspace, workspace_lock


def validate(paths: Sequence[Path]) -> Plan:
    """Check stage files without Docker; raise StageFileError listing every problem."""
    return load_plan(paths)


@contextlib.contextmanager
def event_bus(
    workspace: Workspace,
    config: Config,
    view: ConsoleView | None,
    subscribers: Sequence[Callable[[Event], None]] = (),
) -> Iterator[EventBus]:
    bus = EventBus()
    for subscriber in subscribers:
        bus.subscribe(subscriber)
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
    if log.failure is not None:  # the run's own error, if any, went out instead
        raise local_file_error(log.failure, "the event log")


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
    subscribers: Sequence[Callable[[Event], None]] = (),
    environment: BuildEnvironment | None = None,
    lock: Path | None = None,
    no_lock: bool = False,
    stop_after: str | None = None,
) -> RunState:
    """Build every package of the given stages (and the stages they require).

    `subscribers` receive every event of the run, before the event log and the console;
    `environment` is where packages build (default: a container each on the local engine).
    `lock` (default: `lfsorch.lock` beside the first stage file, unless `no_lock`) pins the
    inputs: the run uses exactly them or refuses before anything starts. `stop_after`
    (`STAGE` or `STAGE/PACKAGE`) ends the run once that checkpoint is taken.
    """
    config = config or load_config(overrides)
    plan = load_plan(paths)
    lock_path = find_lock(paths, lock, no_lock)
    pinned = read_lock(lock_path) if lock_path is not None else None
    if lock is None and pinned is not None and not {s.name for s in plan.stages} & {*pinned.stages}:
        pinned = None  # found beside the stage file, but a lock of other stages there
    workspace = checked_workspace(workspace)
    partition = Partition.checked(lfs_dir, workspace)  # before any engine or workspace work
    client = engine.connect(timeout=None)
    sources_view = sources.cache_dir_for(workspace, config.settings.source_set)
    hostpaths.check_engine_paths(
        client,
        engine_paths(partition, workspace, sources_view),
        [s.file.stage.image or config.settings.image for s in plan.stages],
    )
    options = RunOptions(
        lfs_dir=lfs_dir,
        parallel=parallel or config.settings.parallel_builds,
        rebuild=rebuild,
        rebuild_stages=tuple(rebuild_stages),
        from_stage=from_stage,
        stop_after=stop_after,
    )
    sources_dir = verified_sources(plan, workspace, config.settings.source_set)
    if pinned is not None and lock_path is not None:
        enforce_lock(
            pinned, lock_path, plan, config, client, sources_dir, move_tags=lock is not None
        )
    environment = environment or ByKind(ContainerRunner(client), ChrootRunner(client))
    with event_bus(workspace, config, view, subscribers) as bus:
        build = Build(
            plan,
            config.settings,
            workspace,
            client,
            bus,
            options,
            sources_dir,
            environment=environment,
        )
        return build.run()


def find_lock(paths: Sequence[Path], lock: Path | None, no_lock: bool) -> Path | None:
    """The lock a run uses: the one given, else `lfsorch.lock` beside the first stage file."""
    if lock is not None:
        return lock
    beside = lock_beside(paths[0]) if paths and not no_lock else None
    return beside if beside is not None and os.path.lexists(beside) else None


def create_lock(
    paths: Sequence[Path],
    *,
    output: Path | None = None,
    push: str | None = None,
    config: Config | None = None,
    workspace: Workspace | None = None,
) -> tuple[Path, Lock]:
    """Write the lock of the plan's inputs (beside the first stage file, or `output`); with
    `push` (`REGISTRY/REPO`) the build-host images are pushed there first and locked with
    the digest they can be pulled by."""
    config = config or load_config()
    plan = load_plan(paths)
    workspace = checked_workspace(workspace)
    sources_dir = verified_sources(plan, workspace, config.settings.source_set)
    client = engine.connect(timeout=None)
    locked: dict[str, LockedImage] = {}
    for reference in _lock_images(plan, config):
        image_id = engine.image_digest(client, reference)
        pulled_by = None
        if push is not None:
            pulled_by = registry.push(client, reference, push, image_id.split(":")[1][:16])
        locked[reference] = LockedImage(id=image_id, pull=pulled_by)
    the_lock = make_lock(plan, config.settings, locked, _digests(sources_dir))
    path = output or lock_beside(paths[0])
    write_lock(the_lock, path)
    return path, the_lock


def _lock_images(plan: Plan, config: Config) -> list[str]:
    """The images a lock pins: those the builds start from (their ids are in the keys), and
    the one checkpoint images are unpacked in, which a new runner pulls with them."""
    return sorted({*plan_images(plan, config.settings), EXTRACT_IMAGE})


def _digests(sources_dir: Path | None) -> Callable[[Source], str]:
    if sources_dir is not None:
        return sources.digest_in_view(sources_dir)
    return lambda source: source.sha256 or source.md5 or ""


def enforce_lock(
    pinned: Lock,
    lock_path: Path,
    plan: Plan,
    config: Config,
    client: docker.DockerClient,
    sources_dir: Path | None,
    *,
    move_tags: bool,
) -> None:
    """Refuse with every difference between the lock and the run's inputs. The engine is
    changed only once nothing but images differs: a locked image whose name the engine lacks
    is tagged there (pulled by digest where needed), and with `move_tags` (a lock the user
    named) a name the engine gives another image is moved too. An image tag is the machine's,
    used by every workspace: a lock merely found beside a stage file never moves one."""
    current = make_lock(plan, config.settings, pinned.images, _digests(sources_dir))
    if differences(pinned, current.model_copy(update={"images": pinned.images})):
        as_found = {
            reference: LockedImage(id=image_id)
            for reference in _lock_images(plan, config)
            if (image_id := engine.image_id_or_none(client, reference)) is not None
        }
        raise LockMismatch(
            lock_path, differences(pinned, current.model_copy(update={"images": as_found}))
        )
    found: dict[str, LockedImage] = {}
    missing: list[str] = []
    for reference in _lock_images(plan, config):
        locked = pinned.images.get(reference)
        image_id = engine.image_id_or_none(client, reference)
        if locked is not None and image_id != locked.id and (image_id is None or move_tags):
            bring_image(client, reference, locked)
            image_id = engine.image_id_or_none(client, reference)
        if image_id is None:
            missing.append(f"image {reference}: not in the engine, and the lock has no "
                           "reference to pull it by")  # fmt: skip
        else:
            found[reference] = LockedImage(id=image_id)
    problems = missing + differences(pinned, current.model_copy(update={"images": found}))
    if problems:
        raise LockMismatch(lock_path, problems)


def bring_image(client: docker.DockerClient, reference: str, locked: LockedImage) -> None:
    """Tag the lock's image as `reference`: from the engine's own images when it has that
    id, else pulled by the lock's digest reference. Without either, nothing changes (and
    the difference is reported)."""
    present = engine.image_id_or_none(client, locked.id)
    if present == locked.id:
        client.images.get(locked.id).tag(*registry.split_reference(reference))
    elif locked.pull is not None:
        registry.pull_as(client, locked.pull, locked.id, reference)


def verify_reproducible(
    paths: Sequence[Path],
    *,
    lfs_a: Path | None = None,
    lfs_b: Path | None = None,
    overrides: Sequence[str] = (),
    parallel: int | None = None,
    diffoscope: int = 3,
    keep: bool = False,
    workspace: Workspace | None = None,
    against: Path | None = None,
    make_view: Callable[[], ConsoleView] | None = None,
    notify: Callable[[str], None] | None = None,
) -> reproducible.ReproducibilityReport:
    """Build the stages twice from the same inputs, each time in an empty partition with a
    workspace of its own (so nothing is a cache hit), and compare their checkpoints stage by
    stage; diffoscope shows where inside the first `diffoscope` differing files they differ.

    With `against` (a workspace), the first build is the newest run recorded there that
    checkpointed every stage once the second, the only one built here, is done (or, while
    a run there is still building them, once it has).

    The throwaway workspaces (and partitions made for the builds) are removed afterwards
    unless `keep`; after a failed build they stay, for its logs.
    """
    config = load_config([*overrides, "checkpoint=stage"])  # a checkpoint after every stage
    plan = load_plan(paths)
    workspace = checked_workspace(workspace)
    stages = [stage_plan.name for stage_plan in plan.stages]
    earlier: Workspace | None = None
    if against is not None:
        if lfs_a is not None:
            raise reproducible.NotReproducibleSetup(
                "--against and --lfs-a exclude each other: the first build is the earlier one",
                hint="give --lfs-b alone for the build made here, or neither",
            )
        earlier = checked_workspace(Workspace(against))
        reproducible.check_earlier_builds(earlier, stages)
    sites = reproducible.build_sites(workspace, lfs_a, lfs_b, new_run_id(), one=earlier is not None)

    def build(site: reproducible.BuildSite) -> RunState:
        if notify is not None:
            notify(f"build {site.name}: in {site.lfs}, workspace {site.workspace.root}")
        view = make_view() if make_view else None
        return run(paths, site.lfs, config=config, parallel=parallel, workspace=site.workspace,
                   view=view)  # fmt: skip

    if earlier is None:
        states = _build_twice(sites, build)
        first_store = SnapshotStore(sites.a.workspace.snapshots_dir)
    else:
        built = _build_twice(sites, build, only=(sites.b,))
        try:
            states = [reproducible.earlier_build(earlier, stages, notify=notify), *built]
        except BaseException:  # a refusal, or Ctrl-C while waiting for the earlier run
            if not keep:
                sites.remove()
            raise
        first_store = SnapshotStore(earlier.snapshots_dir)
    stores = (first_store, SnapshotStore(sites.b.workspace.snapshots_dir))
    report = reproducible.ReproducibilityReport(
        states[0].run_id,
        states[1].run_id,
        reproducible.compare_builds(stages, (stores[0], states[0]), (stores[1], states[1])),
    )
    first = report.first_differing
    if first is not None:
        report.diffoscope, report.diffoscope_note = reproducible.run_diffoscope(
            first, stores, diffoscope
        )
    if keep:
        report.kept = sites.root
    else:
        sites.remove()
    return report


def _build_twice(
    sites: reproducible.BuildSites,
    build: Callable[[reproducible.BuildSite], RunState],
    only: Sequence[reproducible.BuildSite] = (),
) -> list[RunState]:
    """Build a, then b (or `only` those). A failed build keeps both sites, for its logs;
    anything else that stops them (a refusal, an interrupt) removes them."""
    states = []
    try:
        for site in only or (sites.a, sites.b):
            state = build(site)
            if state.outcome != "succeeded":
                raise reproducible.BuildFailed(
                    f"build {site.name} {state.outcome}: nothing to compare",
                    hint=f"its record and logs are under {site.workspace.root} "
                    f"(remove {sites.root} when done)",
                )
            states.append(state)
    except BaseException as exc:
        if not isinstance(exc, reproducible.BuildFailed):
            sites.remove()
        raise
    return states


def engine_paths(
    partition: Partition, workspace: Workspace, sources_view: Path | None = None
) -> list[hostpaths.SharedPath]:
    """The directories the engine bind-mounts for builds and restores of this partition: the
    partition (or, where it is no mount point, the directory beside it where a restore
    stages its tree), the workspace (per-attempt directories, stage assets) and the
    sources view."""
    paths = [
        hostpaths.SharedPath("the LFS partition", partition.path, "--lfs"),
        hostpaths.SharedPath("the workspace", workspace.root, HOME_ENV),
        hostpaths.SharedPath("the run directories", workspace.runs_dir),
    ]
    if not os.path.ismount(partition.path):
        paths.append(hostpaths.SharedPath("the directory restores stage in", partition.path.parent))
    if sources_view is not None:
        paths.append(hostpaths.SharedPath("the sources view", sources_view))
    return paths


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


def checked_workspace(workspace: Workspace | None = None) -> Workspace:
    """The workspace (from LFSORCH_HOME by default), refused if it is a system directory or
    lies inside a partition."""
    workspace = workspace or Workspace.from_env()
    refuse_unsafe_workspace(workspace)
    return workspace


def last_run(workspace: Workspace | None = None, lfs_dir: Path | None = None) -> RunState | None:
    """The last run's record, or with `lfs_dir` the record of that partition."""
    workspace = workspace or Workspace.from_env()
    if lfs_dir is None:
        return load_state(workspace.state_file)
    return records.peek_record(Partition(Path(os.path.realpath(lfs_dir)), workspace))


def recent_runs(limit: int = 20, workspace: Workspace | None = None) -> list[records.RunSummary]:
    return records.recent_runs(workspace or Workspace.from_env(), limit)


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


@dataclasses.dataclass
class Cleanup:
    containers: list[str] | None  # None: no engine answered, so no container was checked
    files: list[str]


def cleanup(workspace: Workspace | None = None) -> Cleanup:
    """Remove containers left behind by lfsorch processes that no longer exist, then the
    staging directories that killed snapshots and restores left (in the workspace, and in
    and beside the partitions it has records of, each under its lock)."""
    workspace = checked_workspace(workspace)
    try:
        containers: list[str] | None = engine.reap_leftovers(engine.connect())
    except EngineUnavailable:
        containers = None
    with workspace_lock(workspace):
        files = leftovers.remove_leftovers(leftovers.workspace_leftovers(workspace))
        for record in sorted(workspace.partitions_dir.glob("*/state.json")):
            files += _partition_cleanup(workspace, record)
    return Cleanup(containers, files)


def _partition_cleanup(workspace: Workspace, record_file: Path) -> list[str]:
    """A recorded partition's leftovers, if it is still that partition and not in use."""
    try:
        state = load_state(record_file)
        if state is None:
            return []
        partition = Partition.checked(Path(state.lfs), workspace)
        if partition.identity(create=False) != record_file.parent.name:
            return []
        with partition.lock():
            return leftovers.remove_leftovers(leftovers.partition_leftovers(partition.path))
    except LfsorchError:  # unreadable record, partition gone or busy: nothing of ours to do
        return []


def pull_snapshot(image: str, *, workspace: Workspace | None = None) -> SnapshotInfo:
    """Add a snapshot image's snapshot to the store, pulling the image if the engine lacks it."""
    workspace = checked_workspace(workspace)
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
        leftovers.remove_leftovers(leftovers.workspace_leftovers(workspace))
        return SnapshotStore(workspace.snapshots_dir).import_image(client, image)


def snapshot_image(key_or_stage: str, *, workspace: Workspace | None = None) -> tuple[str, str]:
    """Turn a snapshot into an image; returns (the snapshot's key, the image id)."""
    workspace = checked_workspace(workspace)
    store = SnapshotStore(workspace.snapshots_dir)
    client = engine.connect(timeout=None)
    with workspace_lock(workspace):  # its scratch tree lives in the store
        info = store.resolve(key_or_stage)
        return info.key, store.to_image(client, info.key)


def prune_snapshots(
    *,
    keep_last: int | None = None,
    max_bytes: int | None = None,
    workspace: Workspace | None = None,
) -> PruneResult:
    """Remove old snapshots under the workspace lock, so never one a running build needs.

    A held lock is refused at once (`WorkspaceBusy`), never waited for: a build can hold it
    for hours.
    """
    workspace = checked_workspace(workspace)
    with workspace_lock(workspace):
        leftovers.remove_leftovers(leftovers.workspace_leftovers(workspace))
        return SnapshotStore(workspace.snapshots_dir).prune(keep_last, max_bytes)


class RestoreInterrupted(LfsorchError):
    exit_code = ExitCode.INTERRUPTED


def restore(
    key_or_stage: str,
    lfs_dir: Path,
    *,
    image: bool = False,
    workspace: Workspace | None = None,
    notify: Callable[[str], None] | None = None,
) -> SnapshotInfo:
    """Make the partition equal a snapshot (or a snapshot image, with `image`); the
    partition's run record learns where the partition is.

    Under the workspace's and the partition's locks, after removing containers of runs that
    are gone (one could still be writing into the partition) and refusing while a live one
    mounts it. A partition with no record here yet gets one that continues the snapshot's
    chain of keys, so the next `lfsorch run` of the same stages builds only what follows.
    """
    workspace = checked_workspace(workspace)
    partition = Partition.checked(lfs_dir, workspace)
    store = SnapshotStore(workspace.snapshots_dir)
    with workspace_lock(workspace):
        if not image:
            store.resolve(key_or_stage)  # a wrong name fails before anything is touched
        _check_restore_paths(partition, workspace)
        partition.path.mkdir(parents=True, exist_ok=True)
        with partition.lock():
            client = _clear_for_restore(partition, workspace, notify or (lambda _: None))
            _forget_position(partition)
            try:
                if image:
                    info = store.restore_image(
                        client or engine.connect(), key_or_stage, partition.path
                    )
                else:
                    info = store.restore(key_or_stage, partition.path, client)
            except KeyboardInterrupt:
                raise RestoreInterrupted(
                    f"interrupted: the restore into {partition.path} did not finish",
                    hint="run the same `lfsorch restore` again; it removes what this one left",
                ) from None
            _record_restore(partition, store, info)
            partition.note_last_run(info.key, "restored")
    return info


def _check_restore_paths(partition: Partition, workspace: Workspace) -> None:
    """Where a restore extracts in a container, the engine must mount what lfsorch sees."""
    try:
        client = engine.connect(timeout=None)
    except EngineUnavailable:
        return  # no engine: the restore extracts in the host's sandbox, or says it cannot
    hostpaths.check_engine_paths(client, engine_paths(partition, workspace), [EXTRACT_IMAGE])


def _clear_for_restore(
    partition: Partition, workspace: Workspace, notify: Callable[[str], None]
) -> docker.DockerClient | None:
    try:
        client = engine.connect(timeout=None)
    except EngineUnavailable:
        client = None  # no engine: no container can be writing into the partition
    if client is not None:
        for name in engine.reap_leftovers(client):
            notify(f"removed container {name} of a run that is gone")
        partition.refuse_live_containers(client)
    staging = leftovers.workspace_leftovers(workspace)
    staging += leftovers.partition_leftovers(partition.path)
    for path in leftovers.remove_leftovers(staging):
        notify(f"removed {path}, left by an interrupted snapshot or restore")
    return client


def _forget_position(partition: Partition) -> None:
    """Until the restore is done, the record must not say the partition is at a checkpoint.
    A record still `running` belongs to a run that was killed (this process holds the
    partition's lock): it says so now."""
    record = records.load_record(partition)
    if record is None or (record.partition_at is None and record.outcome != "running"):
        return
    record.partition_at = None
    if record.outcome == "running":
        record.outcome = "interrupted"
        for package in record.packages:
            if package.status == "running":
                package.status = "pending"
    _save_record(partition, record)


def _record_restore(partition: Partition, store: SnapshotStore, info: SnapshotInfo) -> None:
    record = records.load_record(partition)
    if record is None:
        chain = store.manifest(info.key).metadata.get("chain") or {}
        record = RunState(
            run_id=f"restore-{info.key[:12]}",
            lfs=str(partition.path),
            partition=partition.identity(),
            files=[],
            outcome="succeeded",
            base_stage=chain.get("first_stage"),
            base_key=chain.get("base"),
        )
    record.partition_at = info.key
    _save_record(partition, record)


def _save_record(partition: Partition, record: RunState) -> None:
    identity = partition.identity()
    assert identity is not None
    record.partition = identity
    save_state(record, partition.record_file(identity))
    last = load_state(partition.workspace.state_file)
    if last is not None and last.run_id == record.run_id:
        save_state(record, partition.workspace.state_file)


# ------------------------------------------------------------- settings, schema, report


def configuration(overrides: Sequence[str] = ()) -> Config:
    """The settings of every layer with where each came from; `overrides` (KEY=VALUE) last."""
    return load_config(overrides)


def stage_schema() -> dict[str, Any]:
    """The JSON Schema of stage files, for editors."""
    return stage_json_schema()


def last_report(
    reference: str = SBU_REFERENCE, workspace: Workspace | None = None
) -> Report | None:
    """Per-package figures of the last run, with SBUs relative to `reference`; None before
    the first run. A run under way also gets its time to go (`monitor.estimates`)."""
    workspace = workspace or Workspace.from_env()
    state = last_run(workspace)
    if state is None:
        return None
    if not state.under_way():
        return build_report(state, reference)
    sbu_s = sbu_seconds(state, reference)
    history = History.read(workspace.runs_dir)
    try:
        book = load_plan([Path(name) for name in state.files]).book_sbus()
    except LfsorchError:
        book = {}  # stage files changed or gone since the run began: earlier runs alone tell
    left = [f"{p.stage}/{p.name}" for p in state.packages if p.status in ("pending", "running")]
    found = {name: estimate(name, book.get(name), history, sbu_s) for name in left}
    return build_report(state, reference, estimates=found)


# --------------------------------------------------------------------------- snapshots


def list_snapshots(
    broken: list[str] | None = None, *, workspace: Workspace | None = None
) -> list[SnapshotInfo]:
    """The workspace's snapshots, oldest first; one line per unreadable one goes to `broken`."""
    return _snapshot_store(workspace).list(broken)


def snapshot_details(
    key_or_stage: str, *, workspace: Workspace | None = None
) -> tuple[SnapshotInfo, Manifest]:
    """One snapshot (by key, key prefix or stage) and its manifest."""
    store = _snapshot_store(workspace)
    info = store.resolve(key_or_stage)
    return info, store.manifest(info.key)


def verify_snapshot(
    key_or_stage: str, *, workspace: Workspace | None = None
) -> tuple[SnapshotInfo, list[str]]:
    """The snapshot and every problem its archives have against their manifests (none: ok)."""
    store = _snapshot_store(workspace)
    info = store.resolve(key_or_stage)
    return info, store.verify(info.key)


def _snapshot_store(workspace: Workspace | None) -> SnapshotStore:
    return SnapshotStore(checked_workspace(workspace).snapshots_dir)


# --------------------------------------------------------------------------- sources


def fetch_sources(
    stage_files: Sequence[Path],
    source_set: str | None = None,
    *,
    allow_unverified: bool = False,
    workspace: Workspace | None = None,
) -> sources.FetchResult:
    """Download every source the stage files (and the stages they require) declare into the
    verified cache of `source_set` (default: the configuration's)."""
    the_set = _source_set(source_set, stage_files)
    return sources.fetch(
        _declared_sources(stage_files),
        workspace or Workspace.from_env(),
        the_set,
        allow_unverified=allow_unverified,
    )


def add_sources(
    local_files: Sequence[Path],
    stage_files: Sequence[Path],
    source_set: str | None = None,
    *,
    workspace: Workspace | None = None,
) -> sources.AddResult:
    """Put local files into the verified cache where they match a checksum the stage files
    declare; the result lists each refusal with its reason."""
    the_set = _source_set(source_set, stage_files)
    return sources.add(
        local_files, _declared_sources(stage_files), workspace or Workspace.from_env(), the_set
    )


def source_status(
    stage_files: Sequence[Path],
    source_set: str | None = None,
    *,
    workspace: Workspace | None = None,
) -> tuple[list[sources.SourceStatus], Path]:
    """Each declared source's state in the cache (ok, missing, bad, unverified), and the
    cache directory of the set."""
    the_set = _source_set(source_set, stage_files)
    cache_dir = sources.cache_dir_for(workspace or Workspace.from_env(), the_set)
    return sources.status(_declared_sources(stage_files), cache_dir, the_set), cache_dir


def _declared_sources(stage_files: Sequence[Path]) -> dict[str, list[Source]]:
    """`stage/package` -> sources, for the given stages and every stage they require."""
    plan = load_plan(stage_files)
    return {
        f"{stage_plan.name}/{package.name}": list(package.sources)
        for stage_plan in plan.stages
        for package in stage_plan.file.stage.packages
        if package.sources
    }


def _source_set(name: str | None, stage_files: Sequence[Path]) -> SourceSet:
    """The named set (default: the configuration's), read from set files beside the stage
    files first (stages/sourcesets), then from the built-in ones."""
    dirs = [path.resolve().parent / "sourcesets" for path in stage_files]
    search = list(dict.fromkeys([*dirs, *default_set_dirs()]))
    return load_source_set(name or load_config().settings.source_set, search)


# --------------------------------------------------------------------------- images


def bootstrap_base_image(
    suite: str = images.DEFAULT_SUITE,
    mirror: str | None = None,
    *,
    progress: images.Progress | None = None,
    workspace: Workspace | None = None,
) -> str:
    """Make the base image from scratch with debootstrap; return its id."""
    return images.bootstrap_base(
        engine.connect(),
        workspace or Workspace.from_env(),
        suite=suite,
        mirror=mirror,
        progress=progress or (lambda _: None),
    )


def build_host_image(
    tag: str = images.HOST_IMAGE,
    *,
    rebuild: bool = False,
    progress: images.Progress | None = None,
    workspace: Workspace | None = None,
) -> str:
    """Build the LFS build host (making the base first when it is missing); return its id."""
    return images.build_host(
        engine.connect(),
        workspace or Workspace.from_env(),
        tag=tag,
        rebuild=rebuild,
        progress=progress or (lambda _: None),
    )


def list_images() -> list[images.ImageInfo]:
    """lfsorch's images in the engine."""
    return images.list_images(engine.connect())


__all__ = ["PartitionBusy"]
