"""Variables that expand to more than a build can receive: `$NAME` references nest, so a stage
file of a few kilobytes (seven variables, each naming the one before a hundred times) would
expand to terabytes when a run merges the environment."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from orchestrator.workspace import Workspace
from tests.helpers import BASE_IMAGE, run_cli

TOO_LARGE = "expands to more than 128 KiB, the most one variable can hold in a build"


def _bomb() -> str:
    lines = ["stage: bomb", "environment:", "  A: " + "x" * 1000]
    for previous, name in zip("ABCDEF", "BCDEFG", strict=True):
        lines.append(f"  {name}: '" + f"${previous}" * 100 + "'")
    return "\n".join([*lines, "packages:", "  - name: a", "    script: 'true'", ""])


def test_validate_refuses_a_variable_that_expands_past_the_limit(
    stage_file: Callable[[str, str], Path],
) -> None:
    path = stage_file("bomb.yaml", _bomb())
    result = run_cli("validate", str(path), timeout=60)
    assert result.returncode == 2
    assert result.stderr == f"{path}:5: environment.C: environment variable C {TOO_LARGE}\n"


@pytest.mark.docker
@pytest.mark.usefixtures("no_leftovers")
def test_run_refuses_a_configuration_variable_that_a_stage_expands_past_the_limit(
    workspace: Workspace, lfs_dir: Path, stage_file: Callable[[str, str], Path]
) -> None:
    references = "$FOO" * 100
    path = stage_file(
        "ref.yaml",
        f"""
        stage: ref
        image: {BASE_IMAGE}
        environment: {{B: "{references}"}}
        packages: [{{name: a, script: "echo built > /mnt/lfs/built"}}]
        """,
    )
    result = run_cli(
        "run",
        str(path),
        "--lfs",
        str(lfs_dir),
        env={"LFSORCH_ENVIRONMENT": "{FOO: " + "y" * 2000 + "}"},
    )
    assert result.returncode == 2
    assert result.stderr == (
        f"error: environment variable B {TOO_LARGE}\n"
        "  hint: shorten it, or keep large data in a file under /stage\n"
    )
    assert [name for name in os.listdir(lfs_dir) if not name.startswith(".lfsorch")] == []
