"""Whether a source archive is safe to unpack, checked once before the file is first used.

Build scripts unpack sources with `tar -x` as root inside the container, with the partition
mounted: a member named `../x` or `/x`, or a link that leaves the archive's directory, would
write where the build never meant to. tarsafe's rules fit build sources exactly (unlike root
filesystems, which legitimately hold absolute links and devices), so its checks decide, with
two corrections noted where they are made.

The file's content decides whether it is an archive (gzip, bzip2, xz, zstd or plain tar), not
its name: a patch or a signature is not checked, a tarball under any name is.
"""

from __future__ import annotations

import contextlib
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import tarsafe
import zstandard

# Where the checks pretend the archive is unpacked: only string arithmetic happens under it.
_ROOT = "/archive-root"

_COMPRESSIONS = {
    b"\x1f\x8b": "gz",
    b"BZh": "bz2",
    b"\xfd7zXZ\x00": "xz",
    b"\x28\xb5\x2f\xfd": "zst",
}


class _Rules(tarsafe.TarSafe):
    """tarsafe's member rules, with a symlink's target read from the link's own directory.

    tarsafe resolves every symlink from the archive's top, so a kernel tree's
    `tools/.../copyloops/copyuser_64.S -> ../../../../../arch/...` (inside the tree) would be
    refused, and a link one level down pointing two levels up could pass.
    """

    def _is_unsafe_symlink(self, tarinfo: tarfile.TarInfo, root: str) -> bool:
        if not tarinfo.issym():
            return False
        here = os.path.join(root, os.path.dirname(tarinfo.name))
        return not self._is_contained(root, os.path.abspath(os.path.join(here, tarinfo.linkname)))


def _compression(path: Path) -> str | None:
    """`gz`/`bz2`/`xz`/`zst`, `""` for a plain tar, None when the file is neither."""
    with path.open("rb") as fh:
        head = fh.read(512)
    for magic, kind in _COMPRESSIONS.items():
        if head.startswith(magic):
            return kind
    return "" if head[257:262] == b"ustar" else None


@contextlib.contextmanager
def _open(path: Path, kind: str) -> Iterator[Any]:
    with path.open("rb") as raw:
        stream: IO[bytes] = raw
        if kind == "zst":
            stream = zstandard.ZstdDecompressor().stream_reader(raw)
            kind = ""
        # GNU tar skips a damaged block and reads on; ignore_zeros does the same here, so a
        # member hidden after garbage is still seen.
        with _Rules.open(fileobj=stream, mode=f"r|{kind}", ignore_zeros=True) as tar:
            yield tar


def _member_problem(tar: Any, member: tarfile.TarInfo, links: set[str]) -> str | None:
    name = member.name
    # Explicit first: an absolute name or target under the pretend root would pass tarsafe.
    if os.path.isabs(name):
        return f"member {name!r} has an absolute name"
    if member.issym() and os.path.isabs(member.linkname):
        return f"symlink {name!r} points to the absolute path {member.linkname!r}"
    if tar._is_traversal_attempt(tarinfo=member, root=_ROOT):
        return f"member {name!r} would be written outside the archive's directory"
    if tar._is_unsafe_symlink(tarinfo=member, root=_ROOT):
        return f"symlink {name!r} -> {member.linkname!r} leaves the archive's directory"
    if tar._is_unsafe_link(tarinfo=member, root=_ROOT):
        return f"hard link {name!r} -> {member.linkname!r} leaves the archive's directory"
    if member.isdev():
        return f"member {name!r} is a device or FIFO"
    normal = os.path.normpath(name)
    parts = normal.split("/")
    through = next(
        (p for p in ("/".join(parts[:i]) for i in range(1, len(parts))) if p in links), None
    )
    if through is not None:
        # Each link may stay inside, yet a member written through one lands where it points.
        return f"member {name!r} is written through the symlink {through!r}"
    if member.issym():
        links.add(normal)
    return None


def unsafe_reason(path: Path) -> str | None:
    """Why unpacking `path` would be unsafe; None when it is safe or not a tar archive."""
    kind = _compression(path)
    if kind is None:
        return None
    try:
        with _open(path, kind) as tar:
            links: set[str] = set()
            for member in tar:
                problem = _member_problem(tar, member, links)
                if problem is not None:
                    return problem
                tar.members.clear()  # nothing is looked up later; a big tree stays small
    except tarfile.ReadError as exc:
        if str(exc) in ("empty file", "truncated header"):
            return None  # compressed, but not a tar archive inside (a .patch.gz)
        return f"it cannot be read as a tar archive ({exc})"
    except (OSError, EOFError, zstandard.ZstdError, tarfile.TarError) as exc:
        return f"it cannot be read as a tar archive ({exc})"
    return None
