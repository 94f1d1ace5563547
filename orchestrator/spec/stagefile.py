"""Reading stage files: YAML with line numbers, schema errors as `FILE:LINE: field: message`."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from orchestrator.errors import ExitCode, LfsorchError
from orchestrator.spec.assets import (
    Asset,
    AssetProblem,
    AssetsChanged,
    collect_assets,
    copy_assets,
    digest_assets,
)
from orchestrator.spec.environment import EnvironmentTooLarge, expand_environment
from orchestrator.spec.models import Stage

Location = tuple[str | int, ...]
MAX_STAGE_FILE_BYTES = 1 << 20
_FILE_KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFSOCK: "a socket",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}


@dataclass(frozen=True)
class Problem:
    """One thing wrong in a stage file, located as precisely as the file allows."""

    file: Path
    line: int
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.field}: {self.message}"


class StageFileError(LfsorchError):
    """One or more stage files are invalid; carries every problem found."""

    exit_code = ExitCode.USER_ERROR

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(problem) for problem in self.problems))


@dataclass(frozen=True)
class StageFile:
    path: Path
    stage: Stage
    lines: dict[Location, int]
    assets: tuple[Asset, ...] = ()
    # Content digest of the assets (sha256 hex, over an empty list when none are declared).
    asset_digest: str = field(default_factory=lambda: digest_assets(()))

    def line_of(self, *location: str | int) -> int:
        return _nearest_line(self.lines, location)


class _StageLoader(yaml.SafeLoader):
    """SafeLoader without anchors and aliases: a few lines of aliases can expand to
    gigabytes, and stage files have no need for them."""

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise _AnchorRefused(event.start_mark)
        return super().compose_node(parent, index)


class _AnchorRefused(Exception):
    def __init__(self, mark: yaml.Mark) -> None:
        super().__init__("YAML anchors and aliases (& and *) are not allowed in stage files")
        self.line = mark.line + 1


def field_path(location: Iterable[str | int]) -> str:
    """`('packages', 1, 'depends', 0)` -> `packages[1].depends[0]`."""
    text = ""
    for part in location:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text or "(file)"


def _nearest_line(lines: dict[Location, int], location: Location) -> int:
    for end in range(len(location), -1, -1):
        if location[:end] in lines:
            return lines[location[:end]]
    return 1


def _index_lines(node: yaml.Node, location: Location, lines: dict[Location, int]) -> None:
    lines[location] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value
            lines[(*location, key)] = key_node.start_mark.line + 1
            _index_lines(value_node, (*location, key), lines)
            # A key's own line is more useful than its value's for scalar values.
            lines[(*location, key)] = key_node.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _index_lines(item, (*location, index), lines)


def _duplicate_keys(node: yaml.Node, location: Location) -> list[tuple[Location, int]]:
    found: list[tuple[Location, int]] = []
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            if key_node.value in seen:
                found.append(((*location, key_node.value), key_node.start_mark.line + 1))
            seen.add(key_node.value)
            found.extend(_duplicate_keys(value_node, (*location, key_node.value)))
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            found.extend(_duplicate_keys(item, (*location, index)))
    return found


def _pydantic_message(error: Any) -> str:
    if error["type"] == "extra_forbidden":
        return "unknown key"
    if error["type"] == "missing":
        return "required key is missing"
    message = str(error["msg"])
    return message.removeprefix("Value error, ")


def _compose(text: str, path: Path) -> tuple[yaml.Node | None, Any]:
    """The node tree (for lines) and the data, composed once, without aliases."""
    loader = _StageLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except _AnchorRefused as exc:
        raise StageFileError([Problem(path, exc.line, "(yaml)", str(exc))]) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        problem = exc.problem or str(exc)
        raise StageFileError([Problem(path, line, "(yaml)", f"invalid YAML: {problem}")]) from None
    except yaml.YAMLError as exc:
        raise StageFileError([Problem(path, 1, "(yaml)", f"invalid YAML: {exc}")]) from None
    except RecursionError:
        raise StageFileError(
            [Problem(path, 1, "(yaml)", "invalid YAML: nested too deeply")]
        ) from None
    finally:
        loader.dispose()
    return node, data


def parse_stage_text(text: str, path: Path) -> StageFile:
    """Parse and validate one stage file's text; raise StageFileError with every problem."""
    node, data = _compose(text, path)
    if node is None or not isinstance(data, dict):
        raise StageFileError([Problem(path, 1, "(file)", "expected a mapping with a 'stage' key")])

    lines: dict[Location, int] = {}
    _index_lines(node, (), lines)
    problems = [
        Problem(path, line, field_path(location), "key given twice")
        for location, line in _duplicate_keys(node, ())
    ]
    try:
        stage = Stage.model_validate(data)
    except ValidationError as exc:
        for error in exc.errors():
            location = tuple(error["loc"])
            problems.append(
                Problem(
                    path,
                    _nearest_line(lines, location),
                    field_path(location),
                    _pydantic_message(error),
                )
            )
        raise StageFileError(problems) from None
    problems.extend(_environment_problems(stage, path, lines))
    if problems:
        raise StageFileError(problems)
    return StageFile(path, stage, lines)


