"""`lfsorch verify-reproducible`: thin over the api."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from orchestrator import api
from orchestrator.build.reproducible import report_lines
from orchestrator.cli.interrupt import stop_on_sigterm
from orchestrator.errors import ExitCode
from orchestrator.monitor.console import ConsoleView, printable

out = Console(highlight=False, soft_wrap=True, markup=False)


def verify_reproducible(
    files: Annotated[list[Path], typer.Argument(help="stage files (YAML)", show_default=False)],
    lfs_a: Annotated[
        Path | None, typer.Option("--lfs-a", help="empty partition of the first build")
    ] = None,
    lfs_b: Annotated[
        Path | None, typer.Option("--lfs-b", help="empty partition of the second build")
    ] = None,
    diffoscope: Annotated[
        int,
        typer.Option("--diffoscope", min=0, help="files diffoscope compares (0: none)"),
    ] = 3,
    keep: Annotated[
        bool, typer.Option("--keep", help="keep both builds' workspaces and partitions")
    ] = False,
    parallel: Annotated[
        int | None, typer.Option("--parallel", "-j", min=1, help="packages built side by side")
    ] = None,
    against: Annotated[
        Path | None,
        typer.Option(
            "--against",
            help="workspace of an earlier build to compare with (its newest run that "
            "checkpointed these stages): only one build is made here",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
    option: Annotated[
        list[str] | None,
        typer.Option("-o", "--option", help="configuration override KEY=VALUE (repeatable)"),
    ] = None,
) -> None:
    """Build the stages twice in empty partitions (or once, compared with an earlier build)
    and compare the checkpoints entry by entry; exit status 1 when they differ."""
    stop_on_sigterm()
    jobs = [f"parallel_builds={parallel}"] if parallel is not None else []
    report = api.verify_reproducible(
        files,
        lfs_a=lfs_a,
        lfs_b=lfs_b,
        overrides=[*(option or []), *jobs],
        parallel=parallel,
        diffoscope=diffoscope,
        keep=keep,
        against=against,
        make_view=None if as_json else (lambda: ConsoleView(out)),
        notify=None if as_json else out.print,
    )
    if as_json:
        print(json.dumps(report.as_json(), indent=2))
    else:
        out.print()
        for line in report_lines(report):
            out.print(printable(line))
    if not report.reproducible:
        raise typer.Exit(ExitCode.FAILED)
