"""Running a plan: packages whose dependencies are done build side by side, state is recorded
after every change, a failure stops its dependents, an interrupt stops every container.
"""

from __future__ import annotations

import contextlib
import functools
import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import docker
import networkx as nx

from orchestrator.build import records
from orchestrator.build.attempts import PackageAttempts
from orchestrator.build.checkpointing import Checkpointer, policy_of
from orchestrator.build.diskspace import SpaceGuard
from orchestrator.build.inputs import InputsOf
from orchestrator.build.recorder import RunRecorder
from orchestrator.build.state import PackageState, RunState, now_iso
from orchestrator.checkpoints import leftovers
from orchestrator.checkpoints.store import SnapshotStore
from orchestrator.config import Settings
from orchestrator.errors import ExitCode, LfsorchError
from orchestrator.execution import engine
from orchestrator.execution.environment import BuildEnvironment
from orchestrator.monitor import events
from orchestrator.monitor.events import EventBus
from orchestrator.monitor.metrics import host_summary
from orchestrator.monitor.sampler import HostSampler, Thresholds
from orchestrator.partition import Partition
from orchestrator.sources.cache import digest_in_view
from orchestrator.spec.graph import Plan, StagePlan, package_graph
from orchestrator.spec.models import CheckpointPolicy, Stage
from orchestrator.spec.stagefile import copy_stage_assets
from orchestrator.workspace import Workspace, workspace_lock


class BuildInterrupted(LfsorchError):
    exit_code = ExitCode.INTERRUPTED


class UsageError(LfsorchError):
    exit_code = ExitCode.USER_ERROR


@dataclass(frozen=True)
class RunOptions:
    lfs_dir: Path
    parallel: int = 1
    rebuild: bool = False  # build every stage even when a checkpoint of its inputs exists
    rebuild_stages: tuple[str, ...] = ()  # build these even when done or checkpointed
    from_stage: str | None = None  # restore the checkpoint before this stage, build from it
    # `STAGE` or `STAGE/PACKAGE`: stop once the checkpoint after it is taken (a CI job's slice)
    stop_after: str | None = None


def new_run_id() -> str:
    return f"{datetime.now().strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


@dataclass(frozen=True)
class Group:
    """Packages built between two checkpoints: one package (`checkpoint: package` at -j 1),
    a level of packages that build side by side (at -j N), or a whole stage."""

    names: list[str]
    start: str | None  # the checkpoint before the group
    key: str | None  # the checkpoint after it; None when none is taken


