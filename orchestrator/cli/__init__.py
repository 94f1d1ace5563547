"""Command line: a thin layer over `orchestrator.api`. Every command goes through api; other
modules are imported here only for constants, types and the console view."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from orchestrator import api
from orchestrator.cli import ci as ci_cli
from orchestrator.cli import images as images_cli
from orchestrator.cli import snapshots as snapshots_cli
from orchestrator.cli import sources as sources_cli
from orchestrator.cli import verify as verify_cli
from orchestrator.cli.interrupt import stop_on_sigterm
from orchestrator.errors import ExitCode, LfsorchError, local_file_error
from orchestrator.monitor.console import ConsoleView, printable
from orchestrator.monitor.report import SBU_REFERENCE, Report

if TYPE_CHECKING:
    from orchestrator.build.state import RunState

app = typer.Typer(
    name="lfsorch",
    help="Build Linux From Scratch stage by stage, each package in a fresh container.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
config_app = typer.Typer(help="Show the configuration and where each value comes from.")
app.add_typer(config_app, name="config")
app.add_typer(images_cli.app, name="images")
app.add_typer(snapshots_cli.snapshots_app, name="snapshots")
app.add_typer(sources_cli.app, name="sources")
app.command("restore")(snapshots_cli.restore)
app.add_typer(ci_cli.app, name="ci")
app.command("verify-reproducible")(verify_cli.verify_reproducible)

# Paths, names and values printed here are text, never rich markup: `[/x]` in a path or a
# configuration value would be a traceback, `[b]` would vanish.
out = Console(highlight=False, soft_wrap=True, markup=False)

StageFiles = Annotated[list[Path], typer.Argument(help="stage files (YAML)", show_default=False)]
Overrides = Annotated[
    list[str] | None,
    typer.Option("-o", "--option", help="configuration override KEY=VALUE (repeatable)"),
]


@app.command()
def validate(files: StageFiles) -> None:
    """Check stage files (syntax, schema, dependency graph) without Docker."""
    plan = api.validate(files)
    for stage_plan in plan.stages:
        count = len(stage_plan.file.stage.packages)
        out.print(f"{stage_plan.file.path}: stage {stage_plan.name}: {count} package(s), valid")


@app.command()
def plan(
    files: StageFiles,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Print the build order: levels of packages that may build side by side."""
    result = api.validate(files)
    if as_json:
        print(json.dumps(result.as_json(), indent=2))
        return
    for stage_plan in result.stages:
        out.print(f"stage {stage_plan.name} ({stage_plan.file.path})")
        for number, level in enumerate(stage_plan.levels, start=1):
            out.print(f"  {number:>2}. {'  '.join(level)}")


@app.command("lock")
def lock_command(
    files: StageFiles,
    output: Annotated[
        Path | None, typer.Option("--output", help="where to write it (default: beside FILE)")
    ] = None,
    push: Annotated[
        str | None,
        typer.Option(
            "--push",
            metavar="REGISTRY/REPO",
            help="push the build-host image there and lock the digest to pull it by",
        ),
    ] = None,
    option: Overrides = None,
) -> None:
    """Write lfsorch.lock: the host image by digest, every source by checksum, the source
    set, the settings in checkpoint keys and SOURCE_DATE_EPOCH."""
    path, written = api.create_lock(
        files, output=output, push=push, config=api.configuration(option or [])
    )
    out.print(f"wrote {path}: {len(written.stages)} stage(s), {len(written.sources)} source(s)")
    for reference, image in sorted(written.images.items()):
        out.print(f"  image {reference} {image.id}" + (f" ({image.pull})" if image.pull else ""))


@app.command()
def schema() -> None:
    """Print the JSON Schema of the stage file format (for editors)."""
    print(json.dumps(api.stage_schema(), indent=2))


@app.command()
def run(
    files: StageFiles,
    lfs: Annotated[
        Path, typer.Option("--lfs", help="the LFS partition (bind-mounted at /mnt/lfs)")
    ],
    parallel: Annotated[
        int | None, typer.Option("--parallel", "-j", min=1, help="packages built side by side")
    ] = None,
    rebuild: Annotated[
        bool,
        typer.Option("--rebuild", help="build every stage even when done or a checkpoint matches"),
    ] = False,
    rebuild_stages: Annotated[
        list[str] | None,
        typer.Option(
            "--rebuild-stage",
            metavar="STAGE",
            help="build STAGE even when done or a checkpoint matches (repeatable)",
        ),
    ] = None,
    from_stage: Annotated[
        str | None,
        typer.Option("--from", help="restore the checkpoint before STAGE and build from it"),
    ] = None,
    stop_after: Annotated[
        str | None,
        typer.Option(
            "--stop-after",
            metavar="STAGE[/PACKAGE]",
            help="stop once the checkpoint after STAGE (or PACKAGE of it) is taken",
        ),
    ] = None,
    lock: Annotated[
        Path | None,
        typer.Option("--lock", help="use exactly the inputs of this lock, or refuse"),
    ] = None,
    no_lock: Annotated[
        bool, typer.Option("--no-lock", help="ignore an lfsorch.lock beside the stage file")
    ] = False,
    option: Overrides = None,
) -> None:
    """Build the stages, each package in a fresh container; resumes after a failure.

    An `lfsorch.lock` beside the first stage file is used unless --no-lock is given."""
    stop_on_sigterm()
    # -j is checked as the configuration's parallel_builds is, with the same cap.
    jobs = [f"parallel_builds={parallel}"] if parallel is not None else []
    config = api.configuration([*(option or []), *jobs])
    state = api.run(
        files,
        lfs,
        config=config,
        parallel=parallel,
        rebuild=rebuild,
        rebuild_stages=rebuild_stages or [],
        from_stage=from_stage,
        view=ConsoleView(out),
        lock=lock,
        no_lock=no_lock,
        stop_after=stop_after,
    )
    _print_summary(state, config.settings.log_tail_lines)
    if state.outcome != "succeeded":
        raise typer.Exit(ExitCode.FAILED)


