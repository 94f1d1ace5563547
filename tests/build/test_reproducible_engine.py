"""`lfsorch verify-reproducible` on the real engine: two real builds of each stage, never
one served from the other's checkpoint, compared entry by entry."""

from __future__ import annotations

import json
import re
import shutil
import signal
from collections.abc import Callable
from pathlib import Path

import docker
import pytest

from orchestrator import api
from orchestrator.build.reproducible import VERIFY_DIR
from orchestrator.build.state import load_state
from orchestrator.checkpoints.compare import MTIMES_NOT_COMPARED
from orchestrator.execution import engine
from orchestrator.workspace import Workspace
from tests.helpers import (
    BASE_IMAGE,
    REPO,
    run_build,
    run_cli,
    start_cli,
    tree_state,
    wait_for_container,
)

pytestmark = pytest.mark.docker


@pytest.fixture
def demo(tmp_path: Path) -> Path:
    stages = tmp_path / "stages"
    stages.mkdir()
    shutil.copy(REPO / "stages" / "demo.yaml", stages)
    shutil.copytree(REPO / "stages" / "demo", stages / "demo")
    return stages / "demo.yaml"


@pytest.fixture
def noisy(stage_file: Callable[[str, str], Path]) -> Path:
    return stage_file(
        "noisy.yaml",
        f"""
        stage: noisy
        image: {BASE_IMAGE}
        packages:
          - name: stable
            script: |
              mkdir -p /mnt/lfs/usr/share
              echo "built at $SOURCE_DATE_EPOCH on $(uname -n)" > /mnt/lfs/usr/share/fixed
          - name: clock
            depends: [stable]
            script: date +%s%N > /mnt/lfs/usr/share/stamp
          - name: dice
            depends: [stable]
            script: head -c 16 /dev/urandom > /mnt/lfs/usr/share/random.bin
        """,
    )


def test_two_builds_of_the_demo_are_identical_and_both_really_built(
    demo: Path, workspace: Workspace, no_leftovers: None
) -> None:
    report = api.verify_reproducible([demo], workspace=workspace, keep=True)

    assert report.reproducible
    [stage] = report.stages
    assert (stage.stage, stage.differences) == ("demo", [])
    assert stage.identical >= 10  # the tree: layout's directories, the library, the programs
    assert report.kept is not None
    for side in ("a", "b"):
        home = Workspace(report.kept / side / "workspace")
        state = load_state(home.state_file)
        assert state is not None and state.outcome == "succeeded"
        # Built, each package in its own container, once: no checkpoint served it.
        assert [(p.name, p.status, len(p.attempts)) for p in state.packages] == [
            (name, "done", 1) for name in ("layout", "libgreet", "crc32", "hello", "release")
        ]
        assert (report.kept / side / "lfs" / "usr" / "bin" / "hello").is_file()
    assert not (workspace.snapshots_dir).exists(), "the real workspace's store is untouched"


def test_a_build_that_embeds_the_time_or_random_bytes_is_reported(
    noisy: Path, workspace: Workspace, no_leftovers: None
) -> None:
    done = run_cli("verify-reproducible", str(noisy), home=workspace.root, timeout=600)

    assert done.returncode == 1, done.stderr
    report = done.stdout[done.stdout.index("\nstage noisy (checkpoint") + 1 :].splitlines()
    assert re.fullmatch(
        r"stage noisy \(checkpoint [0-9a-f]{12}\): 4 identical, 2 differ", report[0]
    )
    assert report[1:6] == [
        "not reproducible: the first stage that differs is noisy",
        "noisy: 2 differ",
        "  usr/share/random.bin: content (16 bytes / 16 bytes)",
        "  usr/share/stamp: content (20 bytes / 20 bytes)",
        MTIMES_NOT_COMPARED,
    ]
    if shutil.which("diffoscope"):
        assert report[6:9] == [
            "diffoscope usr/share/random.bin:",
            "  | --- a/random.bin",
            "  | +++ b/random.bin",
        ]
        stamp = report.index("diffoscope usr/share/stamp:")
        assert report[stamp + 1 : stamp + 3] == ["  | --- a/stamp", "  | +++ b/stamp"]
        assert any(re.fullmatch(r"  \| -\d{19}", line) for line in report[stamp:])
    else:
        assert report[6] == (
            "diffoscope is not installed (Debian: apt-get install diffoscope-minimal)"
        )
    assert list((workspace.root / VERIFY_DIR).iterdir()) == [], "both builds are removed"


