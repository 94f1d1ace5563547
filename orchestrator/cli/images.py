"""`lfsorch images`: make the base image and the LFS build host, and list them."""

from __future__ import annotations

import sys
from datetime import datetime

import typer
from rich.console import Console
from rich.table import Table

from orchestrator.execution import engine, images
from orchestrator.workspace import Workspace

app = typer.Typer(
    help="Build the images LFS is built in (base via pull or debootstrap, then the host).",
    no_args_is_help=True,
)


def _progress() -> images.Progress:
    """Plain lines for logs and pipes; a single dim status line would hide failures in CI."""
    if sys.stdout.isatty():
        console = Console(highlight=False)
        return lambda line: console.print(line, style="dim", markup=False)
    return lambda line: print(line, flush=True)


@app.command()
def bootstrap(
    suite: str = typer.Option(images.DEFAULT_SUITE, help="Debian suite to bootstrap."),
    mirror: str | None = typer.Option(
        None, help="Debian mirror URL; default: the one this machine's apt uses."
    ),
) -> None:
    """Make lfsorch/base from scratch with debootstrap (no registry needed; runs as root)."""
    client = engine.connect()
    image_id = images.bootstrap_base(
        client, Workspace.from_env(), suite=suite, mirror=mirror, progress=_progress()
    )
    print(f"{images.BASE_IMAGE} {image_id}")


@app.command()
def build(
    rebuild: bool = typer.Option(False, "--rebuild", help="Ignore the layer cache."),
    tag: str = typer.Option(images.HOST_IMAGE, help="Tag for the host image."),
) -> None:
    """Build the LFS build host (pulls or bootstraps the base first when it is missing)."""
    client = engine.connect()
    image_id = images.build_host(
        client, Workspace.from_env(), tag=tag, rebuild=rebuild, progress=_progress()
    )
    print(f"{tag} {image_id}")


@app.command("list")
def list_() -> None:
    """Show lfsorch's images in the engine with their ids and sizes."""
    found = images.list_images(engine.connect())
    if not found:
        print("no lfsorch images; run `lfsorch images build`")
        return
    table = Table("image", "id", "size", "created", box=None)
    for info in found:
        table.add_row(", ".join(info.tags), info.id[7:19], _size(info.size), _date(info.created))
    Console(highlight=False).print(table)


def _size(size: int) -> str:
    return f"{size / 1e6:.0f} MB" if size < 1e9 else f"{size / 1e9:.2f} GB"


def _date(created: str) -> str:
    try:
        return datetime.fromisoformat(created[:19]).strftime("%Y-%m-%d %H:%M")
    except ValueError:
        return created
