"""`lfsorch ci plan`: estimates from a real chapter 4-6 run's record (or the book's SBUs),
splits at package checkpoints, and workflow files checked against the schemas GitHub and
GitLab publish (schemastore's, vendored by check-jsonschema: no network)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from orchestrator.ci import jobs, slices
from orchestrator.ci.slices import CiPlanError, History
from orchestrator.config import load_config
from orchestrator.lockfile import LockedImage, make_lock, write_lock
from orchestrator.spec.graph import load_plan
from tests.helpers import REPO, run_cli

WriteStage = Callable[[str, str], Path]
CH6 = REPO / "stages" / "ch6.yaml"
# The record of a real chapter 4-6 build on this project's CI machine (2 cores), trimmed to
# what estimates read.
REAL_RUN = Path(__file__).parent / "ch4-6-run.json"
IMAGE = "sha256:" + "ab" * 32
PULL = "registry.example:5000/lfs/host@sha256:" + "cd" * 32


def _home_with_real_run(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    run_dir = home / "runs" / "20261201-053409-c208"
    run_dir.mkdir(parents=True)
    shutil.copy(REAL_RUN, run_dir / "state.json")
    return home


def _lock_for(stage: Path, tmp_path: Path, pull: str | None = PULL) -> Path:
    """A lock of the plan's inputs as declared (no engine, no sources needed)."""
    settings = load_config([], user_config=tmp_path / "none.yaml", environ={}).settings
    plan = load_plan([stage])
    images = {"lfsorch/host:bookworm": LockedImage(id=IMAGE, pull=pull)}
    lock = make_lock(plan, settings, images, lambda s: s.sha256 or s.md5 or "0" * 64)
    path = tmp_path / "lfsorch.lock"
    write_lock(lock, path)
    return path


def _validate(kind: str, path: Path) -> subprocess.CompletedProcess[str]:
    schema = {"github": ["vendor.github-workflows"], "gitlab": ["vendor.gitlab-ci"]}[kind]
    extra = ["--data-transform", "gitlab-ci"] if kind == "gitlab" else []
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", *schema, *extra, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_history_of_a_real_build_splits_ch6_at_package_checkpoints(tmp_path: Path) -> None:
    history = History.read(_home_with_real_run(tmp_path) / "runs")
    assert history.sbu_s == 183.465
    plan = load_plan([CH6])
    steps = slices.plan_steps(plan)
    found = slices.estimates(plan, steps, history, None)
    assert found["ch5/gcc-pass1"] == slices.Estimate(1538.196, "history")
    cut = slices.split(steps, found, 45 * 60 * 0.75)
    assert [(s.label, s.after, s.until) for s in cut] == [
        ("ch4/layout .. ch5/linux-headers", None, "ch5/linux-headers"),
        ("ch5/glibc .. ch6/binutils-pass2", "ch5/linux-headers", "ch6/binutils-pass2"),
        ("ch6/gcc-pass2 .. ch6/temporary-tools-check", "ch6/binutils-pass2", "ch6"),
    ]
    assert all(s.seconds <= 45 * 60 * 0.75 for s in cut)
    assert [step.name for piece in cut for step in piece.steps] == [s.name for s in steps]


def test_a_package_longer_than_a_job_is_named(tmp_path: Path) -> None:
    home = _home_with_real_run(tmp_path)
    lock = _lock_for(CH6, tmp_path)
    result = run_cli("ci", "plan", str(CH6), "--max-minutes", "20", "--lock", str(lock), home=home)
    assert result.returncode == 2
    assert result.stderr.splitlines()[0] == (
        "error: ch5/gcc-pass1 alone takes about 25.6 min (history), more than the 15.0 min "
        "a job leaves after the margin"
    )
    assert result.stdout == ""


def test_sbu_seconds_scales_history_and_the_book_fills_gaps(
    tmp_path: Path, stage_file: WriteStage
) -> None:
    history = History.read(_home_with_real_run(tmp_path) / "runs")
    plan = load_plan([CH6])
    steps = slices.plan_steps(plan)
    found = slices.estimates(plan, steps, history, 60.0)
    # gcc-pass1 took 8.38 SBU in that run: 8.38 x 60 s here.
    assert found["ch5/gcc-pass1"].seconds == pytest.approx(1538.196 / 183.465 * 60)
    book = slices.estimates(plan, steps, History({}, None), 60.0)
    assert book["ch6/gcc-pass2"] == slices.Estimate(4.6 * 60, "book")
    assert book["ch4/layout"] == slices.Estimate(0.0, "book")

    bare = stage_file("bare.yaml", "stage: bare\npackages:\n  - {name: x, script: 'true'}\n")
    bare_plan = load_plan([bare])
    with pytest.raises(CiPlanError) as caught:
        slices.estimates(bare_plan, slices.plan_steps(bare_plan), History({}, None), None)
    assert caught.value.message == (
        "no estimate for bare/x: no earlier run built them and no SBU is known"
    )


def test_plan_order_follows_dependencies_and_names_stage_ends(stage_file: WriteStage) -> None:
    path = stage_file(
        "order.yaml",
        """
        stage: order
        packages:
          - {name: late, depends: [early], sbu: 1, script: 'true'}
          - {name: early, sbu: 1, script: 'true'}
        """,
    )
    steps = slices.plan_steps(load_plan([path]))
    assert [(s.name, s.checkpoint) for s in steps] == [
        ("order/early", "order/early"),
        ("order/late", "order"),
    ]


