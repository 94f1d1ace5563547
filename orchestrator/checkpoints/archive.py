"""Deterministic tar+zstd archives of a directory tree, and the chunk streams around them.

GNU tar (fast, knows every file type, xattrs, hard links) produces a PAX stream from an
explicit, sorted file list; Python compresses it with multi-threaded zstd and, on the way
through, hashes the compressed bytes and every regular file's data. The archive's bytes depend
only on the tree: sorted names, numeric owners without names, no atime/ctime, a fixed PAX
extended header name. Modification times are kept exactly (nanoseconds): make depends on them,
and they are part of "the same tree", so determinism does not need them clamped.

Reading an archive back goes through `tarstream` (validation) and `extract` (extraction).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import queue
import subprocess
import tarfile
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, BinaryIO

import zstandard

from orchestrator.checkpoints import digests
from orchestrator.checkpoints.tarstream import (
    BLOCK,
    CHUNK,
    TYPE_NAMES,
    ArchiveError,
    canonical_name,
    decode_text,
    field_text,
    padded_size,
    parse_octal,
)

ZSTD_LEVEL = 3
# Compressed output is handed to the digest and the file in pieces of this size.
WRITE_SIZE = 1 << 20
# Compressed bytes decompressed per step when reading an archive back.
READ_SIZE = 2 << 20

TAR_CREATE_ARGS = (
    "--create",
    "--file=-",
    "--format=posix",
    "--numeric-owner",
    # The default extended-header name contains tar's pid, which would break determinism.
    "--pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime",
    "--xattrs",
    "--xattrs-include=*",
    # We pass every path ourselves, already sorted depth-first like --sort=name would.
    "--no-recursion",
    "--null",
    "--verbatim-files-from",
)


# --------------------------------------------------------------------------- writing


@dataclass(frozen=True, slots=True)
class Archived:
    """One member as our own tar wrote it: what the manifest needs, nothing more."""

    name: str  # canonical
    kind: str
    size: int
    linkname: str
    digest: str | None  # of a regular file's data, in the algorithm the writer was given


@dataclass(frozen=True)
class WriteResult:
    digest: str  # of the compressed archive, in the algorithm the writer was given
    size: int  # compressed bytes
    raw_size: int  # uncompressed tar bytes
    members: list[Archived]


class _HashingFile:
    """Write-through wrapper that hashes and counts what the compressor writes."""

    def __init__(self, out: BinaryIO, new_hasher: Callable[[], Any]) -> None:
        self._out = out
        self.hash = new_hasher()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        self.size += len(data)
        return self._out.write(data)


class _TarIndexer:
    """Lean parser for the stream *our* GNU tar writes: names, kinds, sizes, file digests.

    Not a validator: untrusted archives go through `TarScanner`/`MemberPolicy`. This one only
    has to be right about tar's posix output (it refuses anything else) and cheap, because it
    runs beside compression on every byte of a full snapshot. Per member it reads the type,
    size, name and link fields and the PAX `path`/`linkpath`/`size` records; file data is
    hashed straight from memoryview slices of the chunk and never copied.
    """

    def __init__(self, new_hasher: Callable[[], Any] = hashlib.sha256) -> None:
        self._new_hasher = new_hasher
        self.members: list[Archived] = []
        self.raw_size = 0
        self.ended = False
        self._held = bytearray()  # header (or PAX header data) bytes gathered so far
        self._need = BLOCK  # bytes `_held` must reach before it can be parsed
        self._pax_size = -1  # >= 0 while gathering a PAX header's records
        self._pax: dict[bytes, bytes] = {}
        self._zero_blocks = 0
        self._data_left = 0  # data bytes of the current member still to hash
        self._skip = 0  # padding still to skip after them
        self._hasher: Any = None
        self._pending: tuple[str, str, int, str] | None = None

    def feed(self, chunk: bytes | memoryview) -> None:
        view = memoryview(chunk)
        end = len(view)
        self.raw_size += end
        pos = 0
        while pos < end:
            if self._data_left:
                take = min(self._data_left, end - pos)
                if self._hasher is not None:
                    self._hasher.update(view[pos : pos + take])
                self._data_left -= take
                pos += take
                if not self._data_left:
                    self._finish()
            elif self._skip:
                take = min(self._skip, end - pos)
                self._skip -= take
                pos += take
            elif self.ended:
                return  # end-of-archive blocks and record padding: zeros, nothing to index
            elif not self._held and end - pos >= self._need:
                # The common case: the whole header lies inside this chunk, no copy needed.
                stop = pos + self._need
                self._header(view[pos:stop])
                pos = stop
            else:
                take = min(self._need - len(self._held), end - pos)
                self._held += view[pos : pos + take]
                pos += take
                if len(self._held) == self._need:
                    held, self._held = self._held, bytearray()
                    self._header(memoryview(held))

    def close(self) -> None:
        if not self.ended or self._data_left or self._pending is not None:
            raise ArchiveError("tar output ended before its end-of-archive blocks")

    def _header(self, data: memoryview) -> None:
        if self._pax_size >= 0:
            self._pax = _pax_records(bytes(data[: self._pax_size]))
            self._pax_size = -1
            self._need = BLOCK
            return
        block = bytes(data)
        if block[257:265] != b"ustar\x0000":
            if not any(block):
                self._zero_blocks += 1
                self.ended = self._zero_blocks == 2
                return
            raise ArchiveError(f"tar wrote a header this tool does not read: {block[:100]!r}")
        type_ = block[156:157]
        pax, self._pax = self._pax, {}
        size = int(pax[b"size"]) if b"size" in pax else parse_octal(block[124:136])
        if type_ == tarfile.XHDTYPE:
            self._pax_size = size
            self._need = padded_size(size)
            return
        kind = TYPE_NAMES.get(type_)
        if kind is None:
            raise ArchiveError(f"tar wrote a member of unexpected type {type_!r}")
        if b"path" in pax:
            name = decode_text(pax[b"path"])
        else:
            prefix = field_text(block[345:500])
            name = f"{prefix}/{field_text(block[0:100])}" if prefix else field_text(block[0:100])
        link = decode_text(pax[b"linkpath"]) if b"linkpath" in pax else field_text(block[157:257])
        self._pending = (canonical_name(name), kind, size, link)
        self._hasher = self._new_hasher() if kind == "file" else None
        self._data_left = size
        self._skip = padded_size(size) - size
        if not size:
            self._finish()

    def _finish(self) -> None:
        assert self._pending is not None
        name, kind, size, link = self._pending
        digest = self._hasher.hexdigest() if self._hasher is not None else None
        self.members.append(Archived(name, kind, size, link, digest))
        self._pending = None
        self._hasher = None


def _pax_records(data: bytes) -> dict[bytes, bytes]:
    """PAX records of a header tar itself wrote ("LEN key=value\\n", values may hold anything)."""
    records: dict[bytes, bytes] = {}
    pos = 0
    while pos < len(data) and data[pos]:
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        records[key] = value
        pos += length
    return records


def sort_key(path: str) -> tuple[int, list[str]]:
    """Depth-first name order: a directory's whole subtree follows it directly."""
    return (0, []) if path == "." else (1, path.split("/"))


