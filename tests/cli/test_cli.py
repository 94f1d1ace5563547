"""The CLI's offline commands, run as a user runs them."""

from __future__ import annotations

import json
from pathlib import Path

from tests.helpers import run_cli


def test_validate_reports_every_error_and_creates_nothing(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "stage: bad\npackages:\n  - name: a\n    depends: [b]\n    script: x\n"
        "  - name: b\n    depends: [a, nope]\n    script: x\n"
    )
    broken = tmp_path / "broken.yaml"
    broken.write_text("stage: broken\npackages: [\n")
    before = sorted(tmp_path.iterdir())
    result = run_cli("validate", str(bad), str(broken), home=tmp_path / "home")
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"{broken}:3: (yaml): invalid YAML: expected the node content, but found '<stream end>'",
        f"{bad}:7: packages[1].depends[1]: unknown package 'nope' (not defined in stage 'bad')",
        f"{bad}:4: packages[0].depends: dependency cycle: a -> b -> a",
    ]
    assert sorted(tmp_path.iterdir()) == before  # no workspace, nothing else


def test_plan_json_and_schema(tmp_path: Path) -> None:
    result = run_cli("plan", "--json", "stages/demo.yaml", home=tmp_path / "home")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "stages": [
            {"stage": "demo", "levels": [["layout"], ["crc32", "libgreet"], ["hello"], ["release"]]}
        ]
    }
    schema = json.loads(run_cli("schema", home=tmp_path / "home").stdout)
    assert schema["title"] == "lfsorch stage file"
    assert schema["additionalProperties"] is False
    assert "packages" in schema["required"]


def test_config_show_names_the_origin(tmp_path: Path) -> None:
    result = run_cli("config", "show", "--json", "-o", "parallel_builds=3", home=tmp_path / "h")
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["parallel_builds"] == {"value": 3, "from": "command line"}
    assert shown["image"]["from"] == "default"


def test_status_without_a_run(tmp_path: Path) -> None:
    result = run_cli("status", home=tmp_path / "home")
    assert result.returncode == 1
    assert result.stderr.splitlines()[0] == "error: no run recorded yet"