class Build:
    """One invocation of `lfsorch run`: the stages in order, each as groups of packages
    between checkpoints, packages side by side within a group; the attempts themselves are
    `PackageAttempts`', the record `RunRecorder`'s."""

    def __init__(
        self,
        plan: Plan,
        settings: Settings,
        workspace: Workspace,
        client: docker.DockerClient,
        bus: EventBus,
        options: RunOptions,
        sources_dir: Path | None = None,
        *,
        environment: BuildEnvironment,
    ) -> None:
        self.plan = plan
        self.settings = settings
        self.workspace = workspace
        self.client = client
        self.bus = bus
        self.options = options
        self.sources_dir = sources_dir
        self.run_id = new_run_id()
        self.environment = environment
        self.inputs_of = InputsOf(
            settings,
            environment.image_id,
            digest_in_view(sources_dir) if sources_dir else None,
        )
        self.checkpoints = Checkpointer(
            SnapshotStore(workspace.snapshots_dir),
            client,
            settings,
            bus,
            self.run_id,
            inputs_of=self.inputs_of,
        )
        # The key of the stage this run built last, when nothing changed the partition since.
        self._built_at: str | None = None
        self.partition = Partition.checked(options.lfs_dir, workspace)
        self.recorder = RunRecorder(self.run_id, plan, self.partition, workspace, self.inputs_of)
        self.attempts: PackageAttempts  # made once the stages' assets are copied
        self.space: SpaceGuard  # made with the attempts
        self._check_from_stage()

    @property
    def state(self) -> RunState:
        return self.recorder.state

    # -- running -----------------------------------------------------------------------------

    def _check_partition(self) -> None:
        lfs = self.options.lfs_dir
        if not lfs.is_dir():
            raise LfsorchError(
                f"the LFS partition {lfs} is not a directory",
                hint="mount the partition (or create the directory) and pass it with --lfs",
            )
        if any(policy_of(s.file.stage, self.settings) != "none" for s in self.plan.stages):
            # Found now rather than at the first checkpoint, after a package was built.
            self.partition.refuse_nested_mounts("checkpoint")

    def run(self) -> RunState:
        self._check_partition()
        with workspace_lock(self.workspace), self.partition.lock():
            self._prepare()
            reserve = records.SpaceReserve(self.workspace)
            self._start_record(reserve)
            self.bus.emit(
                events.RunStart(
                    run_id=self.run_id,
                    lfs=self.state.lfs,
                    stages=[s.name for s in self.plan.stages],
                    packages=len(self.state.packages),
                    already_done=sum(p.status == "done" for p in self.state.packages),
                    host=host_summary(),
                )
            )
            sampler = self._host_sampler()
            sampler.start()
            try:
                self._run_stages()
            except KeyboardInterrupt:
                self._stop_builds()
                self.state.outcome = "interrupted"
                raise BuildInterrupted(
                    "interrupted: running containers were stopped and removed",
                    hint="run the same command again to continue where it stopped",
                ) from None
            except BaseException:
                self._stop_builds()
                self.state.outcome = "failed"
                raise
            finally:
                try:
                    self._finish(reserve)
                finally:
                    sampler.stop(self.state.outcome)
        return self.state

    def _host_sampler(self) -> HostSampler:
        return HostSampler(
            self.bus,
            self.run_id,
            {"partition": self.options.lfs_dir, "workspace": self.workspace.root},
            self.settings.monitor_interval,
            Thresholds(self.settings.recovery.min_free_space, self.settings.min_free_memory),
            engine_ping=self.client.ping,
            on_space=self.space.observe,
        )

    def _stop_builds(self) -> None:
        """Every running attempt ends now, and none waits out a retry's backoff."""
        attempts = getattr(self, "attempts", None)
        if attempts is not None:
            attempts.stopping.set()
        self.environment.interrupt()

    def _prepare(self) -> None:
        """Clear what dead runs left, check the images, copy the stages' assets."""
        removed = engine.reap_leftovers(self.client)
        staging = leftovers.workspace_leftovers(self.workspace)
        staging += leftovers.partition_leftovers(self.partition.path)
        removed += leftovers.remove_leftovers(staging)
        if removed:
            self.bus.emit(events.Cleanup(run_id=self.run_id, removed=removed))
        if not self.recorder.knows_partition:
            self.partition.refuse_if_half_built()
        self.environment.check_images(
            [s.file.stage.image or self.settings.image for s in self.plan.stages]
        )
        self.workspace.ensure(self.workspace.run_dir(self.run_id))
        files = [stage_plan.file for stage_plan in self.plan.stages]
        asset_dirs = copy_stage_assets(files, self.workspace.run_dir(self.run_id) / "assets")
        self.space = self._space_guard()
        self.attempts = PackageAttempts(
            run_id=self.run_id,
            settings=self.settings,
            workspace=self.workspace,
            environment=self.environment,
            inputs_of=self.inputs_of,
            recorder=self.recorder,
            bus=self.bus,
            lfs_dir=self.options.lfs_dir.resolve(),
            sources_dir=self.sources_dir,
            asset_dirs=asset_dirs,
            space=self.space,
        )

    def _space_guard(self) -> SpaceGuard:
        recovery = self.settings.recovery
        keep = recovery.keep_snapshots
        return SpaceGuard(
            {"partition": self.partition.path, "workspace": self.workspace.root},
            recovery.min_free_space,
            recovery.space_wait,
            prune=(lambda: self.checkpoints.store.prune(keep_last=keep)) if keep else None,
        )

    def _start_record(self, reserve: records.SpaceReserve) -> None:
        try:
            self.recorder.save()
            self.partition.note_last_run(self.run_id, "running")
        except BaseException:
            self.state.outcome, self.state.finished = "failed", now_iso()
            reserve.release()
            self.recorder.save_final()
            raise

    def _finish(self, reserve: records.SpaceReserve) -> None:
        """The run's outcome in every copy of its record, its environment cleaned up."""
        if self.state.outcome == "running":
            failed = any(p.status in ("failed", "skipped") for p in self.state.packages)
            self.state.outcome = "failed" if failed else "succeeded"
        for package in self.state.packages:
            if package.status == "running":
                package.status = "pending"
        self.state.finished = now_iso()
        reserve.release()
        self.recorder.save_final()
        with contextlib.suppress(LfsorchError):  # an error may be on its way out
            self.partition.note_last_run(self.run_id, self.state.outcome)
        self.environment.close()
        self.bus.emit(events.RunComplete(run_id=self.run_id, outcome=self.state.outcome))

    def _check_from_stage(self) -> None:
        names = [stage_plan.name for stage_plan in self.plan.stages]
        named = [("--from", self.options.from_stage)] + [
            ("--rebuild-stage", stage) for stage in self.options.rebuild_stages
        ]
        for option, stage in named:
            if stage is not None and stage not in names:
                raise LfsorchError(
                    f"{option} {stage}: no such stage in this plan",
                    hint=f"stages: {', '.join(names)}",
                )
        stop_stage, stop_package = self._stop_point()
        if stop_stage is not None and stop_stage not in names:
            raise UsageError(
                f"--stop-after {stop_stage}: no such stage in this plan",
                hint=f"stages: {', '.join(names)}",
            )
        if stop_stage is not None and stop_package is not None:
            self._check_stop_package(stop_stage, stop_package)

    def _stop_point(self) -> tuple[str | None, str | None]:
        """(stage, package or None) of `--stop-after`."""
        if self.options.stop_after is None:
            return None, None
        stage, _, package = self.options.stop_after.partition("/")
        return stage, package or None

    def _check_stop_package(self, stage_name: str, package: str) -> None:
        stage_plan = next(s for s in self.plan.stages if s.name == stage_name)
        stage = stage_plan.file.stage
        if package not in [p.name for p in stage.packages]:
            raise UsageError(
                f"--stop-after {stage_name}/{package}: no package {package} in stage {stage_name}",
                hint=f"packages: {', '.join(p.name for p in stage.packages)}",
            )
        if policy_of(stage, self.settings) != "package" or self.options.parallel != 1:
            raise UsageError(
                f"--stop-after {stage_name}/{package}: no checkpoint follows each package of "
                f"{stage_name} in this run",
                hint="run with `-o checkpoint=package -j 1`, or stop after the whole stage",
            )

    def _base_key(self) -> str:
        """The checkpoint of the partition before the plan's first stage."""
        first = self.plan.stages[0].name
        if self.state.base_stage == first and self.state.base_key is not None:
            key = self.state.base_key
        else:
            lfs = self.options.lfs_dir.resolve()
            key, taken_here = self.checkpoints.initial(lfs)
            with self.recorder.recording():
                self.state.base_stage, self.state.base_key = first, key
                self.state.partition_at = key if taken_here else None
        self.checkpoints.chain = {"first_stage": first, "base": key}
        return key

    def _reset(self, records: list[PackageState]) -> None:
        with self.recorder.recording():
            for record in records:
                record.status = "pending"

    def _settle_partition(
        self,
        stage: str,
        target: str,
        force: bool,
        records: list[PackageState],
        rebuild: bool = False,
    ) -> None:
        """Before building, make the partition equal the checkpoint `target`.

        Nothing is ever built on top of half-installed files: when the partition may have
        changed since that checkpoint (a failed or killed build), it is restored and the
        packages built after it are built again; when the record says the partition is still
        at that checkpoint, a drift check confirms it.
        """
        lfs = self.options.lfs_dir.resolve()
        if not force and self._built_at == target:
            return  # built by this very run (its checkpoint existed before, so may differ)
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
        if rebuild and not force:
            reason = "--rebuild: back to the checkpoint before it"
        self.checkpoints.restore(target, lfs, stage=stage, reason=reason)
        self._reset(records)
        with self.recorder.recording():
            self.state.partition_at = target

    def _chain_keys(self, base: str) -> list[str]:
        """Checkpoint keys along the plan: the base, then one per stage."""
        keys = [base]
        for stage_plan in self.plan.stages:
            keys.append(self.checkpoints.stage_key(stage_plan, keys[-1]))
        return keys

    def _rebuilds(self, stage: str) -> bool:
        """Whether `--rebuild` (all stages, or this one by name) asks to build the stage even
        when a checkpoint of its inputs exists or the record says it is done."""
        return self.options.rebuild or stage in self.options.rebuild_stages

    def _run_stages(self) -> None:
        broken: set[str] = set()
        checkpointing = any(
            policy_of(s.file.stage, self.settings) != "none" for s in self.plan.stages
        )
        keys = self._chain_keys(self._base_key()) if checkpointing else []
        group_keys = self._group_keys(keys)
        # How far along the chain the partition is; None when a build may have changed it.
        at = keys.index(self.state.partition_at) if self.state.partition_at in keys else None
        starting = self.options.from_stage is None
        stop_stage, stop_package = self._stop_point()
        stopping = False
        for number, stage_plan in enumerate(self.plan.stages, start=1):
            if stopping:
                break
            stage = stage_plan.file.stage
            stopping = stage.stage == stop_stage
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
            rebuild = self._rebuilds(stage.stage)
            if key is not None and policy != "none" and not rebuild:
                # Built and checkpointed before, and the partition holds it (or a later
                # stage; None: a later stage will restore what it needs).
                done = all(r.status == "done" for r in self.recorder.stage_records(stage))
                present = at is None or at >= number
                if (
                    not forced
                    and done
                    and present
                    and self.state.checkpoints.get(stage.stage) == key
                ):
                    continue
                later = keys[number + 1 :] + [k for ks in group_keys[number:] for k in ks]
                cached = self.options.from_stage is None and (
                    self._cache_hit(stage, key) or self._covered_by_later(stage, later)
                )
                if cached:
                    at = number if self.state.partition_at == key else at
                    continue
            if rebuild:
                self._reset(self.recorder.stage_records(stage))
            stop = stop_package if stopping else None
            ok = self._build_stage(stage_plan, policy, parent, key, forced, rebuild, stop)
            # The partition holds what this stage built: later stages are not on it yet.
            at = number if ok else None
            if not ok:
                broken.add(stage.stage)

    def _group_keys(self, keys: list[str]) -> list[list[str]]:
        """Per stage, the keys of its group checkpoints (none where the stage is one group)."""
        if not keys:
            return [[] for _ in self.plan.stages]
        found = []
        for number, stage_plan in enumerate(self.plan.stages, start=1):
            policy = policy_of(stage_plan.file.stage, self.settings)
            groups = self._groups(stage_plan, policy, keys[number - 1])
            found.append([g.key for g in groups if g.key is not None])
        return found

    def _build_stage(
        self,
        stage_plan: StagePlan,
        policy: CheckpointPolicy,
        parent: str | None,
        key: str | None,
        forced: bool,
        rebuild: bool,
        stop_package: str | None = None,
    ) -> bool:
        stage = stage_plan.file.stage
        self.bus.emit(events.StageStart(run_id=self.run_id, stage=stage.stage))
        started = time.monotonic()
        ok, last_group_key = self._run_groups(
            stage_plan, policy, parent, forced, rebuild, stop_package
        )
        if stop_package is not None:  # stopped inside the stage: no stage checkpoint yet
            key = self._built_at = None
        if ok and key is not None and policy != "none":
            # After groups of its own, the stage's checkpoint is the same tree as its last
            # group's: a delta over that one is empty, where one over the stage before
            # repeats the stage.
            self._checkpoint(stage.stage, key, parent, delta_base=last_group_key or parent)
        self._built_at = key if ok else None
        self.bus.emit(
            events.StageComplete(
                run_id=self.run_id,
                stage=stage.stage,
                ok=ok,
                duration_s=round(time.monotonic() - started, 3),
            )
        )
        return ok

    def _cache_hit(self, stage: Stage, key: str) -> bool:
        if not self.checkpoints.store.has(key):
            return False
        lfs = self.options.lfs_dir.resolve()
        self.checkpoints.restore(key, lfs, stage=stage.stage, reason="cache hit")
        with self.recorder.recording():
            for record in self.recorder.stage_records(stage):
                record.status = "done"
            self.state.checkpoints[stage.stage] = key
            self.state.partition_at = key
        self.bus.emit(events.StageCached(run_id=self.run_id, stage=stage.stage, key=key))
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
        with self.recorder.recording():
            for record in self.recorder.stage_records(stage):
                record.status = "done"
        self.bus.emit(
            events.StageCached(run_id=self.run_id, stage=stage.stage, key=later, covered=True)
        )
        return True

    def _checkpoint(
        self,
        stage: str,
        key: str,
        parent: str | None,
        packages: Sequence[str] = (),
        delta_base: str | None = None,
    ) -> None:
        """Snapshot the partition after a stage or, with `packages`, after a group of them."""
        lfs = self.options.lfs_dir.resolve()
        what = "/".join([stage, ", ".join(packages)]) if packages else stage
        self.space.ensure(f"before the checkpoint of {what}")
        fresh = self.checkpoints.take(
            lfs,
            key,
            stage=stage,
            parent=parent,
            package=", ".join(packages) or None,
            delta_base=delta_base,
        )
        with self.recorder.recording():
            for name in [f"{stage}/{package}" for package in packages] or [stage]:
                self.state.checkpoints[name] = key
            # A one-package stage's checkpoint is its package's: the partition is still at it.
            at_key = fresh or self.state.partition_at == key
            self.state.partition_at = key if at_key else None

    def _skip_stage(self, stage_plan: StagePlan, reason: str) -> None:
        for package in stage_plan.file.stage.packages:
            record = self.state.find(stage_plan.name, package.name)
            assert record is not None
            if record.status != "done":
                self._skip(record, reason)

    def _skip(self, record: PackageState, reason: str) -> None:
        with self.recorder.recording():
            record.status = "skipped"
        self.bus.emit(
            events.BuildSkipped(
                run_id=self.run_id, stage=record.stage, package=record.name, reason=reason
            )
        )

    def _groups(
        self, stage_plan: StagePlan, policy: CheckpointPolicy, parent: str | None
    ) -> list[Group]:
        """The stage as groups, each followed by a checkpoint.

        `checkpoint: package` takes one after every package at -j 1 and after every level of
        packages that build side by side at -j N; other stages are one group, whose
        checkpoint is the stage's own (taken by the caller). Group keys chain from `parent`.
        """
        stage = stage_plan.file.stage
        index = {package.name: i for i, package in enumerate(stage.packages)}
        if policy != "package" or parent is None:
            return [Group(list(index), parent, None)]
        if self.options.parallel > 1:
            batches = [sorted(level, key=index.__getitem__) for level in stage_plan.levels]
        else:
            graph, _ = package_graph(stage_plan.file)
            order = nx.lexicographical_topological_sort(graph, key=index.__getitem__)
            batches = [[name] for name in order]
        groups: list[Group] = []
        start = parent
        for names in batches:
            packages = [stage.package(name) for name in names]
            key = self.checkpoints.key(stage_plan.file, packages, start)
            groups.append(Group(names, start, key))
            start = key
        return groups

    def _resume_point(self, stage: Stage, groups: list[Group], forced: bool) -> int:
        """How many groups are built and checkpointed, with their checkpoints at hand.

        A later group's checkpoint in the store (pulled from another runner's snapshot
        image, or left by another run of equal inputs) counts as built too, with every group
        before it: keys chain, so it holds them."""
        built = 0
        for group in groups:
            if forced or group.key is None or not self.checkpoints.store.has(group.key):
                break
            records = [self.state.find(stage.stage, name) for name in group.names]
            if not all(
                record is not None
                and record.status == "done"
                and self.state.checkpoints.get(f"{stage.stage}/{record.name}") == group.key
                for record in records
            ):
                break
            built += 1
        if forced:
            return built
        for position in range(len(groups), built, -1):
            key = groups[position - 1].key
            if key is not None and self.checkpoints.store.has(key):
                self._adopt(stage, groups[:position])
                return position
        return built

    def _adopt(self, stage: Stage, groups: list[Group]) -> None:
        with self.recorder.recording():
            for group in groups:
                for name in group.names:
                    record = self.state.find(stage.stage, name)
                    if record is not None:
                        record.status = "done"
                    self.state.checkpoints[f"{stage.stage}/{name}"] = str(group.key)

    def _run_groups(
        self,
        stage_plan: StagePlan,
        policy: CheckpointPolicy,
        parent: str | None,
        forced: bool,
        rebuild: bool,
        stop_package: str | None = None,
    ) -> tuple[bool, str | None]:
        """Build a stage group by group from the last group checkpoint the record knows,
        never on top of half-installed files; with `stop_package`, only up to the group
        that holds it.

        Returns whether every package was built, and the key of the last group checkpoint.
        """
        stage = stage_plan.file.stage
        groups = self._groups(stage_plan, policy, parent)
        if stop_package is not None:
            end = next(i for i, g in enumerate(groups) if stop_package in g.names)
            groups = groups[: end + 1]
        resume_at = self._resume_point(stage, groups, forced or rebuild)
        start = groups[resume_at].start if resume_at < len(groups) else groups[-1].key
        if start is not None and policy != "none":
            later = [name for group in groups[resume_at:] for name in group.names]
            records = [r for r in (self.state.find(stage.stage, n) for n in later) if r]
            self._settle_partition(stage.stage, start, forced, records, rebuild)
        last_key = start if policy == "package" else None
        for position in range(resume_at, len(groups)):
            group = groups[position]
            if not self._run_group(stage_plan, group, policy):
                self._skip_later_groups(stage, group, groups[position + 1 :])
                return False, last_key
            last_key = group.key or last_key
        return True, last_key

    def _run_group(self, stage_plan: StagePlan, group: Group, policy: CheckpointPolicy) -> bool:
        """Build one group and take its checkpoint.

        Alone in its group, a package's retry starts from the checkpoint before it. Beside
        others, a package to retry waits until the others end; then the level is built again
        from its checkpoint one package at a time. Only in a stage checkpointed as a whole (or
        after a stage that kept no checkpoint) does a retry happen in place.
        """
        stage = stage_plan.file.stage
        by_package = policy == "package" and group.start is not None
        retry_on_checkpoint = None
        if by_package and len(group.names) == 1:
            assert group.start is not None
            retry_on_checkpoint = functools.partial(
                self._restore_for_retry, stage, group.names[0], group.start
            )
        level_start = None
        if by_package and len(group.names) > 1 and self.checkpoints.store.has(group.start or ""):
            level_start = group.start
        built = self._run_packages(stage_plan, group.names, retry_on_checkpoint, level_start)
        delta_base = None
        if not built and level_start is not None and self._only_deferred(stage, group.names):
            delta_base = self._rebuild_level_alone(stage_plan, group, level_start)
            built = delta_base is not None
        self._drop_deferred(stage, group.names)
        if not built:
            # Packages of the level never started once one of them failed for good.
            for record in [self.recorder.find(stage.stage, name) for name in group.names]:
                if record.status == "pending":
                    self._skip(record, "a package of its level failed")
        if built and group.key is not None:
            self._checkpoint(
                stage.stage, group.key, group.start, packages=group.names, delta_base=delta_base
            )
        return built

    def _only_deferred(self, stage: Stage, names: list[str]) -> bool:
        """Whether every package of the level that did not build waits for its retry alone
        (none failed for good), and at least one does."""
        deferred = {name for name in names if (stage.stage, name) in self.attempts.deferred}
        records = [self.recorder.find(stage.stage, name) for name in names]
        ended = {record.name for record in records if record.status in ("failed", "skipped")}
        return bool(deferred) and ended <= deferred

    def _drop_deferred(self, stage: Stage, names: list[str]) -> None:
        for name in names:
            self.attempts.deferred.pop((stage.stage, name), None)

    def _rebuild_level_alone(
        self, stage_plan: StagePlan, group: Group, level_start: str
    ) -> str | None:
        """The level again from the checkpoint before it, each package its own group and
        checkpoint; the key of the last one, or None when a package failed."""
        stage = stage_plan.file.stage
        lfs = self.options.lfs_dir.resolve()
        reason = f"level {', '.join(group.names)}: rebuilt one package at a time"
        self.checkpoints.restore(level_start, lfs, stage=stage.stage, reason=reason)
        self._reset([self.recorder.find(stage.stage, name) for name in group.names])
        with self.recorder.recording():
            self.state.partition_at = level_start
        start = level_start
        for name in group.names:
            key = self.checkpoints.key(stage_plan.file, [stage.package(name)], start)
            retry = functools.partial(self._restore_for_retry, stage, name, start)
            if not self._run_packages(stage_plan, [name], retry):
                return None
            self._checkpoint(stage.stage, key, start, packages=[name])
            start = key
        return start

    def _skip_later_groups(self, stage: Stage, failed: Group, later: list[Group]) -> None:
        records = [self.state.find(stage.stage, name) for name in failed.names]
        culprits = ", ".join(r.name for r in records if r is not None and r.status != "done")
        for group in later:
            for name in group.names:
                record = self.state.find(stage.stage, name)
                if record is not None and record.status != "skipped":
                    self._skip(record, f"{culprits} failed (checkpoint: package builds in order)")

    def _run_packages(
        self,
        stage_plan: StagePlan,
        names: list[str],
        before_retry: Callable[[], None] | None = None,
        level_start: str | None = None,
    ) -> bool:
        """Build the packages `names` not yet done: those whose dependencies are done build
        side by side, up to `parallel`; dependencies outside `names` were built before.

        With `level_start`, a package to retry is deferred (`PackageAttempts.build`): no
        package starts after that, and those running are let finish."""
        stage = stage_plan.file.stage
        graph, _ = package_graph(stage_plan.file)
        order = {name: index for index, name in enumerate(names)}
        records = {name: self.state.find(stage.stage, name) for name in names}
        done = {name for name, r in records.items() if r is not None and r.status == "done"}
        done |= set(graph) - set(names)
        pending = set(names) - done
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
                    deferring = level_start is not None and any(
                        (stage.stage, n) in self.attempts.deferred for n in names
                    )
                    for name in [] if deferring else ready[: parallel - len(running)]:
                        pending.discard(name)
                        package = stage.package(name)
                        future = pool.submit(
                            self.attempts.build, stage_plan, package, before_retry, level_start
                        )
                        running[future] = name
                    if not running:
                        break
                    finished, _ = wait(running, return_when=FIRST_COMPLETED)
                    outcomes = {running.pop(future): future for future in finished}
                    error = _first_error(outcomes.values())
                    if error is not None:
                        raise error
                    for name, future in outcomes.items():
                        (done if future.result() else failed).add(name)
            except BaseException as caught:
                # Every other build stops now; what they raise in turn (interrupted) is a
                # consequence, unless `caught` was one itself and they hold the real cause.
                self._stop_builds()
                error = _first_error(running)
                consequence = isinstance(caught, KeyboardInterrupt)
                if consequence and error is not None and not isinstance(error, KeyboardInterrupt):
                    raise error from None
                raise
        return not failed and not pending

    def _restore_for_retry(self, stage: Stage, package: str, key: str) -> None:
        """A retry starts from the checkpoint before the package, not from what the failed
        attempt left half installed (when that checkpoint exists)."""
        if not self.checkpoints.store.has(key):
            return
        lfs = self.options.lfs_dir.resolve()
        reason = f"retry {package}: back to the checkpoint before it"
        self.checkpoints.restore(key, lfs, stage=stage.stage, reason=reason)
        with self.recorder.recording():
            self.state.partition_at = key


def _first_error(futures: Iterable[Future[bool]]) -> BaseException | None:
    """Wait for finished or interrupted builds; the first error that is not an interrupt
    wins over interrupts, which another build's failure may have caused."""
    errors: list[BaseException] = []
    for future in futures:
        try:
            future.result()
        except BaseException as error:
            errors.append(error)
    real = [error for error in errors if not isinstance(error, KeyboardInterrupt)]
    return next(iter(real or errors), None)
