"""Hostile stage files: alias bombs, FIFOs, devices, huge files and values, and stage
directories holding sockets. Each is refused with exit 2 and FILE:LINE, in bounded memory and
time, before anything is written: no workspace, and the partition untouched."""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import BASE_IMAGE, REPO, run_cli

ADDRESS_SPACE = 512 << 20
ALIASES = "YAML anchors and aliases (& and *) are not allowed in stage files"
PACKAGES = "packages:\n  - {name: a, script: x}\n"


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


def lfsorch(*args: str, home: Path, bounded: bool = True) -> subprocess.CompletedProcess[str]:
    """The CLI, in 512 MB of address space when `bounded`; a hang fails the test."""
    return run_cli(
        *args,
        home=home,
        timeout=60 if bounded else 300,
        preexec_fn=_limit_memory if bounded else None,
    )


class Scene:
    """A directory of stage files, an empty workspace path and a partition with a canary."""

    def __init__(self, root: Path) -> None:
        self.stages = root / "stages"
        self.stages.mkdir()
        self.home = root / "home"
        self.lfs = root / "lfs"
        self.lfs.mkdir()
        (self.lfs / "canary").write_text("untouched\n")

    def write(self, name: str, text: str) -> Path:
        path = self.stages / name
        path.write_text(text)
        return path

    def refused(self, *args: str) -> list[str]:
        """Run the CLI expecting exit 2 and no traces; the lines of its error."""
        stages_before = sorted(self.stages.iterdir())
        result = lfsorch(*args, home=self.home)
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr
        assert not self.home.exists()
        assert sorted(self.lfs.iterdir()) == [self.lfs / "canary"]
        assert (self.lfs / "canary").read_text() == "untouched\n"
        assert sorted(self.stages.iterdir()) == stages_before
        return result.stderr.splitlines()

    def run(self, path: Path, *extra: str) -> list[str]:
        return self.refused("run", str(path), "--lfs", str(self.lfs), *extra)


@pytest.fixture
def scene(tmp_path: Path) -> Scene:
    return Scene(tmp_path)


def alias_bomb(levels: int = 9) -> str:
    """Nine levels of nine aliases under `depends`: 9**9 names once expanded."""
    lines = ["stage: bomb", "packages:", "  - name: a", "    script: x", "    depends:"]
    lines.append("      - &l0 [a, a, a, a, a, a, a, a, a]")
    for level in range(1, levels):
        lines.append(f"      - &l{level} [{', '.join([f'*l{level - 1}'] * 9)}]")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("command", ["validate", "plan", "run"])
def test_alias_bomb_is_refused_in_bounded_memory(scene: Scene, command: str) -> None:
    path = scene.write("bomb.yaml", alias_bomb())
    if command == "run":
        assert scene.run(path) == [f"{path}:6: (yaml): {ALIASES}"]
    else:
        assert scene.refused(command, str(path)) == [f"{path}:6: (yaml): {ALIASES}"]


def test_merge_key_needs_an_alias_and_is_refused(scene: Scene) -> None:
    path = scene.write(
        "merge.yaml",
        "stage: m\nresources: &r {cpus: 1}\npackages:\n  - {<<: *r, name: a, script: x}\n",
    )
    assert scene.refused("validate", str(path)) == [f"{path}:2: (yaml): {ALIASES}"]


def test_fifo_stage_file_is_refused_without_waiting(scene: Scene) -> None:
    fifo = scene.stages / "pipe.yaml"
    os.mkfifo(fifo)
    assert scene.run(fifo) == [f"{fifo}:1: (file): is a FIFO, not a regular file"]


def test_fifo_beside_a_missing_requirement_is_not_read(scene: Scene) -> None:
    os.mkfifo(scene.stages / "other.yaml")
    lonely = scene.write("lonely.yaml", f"stage: lonely\nrequires: [nowhere]\n{PACKAGES}")
    assert scene.run(lonely) == [
        f"{lonely}:2: requires[0]: unknown stage 'nowhere' (no nowhere.yaml beside this file "
        "and no file given defines it)"
    ]


