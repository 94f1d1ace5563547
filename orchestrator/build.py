"""Running a plan: packages whose dependencies are done build side by side, state is recorded
after every change, a failure stops its dependents, an interrupt stops every container.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import docker
import networkx as nx

from orchestrator import engine, events
from orchestrator.checkpoints import Checkpointer, policy_of
from orchestrator.config import Settings
from orchestrator.errors import LfsorchError
from orchestrator.events import EventBus
from orchestrator.graph import Plan, StagePlan, package_graph
from orchestrator.metrics import host_summary, tree_usage
from orchestrator.models import Package, Stage
from orchestrator.runner import BuildJob, BuildResult, ContainerRunner, expand_environment
from orchestrator.snapshots import SnapshotStore, refuse_nested_mounts
from orchestrator.state import Attempt, PackageState, RunState, load_state, now_iso, save_state
from orchestrator.workspace import Workspace


class BuildInterrupted(LfsorchError):
    exit_code = 130


class WorkspaceBusy(LfsorchError):
    exit_code = 3


@dataclass(frozen=True)
class RunOptions:
    lfs_dir: Path
    parallel: int = 1
    rebuild: bool = False  # build stages even when a checkpoint of their inputs exists
    from_stage: str | None = None  # restore the checkpoint before this stage, build from it


def new_run_id() -> str:
    return f"{datetime.now().strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def definition_digest(stage: Stage, package: Package, settings: Settings) -> str:
    """What a package's result depends on; a change to it means it must be built again."""
    relevant = {
        "package": package.model_dump(mode="json"),
        "image": stage.image or settings.image,
        "user": stage.user,
        "workdir": stage.workdir,
        "environment": [settings.environment, stage.environment],
        "makeflags": settings.makeflags,
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


@contextlib.contextmanager
def workspace_lock(workspace: Workspace) -> Iterator[None]:
    """One run per workspace at a time: the state file and the partition are not shareable."""
    workspace.ensure()
    lock_path = workspace.root / "run.lock"
    with lock_path.open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise WorkspaceBusy(
                f"another lfsorch run holds the workspace {workspace.root} (pid {holder})",
                hint="wait for it to finish, or use another LFSORCH_HOME",
            ) from None
        handle.truncate(0)
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _container_safe(name: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_.-]", "_", name)


class Build:
    """One invocation of `lfsorch run`."""

    def __init__(
        self,
        plan: Plan,
        settings: Settings,
        workspace: Workspace,
        client: docker.DockerClient,
        bus: EventBus,
        options: RunOptions,
        sources_dir: Path | None = None,
    ) -> None:
        self.plan = plan
        self.settings = settings
        self.workspace = workspace
        self.client = client
        self.bus = bus
        self.options = options
        self.sources_dir = sources_dir
        self.run_id = new_run_id()
        self.runner = ContainerRunner(client, bus)
        self.checkpoints = Checkpointer(
            SnapshotStore(workspace.snapshots_dir), client, settings, bus, self.run_id
        )
        self._lock = threading.Lock()
        self.state = self._initial_state()
        self._check_from_stage()

    # -- state -------------------------------------------------------------------------------

    def _initial_state(self) -> RunState:
        previous = load_state(self.workspace.state_file)
        lfs = str(self.options.lfs_dir.resolve())
        files = [str(p.file.path) for p in self.plan.stages]
        carried: dict[tuple[str, str], PackageState] = {}
        state = RunState(run_id=self.run_id, lfs=lfs, files=files)
        if previous is not None and previous.lfs == lfs:
            carried = {p.key: p for p in previous.packages}
            state.base_stage, state.base_key = previous.base_stage, previous.base_key
            state.checkpoints = dict(previous.checkpoints)
            state.partition_at = previous.partition_at
        for stage_plan in self.plan.stages:
            stage = stage_plan.file.stage
            for package in stage.packages:
                digest = definition_digest(stage, package, self.settings)
                old = carried.get((stage.stage, package.name))
                if old is not None and old.definition == digest:
                    # Unchanged: keep its history; only what is not done is built again.
                    if old.status != "done":
                        old.status = "pending"
                    state.packages.append(old)
                else:
                    state.packages.append(
                        PackageState(stage=stage.stage, name=package.name, definition=digest)
                    )
        return state

    def _save(self) -> None:
        save_state(self.state, self.workspace.state_file)

    @contextlib.contextmanager
    def _recording(self) -> Iterator[None]:
        """Change the state under the lock; the change is on disk when the block ends."""
        with self._lock:
            yield
            self._save()

    # -- running -----------------------------------------------------------------------------

    def _check_images(self) -> None:
        images = sorted({s.file.stage.image or self.settings.image for s in self.plan.stages})
        missing = []
        for image in images:
            try:
                self.runner.check_image(image)
            except LfsorchError:
                missing.append(image)
        if missing:
            raise LfsorchError(
                f"image(s) not in the Docker engine: {', '.join(missing)}",
                hint="build the host image with `lfsorch images build`",
            )

    def _check_partition(self) -> None:
        lfs = self.options.lfs_dir
        if not lfs.is_dir():
            raise LfsorchError(
                f"the LFS partition {lfs} is not a directory",
                hint="mount the partition (or create the directory) and pass it with --lfs",
            )
        if any(policy_of(s.file.stage, self.settings) != "none" for s in self.plan.stages):
            # Found now rather than at the first checkpoint, after a package was built.
            refuse_nested_mounts(lfs.resolve(), "checkpoint")

    def run(self) -> RunState:
        self._check_partition()
        with workspace_lock(self.workspace):
            removed = engine.reap_leftovers(self.client)
            if removed:
                self.bus.emit(events.CLEANUP, run_id=self.run_id, removed=removed)
            self._check_images()
            self.workspace.ensure(self.workspace.run_dir(self.run_id))
            self._save()
            self.bus.emit(
                events.RUN_START,
                run_id=self.run_id,
                lfs=self.state.lfs,
                stages=[s.name for s in self.plan.stages],
                packages=len(self.state.packages),
                already_done=sum(p.status == "done" for p in self.state.packages),
                host=host_summary(),
            )
            try:
                self._run_stages()
            except KeyboardInterrupt:
                self.runner.interrupt()
                self.state.outcome = "interrupted"
                raise BuildInterrupted(
                    "interrupted: running containers were stopped and removed",
                    hint="run the same command again to continue where it stopped",
                ) from None
            except BaseException:
                self.runner.interrupt()
                self.state.outcome = "failed"
                raise
            finally:
                if self.state.outcome == "running":
                    failed = any(p.status in ("failed", "skipped") for p in self.state.packages)
                    self.state.outcome = "failed" if failed else "succeeded"
                for package in self.state.packages:
                    if package.status == "running":
                        package.status = "pending"
                self.state.finished = now_iso()
                self._save()
                save_state(self.state, self.workspace.run_dir(self.run_id) / "state.json")
                self.runner.close()
                self.bus.emit(events.RUN_COMPLETE, run_id=self.run_id, outcome=self.state.outcome)
        return self.state

    def _check_from_stage(self) -> None:
        names = [stage_plan.name for stage_plan in self.plan.stages]
        if self.options.from_stage is not None and self.options.from_stage not in names:
            raise LfsorchError(
                f"--from {self.options.from_stage}: no such stage in this plan",
                hint=f"stages: {', '.join(names)}",
            )

    def _base_key(self) -> str:
        """The checkpoint of the partition before the plan's first stage."""
        first = self.plan.stages[0].name
        if self.state.base_stage == first and self.state.base_key is not None:
            key = self.state.base_key
        else:
            lfs = self.options.lfs_dir.resolve()
            key, taken_here = self.checkpoints.initial(lfs)
            with self._recording():
                self.state.base_stage, self.state.base_key = first, key
                self.state.partition_at = key if taken_here else None
        self.checkpoints.chain = {"first_stage": first, "base": key}
        return key

    def _stage_records(self, stage: Stage) -> list[PackageState]:
        records = [self.state.find(stage.stage, p.name) for p in stage.packages]
        return [r for r in records if r is not None]

    def _reset(self, records: list[PackageState]) -> None:
        with self._recording():
            for record in records:
                record.status = "pending"

    def _settle_partition(
        self, stage: str, target: str, force: bool, records: list[PackageState]
    ) -> None:
        """Before building, make the partition equal the checkpoint `target`.

        Nothing is ever built on top of half-installed files: when the partition may have
        changed since that checkpoint (a failed or killed build), it is restored and the
        packages built after it are built again; when the record says the partition is still
        at that checkpoint, a drift check confirms it.
        """
        lfs = self.options.lfs_dir.resolve()
        if not force and self.state.partition_at == target:
            self.checkpoints.check_drift(target, lfs)
            return
        if not self.checkpoints.store.has(target):
            if force:
                raise LfsorchError(
                    f"--from {stage}: no checkpoint of the partition before it",
                    hint="build the stages before it once (with checkpoints enabled)",
                )
            return  # the stage before kept no checkpoint: continue in place, as the book does
        reason = "--from" if force else "resume: back to the last checkpoint"
        self.checkpoints.restore(target, lfs, stage=stage, reason=reason)
        self._reset(records)
        with self._recording():
            self.state.partition_at = target

    def _chain_keys(self, base: str) -> list[str]:
        """Checkpoint keys along the plan: the base, then one per stage."""
        keys = [base]
        for stage_plan in self.plan.stages:
            keys.append(self.checkpoints.stage_key(stage_plan, keys[-1]))
        return keys

    def _run_stages(self) -> None:
        broken: set[str] = set()
        checkpointing = any(
            policy_of(s.file.stage, self.settings) != "none" for s in self.plan.stages
        )
        keys = self._chain_keys(self._base_key()) if checkpointing else []
        # How far along the chain the partition is; None when a build may have changed it.
        at = keys.index(self.state.partition_at) if self.state.partition_at in keys else None
        starting = self.options.from_stage is None
        for number, stage_plan in enumerate(self.plan.stages, start=1):
            stage = stage_plan.file.stage
            policy = policy_of(stage, self.settings)
            parent, key = (keys[number - 1], keys[number]) if keys else (None, None)
            forced = stage.stage == self.options.from_stage
            starting = starting or forced
            if not starting:
                continue
            blocked_by = sorted(set(stage.requires) & broken)
            if blocked_by:
                broken.add(stage.stage)
                self._skip_stage(stage_plan, f"required stage {', '.join(blocked_by)} failed")
                continue
            if key is not None and parent is not None and policy != "none":
                # Built and checkpointed before, and the partition holds it (or a later
                # stage; None: a later stage will restore what it needs).
                done = all(r.status == "done" for r in self._stage_records(stage))
                present = at is None or at >= number
                if (
                    not forced
                    and done
                    and present
                    and self.state.checkpoints.get(stage.stage) == key
                ):
                    continue
                rebuild = self.options.rebuild or self.options.from_stage is not None
                if not rebuild and self._cache_hit(stage, key):
                    at = number
                    continue
                if not rebuild and self._covered_by_later(stage, keys[number + 1 :]):
                    continue
            self.bus.emit(events.STAGE_START, run_id=self.run_id, stage=stage.stage)
            started = time.monotonic()
            # The stage's own checkpoint is the same tree as its last package's: a delta
            # over that one is empty, where a delta over the stage before repeats the stage.
            delta_base = parent
            if policy == "package" and parent is not None:
                ok, delta_base = self._run_stage_in_order(stage_plan, parent, forced)
            else:
                if parent is not None and policy == "stage":
                    records = self._stage_records(stage)
                    self._settle_partition(stage.stage, parent, forced, records)
                ok = self._run_stage(stage_plan)
            at = None
            if not ok:
                broken.add(stage.stage)
            elif key is not None and policy != "none":
                self._checkpoint(stage.stage, key, parent, delta_base=delta_base)
                at = number
            self.bus.emit(
                events.STAGE_COMPLETE,
                run_id=self.run_id,
                stage=stage.stage,
                ok=ok,
                duration_s=round(time.monotonic() - started, 3),
            )

    def _cache_hit(self, stage: Stage, key: str) -> bool:
        if not self.checkpoints.store.has(key):
            return False
        lfs = self.options.lfs_dir.resolve()
        self.checkpoints.restore(key, lfs, stage=stage.stage, reason="cache hit")
        with self._recording():
            for record in self._stage_records(stage):
                record.status = "done"
            self.state.checkpoints[stage.stage] = key
            self.state.partition_at = key
        self.bus.emit(events.STAGE_CACHED, run_id=self.run_id, stage=stage.stage, key=key)
        return True

    def _covered_by_later(self, stage: Stage, later_keys: list[str]) -> bool:
        """True when a later stage's checkpoint exists: keys chain, so it holds this stage.

        This is the case in a workspace that imported a later stage's snapshot image
        (`lfsorch snapshots pull`): it has that checkpoint and none of those before it, and
        nothing before it needs building again. The later stage restores the partition as
        its cache hit.
        """
        later = next((k for k in later_keys if self.checkpoints.store.has(k)), None)
        if later is None:
            return False
        with self._recording():
            for record in self._stage_records(stage):
                record.status = "done"
        self.bus.emit(
            events.STAGE_CACHED, run_id=self.run_id, stage=stage.stage, key=later, covered=True
        )
        return True

    def _checkpoint(
        self,
        name: str,
        key: str,
        parent: str | None,
        package: str = "",
        delta_base: str | None = None,
    ) -> None:
        lfs = self.options.lfs_dir.resolve()
        stage = name.split("/")[0]
        fresh = self.checkpoints.take(
            lfs, key, stage=stage, parent=parent, package=package or None, delta_base=delta_base
        )
        with self._recording():
            self.state.checkpoints[name] = key
            self.state.partition_at = key if fresh else None

    def _skip_stage(self, stage_plan: StagePlan, reason: str) -> None:
        for package in stage_plan.file.stage.packages:
            record = self.state.find(stage_plan.name, package.name)
            assert record is not None
            if record.status != "done":
                self._skip(record, reason)

    def _skip(self, record: PackageState, reason: str) -> None:
        with self._recording():
            record.status = "skipped"
        self.bus.emit(
            events.BUILD_SKIPPED,
            run_id=self.run_id,
            stage=record.stage,
            package=record.name,
            reason=reason,
        )

    def _run_stage(self, stage_plan: StagePlan) -> bool:
        """Packages whose dependencies are done build side by side, up to `parallel`."""
        stage = stage_plan.file.stage
        graph, _ = package_graph(stage_plan.file)
        order = {package.name: index for index, package in enumerate(stage.packages)}
        records = {name: self.state.find(stage.stage, name) for name in order}
        done = {name for name, r in records.items() if r is not None and r.status == "done"}
        pending = set(order) - done
        failed: set[str] = set()
        parallel = max(1, self.options.parallel)
        with ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="build") as pool:
            running: dict[Future[bool], str] = {}
            try:
                while pending or running:
                    for name in sorted(pending, key=order.__getitem__):
                        blockers = set(nx.ancestors(graph, name)) & failed
                        if blockers:
                            pending.discard(name)
                            failed.add(name)
                            record = records[name]
                            assert record is not None
                            self._skip(record, f"dependency {', '.join(sorted(blockers))} failed")
                    ready = [
                        n
                        for n in sorted(pending, key=order.__getitem__)
                        if set(graph.predecessors(n)) <= done
                    ]
                    for name in ready[: parallel - len(running)]:
                        pending.discard(name)
                        future = pool.submit(self._build_package, stage_plan, stage.package(name))
                        running[future] = name
                    if not running:
                        break
                    finished, _ = wait(running, return_when=FIRST_COMPLETED)
                    for future in finished:
                        name = running.pop(future)
                        (done if future.result() else failed).add(name)
            except BaseException:
                self.runner.interrupt()
                for future in running:
                    with contextlib.suppress(Exception):
                        future.result()
                raise
        return not failed and not pending

    def _run_stage_in_order(
        self, stage_plan: StagePlan, parent: str, forced: bool
    ) -> tuple[bool, str]:
        """`checkpoint: package`: one package at a time, a checkpoint after each, so a resume
        restores the checkpoint after the last good package instead of the stage's start.

        Returns whether every package was built, and the key of the last checkpoint taken.
        """
        stage = stage_plan.file.stage
        graph, _ = package_graph(stage_plan.file)
        index = {package.name: i for i, package in enumerate(stage.packages)}
        order = list(nx.lexicographical_topological_sort(graph, key=index.__getitem__))
        keys: list[str] = []
        for name in order:
            keys.append(
                self.checkpoints.package_key(stage, stage.package(name), (keys or [parent])[-1])
            )
        records = [r for r in (self.state.find(stage.stage, n) for n in order) if r is not None]
        resume_at = 0
        for position, (record, key) in enumerate(zip(records, keys, strict=True)):
            checkpointed = self.state.checkpoints.get(f"{stage.stage}/{record.name}") == key
            if forced or record.status != "done" or not checkpointed:
                break
            if not self.checkpoints.store.has(key):
                break
            resume_at = position + 1
        start_key = keys[resume_at - 1] if resume_at else parent
        self._settle_partition(stage.stage, start_key, forced, records[resume_at:])
        for position in range(resume_at, len(order)):
            name = order[position]
            previous = keys[position - 1] if position else parent
            retry_on_checkpoint = functools.partial(self._restore_for_retry, stage, name, previous)
            if not self._build_package(stage_plan, stage.package(name), retry_on_checkpoint):
                for later in records[position + 1 :]:
                    self._skip(later, f"{name} failed (checkpoint: package builds in order)")
                return False, previous
            self._checkpoint(f"{stage.stage}/{name}", keys[position], previous, package=name)
        return True, keys[-1] if keys else parent

    def _restore_for_retry(self, stage: Stage, package: str, key: str) -> None:
        """A retry starts from the checkpoint before the package, not from what the failed
        attempt left half installed (when that checkpoint exists)."""
        if not self.checkpoints.store.has(key):
            return
        lfs = self.options.lfs_dir.resolve()
        reason = f"retry {package}: back to the checkpoint before it"
        self.checkpoints.restore(key, lfs, stage=stage.stage, reason=reason)
        with self._recording():
            self.state.partition_at = key

    def _job(self, stage_plan: StagePlan, package: Package, attempt: int) -> BuildJob:
        stage = stage_plan.file.stage
        settings = self.settings
        base = dict(settings.environment)
        base["MAKEFLAGS"] = settings.makeflags
        base["LFSORCH_ATTEMPT"] = str(attempt)  # scripts may build differently on a retry
        if settings.run_tests:
            base["LFSORCH_RUN_TESTS"] = "1"
        environment = expand_environment([base, stage.environment, package.environment])
        log_path = (
            self.workspace.run_dir(self.run_id) / "logs" / stage.stage / f"{package.name}.log"
        )
        return BuildJob(
            run_id=self.run_id,
            stage=_container_safe(stage.stage),
            package=_container_safe(package.name),
            attempt=attempt,
            image=stage.image or settings.image,
            script=package.script,
            environment=environment,
            lfs_dir=self.options.lfs_dir.resolve(),
            log_path=log_path,
            timeout_s=stage.timeout_for(package, settings.timeout),
            user=stage.user,
            workdir=stage.workdir,
            stage_dir=stage_plan.file.path.parent.resolve(),
            sources_dir=self.sources_dir if package.sources else None,
            source_files=[source.file for source in package.sources],
            resources=stage.resources,
            network=stage.network_for(package) or settings.network,
            capabilities=stage.capabilities,
            build_space=settings.build_space,
        )

    def _build_package(
        self,
        stage_plan: StagePlan,
        package: Package,
        before_retry: Callable[[], None] | None = None,
    ) -> bool:
        """Build one package, with the stage's retries; `before_retry` runs before each."""
        stage = stage_plan.file.stage
        record = self.state.find(stage.stage, package.name)
        assert record is not None
        tries = stage.retries_for(package) + 1
        common = {"run_id": self.run_id, "stage": stage.stage, "package": package.name}
        for try_index in range(tries):
            number = len(record.attempts) + 1
            job = self._job(stage_plan, package, number)
            job.log_path.parent.mkdir(parents=True, exist_ok=True)
            with job.log_path.open("a") as log:
                log.write(f"=== lfsorch: {stage.stage}/{package.name} attempt {number} ===\n")
            attempt = Attempt(number=number, started=now_iso())
            with self._recording():
                record.status = "running"
                record.attempts.append(attempt)
                record.log = str(job.log_path)
                self.state.partition_at = None
            self.bus.emit(events.BUILD_START, attempt=number, log=str(job.log_path), **common)
            usage_before = tree_usage(job.lfs_dir)
            result = self.runner.run(job)
            with self._recording():
                _record_result(record, attempt, result)
                record.disk_added_bytes = tree_usage(job.lfs_dir) - usage_before
            figures = _figures(record)
            if result.succeeded:
                self.bus.emit(events.BUILD_COMPLETE, attempt=number, **figures, **common)
                return True
            self.bus.emit(
                events.BUILD_ERROR,
                attempt=number,
                will_retry=try_index < tries - 1 and not result.interrupted,
                reason=result.describe(),
                log=str(job.log_path),
                **figures,
                **common,
            )
            if result.interrupted:
                raise KeyboardInterrupt
            if try_index < tries - 1:
                self.bus.emit(events.BUILD_RETRY, attempt=number + 1, **common)
                if before_retry is not None:
                    before_retry()
        return False


