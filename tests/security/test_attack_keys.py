"""Checkpoint keys against inputs that reach a build but could hide from its key: the bytes a
source set puts in /sources under a declared name, and MAKEFLAGS that differ only in quotes."""

from __future__ import annotations

import json
from pathlib import Path

from orchestrator.build.inputs import InputsOf, without_job_count
from orchestrator.config import load_config
from orchestrator.sources.cache import SET_MARKER, digest_in_view
from orchestrator.spec.models import Stage
from orchestrator.spec.stagefile import StageFile

DECLARED = "a" * 64  # what the stage file declares (upstream's tarball)
REPACKED = "b" * 64  # what a Debian-derived set maps the same file name to


def _stage() -> StageFile:
    source = {"file": "gcc-12.2.0.tar.xz", "url": "https://example/gcc", "sha256": DECLARED}
    package = {"name": "gcc", "script": "make", "sources": [source]}
    return StageFile(
        Path("s.yaml"), Stage.model_validate({"stage": "s", "packages": [package]}), {}
    )


def _view(root: Path, name: str, mapped: dict[str, str]) -> Path:
    view = root / name
    view.mkdir()
    marker = {"name": name, "mapped": mapped, "trusted": {}}
    (view / SET_MARKER).write_text(json.dumps(marker))
    return view


def _key(tmp_path: Path, view: Path | None, overrides: list[str] = ()) -> str:  # type: ignore[assignment]
    (tmp_path / "none.yaml").write_text("")
    settings = load_config(
        list(overrides),
        system_file=tmp_path / "none.yaml",
        user_config=tmp_path / "none.yaml",
        environ={},
    ).settings
    digest = digest_in_view(view) if view else None
    stage = _stage()
    return InputsOf(settings, lambda _: "sha256:img", digest).key(stage, stage.stage.packages, "p")


def test_a_set_that_maps_a_source_to_other_bytes_changes_the_key(tmp_path: Path) -> None:
    upstream = _view(tmp_path, "upstream", {})
    debian = _view(tmp_path, "debian12", {"gcc-12.2.0.tar.xz": REPACKED})
    same_bytes = _view(tmp_path, "mirror", {"gcc-12.2.0.tar.xz": DECLARED})

    assert _key(tmp_path, upstream) != _key(tmp_path, debian)
    # Where a set gives the very bytes the stage declares, runners still share checkpoints.
    assert _key(tmp_path, upstream) == _key(tmp_path, same_bytes) == _key(tmp_path, None)


def test_quotes_in_makeflags_are_not_lost_from_the_key(tmp_path: Path) -> None:
    # make splits MAKEFLAGS at blanks and knows no quotes: these are two different flag sets.
    assert without_job_count('-j4 V="1 2"') == 'V="1 2"'
    quoted = _key(tmp_path, None, ['makeflags=-j4 V="1 2"'])
    bare = _key(tmp_path, None, ["makeflags=-j4 V=1 2"])
    assert quoted != bare
    assert quoted == _key(tmp_path, None, ['makeflags=-j16 V="1 2"'])


def test_the_order_of_sources_is_in_the_key(tmp_path: Path) -> None:
    # The first source is unpacked and the script starts in it: swapping two is another build.
    def stage_with(*files: str) -> StageFile:
        sources = [{"file": f, "sha256": DECLARED} for f in files]
        package = {"name": "gcc", "script": "make", "sources": sources}
        stage = Stage.model_validate({"stage": "s", "packages": [package]})
        return StageFile(Path("s.yaml"), stage, {})

    (tmp_path / "none.yaml").write_text("")
    settings = load_config(
        [], system_file=tmp_path / "none.yaml", user_config=tmp_path / "none.yaml", environ={}
    ).settings
    of = InputsOf(settings, lambda _: "sha256:img")
    gcc_first = stage_with("gcc-12.2.0.tar.xz", "gmp-6.2.1.tar.xz")
    gmp_first = stage_with("gmp-6.2.1.tar.xz", "gcc-12.2.0.tar.xz")
    assert of.key(gcc_first, gcc_first.stage.packages, "p") != of.key(
        gmp_first, gmp_first.stage.packages, "p"
    )