def test_required_file_that_is_a_fifo_is_its_own_problem(scene: Scene) -> None:
    fifo = scene.stages / "base.yaml"
    os.mkfifo(fifo)
    top = scene.write("top.yaml", f"stage: top\nrequires: [base]\n{PACKAGES}")
    assert scene.run(top) == [f"{fifo}:1: (file): is a FIFO, not a regular file"]


def test_device_stage_file_is_refused(scene: Scene) -> None:
    assert scene.run(Path("/dev/zero")) == [
        "/dev/zero:1: (file): is a character device, not a regular file"
    ]


@pytest.mark.parametrize("size", [(1 << 20) + 1, 200 << 20])
def test_stage_file_over_one_mebibyte_is_refused_unread(scene: Scene, size: int) -> None:
    path = scene.stages / "huge.yaml"
    with path.open("wb") as handle:
        handle.write(b"stage: huge\n")
        handle.truncate(size)  # sparse: the test itself stays small
    assert scene.run(path) == [f"{path}:1: (file): larger than 1 MiB ({size} bytes)"]


def test_deeply_nested_stage_file_is_refused(scene: Scene) -> None:
    path = scene.write("deep.yaml", "stage: " + "[" * 100_000 + "]" * 100_000 + "\n")
    assert scene.run(path) == [f"{path}:1: (yaml): invalid YAML: nested too deeply"]


@pytest.mark.parametrize(
    ("line", "field", "message"),
    [
        ("timeout: .inf", "timeout", "a duration must be a finite number, not inf"),
        ("timeout: .nan", "timeout", "a duration must be a finite number, not nan"),
        ("timeout: 99999999999d", "timeout",
         "a duration must be at most 7d (604800s), not 99999999999d"),
        (f"timeout: {'9' * 400}", "timeout", "a duration of 400 digits is far too large"),
        ("resources: {cpus: 1000}", "resources.cpus",
         f"cpus must be at most this host's {os.cpu_count()} CPUs, not 1000.0"),
        ("resources: {cpus: 0.000001}", "resources.cpus", "cpus must be at least 0.01, not 1e-06"),
        ("resources: {memory: 1}", "resources.memory",
         "memory must be at least 6m (6291456 bytes), not 1 bytes"),
        ("resources: {pids: 100000000000000000000000}", "resources.pids",
         "pids must be between 1 and 4194304, not 100000000000000000000000"),
    ],
)  # fmt: skip
def test_limits_the_engine_cannot_apply_are_refused(
    scene: Scene, line: str, field: str, message: str
) -> None:
    path = scene.write("limits.yaml", f"stage: limits\n{line}\n{PACKAGES}")
    assert scene.run(path) == [f"{path}:2: {field}: {message}"]


def test_package_timeout_is_located_at_its_line(scene: Scene) -> None:
    path = scene.write(
        "t.yaml", "stage: t\npackages:\n  - name: a\n    script: x\n    timeout: .inf\n"
    )
    assert scene.run(path) == [
        f"{path}:5: packages[0].timeout: a duration must be a finite number, not inf"
    ]


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (("-o", "timeout=.inf"), "error: invalid configuration: timeout (from command line): "
         "Value error, a duration must be a finite number, not inf"),
        (("-o", "timeout=99999999999d"), "error: invalid configuration: timeout (from command "
         "line): Value error, a duration must be at most 7d (604800s), not 99999999999d"),
        (("-o", "parallel_builds=1000"), "error: invalid configuration: parallel_builds (from "
         "command line): Input should be less than or equal to 64"),
    ],
)  # fmt: skip
def test_configuration_layer_refuses_the_same_values(
    scene: Scene, extra: tuple[str, ...], expected: str
) -> None:
    path = scene.write("ok.yaml", f"stage: ok\n{PACKAGES}")
    assert scene.run(path, *extra) == [expected]


def test_parallel_builds_on_the_command_line_are_capped(scene: Scene) -> None:
    path = scene.write("ok.yaml", f"stage: ok\n{PACKAGES}")
    assert scene.run(path, "-j", "1000") == [
        "error: invalid configuration: parallel_builds (from command line): "
        "Input should be less than or equal to 64"
    ]


@contextlib.contextmanager
def socket_at(path: Path) -> Iterator[socket.socket]:
    """A listening unix socket at `path`, bound by a relative name: AF_UNIX names are
    limited to 107 bytes, which a test's temporary path can exceed."""
    listener = socket.socket(socket.AF_UNIX)
    os.chdir(path.parent)
    try:
        listener.bind(path.name)
        listener.listen()
        yield listener
    finally:
        os.chdir(REPO)
        listener.close()


