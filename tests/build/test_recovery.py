"""Failure classes and their strategies: each failed attempt classified from its result alone,
the next attempt's changes decided from the recovery table, layered from the configuration to
the stage and the package."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.build.recovery import (
    Adjustment,
    PackageRecovery,
    classify,
    job_count,
    with_job_count,
)
from orchestrator.config import load_config
from orchestrator.errors import ConfigError
from orchestrator.execution.environment import BuildJob, BuildResult
from orchestrator.monitor.metrics import ContainerFigures
from orchestrator.spec.models import Recovery, Resources, Stage

MIB = 1 << 20


def job_of(
    makeflags: str = "-j1", memory: int | None = 128 * MIB, timeout: float = 60.0
) -> BuildJob:
    return BuildJob(
        run_id="r",
        stage="s",
        package="p",
        attempt=1,
        image="img",
        script="make",
        environment={"MAKEFLAGS": makeflags, "PATH": "/bin"},
        lfs_dir=Path("/nonexistent"),
        log_path=Path("/nonexistent/log"),
        timeout_s=timeout,
        resources=Resources(memory=memory),
    )


def result_of(exit_code: int | None = 1, peak: int | None = None, **flags: object) -> BuildResult:
    figures = ContainerFigures(memory_peak_bytes=peak)
    return BuildResult(exit_code, 1.0, figures, **flags)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("result", "expected"),
    [
        (result_of(2), "build"),
        (result_of(137, oom_killed=True), "memory"),
        (result_of(137, peak=127 * MIB), "memory"),
        (result_of(137, peak=10 * MIB), "build"),  # killed, but far from the limit
        (result_of(137, timed_out=True), "time"),
        (result_of(219, misconfigured=True), "configuration"),
        (result_of(1, space_exceeded=True, error="wrote more than 1 GiB"), "disk"),
        (result_of(None, engine_lost=True, error="the engine stopped answering"), "system"),
    ],
)
def test_each_failure_has_one_class(result: BuildResult, expected: str) -> None:
    assert classify(result, job_of())[0] == expected


@pytest.mark.parametrize(
    ("makeflags", "jobs"),
    [("-j8", 8), ("-j 4 V=1", 4), ("--jobs=3", 3), ("-j2 -j6", 6), ("V=1", 1), ("", 1)],
)
def test_job_count_reads_makeflags_as_make_does(makeflags: str, jobs: int) -> None:
    assert job_count(makeflags) == jobs


def test_job_count_is_replaced_and_the_rest_kept() -> None:
    assert with_job_count("-j8 V=1", 4) == "V=1 -j4"
    assert with_job_count("", 1) == "-j1"


def test_build_failures_retry_with_doubling_backoff_then_fail() -> None:
    recovery = PackageRecovery(Recovery(backoff=1, backoff_max=3), retries=3)
    decisions = [recovery.decide(result_of(2), job_of()) for _ in range(4)]
    assert [(d.strategy, d.delay_s) for d in decisions] == [
        ("retry", 1.0),
        ("retry", 2.0),
        ("retry", 3.0),
        ("fail", 0.0),
    ]
    assert decisions[-1].reason == "exit status 2; no retries left"


def test_memory_halves_jobs_then_raises_the_limit_up_to_the_cap() -> None:
    recovery = PackageRecovery(Recovery(memory_factor=2, memory_cap=300 * MIB), retries=0)
    oom = result_of(137, oom_killed=True)
    first = recovery.decide(oom, job_of("-j4"))
    assert (first.strategy, first.change) == ("fewer-jobs", "MAKEFLAGS -j2 (was -j4)")
    job = recovery.adjustment.apply(job_of("-j4"))
    assert job.environment["MAKEFLAGS"] == "-j2"
    second = recovery.decide(oom, job)
    job = recovery.adjustment.apply(job_of("-j4"))
    assert (second.strategy, job.environment["MAKEFLAGS"]) == ("fewer-jobs", "-j1")
    third = recovery.decide(oom, job)
    assert (third.strategy, third.change) == ("more-memory", "memory limit 256MiB (was 128MiB)")
    job = recovery.adjustment.apply(job_of("-j4"))
    assert (job.resources.memory, job.environment["MAKEFLAGS"]) == (256 * MIB, "-j1")
    fourth = recovery.decide(oom, job)
    assert fourth.change == "memory limit 300MiB (was 256MiB)"  # the cap, not 512
    job = recovery.adjustment.apply(job_of("-j4"))
    last = recovery.decide(oom, job)
    assert (last.strategy, last.retry) == ("fail", False)
    assert last.reason.endswith("at -j1 and the cap 300MiB reached")


def test_beside_others_a_retry_rebuilds_the_level_and_memory_gets_one_step_more() -> None:
    level = "ab" * 32
    rebuilt = "level rebuilt one package at a time from checkpoint abababababab"
    build = PackageRecovery(Recovery(backoff=1), retries=1).decide(result_of(2), job_of(), level)
    assert (build.strategy, build.change) == ("retry", f"retry 1 of 1 after 1s; {rebuilt}")
    recovery = PackageRecovery(Recovery(memory_cap=128 * MIB), retries=0)
    oom = result_of(137, oom_killed=True)
    fewer = recovery.decide(oom, job_of("-j2"), level)
    assert (fewer.strategy, fewer.change) == ("fewer-jobs", f"MAKEFLAGS -j1 (was -j2); {rebuilt}")
    job = recovery.adjustment.apply(job_of("-j2"))
    alone = recovery.decide(oom, job, level)
    assert (alone.strategy, alone.change, alone.retry) == ("fewer-packages", rebuilt, True)
    assert alone.reason.endswith("at -j1 and the cap 128MiB reached")
    assert recovery.adjustment.apply(job_of("-j2")).environment["MAKEFLAGS"] == "-j1"
    # Once only: the next memory failure beside others, or alone, fails.
    assert recovery.decide(oom, job, level).strategy == "fail"
    # Configuration failures are never retried, beside others or not.
    misconfigured = result_of(219, misconfigured=True)
    assert PackageRecovery(Recovery(), 3).decide(misconfigured, job_of(), level).retry is False


def test_memory_without_a_limit_cannot_be_raised() -> None:
    decision = PackageRecovery(Recovery(), 5).decide(
        result_of(137, oom_killed=True), job_of(memory=None)
    )
    assert (decision.failure_class, decision.strategy) == ("memory", "fail")
    assert decision.reason.endswith("at -j1 and no memory limit to raise")


def test_time_retries_once_with_the_factor_and_only_when_configured() -> None:
    timed_out = result_of(137, timed_out=True, timeout_s=60.0)
    assert PackageRecovery(Recovery(), 5).decide(timed_out, job_of()).strategy == "fail"
    recovery = PackageRecovery(Recovery(timeout_factor=2), retries=5)
    first = recovery.decide(timed_out, job_of())
    assert (first.strategy, first.change) == ("longer-timeout", "timeout 120s (was 60s)")
    second = recovery.decide(timed_out, recovery.adjustment.apply(job_of()))
    assert (second.strategy, second.reason) == (
        "fail",
        "timed out after 60s (container killed); already retried once",
    )


@pytest.mark.parametrize("flags", [{"misconfigured": True}, {"space_exceeded": True}])
def test_configuration_and_build_space_are_never_retried(flags: dict[str, bool]) -> None:
    decision = PackageRecovery(Recovery(), retries=5).decide(result_of(219, **flags), job_of())
    assert (decision.strategy, decision.retry) == ("fail", False)


def test_lost_engine_retries_do_not_use_up_build_retries() -> None:
    recovery = PackageRecovery(Recovery(), retries=0)
    lost = result_of(None, engine_lost=True, error="the engine stopped answering")
    decisions = [recovery.decide(lost, job_of()) for _ in range(4)]
    assert [d.strategy for d in decisions] == ["wait-engine"] * 3 + ["fail"]


def test_an_adjustment_leaves_other_variables_and_limits_alone() -> None:
    job = Adjustment(jobs=2).apply(job_of("-j8 V=1", memory=64 * MIB))
    assert job.environment == {"MAKEFLAGS": "V=1 -j2", "PATH": "/bin"}
    assert (job.resources.memory, job.timeout_s) == (64 * MIB, 60.0)


def test_table_layers_configuration_then_stage_then_package(tmp_path: Path) -> None:
    user = tmp_path / "user.yaml"
    user.write_text("recovery: {memory_cap: 1g, backoff: 5s}\n")
    settings = load_config(
        ["recovery.timeout_factor=3"],
        system_file=tmp_path / "none.yaml",
        user_config=user,
        environ={},
    ).settings
    stage = Stage.model_validate(
        {
            "stage": "s",
            "recovery": {"memory_cap": "2g"},
            "packages": [
                {"name": "a", "script": "x", "recovery": {"memory_factor": 4}},
                {"name": "b", "script": "x"},
            ],
        }
    )
    a = stage.recovery_for(stage.packages[0], settings.recovery)
    b = stage.recovery_for(stage.packages[1], settings.recovery)
    assert (a.memory_cap, a.memory_factor, a.backoff, a.timeout_factor) == (2 << 30, 4.0, 5.0, 3.0)
    assert (b.memory_cap, b.memory_factor) == (2 << 30, 2.0)
    assert settings.recovery.memory_cap == 1 << 30


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "recovery.memory_factor=0.5",
            "recovery.memory_factor (from command line): "
            "Input should be greater than or equal to 1",
        ),
        (
            "recovery.retry_forever=true",
            "recovery.retry_forever (from command line): Extra inputs are not permitted",
        ),
        (
            "recovery.memory_cap=1k",
            "recovery.memory_cap (from command line): Value error, memory must be at least 6m",
        ),
    ],
)
def test_bad_recovery_entries_are_config_errors(
    tmp_path: Path, override: str, message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(
            [override], system_file=tmp_path / "none", user_config=tmp_path / "none", environ={}
        )
    assert caught.value.message.startswith(f"invalid configuration: {message}")