def write_archive(
    tree: Path, paths: Iterable[str], out: BinaryIO, *, digest: str = digests.DEFAULT
) -> WriteResult:
    """Write a zstd-compressed PAX archive of `paths` (relative to `tree`, "." is the root);
    the archive and each regular file's data are hashed with `digest` on the way.

    `paths` are archived in the order given; pass them sorted with `sort_key`. They may come
    from a lazy iterable (a tree walk): tar gets each name as soon as it is produced, so the
    walk overlaps with archiving instead of running before it on one core. An exception
    raised by the iterable is re-raised here once tar has stopped.
    """
    command = ["tar", "-C", str(tree), *TAR_CREATE_ARGS, "--files-from=-"]
    return _compress_from(command, paths, out, digests.hasher_factory(digest))


def _compress_from(
    command: list[str], names: Iterable[str], out: BinaryIO, new_hasher: Callable[[], Any]
) -> WriteResult:
    indexer = _TarIndexer(new_hasher)
    sink = _HashingFile(out, new_hasher)
    compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL, threads=-1)
    # stderr goes to a file: a pipe could fill with warnings and stall tar mid-archive.
    with (
        tempfile.TemporaryFile(prefix="lfsorch-tar-") as stderr,
        subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr
        ) as proc,
    ):
        assert proc.stdin is not None and proc.stdout is not None
        with contextlib.suppress(OSError):
            # A 1 MiB pipe instead of 64 KiB: tar writes 10 KiB records, and each full pipe
            # costs a wake-up on both sides.
            fcntl.fcntl(proc.stdout.fileno(), fcntl.F_SETPIPE_SZ, CHUNK)
        feeder = _NameFeeder(proc.stdin, names)
        try:
            # Indexing and hashing file data runs beside compression (both release the GIL
            # for their heavy part), so the pipeline costs about what the slower of them does.
            with (
                _Consumer(indexer.feed) as parse,
                compressor.stream_writer(
                    sink,  # type: ignore[arg-type]
                    closefd=False,
                    write_size=WRITE_SIZE,
                ) as writer,
            ):
                while chunk := proc.stdout.read(CHUNK):
                    parse.put(chunk)
                    writer.write(chunk)
        except BaseException:
            proc.kill()  # unblocks the feeder too (its pipe breaks)
            raise
        finally:
            feeder.join()
        status = proc.wait()
        stderr.seek(0)
        errors = stderr.read().decode(errors="replace").strip()
    if feeder.error is not None and not isinstance(feeder.error, BrokenPipeError):
        raise feeder.error  # the walk failed: tar archived only part of the tree
    if status != 0 or feeder.error is not None:
        raise ArchiveError(f"tar could not archive the tree (exit {status}): {errors}")
    indexer.close()
    return WriteResult(sink.hash.hexdigest(), sink.size, indexer.raw_size, indexer.members)


