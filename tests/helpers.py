"""What tests share: the images and paths they use, the one way to run the CLI, runs with
their events, waiting for a build's container, and trees to snapshot and compare.

Test modules import from here (and from tests.samples), never from one another."""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO, Any

import docker

from orchestrator import api
from orchestrator.build.state import RunState
from orchestrator.checkpoints.store import MANIFEST, PLAIN_MANIFEST, SnapshotStore
from orchestrator.checkpoints.treescan import PARTITION_MARKER
from orchestrator.config import load_config
from orchestrator.execution import engine
from orchestrator.monitor.events import Event
from orchestrator.workspace import Workspace

BASE_IMAGE = "lfsorch/base:bookworm"
REPO = Path(__file__).resolve().parent.parent

# --------------------------------------------------------------------------- the CLI


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "orchestrator", *args]


def _cli_env(home: Path | None, env: dict[str, str] | None) -> dict[str, str]:
    """This process's environment; with `home`, that workspace and no configuration file
    (a developer's own must not reach a test); then `env`, which wins."""
    isolated = {}
    if home is not None:
        isolated = {"LFSORCH_HOME": str(home), "LFSORCH_CONFIG": str(home / "none.yaml")}
    return {**os.environ, **isolated, **(env or {})}


def gone_pid() -> int:
    """The id of a process that has ended (a record left by a killed run names one)."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def run_cli(
    *args: str,
    home: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float | None = 300,
    preexec_fn: Callable[[], object] | None = None,
    check: bool = False,
) -> subprocess.CompletedProcess[str]:
    """`lfsorch ARGS` in a subprocess, as a user runs it, to the end; output captured as
    text. A hang fails the test after `timeout` seconds; with `check`, so does a non-zero
    exit status."""
    return subprocess.run(
        _cli(*args),
        capture_output=True,
        text=True,
        env=_cli_env(home, env),
        cwd=REPO,
        timeout=timeout,
        preexec_fn=preexec_fn,
        check=check,
    )


def start_cli(
    *args: str,
    home: Path | None = None,
    env: dict[str, str] | None = None,
    stdout: int | IO[bytes] = subprocess.PIPE,
    stderr: int = subprocess.STDOUT,
) -> subprocess.Popen[str]:
    """`lfsorch ARGS` started in the background (to signal, kill or race it); stderr goes
    into stdout unless told otherwise."""
    return subprocess.Popen(
        _cli(*args),
        stdout=stdout,
        stderr=stderr,
        text=True,
        env=_cli_env(home, env),
        cwd=REPO,
    )


def wait_for_container(
    client: docker.DockerClient, package: str, owner: int | None = None, timeout: float = 30
) -> None:
    """Until a container of `package` runs; with `owner`, only one started by that process
    (other test sessions may build packages of the same names at the same time)."""
    labels = [f"{engine.PACKAGE}={package}"]
    if owner is not None:
        labels.append(f"{engine.OWNER_PID}={owner}")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.containers.list(filters={"label": labels}):
            return
        time.sleep(0.1)
    raise AssertionError(f"no running container for {package}")


# --------------------------------------------------------------------------- runs in-process


def run_build(
    files: list[Path],
    lfs: Path,
    workspace: Workspace,
    overrides: list[str] | None = None,
    subscribers: Sequence[Callable[[Event], None]] = (),
    **options: Any,
) -> tuple[RunState, list[Event]]:
    """A run as `lfsorch run FILE --lfs DIR -o ...` makes it, with the events it published."""
    recorded: list[Event] = []
    options.setdefault("parallel", 1)
    state = api.run(
        files,
        lfs,
        config=load_config(overrides or []),
        workspace=workspace,
        subscribers=[recorded.append, *subscribers],
        **options,
    )
    return state, recorded


def started(events: list[Event]) -> list[str]:
    """`stage/package` of every build that started, in order."""
    return [f"{e.stage}/{e.package}" for e in events if e.name == "build.start"]


def restores(events: list[Event]) -> list[tuple[str | None, str]]:
    """(stage, reason) of every checkpoint restored during the run."""
    return [(e.stage, e.data["reason"]) for e in events if e.name == "snapshot.restore"]


# --------------------------------------------------------------------------- trees


def partition_text(root: Path) -> dict[str, str]:
    """The partition's own files as text, directories as "<dir>" (lfsorch's marker directory
    is not part of it)."""
    return {
        str(path.relative_to(root)): path.read_text() if path.is_file() else "<dir>"
        for path in sorted(root.rglob("*"))
        if path.relative_to(root).parts[0] != PARTITION_MARKER
    }


def make_tree(root: Path) -> None:
    """A small LFS-like tree with one of every kind of entry a snapshot must keep."""
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/bash").write_bytes(b"\x7fELF bash " * 500)
    os.chmod(root / "usr/bin/bash", 0o755)
    (root / "usr/bin/su").write_bytes(b"su binary")
    os.chmod(root / "usr/bin/su", 0o4755)
    (root / "usr/bin/wall").write_bytes(b"wall binary")
    os.chown(root / "usr/bin/wall", 0, 5)
    os.chmod(root / "usr/bin/wall", 0o2755)
    os.link(root / "usr/bin/bash", root / "usr/bin/bash-hl")
    os.setxattr(root / "usr/bin/bash", "user.lfs.note", b"chapter 6")
    os.symlink("/bin/bash", root / "usr/bin/sh")
    os.symlink("../bin/bash", root / "usr/bin/rel")
    os.symlink("usr/bin", root / "bin")
    (root / "tmp").mkdir()
    os.chmod(root / "tmp", 0o1777)
    (root / "empty").mkdir()
    (root / "home/tester").mkdir(parents=True)
    (root / "home/tester/notes").write_text("hello\n")
    os.chown(root / "home/tester/notes", 1000, 1001)
    os.chown(root / "home/tester", 1000, 1001)
    os.chmod(root / "home/tester", 0o700)
    (root / "dev").mkdir()
    os.mknod(root / "dev/null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.chmod(root / "dev/null", 0o666)
    os.mknod(root / "dev/console", 0o600 | stat.S_IFCHR, os.makedev(5, 1))
    os.mkfifo(root / "dev/initctl", 0o600)


def assert_tree_kinds(root: Path) -> None:
    """Explicit checks, independent of verify_tree, of what must survive a round trip of
    make_tree's tree."""
    mode = lambda p: stat.S_IMODE(os.lstat(root / p).st_mode)  # noqa: E731
    assert mode("usr/bin/su") == 0o4755
    assert mode("usr/bin/wall") == 0o2755
    assert mode("tmp") == 0o1777
    assert mode("home/tester") == 0o700
    notes = os.lstat(root / "home/tester/notes")
    assert (notes.st_uid, notes.st_gid) == (1000, 1001)
    assert os.lstat(root / "usr/bin/wall").st_gid == 5
    assert (root / "usr/bin/bash").read_bytes() == b"\x7fELF bash " * 500
    assert os.readlink(root / "usr/bin/sh") == "/bin/bash"
    assert os.readlink(root / "usr/bin/rel") == "../bin/bash"
    assert os.readlink(root / "bin") == "usr/bin"
    bash, bash_hl = os.lstat(root / "usr/bin/bash"), os.lstat(root / "usr/bin/bash-hl")
    assert bash.st_ino == bash_hl.st_ino and bash.st_nlink == 2
    assert os.getxattr(root / "usr/bin/bash", "user.lfs.note") == b"chapter 6"
    assert (root / "empty").is_dir() and list((root / "empty").iterdir()) == []
    null, console = os.lstat(root / "dev/null"), os.lstat(root / "dev/console")
    assert (
        stat.S_ISCHR(null.st_mode) and os.major(null.st_rdev) == 1 and os.minor(null.st_rdev) == 3
    )
    assert stat.S_ISCHR(console.st_mode) and os.minor(console.st_rdev) == 1
    assert stat.S_ISFIFO(os.lstat(root / "dev/initctl").st_mode)


