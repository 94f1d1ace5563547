"""`lfsorch images`: make the base image and the LFS build host, and list them."""

from __future__ import annotations

import sys
from datetime import datetime

import typer
from rich.console import Console
from rich.table import Table

from orchestrator import api
from orchestrator.execution.images import BASE_IMAGE, DEFAULT_SUITE, HOST_IMAGE, Progress

app = typer.Typer(
    help="Build the images LFS is built in (base via pull or debootstrap, then the host).",
    no_args_is_help=True,
)


def _progress() -> Progress:
    """Plain lines for logs and pipes; a single dim status line would hide failures in CI."""
    if sys.stdout.isatty():
        console = Console(highlight=False)
        return lambda line: console.print(line, style="dim", markup=False)
    return lambda line: print(line, flush=True)


@app.command()
def bootstrap(
    suite: str = typer.Option(DEFAULT_SUITE, help="Debian suite to bootstrap."),
    mirror: str | None = typer.Option(
        None, help="Debian mirror URL; default: the one this machine's apt uses."
    ),
) -> None:
    """Make lfsorch/base from scratch with debootstrap (no registry needed; runs as root)."""
    image_id = api.bootstrap_base_image(suite, mirror, progress=_progress())
    print(f"{BASE_IMAGE} {image_id}")


@app.command()
def build(
    rebuild: bool = typer.Option(False, "--rebuild", help="Ignore the layer cache."),
    tag: str = typer.Option(HOST_IMAGE, help="Tag for the host image."),
) -> None:
    """Build the LFS build host (pulls or bootstraps the base first when it is missing)."""
    image_id = api.build_host_image(tag, rebuild=rebuild, progress=_progress())
    print(f"{tag} {image_id}")


@app.command("list")
def list_() -> None:
    """Show lfsorch's images in the engine with their ids and sizes."""
    found = api.list_images()
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
