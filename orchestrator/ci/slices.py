"""A plan as consecutive CI jobs that each fit a time limit.

Every package of every stage, in the order a run builds them one at a time (`-j 1`, a
checkpoint after each package), gets an estimated build time (`monitor.estimates`: from the
workspace's earlier runs, scaled to `--sbu-seconds` where given, else the book's SBU times
one SBU). Jobs are cut only between packages, where a checkpoint is taken; a package longer
than a job alone is an error naming it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import networkx as nx

from orchestrator.errors import ExitCode, LfsorchError
from orchestrator.monitor.estimates import Estimate, History, estimate
from orchestrator.spec.graph import Plan, StagePlan, package_graph


class CiPlanError(LfsorchError):
    exit_code = ExitCode.USER_ERROR


@dataclass(frozen=True)
class Step:
    """One package of the plan, and what ends with it."""

    stage: str
    package: str
    last_of_stage: bool

    @property
    def name(self) -> str:
        return f"{self.stage}/{self.package}"

    @property
    def checkpoint(self) -> str:
        """What `--stop-after` names to stop after this package: the stage after its last."""
        return self.stage if self.last_of_stage else self.name


@dataclass(frozen=True)
class Slice:
    steps: list[Step]
    seconds: float
    after: str | None  # the checkpoint this job starts from; None: an empty partition

    @property
    def until(self) -> str:
        return self.steps[-1].checkpoint

    @property
    def label(self) -> str:
        first, last = self.steps[0].name, self.steps[-1].name
        return first if first == last else f"{first} .. {last}"


def stage_order(stage_plan: StagePlan) -> list[str]:
    """The packages of a stage in the order a run at `-j 1` builds them."""
    stage = stage_plan.file.stage
    index = {package.name: i for i, package in enumerate(stage.packages)}
    graph, _ = package_graph(stage_plan.file)
    return list(nx.lexicographical_topological_sort(graph, key=index.__getitem__))


def plan_steps(plan: Plan) -> list[Step]:
    steps = []
    for stage_plan in plan.stages:
        order = stage_order(stage_plan)
        steps += [Step(stage_plan.name, name, name == order[-1]) for name in order]
    return steps


def estimates(
    plan: Plan, steps: Sequence[Step], history: History, sbu_seconds: float | None
) -> dict[str, Estimate]:
    """Each step's estimated build time; every package without one is listed at once."""
    book = plan.book_sbus()
    found: dict[str, Estimate] = {}
    unknown = []
    for step in steps:
        found_one = estimate(step.name, book.get(step.name), history, sbu_seconds)
        if found_one is None:
            unknown.append(step.name)
        else:
            found[step.name] = found_one
    if unknown:
        known_sbu = sbu_seconds or history.sbu_s
        raise CiPlanError(
            f"no estimate for {', '.join(unknown)}: no earlier run built them and "
            + ("the stage files give no `sbu:`" if known_sbu else "no SBU is known"),
            hint="give `--sbu-seconds S` (one SBU on the runner) and `sbu:` for each package, "
            "or build once here so the workspace has their times",
        )
    return found


def split(steps: Sequence[Step], found: dict[str, Estimate], budget_s: float) -> list[Slice]:
    """Consecutive jobs, each as long as fits `budget_s`."""
    slices: list[Slice] = []
    current: list[Step] = []
    seconds = 0.0
    for step in steps:
        cost = found[step.name].seconds
        if cost > budget_s:
            raise CiPlanError(
                f"{step.name} alone takes about {cost / 60:.1f} min ({found[step.name].source}), "
                f"more than the {budget_s / 60:.1f} min a job leaves after the margin",
                hint="raise --max-minutes, lower --margin, or build it on a faster runner",
            )
        if current and seconds + cost > budget_s:
            slices.append(Slice(current, seconds, slices[-1].until if slices else None))
            current, seconds = [], 0.0
        current.append(step)
        seconds += cost
    if current:
        slices.append(Slice(current, seconds, slices[-1].until if slices else None))
    return slices
