"""Reading stage files: YAML with line numbers, schema errors as `FILE:LINE: field: message`."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from orchestrator.errors import LfsorchError
from orchestrator.models import Stage

Location = tuple[str | int, ...]


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

    exit_code = 2

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(problem) for problem in self.problems))


@dataclass(frozen=True)
class StageFile:
    path: Path
    stage: Stage
    lines: dict[Location, int]

    def line_of(self, *location: str | int) -> int:
        return _nearest_line(self.lines, location)


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


def parse_stage_text(text: str, path: Path) -> StageFile:
    """Parse and validate one stage file's text; raise StageFileError with every problem."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        problem = exc.problem or str(exc)
        raise StageFileError([Problem(path, line, "(yaml)", f"invalid YAML: {problem}")]) from None
    except yaml.YAMLError as exc:
        raise StageFileError([Problem(path, 1, "(yaml)", f"invalid YAML: {exc}")]) from None
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
    if problems:
        raise StageFileError(problems)
    return StageFile(path, stage, lines)


def load_stage_file(path: Path) -> StageFile:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise StageFileError([Problem(path, 1, "(file)", "no such file")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise StageFileError([Problem(path, 1, "(file)", f"cannot read: {exc}")]) from None
    return parse_stage_text(text, path)
