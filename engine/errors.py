"""Errors that the CLI turns into one clear line and exit code 2."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: printed as one line, exit code 2, nothing launched."""


class ConfigError(UserError):
    """A problem in experiments.toml, located by file, key and (where known) line."""

    def __init__(self, file: str, key: str | None, message: str, line: int | None = None):
        self.file, self.key, self.line, self.message = file, key, line, message
        where = file if line is None else f"{file}:{line}"
        super().__init__(f"{where}: {key}: {message}" if key else f"{where}: {message}")