def test_json_names_the_stage_the_file_and_the_kind(
    noisy: Path, workspace: Workspace, no_leftovers: None
) -> None:
    done = run_cli(
        "verify-reproducible", str(noisy), "--json", "--diffoscope", "0", home=workspace.root
    )

    assert done.returncode == 1, done.stderr
    report = json.loads(done.stdout)
    assert report["reproducible"] is False
    assert report["first_differing_stage"] == "noisy"
    assert report["mtimes_compared"] is False
    [stage] = report["stages"]
    assert [(d["path"], d["kinds"]) for d in stage["differences"]] == [
        ("usr/share/random.bin", ["content"]),
        ("usr/share/stamp", ["content"]),
    ]
    assert report["diffoscope"] == [] and report["diffoscope_note"] is None


def test_a_used_partition_is_refused_before_anything_is_built(
    noisy: Path, workspace: Workspace, tmp_path: Path
) -> None:
    lfs_a, lfs_b = tmp_path / "lfs-a", tmp_path / "lfs-b"
    lfs_a.mkdir()
    lfs_b.mkdir()
    (lfs_b / "left-over").write_text("from an earlier build\n")
    before = tree_state(lfs_a), tree_state(lfs_b)

    done = run_cli(
        "verify-reproducible", str(noisy), "--lfs-a", str(lfs_a), "--lfs-b", str(lfs_b),
        home=workspace.root,
    )  # fmt: skip

    assert done.returncode == 2
    assert done.stderr == (
        f"error: the partition {lfs_b} is not empty: each build starts from an empty partition\n"
        "  hint: empty it, or leave out --lfs-a/--lfs-b for temporary ones\n"
    )
    assert (tree_state(lfs_a), tree_state(lfs_b)) == before
    assert not workspace.root.exists()

    done = run_cli("verify-reproducible", str(noisy), "--lfs-a", str(lfs_a), home=workspace.root)
    assert done.returncode == 2
    assert done.stderr == (
        "error: --lfs-a and --lfs-b go together\n  hint: give both, or neither for temporary ones\n"
    )


def test_given_partitions_hold_the_two_builds(
    noisy: Path, workspace: Workspace, tmp_path: Path
) -> None:
    lfs_a, lfs_b = tmp_path / "lfs-a", tmp_path / "lfs-b"
    lfs_a.mkdir()
    lfs_b.mkdir()

    report = api.verify_reproducible(
        [noisy], lfs_a=lfs_a, lfs_b=lfs_b, workspace=workspace, diffoscope=0
    )

    assert report.first_differing is not None and report.first_differing.stage == "noisy"
    fixed = "built at 1677628800 on lfsorch-build\n"  # SOURCE_DATE_EPOCH, the fixed host name
    for lfs in (lfs_a, lfs_b):
        assert (lfs / "usr/share/fixed").read_text() == fixed
    assert (lfs_a / "usr/share/stamp").read_text() != (lfs_b / "usr/share/stamp").read_text()
    assert list((workspace.root / VERIFY_DIR).iterdir()) == []


