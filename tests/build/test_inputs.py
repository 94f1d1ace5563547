"""One definition of a build's inputs: every configuration layer reaches the key, the
output-neutral ones do not, and the command line beats a stage file."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from orchestrator.build.checkpointing import policy_of
from orchestrator.build.inputs import InputsOf, merged_environment, without_job_count
from orchestrator.config import Settings, load_config
from orchestrator.errors import ConfigError
from orchestrator.spec.models import Package, Stage
from orchestrator.spec.stagefile import StageFile

IMAGES = {"img/a": "sha256:aaa", "img/b": "sha256:bbb"}


def settings_from(
    tmp_path: Path,
    overrides: list[str] = (),  # type: ignore[assignment]
    system: str = "",
    user: str = "",
    environ: dict[str, str] | None = None,
) -> Settings:
    (tmp_path / "system.yaml").write_text(system)
    (tmp_path / "user.yaml").write_text(user)
    return load_config(
        list(overrides),
        system_file=tmp_path / "system.yaml",
        user_config=tmp_path / "user.yaml",
        environ=environ or {},
    ).settings


def stage_of(**changes: Any) -> StageFile:
    package: dict[str, Any] = {"name": "p", "script": "make", "version": "1"}
    package.update(changes.pop("package", {}))
    data: dict[str, Any] = {"stage": "s", "image": "img/a", "packages": [package]}
    data.update(changes)
    return StageFile(Path("s.yaml"), Stage.model_validate(data), {})


def key_of(settings: Settings, stage_file: StageFile, parent: str | None = "parent") -> str:
    of = InputsOf(settings, IMAGES.__getitem__)
    return of.key(stage_file, stage_file.stage.packages, parent)


@pytest.mark.parametrize(
    ("makeflags", "expected"),
    [
        ("-j8", ""),
        ("-j", ""),
        ("-j 8", ""),
        ("--jobs=8", ""),
        ("--jobs 8", ""),
        ("-j2 V=1", "V=1"),
        ("V=1   -j16 -k", "V=1 -k"),
        ("-l 4", "-l 4"),
        ("'-j4", "'-j4"),  # not shell words: kept whole, so it is hashed as it is
    ],
)
def test_job_count_is_left_out_of_makeflags(makeflags: str, expected: str) -> None:
    assert without_job_count(makeflags) == expected


def test_every_layer_reaches_the_key(tmp_path: Path) -> None:
    base = key_of(settings_from(tmp_path), stage_of())
    changed = {
        "system file": key_of(settings_from(tmp_path, system="environment: {A: '1'}"), stage_of()),
        "user file": key_of(settings_from(tmp_path, user="environment: {A: '1'}"), stage_of()),
        "environment": key_of(
            settings_from(tmp_path, environ={"LFSORCH_ENVIRONMENT": "{A: '1'}"}), stage_of()
        ),
        "command line": key_of(settings_from(tmp_path, ["environment.A=1"]), stage_of()),
        "profile": key_of(settings_from(tmp_path, ["profile=full"]), stage_of()),
        "run_tests": key_of(settings_from(tmp_path, ["run_tests=true"]), stage_of()),
        "makeflags": key_of(settings_from(tmp_path, ["makeflags=-j2 V=1"]), stage_of()),
        "network": key_of(settings_from(tmp_path, ["network=true"]), stage_of()),
        "config image": key_of(settings_from(tmp_path, ["image=img/b"]), stage_of(image=None)),
        "stage image": key_of(settings_from(tmp_path), stage_of(image="img/b")),
        "stage variable": key_of(settings_from(tmp_path), stage_of(environment={"A": "1"})),
        "package variable": key_of(
            settings_from(tmp_path), stage_of(package={"environment": {"A": "1"}})
        ),
        "user": key_of(settings_from(tmp_path), stage_of(user="lfs")),
        "workdir": key_of(settings_from(tmp_path), stage_of(workdir="/tmp")),
        "capabilities": key_of(settings_from(tmp_path), stage_of(capabilities=["mknod"])),
        "script": key_of(settings_from(tmp_path), stage_of(package={"script": "make -k"})),
        "version": key_of(settings_from(tmp_path), stage_of(package={"version": "2"})),
        "source": key_of(
            settings_from(tmp_path),
            stage_of(
                package={
                    "sources": [{"file": "p.tar", "url": "http://h/p.tar", "sha256": "0" * 64}]
                }
            ),
        ),
        "assets": key_of(
            settings_from(tmp_path), dataclasses.replace(stage_of(), asset_digest="0" * 64)
        ),
        "parent": key_of(settings_from(tmp_path), stage_of(), parent="other"),
    }
    assert {name: key for name, key in changed.items() if key == base} == {}


def test_output_neutral_inputs_stay_out_of_the_key(tmp_path: Path) -> None:
    base = key_of(settings_from(tmp_path, ["makeflags=-j8"]), stage_of())
    assert key_of(settings_from(tmp_path, ["makeflags=-j1"]), stage_of()) == base
    assert key_of(settings_from(tmp_path), stage_of(resources={"cpus": 0.5})) == base
    assert key_of(settings_from(tmp_path), stage_of(resources={"memory": "1g"})) == base
    settings = settings_from(tmp_path)
    of = InputsOf(settings, IMAGES.__getitem__)
    stage = stage_of()
    package = stage.stage.packages[0]
    first, retry = of.of(stage, package, 1), of.of(stage, package, 2)
    assert retry.environment["LFSORCH_ATTEMPT"] == "2"
    assert first.hashed() == retry.hashed()
    # The timeout and the retries decide whether a build ends, not what it makes.
    assert key_of(settings, stage_of(timeout="1h", retries=3)) == key_of(settings, stage)

    # Users extend the list; the built-in entries stay.
    extended = settings_from(tmp_path, user="output_neutral: [environment.CCACHE_DIR]")
    assert extended.output_neutral[-1] == "environment.CCACHE_DIR"
    assert "makeflags.jobs" in extended.output_neutral
    with_cache = stage_of(environment={"CCACHE_DIR": "/var/cache"})
    assert key_of(extended, with_cache) == key_of(extended, stage_of())
    assert key_of(settings, with_cache) != key_of(settings, stage_of())


def test_a_bad_neutral_entry_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        settings_from(tmp_path, ["output_neutral=[script]"])
    assert caught.value.message == (
        "invalid configuration: output_neutral (from command line): Value error, 'script' is "
        "not an input that can be neutral (makeflags.jobs, environment.NAME, network, "
        "resources, resources.cpus|memory|pids)"
    )


def test_the_command_line_beats_the_stage_file(tmp_path: Path) -> None:
    stage = stage_of(
        environment={"X": "stage", "MAKEFLAGS": "-j1 V=1"},
        package={"environment": {"Y": "package"}},
    ).stage
    package = stage.packages[0]
    below = settings_from(tmp_path, user="environment: {X: user, Y: user}\nmakeflags: -j9")
    env = merged_environment(stage, package, below, 1)
    assert (env["X"], env["Y"], env["MAKEFLAGS"]) == ("stage", "package", "-j1 V=1")

    above = settings_from(tmp_path, ["environment.X=cli", "environment.Y=cli", "makeflags=-j3"])
    env = merged_environment(stage, package, above, 1)
    assert (env["X"], env["Y"], env["MAKEFLAGS"]) == ("cli", "cli", "-j3")

    tests_off = stage_of(environment={"LFSORCH_RUN_TESTS": "1"}).stage
    env = merged_environment(tests_off, tests_off.packages[0], above, 1)
    assert env["LFSORCH_RUN_TESTS"] == "1"
    off = settings_from(tmp_path, ["run_tests=false"])
    assert "LFSORCH_RUN_TESTS" not in merged_environment(tests_off, tests_off.packages[0], off, 1)


def test_checkpoint_policy_precedence(tmp_path: Path) -> None:
    own = stage_of(checkpoint="package").stage
    assert policy_of(own, settings_from(tmp_path, ["profile=minimal"])) == "package"
    assert policy_of(own, settings_from(tmp_path, user="checkpoint: none")) == "package"
    assert policy_of(own, settings_from(tmp_path, ["checkpoint=none"])) == "none"
    assert policy_of(stage_of().stage, settings_from(tmp_path, ["profile=minimal"])) == "none"
    assert policy_of(own, Settings()) == "package"


def test_package_names_keep_the_key_apart() -> None:
    """`gtk+` and `gtk_` are different packages, whatever Docker makes of their names."""
    plus = stage_of(package={"name": "gtk+"})
    under = stage_of(package={"name": "gtk_"})
    assert key_of(Settings(), plus) != key_of(Settings(), under)
    assert isinstance(plus.stage.packages[0], Package)


def test_every_build_gets_a_fixed_source_date_epoch_that_is_part_of_the_key(
    tmp_path: Path,
) -> None:
    stage = stage_of().stage
    package = stage.packages[0]
    default = settings_from(tmp_path)
    assert merged_environment(stage, package, default, 1)["SOURCE_DATE_EPOCH"] == "1677628800"
    assert merged_environment(stage, package, default, 2)["SOURCE_DATE_EPOCH"] == "1677628800"
    other = settings_from(tmp_path, ["source_date_epoch=0"])
    assert merged_environment(stage, package, other, 1)["SOURCE_DATE_EPOCH"] == "0"
    # A stage that sets its own date wins over the configuration's, as for any variable.
    own = stage_of(environment={"SOURCE_DATE_EPOCH": "5"}).stage
    assert merged_environment(own, own.packages[0], default, 1)["SOURCE_DATE_EPOCH"] == "5"


def test_keys_of_stages_without_chroot_are_those_of_before(tmp_path: Path) -> None:
    # The key this stage had before chroot stages existed: it must not change.
    settings = settings_from(tmp_path)
    before = "98f8c59e26b9670509bf310bfb79f976366b72deae2850e01880f5a169055497"
    assert key_of(settings, stage_of()) == before
    assert key_of(settings, stage_of(chroot=False, package={"chroot": False})) == before
    assert (
        "chroot"
        not in InputsOf(settings, IMAGES.__getitem__)
        .of(stage_of(), stage_of().stage.packages[0])
        .all_inputs()
    )


def test_a_chroot_package_has_its_own_key_and_the_book_s_path(tmp_path: Path) -> None:
    settings = settings_from(tmp_path)
    chrooted = stage_of(chroot=True)
    inputs = InputsOf(settings, IMAGES.__getitem__).of(chrooted, chrooted.stage.packages[0])
    assert inputs.all_inputs()["chroot"] is True
    assert inputs.environment["PATH"] == "/usr/bin:/usr/sbin"
    assert key_of(settings, chrooted) != key_of(settings, stage_of())
    # A package leaving a chroot stage is built as in any other stage.
    assert key_of(settings, stage_of(chroot=True, package={"chroot": False})) == key_of(
        settings, stage_of()
    )
    overridden = stage_of(chroot=True, environment={"PATH": "/usr/bin:/tools/bin"})
    of = InputsOf(settings, IMAGES.__getitem__)
    assert of.of(overridden, overridden.stage.packages[0]).environment["PATH"] == (
        "/usr/bin:/tools/bin"
    )


def test_a_package_adds_capabilities_to_its_stage_s(tmp_path: Path) -> None:
    settings = settings_from(tmp_path)
    stage = stage_of(capabilities=["kill"], package={"capabilities": ["setfcap", "kill"]})
    inputs = InputsOf(settings, IMAGES.__getitem__).of(stage, stage.stage.packages[0])
    assert inputs.capabilities == ("kill", "setfcap")
    assert key_of(settings, stage) != key_of(settings, stage_of(capabilities=["kill"]))
