from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.graph import load_plan
from orchestrator.models import parse_duration, parse_size
from orchestrator.stagefile import StageFileError, parse_stage_text


def problems_of(text: str, name: str = "s.yaml") -> list[str]:
    with pytest.raises(StageFileError) as caught:
        parse_stage_text(text, Path(name))
    return [str(p) for p in caught.value.problems]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90", 90),
        (90, 90),
        ("90s", 90),
        ("10m", 600),
        ("1h30m", 5400),
        ("2d", 172800),
        ("1.5h", 5400),
    ],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["10x", "", "m10", "-5s", "0s", True])
def test_bad_durations(text: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize(
    ("text", "size"),
    [("4096", 4096), (4096, 4096), ("512m", 512 << 20), ("4g", 4 << 30), ("4GiB", 4 << 30),
     ("1.5G", 3 << 29), ("64k", 65536)],
)  # fmt: skip
def test_sizes(text: object, size: int) -> None:
    assert parse_size(text) == size


def test_valid_stage_parses_with_defaults() -> None:
    stage_file = parse_stage_text(
        "stage: demo\npackages:\n  - name: a\n    script: 'true'\n", Path("s.yaml")
    )
    stage = stage_file.stage
    assert stage.stage == "demo"
    assert stage.retries_for(stage.packages[0]) == 0
    assert stage.timeout_for(stage.packages[0], 123.0) == 123.0
    assert stage.network_for(stage.packages[0]) is False


def test_yaml_syntax_error_has_line() -> None:
    assert problems_of("stage: demo\npackages:\n  - name: [a\n") == [
        "s.yaml:4: (yaml): invalid YAML: expected ',' or ']', but got '<stream end>'"
    ]


def test_all_schema_errors_at_once_with_lines_and_paths() -> None:
    text = """\
stage: Demo
timeout: 10x
colour: blue
resources: {memory: lots}
packages:
  - name: a
    script: echo a
    retries: -1
  - name: b
"""
    assert problems_of(text) == [
        "s.yaml:1: stage: String should match pattern '^[a-z0-9][a-z0-9._+-]*$'",
        "s.yaml:4: resources.memory: 'lots' is not a size (use e.g. 512m, 4g)",
        "s.yaml:2: timeout: '10x' is not a duration (use e.g. 90s, 10m, 1h30m)",
        "s.yaml:8: packages[0].retries: Input should be greater than or equal to 0",
        "s.yaml:9: packages[1].script: required key is missing",
        "s.yaml:3: colour: unknown key",
    ]


def test_duplicate_key_is_an_error() -> None:
    text = "stage: demo\nstage: other\npackages:\n  - name: a\n    script: x\n"
    assert problems_of(text) == ["s.yaml:2: stage: key given twice"]


def test_not_a_mapping() -> None:
    assert problems_of("- a\n- b\n") == ["s.yaml:1: (file): expected a mapping with a 'stage' key"]


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_graph_errors_all_at_once(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "g.yaml",
        """\
stage: g
packages:
  - name: a
    depends: [c]
    script: x
  - name: b
    depends: [a, ghost]
    script: x
  - name: c
    depends: [b]
    script: x
  - name: a
    script: x
  - name: d
    depends: [d]
    script: x
""",
    )
    with pytest.raises(StageFileError) as caught:
        load_plan([path])
    assert [str(p) for p in caught.value.problems] == [
        f"{path}:12: packages[3].name: duplicate package 'a' (first defined at packages[0])",
        f"{path}:7: packages[1].depends[1]: unknown package 'ghost' (not defined in stage 'g')",
        f"{path}:15: packages[4].depends[0]: package 'd' depends on itself",
        f"{path}:4: packages[0].depends: dependency cycle: a -> b -> c -> a",
    ]


def test_levels_and_required_stage_found_beside(tmp_path: Path) -> None:
    write(tmp_path, "one.yaml", "stage: one\npackages:\n  - {name: x, script: x}\n")
    two = write(
        tmp_path,
        "two.yaml",
        """\
stage: two
requires: [one]
packages:
  - {name: top, script: x}
  - {name: left, depends: [top], script: x}
  - {name: right, depends: [top], script: x}
  - {name: bottom, depends: [left, right], script: x}
""",
    )
    plan = load_plan([two])
    assert plan.as_json() == {
        "stages": [
            {"stage": "one", "levels": [["x"]]},
            {"stage": "two", "levels": [["top"], ["left", "right"], ["bottom"]]},
        ]
    }


def test_unknown_required_stage_and_stage_cycle(tmp_path: Path) -> None:
    lonely_text = "stage: lonely\nrequires: [nowhere]\npackages:\n  - {name: x, script: x}\n"
    lonely = write(tmp_path, "lonely.yaml", lonely_text)
    with pytest.raises(StageFileError) as caught:
        load_plan([lonely])
    assert [str(p) for p in caught.value.problems] == [
        f"{lonely}:2: requires[0]: unknown stage 'nowhere' (no nowhere.yaml beside this file "
        "and no file given defines it)"
    ]
    a = write(tmp_path, "a.yaml", "stage: a\nrequires: [b]\npackages:\n  - {name: x, script: x}\n")
    write(tmp_path, "b.yaml", "stage: b\nrequires: [a]\npackages:\n  - {name: x, script: x}\n")
    with pytest.raises(StageFileError) as caught:
        load_plan([a])
    assert [str(p) for p in caught.value.problems] == [f"{a}:2: requires: stage cycle: a -> b -> a"]


def test_repository_stage_files_validate() -> None:
    stages = Path(__file__).resolve().parents[2] / "stages"
    files = sorted(stages.glob("*.yaml"))
    assert files, "the repository ships stage files"
    plan = load_plan(files)
    assert {"demo"} <= {s.name for s in plan.stages}


def test_ch6_plan_builds_the_stages_it_requires_first() -> None:
    stages = Path(__file__).resolve().parents[2] / "stages"
    plan = load_plan([stages / "ch6.yaml"]).as_json()["stages"]
    assert [s["stage"] for s in plan] == ["ch4", "ch5", "ch6"]  # type: ignore[index]
    ch5 = [level for s in plan if s["stage"] == "ch5" for level in s["levels"]]  # type: ignore[index]
    assert ch5 == [["binutils-pass1"], ["gcc-pass1"], ["linux-headers"], ["glibc"], ["libstdcxx"]]
    ch6 = next(s["levels"] for s in plan if s["stage"] == "ch6")  # type: ignore[index]
    assert ch6[0] == ["cross-toolchain-check"]
    assert ch6[-2:] == [["gcc-pass2"], ["temporary-tools-check"]]
