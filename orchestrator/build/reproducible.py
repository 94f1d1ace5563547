"""Whether two builds of the same inputs give the same partition: where each build runs,
how their checkpoints compare stage by stage, and diffoscope on the first differing files.

Each build gets a throwaway workspace of its own, so its snapshot store starts empty and no
stage can be a cache hit on the other build's checkpoint (that would compare a build with
itself). Both share the real workspace's verified sources through a symlink: sources are
inputs, read-only to a build.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.build.state import RunState, load_state
from orchestrator.checkpoints import compare
from orchestrator.checkpoints.compare import EntryDifference
from orchestrator.checkpoints.extract import remove_tree
from orchestrator.checkpoints.store import SnapshotStore
from orchestrator.errors import ExitCode, LfsorchError
from orchestrator.workspace import Workspace

VERIFY_DIR = "verify"
DIFFOSCOPE_TIMEOUT_S = 300
EARLIER_POLL_S = 5.0
DIFFOSCOPE_MAX_LINES = 200
DIFFOSCOPE_MAX_BYTES = 256 * 1024


class NotReproducibleSetup(LfsorchError):
    """The two builds cannot be made as asked (a partition that is not empty)."""

    exit_code = ExitCode.USER_ERROR


class BuildFailed(LfsorchError):
    """One of the two builds failed: there is nothing to compare."""


@dataclass(frozen=True)
class BuildSite:
    """Where one of the two builds runs: its own workspace and partition."""

    name: str  # "a" or "b"
    workspace: Workspace
    lfs: Path


@dataclass
class BuildSites:
    root: Path  # the throwaway directory of both workspaces (and of temporary partitions)
    a: BuildSite
    b: BuildSite

    def remove(self) -> None:
        """Remove the throwaway workspaces, and the partitions made for the builds."""
        if self.root.exists():
            remove_tree(self.root)


def build_sites(
    workspace: Workspace, lfs_a: Path | None, lfs_b: Path | None, run_tag: str, one: bool = False
) -> BuildSites:
    """Two fresh workspaces under the real one's `verify/`, with its sources, and two empty
    partitions (the given ones, which must be empty, or new ones beside the workspaces).
    With `one`, only b's is made (a names the same place and is never built)."""
    if (lfs_a is None) != (lfs_b is None) and not one:
        raise NotReproducibleSetup(
            "--lfs-a and --lfs-b go together", hint="give both, or neither for temporary ones"
        )
    for given in (lfs_a, lfs_b):
        if given is not None:
            _refuse_used(given)
    if lfs_a is not None and lfs_b is not None and os.path.samefile(lfs_a, lfs_b):
        raise NotReproducibleSetup(
            f"--lfs-a and --lfs-b name the same directory {lfs_a}: each build needs its own",
            hint="give two empty directories",
        )
    root = workspace.root / VERIFY_DIR / run_tag
    root.mkdir(parents=True)
    sites = []
    for name, given in (("b", lfs_b),) if one else (("a", lfs_a), ("b", lfs_b)):
        home = root / name / "workspace"
        home.mkdir(parents=True)
        os.symlink(workspace.sources_dir, home / "sources", target_is_directory=True)
        lfs = given if given is not None else root / name / "lfs"
        lfs.mkdir(exist_ok=True)
        sites.append(BuildSite(name, Workspace(home), lfs))
    return BuildSites(root, sites[0], sites[-1])


def check_earlier_builds(workspace: Workspace, stages: list[str]) -> None:
    """Refuse, before anything is built, a workspace none of whose runs builds every one of
    `stages` (finished or still under way: it is read again once the second build is done)."""
    if not any(_builds_all(state, stages) for state in _runs(workspace)):
        raise NotReproducibleSetup(
            f"no run in the workspace {workspace.root} builds every stage ({', '.join(stages)})",
            hint="build the same stage files there first, or leave out --against to build twice",
        )