def _print_summary(state: RunState, tail_lines: int) -> None:
    counts: dict[str, int] = {}
    for package in state.packages:
        counts[package.status] = counts.get(package.status, 0) + 1
    summary = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    out.print(f"\nrun {state.run_id} {state.outcome}: {summary}")
    for package in state.packages:
        if package.status != "failed":
            continue
        last = package.attempts[-1] if package.attempts else None
        reason = last.error if last and last.error else f"exit status {package.exit_code}"
        out.print(f"\nFAILED {package.stage}/{package.name}: {printable(reason)}", markup=False)
        for line in api.log_tail(package, tail_lines):
            out.print(f"  | {printable(line)}", markup=False)
        out.print(f"  whole log: {package.log}", markup=False)


def _status_table(state: RunState) -> Table:
    table = Table(title=f"run {state.run_id} ({state.outcome})")
    for column in (
        "stage",
        "package",
        "status",
        "tries",
        "exit",
        "oom",
        "time",
        "cpu s",
        "mem peak",
    ):
        table.add_column(column)
    for p in state.packages:
        table.add_row(
            p.stage,
            p.name,
            p.status,
            str(len(p.attempts)),
            "-" if p.exit_code is None else str(p.exit_code),
            "yes" if p.oom_killed else "",
            "-" if p.duration_s is None else f"{p.duration_s:.1f}s",
            "-" if p.cpu_seconds is None else f"{p.cpu_seconds:.1f}",
            "-" if p.memory_peak_bytes is None else f"{p.memory_peak_bytes / 2**20:.1f}MiB",
        )
    return table


@app.command()
def status(
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
    lfs: Annotated[
        Path | None, typer.Option("--lfs", help="show this partition's record, not the last run")
    ] = None,
) -> None:
    """Show the last run (or a partition's record): each package's status, attempts and
    container figures."""
    state = api.last_run(lfs_dir=lfs)
    if state is None:
        where = f" for the partition {lfs}" if lfs is not None else ""
        raise LfsorchError(
            f"no run recorded yet{where}", hint="start one with `lfsorch run FILE --lfs DIR`"
        )
    if as_json:
        print(json.dumps(state.status_json(), indent=2))
    else:
        out.print(_status_table(state))
        for line in _attempt_lines(state):
            out.print(line, markup=False)


def _attempt_lines(state: RunState) -> list[str]:
    """Attempt by attempt, for packages that failed once or more: what failed, why, and what
    the next attempt changed."""
    lines: list[str] = []
    for package in state.packages:
        failed = [a for a in package.attempts if a.error or a.failure_class]
        if not failed:
            continue
        lines.append(f"{package.stage}/{package.name}:")
        for attempt in package.attempts:
            if not attempt.error and not attempt.failure_class:
                lines.append(f"  attempt {attempt.number}: succeeded")
                continue
            what = f"{attempt.failure_class} failure" if attempt.failure_class else "failed"
            then = f"; next: {attempt.change}" if attempt.change else ""
            lines.append(
                f"  attempt {attempt.number}: {what}, {printable(attempt.error or '')}{then}"
            )
    return lines


_ESTIMATED_FROM = {"history": "earlier runs", "book": "the book's SBU"}


def _clock(seconds: float, *, exact: bool = True) -> str:
    """`1h 02m 05s`, or for an estimate `1h 02m`."""
    whole = int(seconds + 0.5) if exact else int(seconds / 60 + 0.5) * 60
    hours_minutes = f"{whole // 3600}h {whole // 60 % 60:02d}m"
    return f"{hours_minutes} {whole % 60:02d}s" if exact else hours_minutes


