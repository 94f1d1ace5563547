"""Text from a snapshot store (a manifest's stage name), a stage file's path or the
configuration reaches the terminal: rich markup in it (`[/x]`) was a traceback and hid one
snapshot behind another, `[b]` vanished from a path, and terminal escapes went out raw."""

from __future__ import annotations

from pathlib import Path

from orchestrator.checkpoints.store import SnapshotStore
from orchestrator.workspace import Workspace
from tests.helpers import run_cli

HOSTILE = "\x1b]0;owned\x07\x1b[2J[/x][link=file:///etc/shadow]y"
SHOWN = "\\x1b]0;owned\\x07\\x1b[2J[/x][link=file:///etc/shadow]y"


def _store_with_hostile_stage(workspace: Workspace, tmp_path: Path) -> str:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "file").write_bytes(b"content\n")
    key = "a" * 64
    SnapshotStore(workspace.snapshots_dir).create(
        tree, key, stage=HOSTILE, parent=None, metadata={}
    )
    return key


def test_snapshots_list_and_show_print_a_hostile_stage_name_as_text(
    workspace: Workspace, tmp_path: Path
) -> None:
    key = _store_with_hostile_stage(workspace, tmp_path)
    listed = run_cli("snapshots", "list", env={"COLUMNS": "400"})
    assert (listed.returncode, listed.stderr) == (0, "")
    assert SHOWN in listed.stdout
    assert "\x1b" not in listed.stdout

    shown = run_cli("snapshots", "show", key[:12])
    assert (shown.returncode, shown.stderr) == (0, "")
    assert f"stage:     {SHOWN}\n" in shown.stdout
    assert "\x1b" not in shown.stdout


def test_a_path_with_brackets_is_printed_as_it_is(tmp_path: Path) -> None:
    directory = tmp_path / "[bold]x"
    directory.mkdir()
    path = directory / "s.yaml"
    path.write_text("stage: s\npackages: [{name: a, script: 'true'}]\n")
    result = run_cli("validate", str(path))
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == f"{path}: stage s: 1 package(s), valid\n"


def test_config_show_prints_markup_in_a_value_as_text(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text('environment: {A: "[/oops]"}\n')
    result = run_cli("config", "show", env={"LFSORCH_CONFIG": str(config), "COLUMNS": "400"})
    assert (result.returncode, result.stderr) == (0, "")
    assert '{"A": "[/oops]"}' in result.stdout