def earlier_build(
    workspace: Workspace,
    stages: list[str],
    *,
    poll_s: float = EARLIER_POLL_S,
    notify: Callable[[str], None] | None = None,
) -> RunState:
    """The newest run recorded in `workspace` with a checkpoint of every one of `stages`:
    the first build, when the second is compared with a build made elsewhere (on another
    partition, another runner, or still under way when the second started).

    When none has them yet but a run that builds them is still under way (its process is
    alive), this waits for it: two long builds started side by side rarely end in order."""
    announced: set[str] = set()
    while True:
        under_way: RunState | None = None
        for state in _runs(workspace):
            if all(stage in state.checkpoints for stage in stages):
                return state
            if under_way is None and state.under_way() and _builds_all(state, stages):
                under_way = state
        if under_way is None:
            raise NotReproducibleSetup(
                f"no run in the workspace {workspace.root} has a checkpoint of every stage "
                f"({', '.join(stages)})",
                hint="finish its build of those stages (a stopped one resumes with the same "
                "`lfsorch run`), then run again",
            )
        if notify is not None and under_way.run_id not in announced:
            announced.add(under_way.run_id)
            missing = [stage for stage in stages if stage not in under_way.checkpoints]
            notify(
                f"waiting for run {under_way.run_id} (process {under_way.owner_pid}) in "
                f"{workspace.root} to checkpoint {', '.join(missing)}"
            )
        time.sleep(poll_s)


def _builds_all(state: RunState, stages: list[str]) -> bool:
    planned = {package.stage for package in state.packages} | set(state.checkpoints)
    return planned.issuperset(stages)


def _runs(workspace: Workspace) -> Iterator[RunState]:
    """The workspace's run records, newest first; unreadable ones are passed over."""
    runs = workspace.runs_dir
    for run_dir in sorted(runs.iterdir(), reverse=True) if runs.is_dir() else []:
        try:
            state = load_state(run_dir / "state.json")
        except LfsorchError:
            continue
        if state is not None:
            yield state


def _refuse_used(path: Path) -> None:
    if not path.is_dir():
        raise NotReproducibleSetup(
            f"the partition {path} is not a directory",
            hint="create an empty directory for each build, or leave out --lfs-a/--lfs-b",
        )
    if any(path.iterdir()):
        raise NotReproducibleSetup(
            f"the partition {path} is not empty: each build starts from an empty partition",
            hint="empty it, or leave out --lfs-a/--lfs-b for temporary ones",
        )


# --------------------------------------------------------------------------- comparing


@dataclass
class StageComparison:
    stage: str
    key: str
    identical: int
    differences: list[EntryDifference]
    # Paths that differ here but not at the stage before: what this stage's build added.
    new: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "key": self.key,
            "identical": self.identical,
            "differ": len(self.differences),
            "new": self.new,
            "differences": [d.as_json() for d in self.differences],
        }


@dataclass
class DiffoscopeResult:
    path: str
    output: str  # at most DIFFOSCOPE_MAX_LINES lines; a note says how many were left out

    def as_json(self) -> dict[str, str]:
        return {"path": self.path, "output": self.output}


@dataclass
class ReproducibilityReport:
    run_a: str
    run_b: str
    stages: list[StageComparison]
    diffoscope: list[DiffoscopeResult] = field(default_factory=list)
    diffoscope_note: str | None = None  # why diffoscope did not run, when it did not
    kept: Path | None = None  # where the builds' workspaces are, when kept

    @property
    def first_differing(self) -> StageComparison | None:
        return next((stage for stage in self.stages if stage.differences), None)

    @property
    def reproducible(self) -> bool:
        return self.first_differing is None

    def as_json(self) -> dict[str, Any]:
        first = self.first_differing
        return {
            "reproducible": self.reproducible,
            "first_differing_stage": first.stage if first else None,
            "runs": {"a": self.run_a, "b": self.run_b},
            "mtimes_compared": False,
            "mtimes_note": compare.MTIMES_NOT_COMPARED,
            "stages": [stage.as_json() for stage in self.stages],
            "diffoscope": [result.as_json() for result in self.diffoscope],
            "diffoscope_note": self.diffoscope_note,
            "kept": str(self.kept) if self.kept else None,
        }


def compare_builds(
    stages: list[str], a: tuple[SnapshotStore, RunState], b: tuple[SnapshotStore, RunState]
) -> list[StageComparison]:
    """Each stage's checkpoint in build a against the same stage's in build b."""
    (store_a, state_a), (store_b, state_b) = a, b
    results: list[StageComparison] = []
    before: set[str] = set()
    for stage in stages:
        key_a, key_b = state_a.checkpoints.get(stage), state_b.checkpoints.get(stage)
        if key_a is None or key_b is None:
            raise LfsorchError(f"stage {stage} has no checkpoint in one of the builds")
        if key_a != key_b:
            raise LfsorchError(
                f"stage {stage}: the two builds had different inputs "
                f"(checkpoints {key_a[:12]} and {key_b[:12]})",
                hint="something changed between them (a retagged image, an edited stage "
                "file); run again",
            )
        identical, differences = compare.compare_manifests(
            store_a.manifest(key_a), store_b.manifest(key_b)
        )
        differing = {difference.path for difference in differences}
        new = [d.path for d in differences if d.path not in before]
        results.append(StageComparison(stage, key_a, identical, differences, new))
        before = differing
    return results