@pytest.mark.parametrize("kind", ["github", "gitlab"])
def test_workflows_match_the_published_schemas(kind: str, tmp_path: Path) -> None:
    home = _home_with_real_run(tmp_path)
    lock = _lock_for(CH6, tmp_path)
    output = tmp_path / f"{kind}.yml"
    result = run_cli(
        "ci", "plan", str(CH6), "--max-minutes", "45", "--lock", str(lock),
        "--format", kind, "--output", str(output), "-o", "source_set=upstream", home=home,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "job 3: ch6/gcc-pass2 .. ch6/temporary-tools-check" in result.stderr
    checked = _validate(kind, output)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    document = yaml.safe_load(output.read_text())
    registry = "registry.example:5000/lfs"
    if kind == "github":
        jobs = document["jobs"]
        assert list(jobs) == ["slice-1", "slice-2", "slice-3"]
        assert jobs["slice-2"]["needs"] == "slice-1"
        assert all(job["timeout-minutes"] == 45 for job in jobs.values())
        runs = [step.get("run", "") for step in jobs["slice-2"]["steps"]]
        uploads = [s for s in jobs["slice-2"]["steps"] if "upload-artifact" in s.get("uses", "")]
        assert uploads[0]["if"] == "always()"
    else:
        assert document["stages"] == ["slice-1", "slice-2", "slice-3"]
        runs = document["slice-2"]["script"]
        assert document["slice-2"]["artifacts"]["when"] == "always"
    job = next(line for line in runs if "ci job" in line).splitlines()[-1]
    assert job.endswith(
        f"ci job {CH6} --lock {lock} --registry {registry} --until ch6/binutils-pass2 "
        '--after ch5/linux-headers -o source_set=upstream --lfs "$LFS"'
    )

    # The schema check can fail: a job without a runner, artifacts kept "sometimes".
    if kind == "github":
        del document["jobs"]["slice-1"]["runs-on"]
    else:
        document["slice-1"]["artifacts"]["when"] = "sometimes"
    broken = tmp_path / f"broken-{kind}.yml"
    broken.write_text(yaml.safe_dump(document))
    assert _validate(kind, broken).returncode == 1


def test_plan_needs_a_pushed_lock(tmp_path: Path, stage_file: WriteStage) -> None:
    home = _home_with_real_run(tmp_path)
    path = stage_file("one.yaml", "stage: one\npackages:\n  - {name: x, sbu: 1, script: 'true'}\n")
    missing = run_cli("ci", "plan", str(path), "--max-minutes", "10", home=home)
    assert missing.returncode == 2
    assert missing.stderr.splitlines()[0] == (
        f"error: no lock beside {path}: jobs build from a lock's inputs"
    )
    lock = _lock_for(path, tmp_path, pull=None)
    unpushed = run_cli("ci", "plan", str(path), "--max-minutes", "10", "--lock", str(lock),
                       home=home)  # fmt: skip
    assert unpushed.returncode == 2
    assert unpushed.stderr.splitlines()[0] == (
        f"error: {lock}: its image was never pushed, so no runner can pull it"
    )
    bad_margin = run_cli("ci", "plan", str(path), "--max-minutes", "0", home=home)
    assert bad_margin.returncode == 2
    assert not (home / "runs" / "x").exists() and sorted(p.name for p in home.iterdir()) == ["runs"]
    assert json.loads(lock.read_text())["images"]["lfsorch/host:bookworm"]["pull"] is None


def test_the_workflow_names_a_lock_in_the_checkout_relative_to_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "repo" / "stages").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "repo")
    inside = tmp_path / "repo" / "stages" / "lfsorch.lock"
    assert jobs._as_in_checkout(inside) == "stages/lfsorch.lock"
    assert jobs._as_in_checkout(tmp_path / "elsewhere.lock") == str(tmp_path / "elsewhere.lock")


def test_the_book_times_chapters_7_and_8_after_a_real_ch4_6_run(tmp_path: Path) -> None:
    # The first chapter 8 plan of a team that has built only chapters 4-6 so far.
    history = History.read(_home_with_real_run(tmp_path) / "runs")
    plan = load_plan([REPO / "stages" / "ch8.yaml"])
    steps = slices.plan_steps(plan)
    found = slices.estimates(plan, steps, history, None)
    assert found["ch5/gcc-pass1"] == slices.Estimate(1538.196, "history")
    assert found["ch7/gettext"] == slices.Estimate(1.0 * 183.465, "book")
    assert found["ch8/gcc"] == slices.Estimate(43 * 183.465, "book")
    assert {e.source for name, e in found.items() if name.startswith(("ch7/", "ch8/"))} == {"book"}
    # GitHub's hosted jobs stop at 6 h: 4.5 h after the default margin.
    cut = slices.split(steps, found, 6 * 3600 * 0.75)
    assert [(s.after, s.until) for s in cut] == [
        (None, "ch8/shadow"),
        ("ch8/shadow", "ch8/texinfo"),
        ("ch8/texinfo", "ch8"),
    ]
    assert all(s.seconds <= 6 * 3600 * 0.75 for s in cut)
