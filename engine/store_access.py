"""Whether this user may write a runs folder and its database, and reading one they may not.

Commands that write (`engine run`, `engine queue add`, `engine queue cancel`, qtui) check
`write_problem` first and stop with one line naming the path ("runs/qtui.db: cannot write
(permission denied); ..."), before anything is created. Commands that only read (`engine list`,
`show`, `export`, `compare`, `report`, `queue`) open a database they cannot write read-only
(`open_readonly`): SQLite's `mode=ro`, or, when the database has no write-ahead log to merge
(`qtui.db-wal` absent or empty: the last writer closed it), `immutable=1`, which needs no
`qtui.db-shm` (a reader without write access to the folder cannot create one). An immutable
reader takes no locks: a writer that starts meanwhile writes its own new log, not the pages
being read, so a one-shot read stays consistent. A log with changes in it that this user can
neither merge nor map read-only is said plainly instead. Standard library only at import (qtui's
start-up imports this module).
"""

from __future__ import annotations

import os
from pathlib import Path

from engine.errors import UserError

DB_NAME = "qtui.db"  # engine.store.DB_NAME (kept out of qtui's start-up)
HINT = "ask its owner for write access, or use --runs-dir with a folder you can write"


class NotWritable(UserError):
    """The runs folder or its database cannot be written by this user."""


def read_only_fs(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def write_problem(runs_dir: str | Path) -> str | None:
    """Why this user cannot write `runs_dir` and its database, in one line; None if they can."""
    runs = Path(runs_dir)
    db = runs / DB_NAME
    if not runs.exists():
        parent = runs.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if read_only_fs(parent):
            return f"{runs}: cannot create (read-only file system at {parent}); {HINT}"
        if not os.access(parent, os.W_OK | os.X_OK):
            return f"{runs}: cannot create (permission denied in {parent}); {HINT}"
        return None
    if not runs.is_dir():
        return f"{runs}: not a folder"
    if read_only_fs(runs):
        return f"{db if db.exists() else runs}: cannot write (read-only file system); {HINT}"
    for path in (db, db.with_name(DB_NAME + "-wal"), db.with_name(DB_NAME + "-shm")):
        if path.exists() and not os.access(path, os.R_OK | os.W_OK):
            return f"{path}: cannot write (permission denied); {HINT}"
    if not os.access(runs, os.W_OK | os.X_OK):
        return (f"{runs}: cannot write (permission denied): run folders and SQLite's {DB_NAME}-wal "
                f"are created there; {HINT}")
    return None


def check_writable(runs_dir: str | Path) -> None:
    problem = write_problem(runs_dir)
    if problem:
        raise NotWritable(problem)


def open_readonly(runs_dir: str | Path):
    """A `Store` on a database this user may read but not write; its writes fail. Raises
    FileNotFoundError when there is none, UserError when it cannot be read without writing."""
    import sqlite3

    import sqlite_utils

    from engine.store import SCHEMA_VERSION, Store

    runs = Path(runs_dir)
    path = runs / DB_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no database here")
    wal = path.with_name(DB_NAME + "-wal")
    immutable = not wal.exists() or wal.stat().st_size == 0
    uri = f"{path.resolve().as_uri()}?mode=ro" + ("&immutable=1" if immutable else "")
    try:
        conn = sqlite3.connect(uri, uri=True, timeout=10)
        try:
            tables = {r[0] for r in conn.execute("select name from sqlite_master where type = 'table'")}
            if not {"meta", "runs"} <= tables:
                raise UserError(f"{path}: not a qtui database (no runs table)")
            row = conn.execute("select value from meta where key = 'schema_version'").fetchone()
            if row is None or not str(row[0]).isdigit():
                raise UserError(f"{path}: not a qtui database (no schema version)")
            version = int(row[0])
            columns = {r[1] for r in conn.execute("pragma table_info(runs)")}
        except BaseException:
            conn.close()
            raise
    except sqlite3.Error as exc:
        raise UserError(
            f"{path}: cannot read it without write permission ({exc}): its write-ahead log {wal.name} holds "
            f"changes that only a writer can merge; {HINT}") from None
    if version != SCHEMA_VERSION or "protocol" not in columns:
        conn.close()
        raise UserError(f"{path}: schema version {version} needs an upgrade (this qtui reads {SCHEMA_VERSION}), "
                        f"which needs write access; {HINT}")
    store = Store(db=sqlite_utils.Database(conn), runs_dir=runs.resolve())
    store.read_only = True
    return store
