"""Assets whose path changes between the check and the read: the stage file's directory may
belong to another user, who swaps a checked directory for a symlink to a root-only one so that
lfsorch (as root) copies its files into /stage, and from there into the partition."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from orchestrator.spec.assets import AssetsChanged, collect_assets, copy_assets, digest_assets

SWAPPED = (
    "stage asset demo/id_rsa: its path no longer leads to the file checked "
    "(a directory on it was replaced by a symlink)"
)


def _swap_after_check(tmp_path: Path) -> tuple[list, Path]:  # type: ignore[type-arg]
    stages = tmp_path / "stages"
    (stages / "demo").mkdir(parents=True)
    (stages / "demo" / "id_rsa").write_text("harmless\n")
    secret = tmp_path / "root-only"
    secret.mkdir(mode=0o700)
    (secret / "id_rsa").write_text("SECRET\n")
    assets = collect_assets(stages, ["demo"])
    os.rename(stages / "demo", stages / "checked")
    os.symlink(secret, stages / "demo")
    return assets, stages


def test_a_directory_swapped_for_a_symlink_after_the_check_is_not_read(tmp_path: Path) -> None:
    assets, _ = _swap_after_check(tmp_path)
    with pytest.raises(AssetsChanged) as raised:
        digest_assets(assets)
    assert raised.value.message == SWAPPED


def test_the_copy_does_not_follow_a_swapped_directory(tmp_path: Path) -> None:
    stages = tmp_path / "stages"
    (stages / "demo").mkdir(parents=True)
    (stages / "demo" / "id_rsa").write_text("SECRET\n")  # same bytes: the digest would match
    assets = collect_assets(stages, ["demo"])
    digest = digest_assets(assets)
    secret = tmp_path / "root-only"
    os.rename(stages / "demo", secret)
    os.symlink(secret, stages / "demo")
    copy = tmp_path / "run" / "stage"
    with pytest.raises(AssetsChanged) as raised:
        copy_assets(assets, copy, digest)
    assert raised.value.message == SWAPPED
    assert not copy.exists()
    assert sorted(os.listdir(tmp_path / "run")) == []
