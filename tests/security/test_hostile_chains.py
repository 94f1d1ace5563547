"""A snapshot store written by an attacker: restore and verify must refuse, and write nothing
outside the partition, whichever way the archive tries to be read differently by tar.

Each chain lays a symlink `x -> <canary dir outside the partition>` in one layer and then
tries to write `x/victim` (an existing setuid file out there) in a later one.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import docker
import pytest

from orchestrator.checkpoints.store import SnapshotStore
from orchestrator.checkpoints.tarstream import UnsafeArchiveError
from tests.helpers import run_cli, tree_state
from tests.security.tarcraft import (
    Snapshot,
    assert_canary_intact,
    base_with_symlink,
    canary_state,
    chain_manifest_omits_symlink,
    chain_nul_in_pax_path,
    chain_pax_length_with_sign,
    end,
    entry,
    plant_canary,
    write_snapshot,
)

Chain = Callable[[Path, Path], str]  # (store root, canary dir) -> key of the chain's tip


CHAINS: list[tuple[Chain, str]] = [
    (
        chain_manifest_omits_symlink,
        "snapshot ch5 (a2): member 'x/victim' lies below symlink 'x' (would write through it)",
    ),
    (
        chain_pax_length_with_sign,
        "snapshot ch5 (b1): member '(PAX header)' has a malformed PAX record "
        "(length b'+15' is not plain decimal digits)",
    ),
    (
        chain_nul_in_pax_path,
        "snapshot ch5 (c0): member 'x\\x00junk' has a NUL byte in its name",
    ),
]
CHAIN_IDS = ["manifest-omits-symlink", "pax-length-with-sign", "nul-in-pax-path"]


@pytest.fixture
def partition(tmp_path: Path) -> Path:
    """An existing partition with content: a refused restore must leave it as it was."""
    lfs = tmp_path / "lfs"
    (lfs / "usr/bin").mkdir(parents=True)
    (lfs / "usr/bin/bash").write_bytes(b"bash")
    os.symlink("usr/bin", lfs / "bin")
    return lfs


def _assert_untouched(
    tmp_path: Path, partition: Path, before: dict[str, tuple[object, ...]]
) -> None:
    assert tree_state(partition) == before
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".lfs")]
    assert leftovers == []


@pytest.mark.parametrize(("make_chain", "reason"), CHAINS, ids=CHAIN_IDS)
def test_hostile_chain_is_refused_by_restore_on_the_host(
    make_chain: Chain, reason: str, tmp_path: Path, partition: Path
) -> None:
    victim = plant_canary(tmp_path / "outside")
    canary, before = canary_state(victim.parent), tree_state(partition)
    store = SnapshotStore(tmp_path / "snapshots")
    tip = make_chain(store.root, victim.parent)
    with pytest.raises(UnsafeArchiveError) as caught:
        store.restore(tip, partition)
    assert caught.value.message == reason
    assert_canary_intact(victim, canary)
    _assert_untouched(tmp_path, partition, before)


@pytest.mark.docker
@pytest.mark.usefixtures("no_leftovers")
@pytest.mark.parametrize(("make_chain", "reason"), CHAINS, ids=CHAIN_IDS)
def test_hostile_chain_is_refused_by_restore_in_a_container(
    make_chain: Chain,
    reason: str,
    tmp_path: Path,
    partition: Path,
    docker_client: docker.DockerClient,
) -> None:
    victim = plant_canary(tmp_path / "outside")
    canary, before = canary_state(victim.parent), tree_state(partition)
    store = SnapshotStore(tmp_path / "snapshots", isolate=True)
    tip = make_chain(store.root, victim.parent)
    with pytest.raises(UnsafeArchiveError) as caught:
        store.restore(tip, partition, docker_client)
    assert caught.value.message == reason
    assert_canary_intact(victim, canary)
    _assert_untouched(tmp_path, partition, before)


@pytest.mark.parametrize(("make_chain", "reason"), CHAINS, ids=CHAIN_IDS)
def test_hostile_chain_fails_verify_with_the_same_reason(
    make_chain: Chain, reason: str, tmp_path: Path
) -> None:
    victim = plant_canary(tmp_path / "outside")
    canary = canary_state(victim.parent)
    store = SnapshotStore(tmp_path / "snapshots")
    tip = make_chain(store.root, victim.parent)
    assert reason in store.verify(tip)
    assert_canary_intact(victim, canary)


def test_cli_restore_and_verify_refuse_a_hostile_chain(
    tmp_path: Path, partition: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    victim = plant_canary(tmp_path / "outside")
    canary, before = canary_state(victim.parent), tree_state(partition)
    tip = chain_manifest_omits_symlink(home / "snapshots", victim.parent)
    restored = run_cli("restore", tip, "--lfs", str(partition), home=home)
    reason = CHAINS[0][1]
    assert restored.returncode == 1
    assert restored.stderr.splitlines()[0] == f"error: {reason}"
    assert "Traceback" not in restored.stderr
    verified = run_cli("snapshots", "verify", tip, home=home)
    assert verified.returncode == 1
    assert reason in verified.stdout.splitlines()
    assert_canary_intact(victim, canary)
    _assert_untouched(tmp_path, partition, before)


def test_verify_compares_every_manifest_with_the_tree_its_layers_build(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path / "snapshots")
    chain_manifest_omits_symlink(store.root, tmp_path / "outside")
    assert store.verify("a1") == [
        "snapshot ch5 (a1): manifest lacks 'x', a symlink the archives create"
    ]
    assert store.verify("a2") == [
        "snapshot ch5 (a1): manifest lacks 'x', a symlink the archives create",
        CHAINS[0][1],
    ]


@pytest.mark.parametrize(
    ("deleted", "reason"),
    [
        (["x/victim"], "member 'x/victim' lies below symlink 'x' (would write through it)"),
        (["../outside/victim"], "member '../outside/victim' escapes the tree ('..' component)"),
        (["/tmp"], "member '/tmp' escapes the tree (absolute path)"),
        (["x\0/victim"], "member 'x\\x00/victim' has a NUL byte in its name"),
    ],
    ids=["through-symlink", "dot-dot", "absolute", "nul"],
)
def test_hostile_deletion_lists_are_refused(
    deleted: list[str], reason: str, tmp_path: Path, partition: Path
) -> None:
    victim = plant_canary(tmp_path / "outside")
    canary, before = canary_state(victim.parent), tree_state(partition)
    store = SnapshotStore(tmp_path / "snapshots")
    base_with_symlink(store.root, victim.parent, "d0")
    entries = [
        entry(".", "dir", "d0"),
        entry("x", "symlink", "d0", mode=0o777, link=str(victim.parent)),
    ]
    write_snapshot(store.root, Snapshot("d1", end(), entries, delta_of="d0", deleted=deleted))
    with pytest.raises(UnsafeArchiveError) as caught:
        store.restore("d1", partition)
    assert caught.value.message == f"snapshot ch5 (d1): {reason}"
    assert f"snapshot ch5 (d1): {reason}" in store.verify("d1")
    assert_canary_intact(victim, canary)
    _assert_untouched(tmp_path, partition, before)
