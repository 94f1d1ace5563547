"""The user's configuration file as whatever LFSORCH_CONFIG names: a FIFO blocked every command
before its first line, /dev/zero filled memory until MemoryError."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import run_cli

HINT = "  hint: point LFSORCH_CONFIG at the YAML file, or remove it\n"


@pytest.mark.parametrize(
    ("make", "why"),
    [
        (lambda path: os.mkfifo(path), "not a regular file (a configuration file is UTF-8 YAML)"),
        (lambda path: os.symlink("/dev/zero", path), None),
        (
            lambda path: path.write_bytes(b"#" * ((1 << 20) + 1)),
            "larger than 1 MiB (a configuration file is short)",
        ),
    ],
    ids=["fifo", "dev-zero", "huge"],
)
def test_a_configuration_file_that_is_not_a_short_regular_file_is_refused_at_once(
    tmp_path: Path,
    make,
    why: str | None,  # type: ignore[no-untyped-def]
) -> None:
    path = tmp_path / "config.yaml"
    make(path)
    result = run_cli(
        "config",
        "show",
        env={"LFSORCH_CONFIG": str(path), "LFSORCH_HOME": str(tmp_path / "h")},
        timeout=30,
    )
    shown = why or "not a regular file (a configuration file is UTF-8 YAML)"
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == f"error: {path}: {shown}\n" + HINT
    assert not (tmp_path / "h").exists()
