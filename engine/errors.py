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


class DamagedFile(UserError, ValueError):
    """A file qtui wrote earlier (a checkpoint, calibration, samples, per-sample data) that is
    truncated, altered or not what its name says: one line naming the file and what is wrong.
    Also a ValueError, what the loaders raised for a bad file before."""

    def __init__(self, path, problem: str):
        self.path, self.problem = str(path), problem
        super().__init__(f"{path}: {problem}")


class DamagedDatabase(UserError):
    """A `qtui.db` that SQLite cannot read (truncated, overwritten, not a database). Raised
    before anything is written to it; the message says how to recover what it holds."""

    def __init__(self, path, problem: str):
        self.path, self.problem = str(path), problem
        super().__init__(
            f"{path}: damaged database ({problem}); nothing was changed. Move it aside (with its -wal "
            f"file, if any) and recover what it holds: mv {path} {path}.damaged && "
            f'sqlite3 {path}.damaged ".recover" | sqlite3 {path}'
        )