def run_diffoscope(
    first: StageComparison, stores: tuple[SnapshotStore, SnapshotStore], limit: int
) -> tuple[list[DiffoscopeResult], str | None]:
    """diffoscope on the first `limit` files whose content differs at the first differing
    stage; (results, why none ran)."""
    candidates = [d.path for d in first.differences if compare.content_differs(d)][:limit]
    if limit <= 0 or not candidates:
        return [], None
    program = shutil.which("diffoscope")
    if program is None:
        return [], "diffoscope is not installed (Debian: apt-get install diffoscope-minimal)"
    with tempfile.TemporaryDirectory(prefix="lfsorch-diffoscope-") as scratch:
        # Each file keeps its name (diffoscope recognises formats by it too), in a directory
        # per file and build: 0/a/NAME, 0/b/NAME.
        places = {path: Path(scratch) / str(number) for number, path in enumerate(candidates)}
        for side, store in zip(("a", "b"), stores, strict=True):
            wanted = {path: place / side / Path(path).name for path, place in places.items()}
            for dest in wanted.values():
                dest.parent.mkdir(parents=True)
            compare.extract_files(store, store.manifest(first.key), wanted)
        results = [
            DiffoscopeResult(path, _diffoscope(program, place, Path(path).name))
            for path, place in places.items()
        ]
    return results, None


def _diffoscope(program: str, cwd: Path, name: str) -> str:
    """Its report on `a/NAME` and `b/NAME` in `cwd`, which it names so."""
    command = [program, "--text", "-", "--no-progress"]
    command += ["--max-text-report-size", str(DIFFOSCOPE_MAX_BYTES), f"a/{name}", f"b/{name}"]
    try:
        done = subprocess.run(
            command,
            cwd=cwd,
            capture_output=True,
            timeout=DIFFOSCOPE_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return f"diffoscope did not finish within {DIFFOSCOPE_TIMEOUT_S} s"
    text = done.stdout.decode(errors="replace") or done.stderr.decode(errors="replace")
    lines = text.splitlines()
    if len(lines) > DIFFOSCOPE_MAX_LINES:
        left = len(lines) - DIFFOSCOPE_MAX_LINES
        lines = [*lines[:DIFFOSCOPE_MAX_LINES], f"... {left} more lines"]
    return "\n".join(lines)


# --------------------------------------------------------------------------- the report

SHOWN_PER_STAGE = 50


def report_lines(report: ReproducibilityReport) -> list[str]:
    """The report for a person: per stage how many entries are identical and how many
    differ, the files each differing stage adds with the kind of difference, and what
    diffoscope found. Paths are as the builds wrote them: print them through `printable`."""
    lines = []
    for stage in report.stages:
        lines.append(
            f"stage {stage.stage} (checkpoint {stage.key[:12]}): {stage.identical} identical, "
            f"{len(stage.differences)} differ"
        )
    first = report.first_differing
    if first is None:
        lines.append("reproducible: every stage's checkpoint is the same in both builds")
    else:
        lines.append(f"not reproducible: the first stage that differs is {first.stage}")
        for stage in report.stages:
            lines += _stage_differences(stage, first)
    lines.append(compare.MTIMES_NOT_COMPARED)
    if report.diffoscope_note:
        lines.append(report.diffoscope_note)
    for result in report.diffoscope:
        lines.append(f"diffoscope {result.path}:")
        lines += [f"  | {line}" for line in result.output.splitlines()]
    if report.kept is not None:
        lines.append(f"the builds' workspaces and partitions are kept in {report.kept}")
    return lines


def _stage_differences(stage: StageComparison, first: StageComparison) -> list[str]:
    new = set(stage.new)
    listed = [d for d in stage.differences if d.path in new]
    if not listed:
        return []
    carried = len(stage.differences) - len(listed)
    heading = f"{stage.stage}: {len(listed)} differ"
    if stage is not first and carried:
        heading += f" that did not at the stage before ({carried} still differ as before)"
    lines = [heading]
    lines += [f"  {d.describe()}" for d in listed[:SHOWN_PER_STAGE]]
    if len(listed) > SHOWN_PER_STAGE:
        lines.append(f"  ... and {len(listed) - SHOWN_PER_STAGE} more (--json lists all)")
    return lines
