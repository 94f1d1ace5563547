"""Running a plan: packages whose dependencies are done build side by side, state is recorded
after every change, a failure stops its dependents, an interrupt stops every container.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import secrets
import threading
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import docker
import networkx as nx

from orchestrator import engine, events
from orchestrator.config import Settings
from orchestrator.errors import LfsorchError
from orchestrator.events import EventBus
from orchestrator.graph import Plan, StagePlan, package_graph
from orchestrator.metrics import host_summary, tree_usage
from orchestrator.models import Package, Stage
from orchestrator.runner import BuildJob, BuildResult, ContainerRunner, expand_environment
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
        self._lock = threading.Lock()
        self.state = self._initial_state()

    # -- state -------------------------------------------------------------------------------

    def _initial_state(self) -> RunState:
        previous = load_state(self.workspace.state_file)
        lfs = str(self.options.lfs_dir.resolve())
        files = [str(p.file.path) for p in self.plan.stages]
        carried: dict[tuple[str, str], PackageState] = {}
        if previous is not None and previous.lfs == lfs:
            carried = {p.key: p for p in previous.packages}
        state = RunState(run_id=self.run_id, lfs=lfs, files=files)
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
        save_state(self.state, self.workspace.run_dir(self.run_id) / "state.json")

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
                self.bus.emit(events.RUN_COMPLETE, run_id=self.run_id, outcome=self.state.outcome)
        return self.state

    def _run_stages(self) -> None:
        broken: set[str] = set()
        for stage_plan in self.plan.stages:
            stage = stage_plan.file.stage
            blocked_by = sorted(set(stage.requires) & broken)
            if blocked_by:
                broken.add(stage.stage)
                self._skip_stage(stage_plan, f"required stage {', '.join(blocked_by)} failed")
                continue
            self.bus.emit(events.STAGE_START, run_id=self.run_id, stage=stage.stage)
            started = time.monotonic()
            ok = self._run_stage(stage_plan)
            if not ok:
                broken.add(stage.stage)
            self.bus.emit(
                events.STAGE_COMPLETE,
                run_id=self.run_id,
                stage=stage.stage,
                ok=ok,
                duration_s=round(time.monotonic() - started, 3),
            )

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

    def _job(self, stage_plan: StagePlan, package: Package, attempt: int) -> BuildJob:
        stage = stage_plan.file.stage
        settings = self.settings
        base = dict(settings.environment)
        base["MAKEFLAGS"] = settings.makeflags
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
        )

    def _build_package(self, stage_plan: StagePlan, package: Package) -> bool:
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