def _record_result(record: PackageState, attempt: Attempt, result: BuildResult) -> None:
    attempt.duration_s = round(result.duration_s, 3)
    attempt.exit_code = result.exit_code
    attempt.oom_killed = result.oom_killed
    attempt.timed_out = result.timed_out
    attempt.interrupted = result.interrupted
    attempt.error = None if result.succeeded else result.describe()
    record.exit_code = result.exit_code
    record.oom_killed = result.oom_killed
    record.timed_out = result.timed_out
    record.duration_s = attempt.duration_s
    record.cpu_seconds = result.figures.cpu_seconds
    record.memory_peak_bytes = result.figures.memory_peak_bytes
    record.read_bytes = result.figures.read_bytes
    record.write_bytes = result.figures.write_bytes
    record.io_source = result.figures.io_source
    record.finished = now_iso()
    if result.interrupted:
        record.status = "pending"
    else:
        record.status = "done" if result.succeeded else "failed"


def _figures(record: PackageState) -> dict[str, object]:
    return {
        "duration_s": record.duration_s,
        "exit_code": record.exit_code,
        "oom_killed": record.oom_killed,
        "timed_out": record.timed_out,
        "cpu_seconds": record.cpu_seconds,
        "memory_peak_bytes": record.memory_peak_bytes,
        "read_bytes": record.read_bytes,
        "write_bytes": record.write_bytes,
        "io_source": record.io_source,
        "disk_added_bytes": record.disk_added_bytes,
    }
