"""Stage assets: the files a stage declares beside its stage file, and nothing else.

A build sees them read-only at /stage as a private copy made once per run, never the stage
file's directory itself: that directory may hold anything (a Docker socket in /tmp gives
host root, and read-only mounts do not stop connect()). Only regular files and directories
are accepted, every symlink must resolve inside the stage file's directory, and the copy is
checked against the digest taken when the stage file was read, so what is built is what the
checkpoint key names.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from orchestrator.errors import ExitCode, LfsorchError

MAX_ASSET_FILES = 10_000
MAX_ASSET_BYTES = 256 << 20
_CHUNK = 1 << 20
_KINDS = {
    stat.S_IFSOCK: "a socket",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}


class AssetProblem(Exception):
    """One declared asset (by its index in `assets`) is refused."""

    def __init__(self, index: int, message: str) -> None:
        super().__init__(message)
        self.index = index
        self.message = message


class AssetsChanged(LfsorchError):
    """The assets on disk no longer match what was read with the stage file."""

    exit_code = ExitCode.USER_ERROR


@dataclass(frozen=True)
class Asset:
    """One file or directory of /stage: where it goes, and the real path it is read from."""

    relative: str
    source: Path  # resolved: no symlink in it below `base`
    is_dir: bool
    executable: bool = False
    # The stage file's directory (resolved) and its (st_dev, st_ino) when it was checked:
    # the file is opened from there one component at a time, never through a symlink.
    base: Path | None = None
    base_identity: tuple[int, int] = (0, 0)


def _kind(mode: int) -> str:
    return _KINDS.get(stat.S_IFMT(mode), "not a regular file or directory")


class _Collector:
    """Walks the declared paths, refusing anything that could reach outside or is not data."""

    def __init__(self, base: Path) -> None:
        self.base = base
        info = base.stat()
        self.base_identity = (info.st_dev, info.st_ino)
        self.assets: dict[str, Asset] = {}
        self.total_bytes = 0

    def _resolve(self, index: int, path: Path, shown: str) -> tuple[Path, os.stat_result]:
        try:
            real = path.resolve(strict=True)
        except FileNotFoundError:
            raise AssetProblem(index, f"{shown}: no such file or directory") from None
        except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop
            raise AssetProblem(index, f"{shown}: cannot resolve: {exc}") from None
        if real != self.base and not real.is_relative_to(self.base):
            raise AssetProblem(
                index, f"{shown}: resolves to {real}, outside the stage file's directory"
            )
        try:
            info = real.lstat()
        except OSError as exc:
            raise AssetProblem(index, f"{shown}: cannot read: {exc.strerror}") from None
        if not (stat.S_ISREG(info.st_mode) or stat.S_ISDIR(info.st_mode)):
            raise AssetProblem(
                index,
                f"{shown} is {_kind(info.st_mode)}; only regular files and directories "
                f"can be assets",
            )
        return real, info

    def _add(self, index: int, asset: Asset, size: int) -> None:
        if asset.relative in self.assets:
            return
        if len(self.assets) >= MAX_ASSET_FILES:
            raise AssetProblem(index, f"more than {MAX_ASSET_FILES} files and directories")
        self.total_bytes += size
        if self.total_bytes > MAX_ASSET_BYTES:
            raise AssetProblem(index, f"more than {MAX_ASSET_BYTES >> 20} MiB in all")
        self.assets[asset.relative] = asset

    def add_path(self, index: int, relative: str, ancestors: tuple[tuple[int, int], ...]) -> None:
        real, info = self._resolve(index, self.base / relative, relative)
        if stat.S_ISREG(info.st_mode):
            executable = bool(info.st_mode & 0o111)
            asset = Asset(relative, real, False, executable, self.base, self.base_identity)
            self._add(index, asset, info.st_size)
            return
        identity = (info.st_dev, info.st_ino)
        if identity in ancestors or real == self.base:
            raise AssetProblem(index, f"{relative}: a symlink leads back to a directory above it")
        self._add(index, Asset(relative, real, True), 0)
        try:
            names = sorted(entry.name for entry in os.scandir(real))
        except OSError as exc:
            raise AssetProblem(index, f"{relative}: cannot list: {exc.strerror}") from None
        for name in names:
            self.add_path(index, f"{relative}/{name}", (*ancestors, identity))


def collect_assets(base: Path, declared: Sequence[str]) -> list[Asset]:
    """Every file and directory the declared paths name, sorted so parents come first."""
    collector = _Collector(base.resolve())
    for index, relative in enumerate(declared):
        collector.add_path(index, relative, ())
    return [collector.assets[key] for key in sorted(collector.assets)]


def _open_beneath(asset: Asset) -> int:
    """Open the asset's file from the stage file's directory down, one component at a time
    and never through a symlink: a directory on the way that was swapped for a symlink since
    it was checked (the stage file's directory may be another user's) leads nowhere."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    if asset.base is None:
        return os.open(asset.source, flags)
    directory = os.open(asset.base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        info = os.fstat(directory)
        if (info.st_dev, info.st_ino) != asset.base_identity:
            raise OSError(errno.ELOOP, "the stage file's directory was replaced")
        *parents, name = asset.source.relative_to(asset.base).parts
        for part in parents:
            below = os.open(part, flags | os.O_DIRECTORY, dir_fd=directory)
            os.close(directory)
            directory = below
        return os.open(name, flags, dir_fd=directory)
    finally:
        os.close(directory)


def _open_regular(asset: Asset) -> int:
    """A descriptor on the asset's file, refusing anything swapped in since it was checked."""
    try:
        descriptor = _open_beneath(asset)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise AssetsChanged(
                f"stage asset {asset.relative}: its path no longer leads to the file checked "
                "(a directory on it was replaced by a symlink)",
                hint="make sure nobody else can write to the stage file's directory",
            ) from None
        raise AssetsChanged(f"stage asset {asset.relative}: cannot read: {exc.strerror}") from None
    if not stat.S_ISREG(os.fstat(descriptor).st_mode):
        os.close(descriptor)
        raise AssetsChanged(f"stage asset {asset.relative} is no longer a regular file")
    return descriptor


def _chunks(asset: Asset) -> Iterator[bytes]:
    descriptor = _open_regular(asset)
    with open(descriptor, "rb", closefd=True) as handle:
        while chunk := handle.read(_CHUNK):
            yield chunk


class _Digest:
    """sha256 over each asset's place, kind, executable bit and content, in sorted order."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()

    def add(self, asset: Asset, content_sha256: str = "") -> None:
        kind = "dir" if asset.is_dir else ("exec" if asset.executable else "file")
        self._hash.update(f"{kind}\0{asset.relative}\0{content_sha256}\n".encode())

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def digest_assets(assets: Sequence[Asset]) -> str:
    """The content digest of the assets: part of a stage's build inputs."""
    digest = _Digest()
    for asset in assets:
        content = hashlib.sha256()
        if not asset.is_dir:
            for chunk in _chunks(asset):
                content.update(chunk)
        digest.add(asset, content.hexdigest() if not asset.is_dir else "")
    return digest.hexdigest()


def _make_directory(root: Path, directory: Path) -> None:
    """`mkdir -p` with mode 755 whatever the umask, so the stage's user can read the copy."""
    for path in [*reversed(directory.relative_to(root).parents), directory.relative_to(root)]:
        full = root / path
        if not full.is_dir():
            full.mkdir()
        full.chmod(0o755)


def copy_assets(assets: Sequence[Asset], destination: Path, expected_digest: str) -> None:
    """Copy the assets into `destination` (which must not exist), with plain modes (no setuid,
    readable by the stage's user), and check the copy is what the digest names."""
    staging = destination.with_name(f".{destination.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    digest = _Digest()
    try:
        for asset in assets:
            target = staging / asset.relative
            # A declared `demo/hello.c` brings an otherwise empty `demo/` with it.
            _make_directory(staging, target if asset.is_dir else target.parent)
            if asset.is_dir:
                digest.add(asset)
                continue
            content = hashlib.sha256()
            with target.open("wb") as out:
                for chunk in _chunks(asset):
                    content.update(chunk)
                    out.write(chunk)
            target.chmod(0o755 if asset.executable else 0o644)
            digest.add(asset, content.hexdigest())
        if digest.hexdigest() != expected_digest:
            raise AssetsChanged(
                "the stage's assets changed since the stage file was read",
                hint="run the command again once they stop changing",
            )
        staging.rename(destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
