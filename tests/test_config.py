from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.config import load_config
from orchestrator.errors import ConfigError


def origins(config: object) -> dict[str, tuple[object, str]]:
    return {key: (value, origin) for key, value, origin in config.show()}  # type: ignore[attr-defined]


def test_layers_in_order_with_provenance(tmp_path: Path) -> None:
    system = tmp_path / "system.yaml"
    system.write_text("parallel_builds: 2\nimage: sys/image\nenvironment: {A: sys, B: sys}\n")
    user = tmp_path / "user.yaml"
    user.write_text("profile: full\nimage: user/image\nenvironment: {B: user}\n")
    config = load_config(
        ["parallel_builds=4", "environment.C=cli"],
        system_file=system,
        user_config=user,
        environ={"LFSORCH_IMAGE": "env/image", "LFSORCH_NETWORK": "true", "OTHER": "x"},
    )
    shown = origins(config)
    assert shown["parallel_builds"] == (4, "command line")
    assert shown["image"] == ("env/image", "environment")
    assert shown["network"] == (True, "environment")
    assert shown["profile"] == ("full", f"user file {user}")
    assert shown["checkpoint"] == ("package", "profile full")
    assert shown["run_tests"] == (True, "profile full")
    assert shown["environment"] == ({"A": "sys", "B": "user", "C": "cli"}, "command line")
    assert shown["log_backups"] == (5, "default")


def test_user_file_overrides_profile(tmp_path: Path) -> None:
    user = tmp_path / "user.yaml"
    user.write_text("profile: full\ncheckpoint: stage\n")
    config = load_config(system_file=tmp_path / "none", user_config=user, environ={})
    assert origins(config)["checkpoint"] == ("stage", f"user file {user}")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["bogus=1"], "command line: unknown key(s) bogus"),
        (["novalue"], "-o 'novalue': expected KEY=VALUE"),
        (["profile=huge"], "command line: unknown profile 'huge'"),
        (["parallel_builds=0"], "invalid configuration: parallel_builds (from command line): "
                                "Input should be greater than or equal to 1"),
    ],
)  # fmt: skip
def test_bad_values_are_config_errors(tmp_path: Path, overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(
            overrides, system_file=tmp_path / "none", user_config=tmp_path / "none", environ={}
        )
    assert caught.value.message == message


def test_bad_user_file(tmp_path: Path) -> None:
    user = tmp_path / "user.yaml"
    user.write_text("[not, a, mapping]\n")
    with pytest.raises(ConfigError) as caught:
        load_config(system_file=tmp_path / "none", user_config=user, environ={})
    assert caught.value.message == f"{user}: expected a mapping of configuration keys"
