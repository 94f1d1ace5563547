from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import pytest

from orchestrator.spec.assets import AssetsChanged
from orchestrator.spec.graph import load_plan
from orchestrator.spec.models import parse_duration, parse_size
from orchestrator.spec.stagefile import (
    StageFileError,
    asset_digest,
    copy_stage_assets,
    load_stage_file,
    parse_stage_text,
)


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
    ("value", "message"),
    [
        (float("inf"), "a duration must be a finite number, not inf"),
        (float("nan"), "a duration must be a finite number, not nan"),
        ("99999999999d", "a duration must be at most 7d (604800s), not 99999999999d"),
        ("7d1s", "a duration must be at most 7d (604800s), not 7d1s"),
        (10**400, "a duration of 401 digits is far too large"),
        ("9" * 400, "a duration of 400 characters is far too long"),
    ],
)
def test_durations_are_finite_and_at_most_a_week(value: object, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_duration(value)
    assert str(caught.value) == message


def test_a_week_is_the_longest_duration() -> None:
    assert parse_duration("7d") == 7 * 86400


@pytest.mark.parametrize(
    ("text", "size"),
    [("4096", 4096), (4096, 4096), ("512m", 512 << 20), ("4g", 4 << 30), ("4GiB", 4 << 30),
     ("1.5G", 3 << 29), ("64k", 65536)],
)  # fmt: skip
def test_sizes(text: object, size: int) -> None:
    assert parse_size(text) == size


STAGE_HEAD = "stage: demo\npackages:\n  - {name: a, script: x}\n"


@pytest.mark.parametrize(
    ("resources", "message"),
    [
        ("{cpus: 1000}", f"cpus must be at most this host's {os.cpu_count()} CPUs, not 1000.0"),
        ("{cpus: 0.000001}", "cpus must be at least 0.01, not 1e-06"),
        ("{cpus: .nan}", "cpus must be at least 0.01, not nan"),
        ("{memory: 1}", "memory must be at least 6m (6291456 bytes), not 1 bytes"),
        ("{memory: 5m}", "memory must be at least 6m (6291456 bytes), not 5242880 bytes"),
        (f"{{memory: {10**400}}}", "a size of 401 digits is far too large"),
        ("{pids: 100000000000000000000000}",
         "pids must be between 1 and 4194304, not 100000000000000000000000"),
        ("{pids: 0}", "pids must be between 1 and 4194304, not 0"),
    ],
)  # fmt: skip
def test_resource_limits_the_engine_would_refuse(resources: str, message: str) -> None:
    field = resources[1:].split(":")[0]
    assert problems_of(f"resources: {resources}\n{STAGE_HEAD}") == [
        f"s.yaml:1: resources.{field}: {message}"
    ]


def test_resource_limits_at_their_bounds_are_accepted() -> None:
    text = f"resources: {{cpus: 0.01, memory: 6m, pids: 4194304}}\n{STAGE_HEAD}"
    resources = parse_stage_text(text, Path("s.yaml")).stage.resources
    assert (resources.cpus, resources.memory, resources.pids) == (0.01, 6 << 20, 4194304)


def test_anchors_and_aliases_are_refused_with_their_line() -> None:
    text = "stage: demo\npackages:\n  - &p {name: a, script: x}\n  - *p\n"
    assert problems_of(text) == [
        "s.yaml:3: (yaml): YAML anchors and aliases (& and *) are not allowed in stage files"
    ]


def test_deep_nesting_is_an_error_not_a_crash() -> None:
    assert problems_of("stage: " + "[" * 5000 + "]" * 5000 + "\n") == [
        "s.yaml:1: (yaml): invalid YAML: nested too deeply"
    ]


@pytest.mark.parametrize(
    ("assets", "message"),
    [
        ("[/etc/passwd]", "'/etc/passwd' is absolute; name assets relative to the stage file"),
        ("[demo/../../x]", "'demo/../../x' contains '..'; assets must stay beside the stage file"),
        ("[./]", "name files or a subdirectory, not the stage file's own directory as a whole"),
    ],
)
def test_asset_paths_cannot_leave_the_stage_directory(assets: str, message: str) -> None:
    assert problems_of(f"assets: {assets}\n{STAGE_HEAD}") == [f"s.yaml:1: assets[0]: {message}"]


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


def asset_stage(tmp_path: Path, assets: str) -> Path:
    return write(tmp_path, "s.yaml", f"stage: demo\nassets: {assets}\n{STAGE_HEAD[12:]}")


def load_problems(path: Path) -> list[str]:
    with pytest.raises(StageFileError) as caught:
        load_stage_file(path)
    return [str(p) for p in caught.value.problems]


def test_assets_are_collected_digested_and_copied_with_plain_modes(tmp_path: Path) -> None:
    (tmp_path / "demo/sub").mkdir(parents=True)
    (tmp_path / "demo/hello.c").write_text("int main(void) { return 0; }\n")
    (tmp_path / "demo/run.sh").write_text("#!/bin/sh\n")
    (tmp_path / "demo/run.sh").chmod(0o4755)
    (tmp_path / "demo/sub/link.h").symlink_to("../hello.c")
    (tmp_path / "other.txt").write_text("not declared\n")
    stage_file = load_stage_file(asset_stage(tmp_path, "demo/"))
    assert [a.relative for a in stage_file.assets] == [
        "demo", "demo/hello.c", "demo/run.sh", "demo/sub", "demo/sub/link.h"
    ]  # fmt: skip
    copies = copy_stage_assets([stage_file], tmp_path / "run")
    root = copies["demo"]
    copied = {str(p.relative_to(root)): stat.S_IMODE(p.lstat().st_mode) for p in root.rglob("*")}
    assert copied == {
        "demo": 0o755, "demo/hello.c": 0o644, "demo/run.sh": 0o755, "demo/sub": 0o755,
        "demo/sub/link.h": 0o644,
    }  # fmt: skip
    assert (root / "demo/sub/link.h").read_text() == "int main(void) { return 0; }\n"
    assert not (root / "other.txt").exists()


def test_asset_digest_follows_content(tmp_path: Path) -> None:
    (tmp_path / "a.c").write_text("one\n")
    path = asset_stage(tmp_path, "a.c")
    first = load_stage_file(path).asset_digest
    assert load_stage_file(path).asset_digest == first
    (tmp_path / "a.c").write_text("two\n")
    assert load_stage_file(path).asset_digest != first
    assert parse_stage_text(STAGE_HEAD, Path("s.yaml")).asset_digest != first


def test_assets_changed_after_reading_are_not_copied(tmp_path: Path) -> None:
    (tmp_path / "a.c").write_text("one\n")
    stage_file = load_stage_file(asset_stage(tmp_path, "[a.c]"))
    (tmp_path / "a.c").write_text("two\n")
    with pytest.raises(AssetsChanged) as caught:
        copy_stage_assets([stage_file], tmp_path / "run")
    assert str(caught.value) == (
        "the stage's assets changed since the stage file was read\n"
        "  hint: run the command again once they stop changing"
    )
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_socket_fifo_and_escaping_symlink_in_assets_are_refused(tmp_path: Path) -> None:
    (tmp_path / "demo").mkdir()
    os.mkfifo(tmp_path / "demo/pipe")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(tmp_path / "sock"))
    (tmp_path / "out").symlink_to("/etc/hostname")
    (tmp_path / "loop").mkdir()
    (tmp_path / "loop/again").symlink_to("..")
    try:
        path = asset_stage(tmp_path, "[demo, sock, out, missing, loop]")
        for index, expected in enumerate(
            [
                "demo/pipe is a FIFO; only regular files and directories can be assets",
                "sock is a socket; only regular files and directories can be assets",
                "out: resolves to /etc/hostname, outside the stage file's directory",
                "missing: no such file or directory",
                "loop/again: a symlink leads back to a directory above it",
            ]
        ):
            declared = ["demo", "sock", "out", "missing", "loop"][index]
            one = asset_stage(tmp_path, f"[{declared}]")
            assert load_problems(one) == [f"{one}:2: assets[0]: {expected}"]
        assert len(load_problems(path)) == 1  # the first refused asset stops the walk
    finally:
        listener.close()


def test_asset_digest_of_the_stage_file(tmp_path: Path) -> None:
    (tmp_path / "a.c").write_text("one\n")
    stage_file = load_stage_file(asset_stage(tmp_path, "[a.c]"))
    assert asset_digest(stage_file) == stage_file.asset_digest
    assert len(asset_digest(stage_file)) == 64