def tree_state(root: Path) -> dict[str, tuple[object, ...]]:
    """Everything about a tree a refused restore must not change (lfsorch's own identity
    marker aside: it is made on first use and never part of a snapshot)."""
    state: dict[str, tuple[object, ...]] = {}
    for path in [root, *sorted(root.rglob("*"))]:
        if path.relative_to(root).parts[:1] == (PARTITION_MARKER,):
            continue
        info = os.lstat(path)
        content = (
            hashlib.sha256(path.read_bytes()).hexdigest() if stat.S_ISREG(info.st_mode) else None
        )
        state[str(path.relative_to(root))] = (
            info.st_mode, info.st_uid, info.st_gid, info.st_mtime_ns, info.st_ino, content
        )  # fmt: skip
    return state


def apt_root(tmp_path: Path, files: dict[str, str]) -> Path:
    """A root directory whose etc/apt holds `files` (name under etc/apt -> text)."""
    for name, text in files.items():
        path = tmp_path / "etc" / "apt" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


# --------------------------------------------------------------------------- local HTTP


@contextlib.contextmanager
def loopback_http(get: Callable[[BaseHTTPRequestHandler], None]) -> Iterator[str]:
    """An HTTP server on 127.0.0.1 answering GET with `get(handler)`; yields its base URL."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            get(self)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def mounts_under(root: Path) -> list[str]:
    """Mount points at or below `root`, deepest first (what a second engine left mounted)."""
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4]
        if point == str(root) or point.startswith(f"{root}/"):
            points.append(point)
    return sorted(points, key=len, reverse=True)


def snapshot_kinds(store: SnapshotStore, keys: Sequence[str]) -> list[str]:
    """ "full" or "delta" for each snapshot, in order."""
    return ["full" if store.manifest(key).delta_of is None else "delta" for key in keys]


def as_plain_manifests(store: SnapshotStore, *keys: str) -> None:
    """Store the manifests as plain JSON, as lfsorch did before compressing them."""
    for key in keys:
        text = store.manifest_json(key)
        (store.root / key / MANIFEST).unlink()
        (store.root / key / PLAIN_MANIFEST).write_bytes(text)