def test_a_failed_build_keeps_its_logs_and_is_not_compared(
    stage_file: Callable[[str, str], Path], workspace: Workspace
) -> None:
    failing = stage_file(
        "failing.yaml",
        f"stage: failing\nimage: {BASE_IMAGE}\npackages:\n  - name: boom\n    script: exit 3\n",
    )

    done = run_cli("verify-reproducible", str(failing), home=workspace.root)

    assert done.returncode == 1
    [site] = list((workspace.root / VERIFY_DIR).iterdir())
    assert done.stderr == (
        "error: build a failed: nothing to compare\n"
        f"  hint: its record and logs are under {site}/a/workspace (remove {site} when done)\n"
    )
    assert not (site / "b" / "workspace" / "state.json").exists(), "b is not built"
    log = site / "a" / "workspace" / "runs"
    assert [p.name for p in log.glob("*/logs/failing/boom.log")] == ["boom.log"]


# SIGTERM is what CI runners, `timeout` and `docker stop` send.
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_stopped_build_leaves_no_container_and_no_site(
    stop: signal.Signals,
    stage_file: Callable[[str, str], Path],
    workspace: Workspace,
    docker_client: docker.DockerClient,
) -> None:
    endless = stage_file(
        "endless.yaml",
        f"stage: endless\nimage: {BASE_IMAGE}\npackages:\n"
        "  - name: vr-sleeper\n    script: sleep 300\n",
    )
    process = start_cli("verify-reproducible", str(endless), home=workspace.root)
    wait_for_container(docker_client, "vr-sleeper", owner=process.pid)
    process.send_signal(stop)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 130, output
    owned = {"label": [f"{engine.OWNER_PID}={process.pid}"]}
    assert docker_client.containers.list(all=True, filters=owned) == []
    assert list((workspace.root / VERIFY_DIR).iterdir()) == []


def test_against_an_earlier_build_only_the_second_is_built_here(
    demo: Path, workspace: Workspace, tmp_path: Path, no_leftovers: None
) -> None:
    """The first build is a run made before in another workspace, on another partition (a
    long build, or another runner's): its checkpoints are compared with one new build."""
    earlier = Workspace(tmp_path / "earlier")
    (tmp_path / "earlier-lfs").mkdir()
    state, _ = run_build([demo], tmp_path / "earlier-lfs", earlier)
    assert state.outcome == "succeeded"

    report = api.verify_reproducible([demo], workspace=workspace, against=earlier.root, keep=True)

    assert report.reproducible and report.run_a == state.run_id
    assert report.kept is not None
    assert sorted(item.name for item in report.kept.iterdir()) == ["b"], "one build made here"
    built = load_state(Workspace(report.kept / "b" / "workspace").state_file)
    assert built is not None and [p.status for p in built.packages] == ["done"] * 5
    assert all(len(p.attempts) == 1 for p in built.packages), "built, not restored"
    [stage] = report.stages
    assert stage.key == state.checkpoints["demo"] and stage.identical >= 10