@pytest.fixture
def listening_socket(tmp_path: Path) -> Iterator[Path]:
    # A short path: AF_UNIX names are limited to 107 bytes.
    directory = Path(os.environ.get("TMPDIR", "/tmp"))
    path = directory / f"lfsorch-test-{os.getpid()}-{id(tmp_path)}.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen()
    try:
        yield path
    finally:
        listener.close()
        path.unlink()


def test_socket_inside_declared_assets_is_refused(scene: Scene, listening_socket: Path) -> None:
    (scene.stages / "demo").mkdir()
    (scene.stages / "demo/hello.c").write_text("int main(void) { return 0; }\n")
    (scene.stages / "demo/engine.sock").symlink_to(listening_socket)
    path = scene.write("s.yaml", f"stage: s\nassets:\n  - demo/\n{PACKAGES}")
    assert scene.run(path) == [
        f"{path}:3: assets[0]: demo/engine.sock: resolves to {listening_socket}, "
        "outside the stage file's directory"
    ]


def test_socket_named_as_an_asset_is_refused(scene: Scene) -> None:
    with socket_at(scene.stages / "engine.sock"):
        path = scene.write("s.yaml", f"stage: s\nassets: [engine.sock]\n{PACKAGES}")
        assert scene.run(path) == [
            f"{path}:2: assets[0]: engine.sock is a socket; only regular files and directories "
            "can be assets"
        ]


@pytest.mark.parametrize(
    ("assets", "message"),
    [
        ("[/var/run/docker.sock]",
         "'/var/run/docker.sock' is absolute; name assets relative to the stage file"),
        ("[../..]", "'../..' contains '..'; assets must stay beside the stage file"),
        ("[.]", "name files or a subdirectory, not the stage file's own directory as a whole"),
    ],
)  # fmt: skip
def test_assets_cannot_name_anything_outside(scene: Scene, assets: str, message: str) -> None:
    path = scene.write("s.yaml", f"stage: s\nassets: {assets}\n{PACKAGES}")
    assert scene.run(path) == [f"{path}:2: assets[0]: {message}"]


SEES_STAGE = r"""
stage: sees
image: {image}
checkpoint: none
assets: [demo/]
packages:
  - name: look
    script: |
      find /stage | sort > /mnt/lfs/listing
      cat /stage/demo/hello.c > /mnt/lfs/hello.c
      for name in /stage/engine.sock /stage/secret.txt /stage/sees.yaml; do
        if cat "$name" >/dev/null 2>&1; then echo "$name readable" >> /mnt/lfs/seen; fi
      done
      perl -MIO::Socket::UNIX -e '
        my $s = IO::Socket::UNIX->new(Peer => "/stage/engine.sock");
        print $s ? "connected\n" : "refused: $!\n"' > /mnt/lfs/connect
      touch /stage/demo/new 2>/dev/null && echo writable >> /mnt/lfs/seen || true
"""


@pytest.mark.docker
@pytest.mark.usefixtures("no_leftovers")
def test_build_sees_only_its_declared_assets(scene: Scene) -> None:
    (scene.stages / "demo").mkdir()
    (scene.stages / "demo/hello.c").write_text("int main(void) { return 0; }\n")
    (scene.stages / "secret.txt").write_text("beside the stage file\n")
    path = scene.write("sees.yaml", SEES_STAGE.format(image=BASE_IMAGE).lstrip())
    with socket_at(scene.stages / "engine.sock") as listener:
        listener.settimeout(0)
        result = lfsorch("run", str(path), "--lfs", str(scene.lfs), home=scene.home, bounded=False)
        assert result.returncode == 0, result.stdout + result.stderr
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody connected
    assert (scene.lfs / "listing").read_text().split() == [
        "/stage", "/stage/demo", "/stage/demo/hello.c"
    ]  # fmt: skip
    assert (scene.lfs / "hello.c").read_text() == "int main(void) { return 0; }\n"
    assert (scene.lfs / "connect").read_text() == "refused: No such file or directory\n"
    assert not (scene.lfs / "seen").exists()
