"""Content digests of a snapshot's archive and files: which algorithm, and hashers for it.

New manifests use BLAKE3: hashing every file (when writing) and the archive (when writing and
reading it back) is the one cost a snapshot and a restore add to `tar | zstd`, and on one
core BLAKE3 runs several times faster than sha256. Manifests written before name no
algorithm and mean sha256; they are still read, checked and restored. Digests other tools
must agree on stay sha256: image layer ids (`docker` computes them), checkpoint keys.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import blake3

SHA256 = "sha256"
BLAKE3 = "blake3"
# What new manifests record; old manifests without a `digest` field mean SHA256.
DEFAULT = BLAKE3
LEGACY = SHA256

_HASHERS: dict[str, Callable[[], Any]] = {SHA256: hashlib.sha256, BLAKE3: blake3.blake3}
READ_SIZE = 1 << 20


class UnknownDigest(ValueError):
    """A manifest names a digest algorithm this version does not know."""


def hasher_factory(algorithm: str) -> Callable[[], Any]:
    """A constructor of hash objects (`update`, `hexdigest`) for `algorithm`."""
    try:
        return _HASHERS[algorithm]
    except KeyError:
        known = ", ".join(sorted(_HASHERS))
        raise UnknownDigest(f"unknown digest algorithm {algorithm!r} (known: {known})") from None


def file_digest(path: Path, algorithm: str) -> str:
    """The hex digest of the file's content."""
    digest = hasher_factory(algorithm)()
    with path.open("rb") as handle:
        while chunk := handle.read(READ_SIZE):
            digest.update(chunk)
    return str(digest.hexdigest())


def data_digest(data: bytes, algorithm: str) -> str:
    digest = hasher_factory(algorithm)()
    digest.update(data)
    return str(digest.hexdigest())
