"""The lock file: hostile locks get exact errors and harm nothing; every kind of difference
between a lock and a run is named."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from orchestrator.config import load_config
from orchestrator.lockfile import (
    Lock,
    LockedImage,
    LockError,
    differences,
    make_lock,
    read_lock,
    write_lock,
)
from orchestrator.spec.graph import load_plan
from tests.helpers import tree_state

WriteStage = Callable[[str, str], Path]
IMAGE = "sha256:" + "ab" * 32
OTHER = "sha256:" + "ef" * 32
DIGEST = "12" * 32


def _valid() -> dict[str, Any]:
    return {
        "lfsorch_lock": 1,
        "stages": ["one"],
        "images": {"lfsorch/host:bookworm": {"id": IMAGE, "pull": None}},
        "source_set": "upstream",
        "sources": {"m4-1.4.19.tar.xz": DIGEST},
        "source_date_epoch": 1677628800,
        "settings": {
            "makeflags": "",
            "environment": {},
            "network": False,
            "run_tests": False,
            "output_neutral": ["environment.LFSORCH_ATTEMPT", "makeflags.jobs", "resources"],
        },
    }


def _write(tmp_path: Path, data: Any) -> Path:
    path = tmp_path / "lfsorch.lock"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_a_written_lock_reads_back(tmp_path: Path) -> None:
    lock = Lock.model_validate(_valid())
    path = tmp_path / "out.lock"
    write_lock(lock, path)
    assert read_lock(path) == lock
    assert path.read_text() == lock.text()
    assert [p.name for p in tmp_path.iterdir()] == ["out.lock"]  # no temporary left


def _hostile(name: str) -> dict[str, Any]:
    data = _valid()
    if name == "unknown key":
        data["run_this"] = "rm -rf /"
    elif name == "path as source":
        data["sources"] = {"../../etc/passwd": DIGEST}
    elif name == "image with a path":
        data["images"] = {"/var/run/docker.sock": {"id": IMAGE}}
    elif name == "pull by tag":
        data["images"]["lfsorch/host:bookworm"]["pull"] = "evil.example/host:latest"
    elif name == "huge epoch":
        data["source_date_epoch"] = 10**30
    elif name == "huge makeflags":
        data["settings"]["makeflags"] = "x" * 5000
    elif name == "unknown neutral":
        data["settings"]["output_neutral"] = ["script"]
    elif name == "version":
        data["lfsorch_lock"] = 2
    return data


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("unknown key", "run_this: Extra inputs are not permitted"),
        (
            "path as source",
            "sources.../../etc/passwd.[key]: String should match pattern "
            "'^[A-Za-z0-9_+][A-Za-z0-9._+~-]{0,254}$'",
        ),
        ("image with a path", "images./var/run/docker.sock.[key]: String should match pattern"),
        ("pull by tag", "images.lfsorch/host:bookworm.pull: String should match pattern"),
        ("huge epoch", "source_date_epoch: Input should be less than or equal to 253402300799"),
        ("huge makeflags", "settings.makeflags: String should have at most 4096 characters"),
        (
            "unknown neutral",
            "settings.output_neutral: Value error, 'script' is not an input that can be neutral",
        ),
        ("version", "lfsorch_lock: Input should be 1"),
    ],
)
def test_hostile_locks_get_exact_errors(tmp_path: Path, name: str, message: str) -> None:
    path = _write(tmp_path, _hostile(name))
    before = tree_state(tmp_path)
    with pytest.raises(LockError) as caught:
        read_lock(path)
    assert caught.value.message.startswith(f"{path}: not a valid lock: {message}")
    assert tree_state(tmp_path) == before


def test_odd_lock_files_are_refused_without_reading_them(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.lock"
    os.mkfifo(fifo)
    with pytest.raises(LockError) as caught:
        read_lock(fifo)  # would block for ever if it were opened for a writer
    assert caught.value.message == (
        f"{fifo}: not a regular file (a lock is a JSON file `lfsorch lock` writes)"
    )
    huge = _write(tmp_path, " " * (1 << 20) + json.dumps(_valid()))
    with pytest.raises(LockError) as caught:
        read_lock(huge)
    assert caught.value.message == f"{huge}: larger than 1 MiB (a lock is short)"
    with pytest.raises(LockError) as caught:
        read_lock(Path("/dev/zero"))
    assert caught.value.message == (
        "/dev/zero: not a regular file (a lock is a JSON file `lfsorch lock` writes)"
    )
    broken = _write(tmp_path, '{"lfsorch_lock": 1,')
    with pytest.raises(LockError) as caught:
        read_lock(broken)
    assert caught.value.message.startswith(f"{broken}: not a valid lock: (top): Invalid JSON")
    with pytest.raises(LockError) as caught:
        read_lock(tmp_path)
    assert caught.value.message == (
        f"{tmp_path}: a directory (a lock is a JSON file `lfsorch lock` writes)"
    )


def test_every_difference_is_named(tmp_path: Path, stage_file: WriteStage) -> None:
    path = stage_file(
        "one.yaml",
        f"""
        stage: one
        packages:
          - name: m4
            sources:
              - {{file: m4-1.4.19.tar.xz, url: "https://example.org/m4.tar.xz", sha256: "{DIGEST}"}}
            script: "true"
        """,
    )
    plan = load_plan([path])
    none = tmp_path / "none.yaml"
    settings = load_config([], user_config=none, environ={}).settings
    images = {"lfsorch/host:bookworm": LockedImage(id=IMAGE)}
    locked = make_lock(plan, settings, images, lambda s: s.sha256 or "")
    assert locked == Lock.model_validate(_valid())
    assert differences(locked, locked) == []

    changed = load_config(
        [
            "source_set=debian12",
            "source_date_epoch=1",
            "environment.CFLAGS=-O3",
            "makeflags=-j4 V=1",
            "run_tests=true",
        ],
        user_config=none,
        environ={},
    ).settings
    now = make_lock(plan, changed, {"lfsorch/host:bookworm": LockedImage(id=OTHER)},
                    lambda s: "34" * 32)  # fmt: skip
    assert differences(locked, now) == [
        f"image lfsorch/host:bookworm: locked {IMAGE}, the engine has {OTHER}",
        "source set: locked upstream, the run uses debian12",
        f"source m4-1.4.19.tar.xz: locked {DIGEST}, the set serves {'34' * 32}",
        "source_date_epoch: locked 1677628800, the run uses 1",
        'makeflags: locked "", the run uses "V=1"',
        "run_tests: locked false, the run uses true",
        'environment.CFLAGS: locked (unset), the run uses "-O3"',
    ]
    other_stage = Lock.model_validate({**_valid(), "stages": ["zero"]})
    assert differences(other_stage, locked) == ["stage one: not in the lock (it locks zero)"]


def test_a_source_without_a_known_checksum_cannot_be_locked(
    tmp_path: Path, stage_file: WriteStage
) -> None:
    path = stage_file(
        "one.yaml",
        """
        stage: one
        packages:
          - name: m4
            sources: [{file: m4.tar.xz, url: "https://example.org/m4.tar.xz"}]
            script: "true"
        """,
    )
    settings = load_config([], user_config=tmp_path / "none.yaml", environ={}).settings
    with pytest.raises(LockError) as caught:
        make_lock(load_plan([path]), settings, {"x": LockedImage(id=IMAGE)}, lambda s: "")
    assert caught.value.message == "no checksum known for m4.tar.xz"


def test_writing_a_lock_never_writes_through_a_planted_link(tmp_path: Path) -> None:
    # In a directory others can write to, the temporary's name is known in advance.
    victim = tmp_path / "victim"
    victim.write_text("kept\n")
    shared = tmp_path / "shared"
    shared.mkdir()
    os.symlink(victim, shared / f".lfsorch.lock.tmp-{os.getpid()}")
    lock = Lock.model_validate(_valid())
    write_lock(lock, shared / "lfsorch.lock")
    assert victim.read_text() == "kept\n"
    assert read_lock(shared / "lfsorch.lock") == lock
    planted = f".lfsorch.lock.tmp-{os.getpid()}"
    assert sorted(p.name for p in shared.iterdir()) == [planted, "lfsorch.lock"]
