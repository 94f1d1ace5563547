"""The shipped `debian12` set and the shipped stage files agree: every source a stage declares
is routed by the set, and every file the set routes is one a stage declares."""

from __future__ import annotations

from pathlib import Path

import yaml

from orchestrator.sources.sets import load_source_set

STAGES = Path(__file__).resolve().parents[2] / "stages"
BOOK_STAGES = sorted(p for p in STAGES.glob("ch*.yaml"))


def _declared() -> dict[str, list[str]]:
    """file name -> the stage/package names that declare it (read as plain YAML, so the test
    does not depend on which stage fields this checkout's loader knows)."""
    found: dict[str, list[str]] = {}
    for path in BOOK_STAGES:
        stage = yaml.safe_load(path.read_text())
        for package in stage["packages"]:
            for source in package.get("sources") or []:
                found.setdefault(source["file"], []).append(f"{stage['stage']}/{package['name']}")
    return found


def test_every_book_source_is_in_the_debian12_set() -> None:
    routed = load_source_set("debian12").files
    missing = {file: users for file, users in _declared().items() if file not in routed}
    assert missing == {}


def test_every_debian12_entry_is_used_by_a_stage() -> None:
    declared = _declared()
    unused = sorted(file for file in load_source_set("debian12").files if file not in declared)
    assert unused == []


def test_one_file_name_has_one_declaration_across_stages() -> None:
    digests: dict[str, set[tuple[str | None, str | None]]] = {}
    for path in BOOK_STAGES:
        for package in yaml.safe_load(path.read_text())["packages"]:
            for source in package.get("sources") or []:
                pair = (source.get("sha256"), source.get("md5"))
                digests.setdefault(source["file"], set()).add(pair)
    assert {file: pairs for file, pairs in digests.items() if len(pairs) > 1} == {}
