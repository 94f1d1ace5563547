"""`lfsorch snapshots` (list, show, verify, prune, image, pull) and `lfsorch restore`: thin
over the api."""

from __future__ import annotations

import json
import sys
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.table import Table

from orchestrator import api
from orchestrator.checkpoints.store import IMAGE_REPOSITORY
from orchestrator.cli.interrupt import stop_on_sigterm
from orchestrator.errors import ConfigError, LfsorchError
from orchestrator.monitor.console import printable
from orchestrator.spec.models import parse_size

if TYPE_CHECKING:
    from orchestrator.checkpoints.store import SnapshotInfo

snapshots_app = typer.Typer(
    help="Checkpoints of the LFS partition taken after each stage.", no_args_is_help=True
)


def _max_size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError:
        raise ConfigError(
            f"--max-size {text!r} is not a size", hint="write e.g. 10G or 500M"
        ) from None


def _human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def _when(info: SnapshotInfo) -> str:
    return datetime.fromtimestamp(info.created).strftime("%Y-%m-%d %H:%M:%S")


def _say(text: str) -> None:
    """A line made of what a manifest says: the store is not trusted, so no raw escapes."""
    print(printable(text))


@snapshots_app.command("list")
def list_() -> None:
    """Show snapshots, oldest first: key, stage, kind, sizes."""
    broken: list[str] = []
    found = api.list_snapshots(broken)
    for problem in broken:
        _say(f"broken: {problem}")
    if not found:
        print("no snapshots")
        return
    table = Table("key", "stage", "created", "kind", "archive", "tree", "entries")
    for info in found:
        kind = f"delta of {info.delta_of[:12]}" if info.delta_of else "full"
        table.add_row(
            info.key[:16],
            printable(info.stage),
            _when(info),
            kind,
            _human(info.archive_size),
            _human(info.tree_bytes),
            str(info.entries),
        )
    Console(highlight=False, markup=False).print(table)


@snapshots_app.command()
def show(
    key_or_stage: str = typer.Argument(..., metavar="KEY|STAGE"),
    show_definition: bool = typer.Option(
        False, "--definition", help="Also print the stage definition it was built from."
    ),
) -> None:
    """Show one snapshot: manifest summary, and the inputs its key was made of."""
    info, manifest = api.snapshot_details(key_or_stage)
    _say(f"key:       {info.key}")
    _say(f"stage:     {info.stage}")
    _say(f"created:   {_when(info)}")
    _say(f"parent:    {info.parent or '-'}")
    _say(f"delta of:  {info.delta_of or '- (full)'}")
    _say(f"archive:   {_human(info.archive_size)} {manifest.digest} {manifest.archive_digest}")
    _say(f"tree:      {_human(info.tree_bytes)} in {info.entries} entries")
    carried = sum(1 for entry in manifest.entries.values() if entry.layer == info.key)
    _say(f"carries:   {carried} entries; deletes {len(manifest.deleted)}")
    meta = dict(manifest.metadata)
    if "image" in meta:
        _say(f"image:     {meta.pop('image')}")
    if "sources" in meta:
        sources = meta.pop("sources")
        _say(f"sources:   {len(sources)} file(s)")
        for file, checksum in sorted(sources.items()):
            _say(f"  {file}  {checksum or '(no checksum)'}")
    definition = meta.pop("definition", None)
    if definition is not None:
        packages = definition.get("packages") or [definition.get("package", {})]
        names = ", ".join(str(p.get("name")) for p in packages if p)
        _say(f"built by:  {names or '-'}" + ("" if show_definition else "  (--definition)"))
    hashed, neutral = meta.pop("inputs", None), meta.pop("neutral", None)
    for name, value in sorted(meta.items()):
        _say(f"meta {name}: {value}")
    if show_definition and hashed is not None:
        _say(f"hashed:    {', '.join(hashed)}")
        left_out = [f"{name} ({value})" for name, value in sorted((neutral or {}).items())]
        _say(f"neutral:   {', '.join(left_out) or '-'}")
    if show_definition and definition is not None:
        print(json.dumps(definition, indent=2, sort_keys=True))


@snapshots_app.command()
def verify(key_or_stage: str = typer.Argument(..., metavar="KEY|STAGE")) -> None:
    """Check archive digests and that every archive matches its manifest."""
    info, problems = api.verify_snapshot(key_or_stage)
    if problems:
        for problem in problems:
            _say(problem)
        raise LfsorchError(
            f"snapshot {info.stage} ({info.key[:12]}) failed verification "
            f"({len(problems)} problem(s))",
            hint="delete it and snapshot the stage again",
        )
    _say(f"snapshot {info.stage} ({info.key[:12]}): ok")


@snapshots_app.command()
def prune(
    keep: int | None = typer.Option(None, "--keep", min=0, help="Keep the newest N."),
    max_size: str | None = typer.Option(
        None, "--max-size", help="Keep the newest ones whose archives fit, e.g. 10G."
    ),
) -> None:
    """Remove old snapshots; a kept delta whose base goes becomes a full snapshot first.

    Refused while a run holds the workspace."""
    if keep is None and max_size is None:
        raise ConfigError("prune needs --keep N and/or --max-size SIZE")
    limit = _max_size(max_size) if max_size is not None else None
    result = api.prune_snapshots(keep_last=keep, max_bytes=limit)
    for key in result.rebased:
        print(f"rebased {key} onto a full snapshot (its base was removed)")
    for key in result.removed:
        print(f"removed {key}")
    print(f"{len(result.removed)} snapshot(s) removed, {_human(max(result.freed_bytes, 0))} freed")


@snapshots_app.command()
def image(key_or_stage: str = typer.Argument(..., metavar="KEY|STAGE")) -> None:
    """Turn a snapshot into a single-layer Docker image labelled with its key (to push)."""
    key, image_id = api.snapshot_image(key_or_stage)
    print(f"{IMAGE_REPOSITORY}:{key} {image_id}")


@snapshots_app.command()
def pull(image_ref: str = typer.Argument(..., metavar="IMAGE")) -> None:
    """Add the snapshot a snapshot image holds to this workspace (pulling it if absent)."""
    info = api.pull_snapshot(image_ref)
    _say(f"snapshot {info.stage} ({info.key[:12]}) added: runs whose stages lead to it "
          "start after it")  # fmt: skip


def restore(
    target: str = typer.Argument(
        ..., metavar="STAGE|KEY|IMAGE", help="Stage name, snapshot key, or with --image an image."
    ),
    lfs: Path = typer.Option(..., "--lfs", help="The LFS directory to make equal the snapshot."),
    image: bool = typer.Option(
        False, "--image", help="TARGET is a snapshot image (`lfsorch snapshots image`)."
    ),
) -> None:
    """Make the LFS directory equal a snapshot (by stage or key); refuses unsafe archives."""
    stop_on_sigterm()
    info = api.restore(target, lfs, image=image, notify=lambda line: print(line, file=sys.stderr))
    _say(f"restored {info.stage} ({info.key[:12]}) into {lfs}")
