"""CI runners: a plan split into jobs that fit a time limit (`ci plan`), the workflow file
that runs them, and one job (`ci job`): pull the lock's images and the previous job's
checkpoint, build a slice, push its checkpoint. Built on the library API (`orchestrator.api`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path

import docker

from orchestrator.api import (
    bring_image,
    checked_workspace,
    find_lock,
    pull_snapshot,
    run,
    snapshot_image,
)
from orchestrator.build import records
from orchestrator.build.checkpointing import tree_key
from orchestrator.build.state import RunState
from orchestrator.checkpoints.store import IMAGE_REPOSITORY, SnapshotStore
from orchestrator.ci import keys as ci_keys
from orchestrator.ci import slices as ci_slices
from orchestrator.ci import workflow as ci_workflow
from orchestrator.config import load_config
from orchestrator.errors import LfsorchError
from orchestrator.execution import engine, registry
from orchestrator.lockfile import Lock, read_lock
from orchestrator.monitor.console import ConsoleView
from orchestrator.partition import Partition
from orchestrator.spec.graph import load_plan
from orchestrator.workspace import Workspace

SNAPSHOT_REPOSITORY = "snapshot"  # under the registry given to `ci plan` and `ci job`


def _as_in_checkout(path: Path) -> str:
    """A path as a job in a checkout of this directory names it: relative when it is below
    the current directory (CI runners check the repository out elsewhere)."""
    resolved, here = path.resolve(), Path.cwd().resolve()
    return str(resolved.relative_to(here)) if resolved.is_relative_to(here) else str(path)


def _lock_for_ci(
    paths: Sequence[Path], lock: Path | None, why: str, hint: str
) -> tuple[Path, Lock]:
    """The lock CI work needs (the one given, else the one beside the first stage file)."""
    lock_path = find_lock(paths, lock, no_lock=False)
    if lock_path is None:
        raise ci_slices.CiPlanError(f"no lock beside {paths[0]}: {why}", hint=hint)
    return lock_path, read_lock(lock_path)


@dataclasses.dataclass(frozen=True)
class CiPlan:
    slices: list[ci_slices.Slice]
    estimates: dict[str, ci_slices.Estimate]
    budget_s: float
    text: str  # the workflow file


def ci_plan(
    paths: Sequence[Path],
    *,
    max_minutes: int,
    kind: ci_workflow.Format,
    sbu_seconds: float | None = None,
    margin: float = 0.25,
    lock: Path | None = None,
    registry_repo: str | None = None,
    overrides: Sequence[str] = (),
    command: str = "lfsorch ci plan",
    workspace: Workspace | None = None,
) -> CiPlan:
    """The plan split into consecutive jobs that each fit `max_minutes` after `margin`, and
    the workflow that runs them: estimated from the workspace's earlier runs, else from the
    stage files' `sbu:` times `sbu_seconds`. Needs the lock the jobs build with."""
    if not 0 <= margin < 1:
        raise ci_slices.CiPlanError(f"--margin {margin}: must be at least 0 and below 1")
    load_config(overrides)  # a wrong -o fails here, not in the jobs
    plan = load_plan(paths)
    lock_path, pinned = _lock_for_ci(
        paths, lock, "jobs build from a lock's inputs",
        "write one with `lfsorch lock --push REGISTRY/REPO STAGE_FILE...`",
    )  # fmt: skip
    repository = registry_repo or _registry_of(pinned, lock_path)
    history = ci_slices.History.read(checked_workspace(workspace).runs_dir)
    steps = ci_slices.plan_steps(plan)
    found = ci_slices.estimates(plan, steps, history, sbu_seconds)
    budget = max_minutes * 60 * (1 - margin)
    slices = ci_slices.split(steps, found, budget)
    jobs = ci_workflow.Jobs(
        stage_files=[str(path) for path in paths],
        lock=_as_in_checkout(lock_path),
        registry=repository,
        source_set=pinned.source_set,
        overrides=list(overrides),
        max_minutes=max_minutes,
        command=command,
    )
    return CiPlan(slices, found, budget, ci_workflow.render(kind, jobs, slices))


