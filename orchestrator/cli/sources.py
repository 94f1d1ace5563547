"""`lfsorch sources`: fetch and inspect the source cache."""

from __future__ import annotations

from pathlib import Path

import typer

from orchestrator import api
from orchestrator.errors import ExitCode
from orchestrator.sources.errors import SourceError

app = typer.Typer(help="Fetch, verify and list the packages' source files.", no_args_is_help=True)

FilesArg = typer.Argument(..., exists=True, dir_okay=False, help="stage file(s)")
SetOpt = typer.Option(
    None, "--set", "-s", help="source set: upstream, debian12, ... (default: config source_set)"
)


@app.command("fetch")
def fetch_cmd(
    files: list[Path] = FilesArg,
    source_set: str | None = SetOpt,
    allow_unverified: bool = typer.Option(
        False, help="fetch files that declare no checksum and trust their first digest"
    ),
) -> None:
    """Download every source the stage files declare into the verified cache."""
    result = api.fetch_sources(files, source_set, allow_unverified=allow_unverified)
    mib = result.bytes_downloaded / 2**20
    for file, uri in sorted(result.fell_back.items()):
        typer.echo(f"{file}: the URI apt named failed; taken from {uri}")
    typer.echo(
        f"{len(result.fetched)} fetched ({mib:.1f} MiB in {result.seconds:.0f}s), "
        f"{len(result.cached)} already cached, in {result.cache_dir}"
    )


@app.command("add")
def add_cmd(
    local_files: list[Path] = typer.Argument(..., help="local source files to add"),
    stage_files: list[Path] = typer.Option(
        ..., "--for", "-f", exists=True, dir_okay=False, help="stage file(s) declaring them"
    ),
    source_set: str | None = SetOpt,
) -> None:
    """Put local files into the verified cache when they match a declared checksum.

    Without a network: copy the tarballs (or, for a Debian set, the Debian orig tarballs)
    onto the machine and add them. The content decides which declared file each one is.
    """
    result = api.add_sources(local_files, stage_files, source_set)
    for path, names in result.added:
        typer.echo(f"added {path} as {', '.join(names)}")
    if len(result.refused) == 1 and not result.added:
        raise result.refused[0]
    if result.refused:
        listing = "\n".join(f"  - {exc.message}" for exc in result.refused)
        raise SourceError(
            f"{len(result.refused)} file(s) refused, nothing written for them:\n{listing}",
            hint=result.refused[0].hint,
        )
    typer.echo(f"{len(result.added)} file(s) added to {result.cache_dir}")


@app.command("list")
def list_cmd(files: list[Path] = FilesArg, source_set: str | None = SetOpt) -> None:
    """Show which sources are cached, missing or bad for a set."""
    rows, cache_dir = api.source_status(files, source_set)
    colors = {"ok": "green", "missing": "yellow", "bad": "red", "unverified": "yellow"}
    for row in rows:
        state = typer.style(f"{row.state:<10}", fg=colors[row.state])
        typer.echo(f"{state} {row.file}  {row.detail}".rstrip())
    typer.echo(f"cache: {cache_dir}")
    if any(r.state != "ok" for r in rows):
        raise typer.Exit(ExitCode.SOURCES)
