"""Error types. Every error a user can cause carries a message that says what to do."""

from __future__ import annotations


class LfsorchError(Exception):
    """Base of all errors the CLI reports as one readable message instead of a traceback."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


class ConfigError(LfsorchError):
    """A configuration value or file is wrong."""

    exit_code = 2


class EngineUnavailable(LfsorchError):
    """No Docker engine answers."""

    exit_code = 3


class ImageMissing(LfsorchError):
    """A stage's image is not present in the engine."""

    exit_code = 3
