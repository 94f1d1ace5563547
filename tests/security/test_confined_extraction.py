"""Defence in depth: with the validator bypassed, extraction still changes nothing outside the
staging directory, because tar runs where nothing else is writable."""

from __future__ import annotations

import os
from pathlib import Path

import docker
import pytest

from orchestrator.checkpoints import extract
from orchestrator.checkpoints.extract import ContainerExtractor, Layer, SandboxExtractor
from orchestrator.checkpoints.store import SnapshotStore
from orchestrator.checkpoints.tarstream import ArchiveError, Member, MemberPolicy
from tests.helpers import tree_state
from tests.security.tarcraft import (
    ATTACK,
    assert_canary_intact,
    canary_state,
    chain_manifest_omits_symlink,
    end,
    member,
    plant_canary,
)

SOURCE = "hostile"


class AcceptEverything(MemberPolicy):
    """A validator with a hole as large as it gets."""

    def check(self, member: Member) -> None:
        pass

    def check_path(self, name: str) -> None:
        pass


def _hostile_layers(outside: Path, escape_name: str) -> list[Layer]:
    """Layer 1 lays symlinks out of the tree (absolute, to /, up with '..', through /proc); layer 2
    deletes and writes through them and hard-links to what lies behind them."""
    links = (
        member(b"x", b"2", linkname=bytes(outside))
        + member(b"root", b"2", linkname=b"/")
        + member(b"up", b"2", linkname=b"../" * 16 + bytes(outside)[1:])
        + member(b"proc", b"2", linkname=b"/proc/1/root" + bytes(outside))
        + end()
    )
    through = (
        member(b"root/" + escape_name.encode(), data=ATTACK)
        + member(b"root/usr/" + escape_name.encode(), data=ATTACK)
        + member(b"x/victim", data=ATTACK, mode=0o6777)
        + member(b"up/victim", data=ATTACK, mode=0o6777)
        + member(b"proc/victim", data=ATTACK, mode=0o6777)
        + member(b"x/dropped", data=ATTACK, mode=0o6777)
        + member(b"hard", b"1", linkname=b"x/victim")
        + end()
    )
    return [
        Layer([links], AcceptEverything(SOURCE)),
        Layer([through], AcceptEverything(SOURCE), delete_before=["x/victim", "up/victim"]),
    ]


def _assert_nothing_escaped(victim: Path, canary: dict[str, object], escape: str) -> None:
    assert_canary_intact(victim, canary)  # type: ignore[arg-type]
    assert not os.path.lexists(f"/{escape}")
    assert not os.path.lexists(f"/usr/{escape}")


def test_the_sandbox_keeps_a_bypassed_validator_inside_the_staging_dir(tmp_path: Path) -> None:
    assert extract.sandbox_problem() is None
    victim = plant_canary(tmp_path / "outside")
    canary = canary_state(victim.parent)
    staging = tmp_path / "staging"
    staging.mkdir()
    escape = f"lfsorch-escape-{os.getpid()}-sandbox"
    with pytest.raises(ArchiveError) as caught:
        SandboxExtractor(staging).extract(_hostile_layers(victim.parent, escape))
    first_line = caught.value.message.splitlines()[0]
    assert first_line == (
        f"tar could not extract {SOURCE} (exit 2): "
        f"tar: root/usr/{escape}: Cannot open: Read-only file system"
    )
    _assert_nothing_escaped(victim, canary, escape)
    assert not os.path.lexists(staging / "hard")  # link() found no file behind the symlink


@pytest.mark.docker
@pytest.mark.usefixtures("no_leftovers")
def test_the_container_keeps_a_bypassed_validator_inside_the_staging_dir(
    tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    victim = plant_canary(tmp_path / "outside")
    canary = canary_state(victim.parent)
    staging = tmp_path / "staging"
    staging.mkdir()
    escape = f"lfsorch-escape-{os.getpid()}-container"
    with pytest.raises(ArchiveError) as caught:
        ContainerExtractor(docker_client, staging).extract(_hostile_layers(victim.parent, escape))
    assert caught.value.message.startswith("tar in the restore container failed (exit 2): ")
    assert f"tar: root/{escape}: Cannot open: Read-only file system" in caught.value.message
    _assert_nothing_escaped(victim, canary, escape)
    assert not os.path.lexists(staging / "hard")


def test_restore_with_the_member_checks_switched_off_still_writes_nothing_outside(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(MemberPolicy, "check", lambda self, member: None)
    victim = plant_canary(tmp_path / "outside")
    canary = canary_state(victim.parent)
    partition = tmp_path / "lfs"
    partition.mkdir()
    (partition / "kept").write_text("built earlier")
    before = tree_state(partition)
    store = SnapshotStore(tmp_path / "snapshots")
    tip = chain_manifest_omits_symlink(store.root, victim.parent)
    with pytest.raises(ArchiveError) as caught:
        store.restore(tip, partition)
    assert caught.value.message.splitlines()[0] == (
        "tar could not extract snapshot ch5 (a2) (exit 2): "
        "tar: x/victim: Cannot open: No such file or directory"
    )
    assert_canary_intact(victim, canary)
    assert tree_state(partition) == before


def test_no_extractor_runs_unconfined() -> None:
    assert not hasattr(extract, "HostExtractor")
    assert extract.confined_extractor(Path("/nonexistent"), isolate=False).__class__ in (
        SandboxExtractor,
        ContainerExtractor,
    )
