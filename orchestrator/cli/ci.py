"""`lfsorch ci plan` and `lfsorch ci job`: thin over `orchestrator.ci.jobs`."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.console import Console

from orchestrator.ci import jobs
from orchestrator.cli.interrupt import stop_on_sigterm
from orchestrator.errors import ExitCode
from orchestrator.monitor.console import ConsoleView, printable

app = typer.Typer(help="CI runners: split a build into jobs, run one job.", no_args_is_help=True)
out = Console(highlight=False, soft_wrap=True, markup=False)
err = Console(stderr=True, highlight=False, soft_wrap=True, markup=False)

StageFiles = Annotated[list[Path], typer.Argument(help="stage files (YAML)", show_default=False)]
LockOption = Annotated[
    Path | None,
    typer.Option("--lock", help="the lock the jobs build with (default: beside FILE)"),
]
Overrides = Annotated[
    list[str] | None,
    typer.Option("-o", "--option", help="configuration override KEY=VALUE (repeatable)"),
]


@app.command("plan")
def plan(
    files: StageFiles,
    max_minutes: Annotated[
        int, typer.Option("--max-minutes", min=1, max=10080, help="a job's time limit")
    ],
    kind: Annotated[
        Literal["github", "gitlab"], typer.Option("--format", help="github or gitlab")
    ] = "github",
    sbu_seconds: Annotated[
        float | None,
        typer.Option(
            "--sbu-seconds", min=0.001, max=86400, help="one SBU on the runner, in seconds"
        ),
    ] = None,
    margin: Annotated[
        float, typer.Option("--margin", min=0.0, max=0.95, help="share of a job kept free")
    ] = 0.25,
    lock: LockOption = None,
    registry: Annotated[
        str | None,
        typer.Option("--registry", help="REGISTRY/NS for checkpoint images (default: the lock's)"),
    ] = None,
    output: Annotated[
        Path, typer.Option("--output", help="the workflow file to write; - prints it")
    ] = Path("-"),
    option: Overrides = None,
) -> None:
    """Split the plan into consecutive jobs that each fit --max-minutes, and write the
    workflow that runs them (estimates from earlier runs, else the book's SBUs)."""
    command = shlex.join(["lfsorch", "ci", "plan", *sys.argv[3:]]) if sys.argv else ""
    result = jobs.ci_plan(
        files,
        max_minutes=max_minutes,
        kind=kind,
        sbu_seconds=sbu_seconds,
        margin=margin,
        lock=lock,
        registry_repo=registry,
        overrides=option or [],
        command=command,
    )
    for number, piece in enumerate(result.slices, start=1):
        err.print(
            f"job {number}: {printable(piece.label)}, about {piece.seconds / 60:.1f} min "
            f"(of {result.budget_s / 60:.1f} min after the margin), stops after {piece.until}"
        )
    if str(output) == "-":
        sys.stdout.write(result.text)
    else:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(result.text)
        err.print(f"wrote {output}")


@app.command("job")
def job(
    files: StageFiles,
    lfs: Annotated[Path, typer.Option("--lfs", help="the LFS partition (empty on a new runner)")],
    registry: Annotated[str, typer.Option("--registry", help="REGISTRY/NS of checkpoint images")],
    until: Annotated[
        str, typer.Option("--until", metavar="STAGE[/PACKAGE]", help="the slice's last checkpoint")
    ],
    after: Annotated[
        str | None,
        typer.Option("--after", metavar="STAGE[/PACKAGE]", help="the previous job's checkpoint"),
    ] = None,
    lock: LockOption = None,
    option: Overrides = None,
) -> None:
    """Run one job of `ci plan`: pull the lock's image and the previous checkpoint, build up
    to --until, push that checkpoint (nothing to do when the registry has it)."""
    stop_on_sigterm()
    result = jobs.ci_job(
        files,
        lfs,
        registry_repo=registry,
        until=until,
        after=after,
        lock=lock,
        overrides=option or [],
        view=ConsoleView(out),
        notify=lambda line: out.print(printable(line)),
    )
    if result.state is not None and result.state.outcome != "succeeded":
        out.print(f"run {result.state.run_id} {result.state.outcome}")
        raise typer.Exit(ExitCode.FAILED)