def _environment_problems(stage: Stage, path: Path, lines: dict[Location, int]) -> list[Problem]:
    """Variables that expand past what a build can receive, with the line that names them."""
    problems: list[Problem] = []
    for index, package in enumerate(stage.packages):
        try:
            expand_environment([stage.environment, package.environment])
        except EnvironmentTooLarge as exc:
            location: Location = (
                ("packages", index, "environment", exc.name)
                if exc.name in package.environment
                else ("environment", exc.name)
            )
            problem = Problem(
                path, _nearest_line(lines, location), field_path(location), exc.message
            )
            if problem not in problems:
                problems.append(problem)
    return problems


def _refuse(path: Path, message: str) -> StageFileError:
    return StageFileError([Problem(path, 1, "(file)", message)])


def read_stage_text(path: Path) -> str:
    """The file's text, read only if it is a regular file of at most 1 MiB: a FIFO would
    block, and /dev/zero would fill memory."""
    try:
        info = path.stat()
    except FileNotFoundError:
        raise _refuse(path, "no such file") from None
    except OSError as exc:
        raise _refuse(path, f"cannot read: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        kind = _FILE_KINDS.get(stat.S_IFMT(info.st_mode), "not a regular file")
        raise _refuse(path, f"is {kind}, not a regular file")
    limit = f"larger than {MAX_STAGE_FILE_BYTES >> 20} MiB"
    if info.st_size > MAX_STAGE_FILE_BYTES:
        raise _refuse(path, f"{limit} ({info.st_size} bytes)")
    try:
        # O_NONBLOCK: should a FIFO be swapped in after stat(), open() must not wait for it.
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with open(descriptor, "rb", closefd=True) as handle:
            if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                raise _refuse(path, "is not a regular file")
            data = handle.read(MAX_STAGE_FILE_BYTES + 1)
    except OSError as exc:
        raise _refuse(path, f"cannot read: {exc.strerror}") from None
    if len(data) > MAX_STAGE_FILE_BYTES:
        raise _refuse(path, limit)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _refuse(path, f"not UTF-8 text (byte {exc.start})") from None


def _with_assets(stage_file: StageFile) -> StageFile:
    declared = stage_file.stage.assets
    if not declared:
        return stage_file
    try:
        assets = collect_assets(stage_file.path.parent, declared)
        digest = digest_assets(assets)
    except AssetProblem as exc:
        location = ("assets", exc.index)
        raise StageFileError(
            [
                Problem(
                    stage_file.path,
                    stage_file.line_of(*location),
                    field_path(location),
                    exc.message,
                )
            ]
        ) from None
    except AssetsChanged as exc:
        line = stage_file.line_of("assets")
        raise StageFileError([Problem(stage_file.path, line, "assets", exc.message)]) from None
    return StageFile(stage_file.path, stage_file.stage, stage_file.lines, tuple(assets), digest)


def load_stage_file(path: Path) -> StageFile:
    """Read, parse and validate one stage file, with the assets it declares."""
    return _with_assets(parse_stage_text(read_stage_text(path), path))


def copy_stage_assets(files: Iterable[StageFile], root: Path) -> dict[str, Path]:
    """Each stage's assets copied under `root/STAGE`, checked against the digest taken when
    the stage file was read; stages without assets get no entry (and no /stage)."""
    copies: dict[str, Path] = {}
    for stage_file in files:
        if stage_file.assets:
            target = root / stage_file.stage.stage
            copy_assets(stage_file.assets, target, stage_file.asset_digest)
            copies[stage_file.stage.stage] = target
    return copies


def asset_digest(stage_file: StageFile) -> str:
    """sha256 (hex) of the stage's assets, by path, kind, executable bit and content, as read
    with the stage file; the same for every stage without assets. A build input."""
    return stage_file.asset_digest