def _registry_of(pinned: Lock, lock_path: Path) -> str:
    """Where the lock's host image was pushed (`REGISTRY/NS/REPO@...` -> `REGISTRY/NS`)."""
    for image in pinned.images.values():
        if image.pull is not None:
            repository = image.pull.split("@", 1)[0]
            return repository.rsplit("/", 1)[0] if "/" in repository else repository
    raise ci_slices.CiPlanError(
        f"{lock_path}: its image was never pushed, so no runner can pull it",
        hint="write the lock with `lfsorch lock --push REGISTRY/REPO ...`, or give --registry",
    )


@dataclasses.dataclass(frozen=True)
class CiJob:
    key: str  # the checkpoint after the slice
    image: str  # its snapshot image in the registry
    state: RunState | None  # None: the registry had it, nothing was built


def ci_job(
    paths: Sequence[Path],
    lfs_dir: Path,
    *,
    registry_repo: str,
    until: str,
    after: str | None = None,
    lock: Path | None = None,
    overrides: Sequence[str] = (),
    workspace: Workspace | None = None,
    view: ConsoleView | None = None,
    notify: Callable[[str], None] = lambda _: None,
) -> CiJob:
    """One CI job: build the plan from the checkpoint after `after` (pulled from the
    registry) up to the one after `until`, and push that one; nothing when the registry
    already holds it. Always with the lock's inputs, `-j 1` and a checkpoint per package."""
    config = load_config([*overrides, "checkpoint=package"])
    plan = load_plan(paths)
    lock_path, pinned = _lock_for_ci(
        paths, lock, "a CI job builds a lock's inputs",
        "give --lock FILE, as `lfsorch ci plan` writes it in the workflow",
    )  # fmt: skip
    workspace = checked_workspace(workspace)
    keys = ci_keys.checkpoint_keys(plan, config.settings, pinned, _base_key(lfs_dir, workspace))
    _check_slice_names(keys, until, after)
    client = engine.connect(timeout=None)
    target = f"{registry_repo}/{SNAPSHOT_REPOSITORY}:{keys[until]}"
    if registry.has_tag(client, target):
        notify(f"{target} is in the registry: the checkpoint after {until} is built already")
        return CiJob(keys[until], target, None)
    for reference, locked in pinned.images.items():
        if engine.image_id_or_none(client, reference) != locked.id:
            bring_image(client, reference, locked)
    if after is not None:
        previous = f"{registry_repo}/{SNAPSHOT_REPOSITORY}:{keys[after]}"
        notify(f"pulling the checkpoint after {after}: {previous}")
        pull_snapshot(previous, workspace=workspace)
    state = run(
        paths,
        lfs_dir,
        config=config,
        parallel=1,
        workspace=workspace,
        view=view,
        lock=lock_path,
        stop_after=until,
    )
    if state.outcome == "succeeded":
        _push_checkpoint(client, workspace, keys[until], until, target)
        notify(f"pushed {target}")
    return CiJob(keys[until], target, state)


def _check_slice_names(keys: dict[str, str], until: str, after: str | None) -> None:
    for option, name in (("--until", until), ("--after", after)):
        if name is not None and name not in keys:
            raise ci_slices.CiPlanError(
                f"{option} {name}: no such stage or package in this plan",
                hint="name STAGE or STAGE/PACKAGE as `lfsorch ci plan` writes them",
            )


def _base_key(lfs_dir: Path, workspace: Workspace) -> str:
    """The partition's key before the plan's first stage: its record's, else its content's
    now (a new runner's empty partition)."""
    partition = Partition.checked(lfs_dir, workspace)
    if not partition.path.is_dir():
        raise LfsorchError(
            f"the LFS partition {lfs_dir} is not a directory",
            hint="create the (empty) directory and pass it with --lfs",
        )
    record = records.peek_record(partition)
    if record is not None and record.base_key is not None:
        return record.base_key
    return tree_key(partition.path)


def _push_checkpoint(
    client: docker.DockerClient, workspace: Workspace, key: str, until: str, target: str
) -> None:
    if not SnapshotStore(workspace.snapshots_dir).has(key):
        raise ci_slices.CiPlanError(
            f"the run took no checkpoint {key[:12]} after {until}: its chain of keys differs "
            "from the lock's",
            hint="start each job on an empty partition (`--lfs` a new directory)",
        )
    snapshot_key, _ = snapshot_image(key, workspace=workspace)
    repository, tag = registry.split_reference(target)
    registry.push(client, f"{IMAGE_REPOSITORY}:{snapshot_key}", repository, tag)