def _run_time_lines(result: Report) -> list[str]:
    """The run's own wall time (checkpoints and waits included), and a run under way's time to
    go."""
    lines = []
    if result.elapsed_s is not None:
        if result.outcome == "running":
            lines.append(
                f"run wall time so far: {_clock(result.elapsed_s)} (started {result.started})"
            )
        else:
            lines.append(
                f"run wall time: {_clock(result.elapsed_s)} (started {result.started}, "
                f"{result.outcome} {result.ended})"
            )
    to_go = result.to_go
    if to_go is not None and to_go.packages:
        known = to_go.packages - len(to_go.unknown)
        whence = ", ".join(
            f"{count} from {_ESTIMATED_FROM.get(source, source)}"
            for source, count in sorted(to_go.sources.items(), reverse=True)
        )
        line = f"to go: {to_go.packages} package(s)"
        if known:
            counted = f" for {known} of them" if to_go.unknown else ""
            line += f", about {_clock(to_go.seconds, exact=False)}{counted} ({whence})"
        if to_go.unknown:
            line += f"; no estimate for {', '.join(to_go.unknown)}"
        lines.append(line)
    return lines


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.1f}"


@app.command()
def report(
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
    reference: Annotated[
        str, typer.Option(help="package whose wall time is one SBU")
    ] = SBU_REFERENCE,
) -> None:
    """Per-package wall time, SBU, CPU seconds, memory peak and disk space added (last run)."""
    result = api.last_report(reference)
    if result is None:
        raise LfsorchError(
            "no run recorded yet", hint="start one with `lfsorch run FILE --lfs DIR`"
        )
    if as_json:
        print(json.dumps(result.as_json(), indent=2))
        return
    sbu = (
        f"1 SBU = {result.sbu_s:.1f}s ({reference})" if result.sbu_s else f"no {reference}: no SBU"
    )
    table = Table(title=f"run {result.run_id}: {sbu}")
    for column in (
        "stage",
        "package",
        "status",
        "wall",
        "SBU",
        "cpu s",
        "mem peak MiB",
        "disk +MiB",
    ):
        table.add_column(
            column, justify="left" if column in ("stage", "package", "status") else "right"
        )
    for row in result.rows:
        table.add_row(
            row.stage,
            row.package,
            row.status,
            "-" if row.wall_s is None else f"{row.wall_s:.1f}s",
            "-" if row.sbu is None else f"{row.sbu:.2f}",
            "-" if row.cpu_seconds is None else f"{row.cpu_seconds:.1f}",
            _mib(row.memory_peak_bytes),
            _mib(row.disk_added_bytes),
        )
    out.print(table)
    out.print(f"total wall time of the packages: {result.total_wall_s / 60:.1f} min")
    for line in _run_time_lines(result):
        out.print(line, markup=False)
    steps = [(row, step) for row in result.rows for step in row.recovery]
    if steps:
        out.print("recovery decisions:")
    for row, step in steps:
        out.print(f"  {row.stage}/{row.package} {printable(step.describe())}", markup=False)


@app.command()
def runs(
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, help="how many")] = 20,
) -> None:
    """List the recent runs, newest first: partition, start, outcome, package counts."""
    found = api.recent_runs(limit)
    if as_json:
        print(json.dumps([summary.as_json() for summary in found], indent=2))
        return
    if not found:
        out.print("no runs recorded yet")
        return
    table = Table()
    for column in ("run", "partition", "started", "outcome", "packages"):
        table.add_column(column, overflow="fold")  # ids and paths whole, never cut short
    for summary in found:
        counts = ", ".join(f"{n} {status}" for status, n in sorted(summary.counts.items()))
        table.add_row(summary.run_id, summary.lfs, summary.started, summary.outcome, counts)
    out.print(table)


@app.command()
def cleanup() -> None:
    """Remove containers left behind by lfsorch processes that no longer exist, and the
    staging directories of interrupted snapshots and restores."""
    result = api.cleanup()
    if result.containers is None:
        out.print("no Docker engine answers: containers were not checked")
    else:
        removed = result.containers
        out.print(f"removed {len(removed)} leftover container(s)" + (": " if removed else ""))
        for name in removed:
            out.print(f"  {name}", markup=False)
    out.print(f"removed {len(result.files)} leftover staging path(s)")
    for path in result.files:
        out.print(f"  {path}", markup=False)


@config_app.command("show")
def config_show(
    option: Overrides = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Print every configuration value and the layer it came from."""
    rows = api.configuration(option or []).show()
    if as_json:
        data: dict[str, Any] = {
            key: {"value": value, "from": origin} for key, value, origin in rows
        }
        print(json.dumps(data, indent=2))
        return
    table = Table(title="configuration")
    for column in ("key", "value", "from"):
        table.add_column(column)
    for key, value, origin in rows:
        table.add_row(key, json.dumps(value), origin)
    out.print(table)


def main() -> None:
    try:
        app()
    except LfsorchError as exc:
        err = Console(stderr=True, highlight=False, soft_wrap=True)
        prefix = "" if getattr(exc, "problems", None) else "error: "
        err.print(printable(f"{prefix}{exc}"), markup=False)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        Console(stderr=True).print("interrupted")
        sys.exit(ExitCode.INTERRUPTED)
    except OSError as exc:  # a local file lfsorch cannot use: one line, with what to do
        if exc.errno is None:  # not the system's (an HTTP library's error): not ours to word
            raise
        error = local_file_error(exc)
        Console(stderr=True, highlight=False, soft_wrap=True).print(f"error: {error}", markup=False)
        sys.exit(error.exit_code)