def test_against_an_earlier_build_names_what_differs_from_it(
    noisy: Path, workspace: Workspace, tmp_path: Path, no_leftovers: None
) -> None:
    earlier = Workspace(tmp_path / "earlier")
    (tmp_path / "earlier-lfs").mkdir()
    run_build([noisy], tmp_path / "earlier-lfs", earlier)
    done = run_cli(
        "verify-reproducible", str(noisy), "--against", str(earlier.root), "--json",
        "--diffoscope", "0", home=workspace.root,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    report = json.loads(done.stdout)
    assert [(d["path"], d["kinds"]) for d in report["stages"][0]["differences"]] == [
        ("usr/share/random.bin", ["content"]),
        ("usr/share/stamp", ["content"]),
    ]


def test_against_a_workspace_without_those_stages_is_refused_before_anything_is_built(
    noisy: Path, workspace: Workspace, tmp_path: Path, no_leftovers: None
) -> None:
    empty = tmp_path / "empty-home"
    done = run_cli("verify-reproducible", str(noisy), "--against", str(empty), home=workspace.root)
    assert done.returncode == 2, done.stderr
    assert f"error: no run in the workspace {empty} builds every stage (noisy)" in done.stderr
    assert not empty.exists()
    assert not (workspace.root / VERIFY_DIR).exists() or not any(
        (workspace.root / VERIFY_DIR).iterdir()
    )


def test_against_a_run_that_never_checkpointed_the_stages_is_refused_after_the_build(
    noisy: Path, workspace: Workspace, tmp_path: Path, no_leftovers: None
) -> None:
    """The earlier run may still be building when the second starts; it is read again at
    the end, and one that never got a checkpoint of every stage (it failed) is named."""
    failing = tmp_path / "failing" / "noisy.yaml"
    failing.parent.mkdir()
    failing.write_text(
        f"stage: noisy\nimage: {BASE_IMAGE}\npackages:\n  - {{name: broken, script: 'exit 3'}}\n"
    )
    earlier = Workspace(tmp_path / "earlier")
    (tmp_path / "earlier-lfs").mkdir()
    state, _ = run_build([failing], tmp_path / "earlier-lfs", earlier)
    assert state.outcome == "failed"

    done = run_cli(
        "verify-reproducible", str(noisy), "--against", str(earlier.root), home=workspace.root
    )
    assert done.returncode == 2, done.stderr
    assert (
        f"error: no run in the workspace {earlier.root} has a checkpoint of every stage (noisy)"
        in done.stderr
    )
    assert "build b: in" in done.stdout, "the second build was made"
    assert list((workspace.root / VERIFY_DIR).iterdir()) == [], "and removed"


def test_against_a_build_still_running_waits_for_its_checkpoint(
    stage_file: Callable[[str, str], Path],
    workspace: Workspace,
    tmp_path: Path,
    docker_client: docker.DockerClient,
    no_leftovers: None,
) -> None:
    """Two long builds started side by side rarely end in order: the second one, made here,
    waits for the earlier one to checkpoint the stage instead of refusing, and compares as
    soon as it has, while the earlier run goes on with its later stages."""
    held = stage_file(
        "held.yaml",
        f"""
        stage: held
        image: {BASE_IMAGE}
        packages:
          - name: vr-held
            script: |
              i=0; while [ $i -lt 400000 ]; do i=$((i + 1)); done
              echo "$i" > /mnt/lfs/out
        """,
    )
    # The same script and inputs in the earlier build, with a twentieth of a core (a CPU
    # limit is output-neutral: it stays out of the keys), so its stage ends last; a later
    # stage keeps that run going.
    slow = tmp_path / "slow" / "held.yaml"
    slow.parent.mkdir()
    slow.write_text(held.read_text().replace("packages:", "resources: {cpus: 0.05}\npackages:"))
    later = slow.parent / "later.yaml"
    later.write_text(
        f"stage: later\nimage: {BASE_IMAGE}\nrequires: [held]\npackages:\n"
        "  - {name: vr-later, script: sleep 120}\n"
    )
    earlier = Workspace(tmp_path / "earlier")
    earlier_lfs = tmp_path / "earlier-lfs"
    earlier_lfs.mkdir()
    first = start_cli("run", str(slow), str(later), "--lfs", str(earlier_lfs), home=earlier.root)
    try:
        wait_for_container(docker_client, "vr-held", owner=first.pid)
        done = run_cli("verify-reproducible", str(held), "--against", str(earlier.root),
                       home=workspace.root)  # fmt: skip
        still_running = first.poll() is None
    finally:
        if first.poll() is None:
            first.send_signal(signal.SIGTERM)  # also when waiting failed: no run left behind
        first.communicate(timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert still_running, "compared while the earlier run was in its later stage"
    assert first.returncode == 130
    assert (earlier_lfs / "out").read_text() == "400000\n"
    [state] = [load_state(p) for p in earlier.runs_dir.glob("*/state.json")]
    assert state is not None
    assert (
        f"waiting for run {state.run_id} (process {first.pid}) in {earlier.root} to checkpoint held"
    ) in done.stdout
    key = state.checkpoints["held"][:12]
    assert f"stage held (checkpoint {key}): 2 identical, 0 differ" in done.stdout
    assert list((workspace.root / VERIFY_DIR).iterdir()) == []
