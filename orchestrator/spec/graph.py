"""Dependency graphs of stages and packages, and the build plan derived from them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import networkx as nx

from orchestrator.spec.stagefile import Problem, StageFile, StageFileError, load_stage_file


@dataclass(frozen=True)
class StagePlan:
    file: StageFile
    levels: list[list[str]]

    @property
    def name(self) -> str:
        return self.file.stage.stage


@dataclass(frozen=True)
class Plan:
    stages: list[StagePlan]

    def as_json(self) -> dict[str, object]:
        return {"stages": [{"stage": s.name, "levels": s.levels} for s in self.stages]}

    def book_sbus(self) -> dict[str, float | None]:
        """Each package's `sbu:` (the book's build time in SBU), by `stage/package`."""
        return {f"{s.name}/{p.name}": p.sbu for s in self.stages for p in s.file.stage.packages}


def _cycle_text(cycle: Sequence[str]) -> str:
    return " -> ".join([*cycle, cycle[0]])


def package_graph(stage_file: StageFile) -> tuple[nx.DiGraph, list[Problem]]:
    """Edges run from a dependency to its dependent."""
    stage = stage_file.stage
    graph = nx.DiGraph()
    problems: list[Problem] = []
    first_index: dict[str, int] = {}
    for index, package in enumerate(stage.packages):
        if package.name in first_index:
            problems.append(
                Problem(
                    stage_file.path,
                    stage_file.line_of("packages", index, "name"),
                    f"packages[{index}].name",
                    f"duplicate package '{package.name}' "
                    f"(first defined at packages[{first_index[package.name]}])",
                )
            )
            continue
        first_index[package.name] = index
        graph.add_node(package.name)
    for index, package in enumerate(stage.packages):
        for dep_index, dependency in enumerate(package.depends):
            location = ("packages", index, "depends", dep_index)
            if dependency not in first_index:
                problems.append(
                    Problem(
                        stage_file.path,
                        stage_file.line_of(*location),
                        f"packages[{index}].depends[{dep_index}]",
                        f"unknown package '{dependency}' (not defined in stage '{stage.stage}')",
                    )
                )
            elif dependency == package.name:
                problems.append(
                    Problem(
                        stage_file.path,
                        stage_file.line_of(*location),
                        f"packages[{index}].depends[{dep_index}]",
                        f"package '{package.name}' depends on itself",
                    )
                )
            else:
                graph.add_edge(dependency, package.name)
    for cycle in sorted(nx.simple_cycles(graph), key=lambda c: sorted(c)):
        if len(cycle) < 2:
            continue
        start = min(cycle)
        rotated = cycle[cycle.index(start) :] + cycle[: cycle.index(start)]
        index = first_index[start]
        problems.append(
            Problem(
                stage_file.path,
                stage_file.line_of("packages", index, "depends"),
                f"packages[{index}].depends",
                f"dependency cycle: {_cycle_text(rotated)}",
            )
        )
    return graph, problems


def levels_of(graph: nx.DiGraph) -> list[list[str]]:
    """Groups of packages that may build side by side, in build order."""
    return [sorted(generation) for generation in nx.topological_generations(graph)]


def _find_required(name: str, beside: Path, known: dict[str, StageFile]) -> StageFile | None:
    """The stage `name`: already given, else `name.yaml` beside the requiring file (whose own
    problems are reported as its own), else the first other stage file there defining it.
    Files beside are read only now, when needed, and read_stage_text refuses FIFOs and
    devices without opening them."""
    if name in known:
        return known[name]
    candidate = beside / f"{name}.yaml"
    if candidate.exists():
        stage_file = load_stage_file(candidate)
        if stage_file.stage.stage == name:
            return stage_file
    for other in sorted(beside.glob("*.y*ml")):
        if other == candidate:
            continue
        try:
            stage_file = load_stage_file(other)
        except StageFileError:
            continue  # not a stage file, or someone else's problem: it was not asked for
        if stage_file.stage.stage == name:
            return stage_file
    return None


def resolve_stages(files: Sequence[StageFile]) -> tuple[list[StageFile], list[Problem]]:
    """The given stages plus every stage they require (found by name beside them), in order."""
    known: dict[str, StageFile] = {}
    problems: list[Problem] = []
    for stage_file in files:
        name = stage_file.stage.stage
        if name in known and known[name].path.resolve() != stage_file.path.resolve():
            problems.append(
                Problem(
                    stage_file.path,
                    stage_file.line_of("stage"),
                    "stage",
                    f"stage '{name}' is also defined in {known[name].path}",
                )
            )
        known.setdefault(name, stage_file)
    graph = nx.DiGraph()
    pending = list(known.values())
    while pending:
        stage_file = pending.pop()
        graph.add_node(stage_file.stage.stage)
        for index, required in enumerate(stage_file.stage.requires):
            try:
                found = _find_required(required, stage_file.path.parent, known)
            except StageFileError as exc:
                problems.extend(exc.problems)
                continue
            if found is None:
                problems.append(
                    Problem(
                        stage_file.path,
                        stage_file.line_of("requires", index),
                        f"requires[{index}]",
                        f"unknown stage '{required}' (no {required}.yaml beside this file "
                        f"and no file given defines it)",
                    )
                )
                continue
            if required not in known:
                known[required] = found
                pending.append(found)
            graph.add_edge(required, stage_file.stage.stage)
    for cycle in nx.simple_cycles(graph):
        start = min(cycle)
        rotated = cycle[cycle.index(start) :] + cycle[: cycle.index(start)]
        stage_file = known[start]
        problems.append(
            Problem(
                stage_file.path,
                stage_file.line_of("requires"),
                "requires",
                f"stage cycle: {_cycle_text(rotated)}",
            )
        )
    if problems:
        return [], problems
    order = list(nx.lexicographical_topological_sort(graph))
    return [known[name] for name in order], problems


def load_plan(paths: Sequence[Path]) -> Plan:
    """Load, validate and order stage files; raise StageFileError with every problem at once."""
    problems: list[Problem] = []
    files: list[StageFile] = []
    for path in paths:
        try:
            files.append(load_stage_file(path))
        except StageFileError as exc:
            problems.extend(exc.problems)
    graphs: dict[str, nx.DiGraph] = {}
    for stage_file in files:
        graph, stage_problems = package_graph(stage_file)
        graphs[stage_file.stage.stage] = graph
        problems.extend(stage_problems)
    if problems:
        raise StageFileError(problems)
    ordered, stage_problems = resolve_stages(files)
    if stage_problems:
        raise StageFileError(stage_problems)
    plans: list[StagePlan] = []
    for stage_file in ordered:
        graph = graphs.get(stage_file.stage.stage)
        if graph is None:
            graph, required_problems = package_graph(stage_file)
            problems.extend(required_problems)
        plans.append(StagePlan(stage_file, levels_of(graph)))
    if problems:
        raise StageFileError(problems)
    return Plan(plans)