class _NameFeeder:
    """Writes NUL-terminated names to tar's stdin from a thread, then closes it."""

    def __init__(self, stdin: IO[bytes], names: Iterable[str]) -> None:
        self._stdin = stdin
        self._names = names
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        batch = bytearray()
        try:
            for name in self._names:
                batch += os.fsencode(name)
                batch += b"\0"
                if len(batch) >= 1 << 14:
                    self._stdin.write(batch)
                    batch.clear()
            self._stdin.write(batch)
        except BaseException as exc:
            self.error = exc
        finally:
            with contextlib.suppress(OSError):
                self._stdin.close()

    def join(self) -> None:
        self._thread.join()


class _Consumer:
    """Runs `work` on each put() item in a thread; re-raises its error on the way out."""

    def __init__(self, work: Callable[[bytes], None], depth: int = 16) -> None:
        self._work = work
        self._queue: queue.Queue[bytes | None] = queue.Queue(depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> _Consumer:
        self._thread.start()
        return self

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self._work(item)
                except BaseException as exc:
                    self._error = exc

    def put(self, item: bytes) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put(item)

    def __exit__(self, *exc_info: object) -> None:
        self._queue.put(None)
        self._thread.join()
        if self._error is not None and exc_info[0] is None:
            raise self._error


def prefetch(chunks: Iterable[bytes], depth: int = 4) -> Iterator[bytes]:
    """Produce `chunks` in a thread (decompression overlaps with parsing and extraction)."""
    results: queue.Queue[tuple[bytes | None, BaseException | None]] = queue.Queue(depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for chunk in chunks:
                if stop.is_set():
                    return
                results.put((chunk, None))
            results.put((None, None))
        except BaseException as exc:
            results.put((None, exc))

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while True:
            chunk, error = results.get()
            if error is not None:
                raise error
            if chunk is None:
                return
            yield chunk
    finally:
        stop.set()
        with contextlib.suppress(queue.Empty):
            while True:
                results.get_nowait()
        thread.join(timeout=5)


# --------------------------------------------------------------------------- reading


def decompressed_chunks(path: Path, expected: str, source: str, algorithm: str) -> Iterator[bytes]:
    """Yield the decompressed archive; raise at the end if its compressed digest differs.

    The digest covers the whole file, so it is only known after the last chunk: callers
    extract into a staging directory that is discarded unless the whole stream passed.
    Each step decompresses READ_SIZE compressed bytes (several MiB out) in one call, which
    releases the GIL for all of it: with 1 MiB steps, a decompressing thread spent more time
    waiting for the GIL between steps than decompressing.
    """
    digest = digests.hasher_factory(algorithm)()
    decompressor = zstandard.ZstdDecompressor().decompressobj(
        write_size=CHUNK, read_across_frames=True
    )
    with path.open("rb", buffering=0) as raw:
        while data := raw.read(READ_SIZE):
            digest.update(data)
            try:
                out = decompressor.decompress(data)
            except zstandard.ZstdError as exc:
                raise ArchiveError(f"{source}: archive {path} is corrupt ({exc})") from None
            if out:
                yield out
    found = digest.hexdigest()
    if found != expected:
        raise ArchiveError(
            f"{source}: archive {path} has {algorithm} {found[:16]}…, "
            f"the manifest says {expected[:16]}…",
            hint="the archive was altered or damaged; delete the snapshot and recreate it",
        )


class _ChunkStream:
    """File-like over an iterator of chunks (what scan_stream reads)."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = iter(chunks)

    def read(self, size: int = -1) -> bytes:
        return next(self._chunks, b"")


def chunk_stream(chunks: Iterable[bytes]) -> IO[bytes]:
    return _ChunkStream(chunks)  # type: ignore[return-value]


def tar_chunks(tree: Path, paths: list[str]) -> Iterator[bytes]:
    """The uncompressed archive of `paths` (same bytes `write_archive` compresses)."""
    with tempfile.NamedTemporaryFile(prefix="lfsorch-list-", suffix=".txt") as listing:
        listing.write(b"".join(os.fsencode(p) + b"\0" for p in paths))
        listing.flush()
        command = ["tar", "-C", str(tree), *TAR_CREATE_ARGS, f"--files-from={listing.name}"]
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
            assert proc.stdout is not None and proc.stderr is not None
            while chunk := proc.stdout.read(CHUNK):
                yield chunk
            errors = proc.stderr.read().decode(errors="replace").strip()
            if proc.wait() != 0:
                raise ArchiveError(
                    f"tar could not archive {tree} (exit {proc.returncode}): {errors}"
                )
