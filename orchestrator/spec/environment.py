"""A build's environment variables as stage files and configuration give them: layers merged
in order, `$NAME` and `${NAME}` expanded from the variables set before, each value bounded.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from orchestrator.errors import ExitCode, LfsorchError

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# The book's PATH inside the chroot (chapter 7 on), where no stage or configuration sets one.
CHROOT_PATH = "/usr/bin:/usr/sbin"


class EnvironmentTooLarge(LfsorchError):
    """A variable longer than one exec() argument may be, once its references are expanded."""

    exit_code = ExitCode.USER_ERROR

    def __init__(self, name: str) -> None:
        super().__init__(
            f"environment variable {name} expands to more than {MAX_VARIABLE_BYTES >> 10} KiB, "
            "the most one variable can hold in a build",
            hint="shorten it, or keep large data in a file under /stage",
        )
        self.name = name


# Linux's MAX_ARG_STRLEN: each NAME=VALUE travels as one argument (see container_command).
MAX_VARIABLE_BYTES = 128 << 10
_REFERENCE = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")


def _expanded(name: str, value: str, merged: dict[str, str]) -> str:
    """`value` with $NAME/${NAME} replaced from `merged`, refused as soon as it grows past the
    limit: references nest, so a few lines could otherwise expand to gigabytes."""
    pieces: list[str] = []
    size = len(name) + 2  # NAME=...\0
    last = 0
    for match in _REFERENCE.finditer(value):
        replacement = merged.get(match.group(1) or match.group(2), match.group(0))
        for piece in (value[last : match.start()], replacement):
            size += len(piece.encode())
            if size > MAX_VARIABLE_BYTES:
                raise EnvironmentTooLarge(name)
            pieces.append(piece)
        last = match.end()
    pieces.append(value[last:])
    size += len(pieces[-1].encode())
    if size > MAX_VARIABLE_BYTES:
        raise EnvironmentTooLarge(name)
    return "".join(pieces)


def expand_environment(layers: Sequence[dict[str, str]]) -> dict[str, str]:
    """Merge variable layers in order, expanding $NAME/${NAME} from variables set before."""
    merged: dict[str, str] = {}
    for layer in layers:
        for name, value in layer.items():
            merged[name] = _expanded(name, value, merged)
    merged.setdefault("PATH", DEFAULT_PATH)
    return merged
