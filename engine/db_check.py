"""Is `qtui.db` a database SQLite can read? Checked before anything opens it for writing.

A truncated copy, a file overwritten by another program or a disk error leaves a file SQLite
refuses ("file is not a database", "database disk image is malformed"). Opening it as usual
would first try to write (switch to WAL, create or migrate the schema), so `check_database`
looks without writing: the 100-byte header (magic string, page size, page count against the
file's size), then a read-only connection that reads the schema. It raises
`engine.errors.DamagedDatabase` (one line: the file, what is wrong, nothing changed, how to
recover) and never modifies the file. Imports only sqlite3, so qtui checks before it starts.

An empty file is a new database (SQLite treats it so), unless a write-ahead log with content
sits beside it: then the database's pages are missing and it is damaged.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from engine.errors import DamagedDatabase

MAGIC = b"SQLite format 3\x00"


def _wal_bytes(path: Path) -> int:
    wal = path.with_name(path.name + "-wal")
    try:
        return wal.stat().st_size
    except OSError:
        return 0


def check_database(path: str | Path) -> None:
    """DamagedDatabase if `path` exists and is not a readable SQLite database; else nothing.
    Read-only: the file's bytes are never changed. A verdict of damage is confirmed by a second
    look, so that another process checkpointing at that moment is not mistaken for damage."""
    try:
        _check(Path(path))
    except DamagedDatabase:
        time.sleep(0.05)
        _check(Path(path))


def _check(path: Path) -> None:
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(100)
    except FileNotFoundError:
        return
    except OSError:
        return  # unreadable (permissions): opening it reports that
    wal = _wal_bytes(path)
    if size == 0:
        if wal:
            raise DamagedDatabase(path, f"the file is empty but its write-ahead log {path.name}-wal holds {wal} bytes")
        return
    if len(head) < 100 and MAGIC.startswith(head[:16]):  # cut inside the header itself
        raise DamagedDatabase(path, f"truncated: {size} bytes, shorter than SQLite's 100-byte header")
    if not head.startswith(MAGIC):
        raise DamagedDatabase(path, "not an SQLite database: its header is wrong (overwritten?)")
    if len(head) < 100:
        raise DamagedDatabase(path, f"truncated: {size} bytes, shorter than SQLite's 100-byte header")
    page_size = int.from_bytes(head[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    pages = int.from_bytes(head[28:32], "big")
    counts_valid = head[24:28] == head[92:96]  # the header's page count is current
    if not page_size or page_size & (page_size - 1) or page_size < 512:
        raise DamagedDatabase(path, f"not an SQLite database: page size {page_size} in its header")
    # with a write-ahead log a checkpoint may have stopped half-way: the log completes the file
    if counts_valid and not wal and size < pages * page_size:
        raise DamagedDatabase(path, f"truncated: its header says {pages * page_size} bytes ({pages} pages), "
                                    f"the file has {size}")
    _probe(path, immutable=not wal)


def _probe(path: Path, immutable: bool) -> None:
    """Read the schema over a read-only connection; SQLite's own verdict on damage. Without a
    write-ahead log the file alone is the database: opened `immutable`, SQLite creates no
    -wal or -shm file beside it either."""
    mode = "mode=ro&immutable=1" if immutable else "mode=ro"
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?{mode}", uri=True, timeout=10)
    except sqlite3.Error:
        return  # cannot open read-only here (e.g. no -shm may be created): the normal open reports it
    try:
        conn.execute("select count(*) from sqlite_master").fetchone()
        tables = [r[0] for r in conn.execute("select name from sqlite_master where type = 'table'")]
        for table in ("meta", "runs"):
            if table in tables:
                conn.execute(f"select count(*) from {table}").fetchone()
    except sqlite3.DatabaseError as exc:
        text = str(exc)
        if "not a database" in text or "malformed" in text or "corrupt" in text:
            raise DamagedDatabase(path, f"SQLite says: {text}") from None
    finally:
        conn.close()


def integrity_problems(path: str | Path, limit: int = 5) -> list[str]:
    """`PRAGMA integrity_check` over a read-only connection: [] when the database is sound."""
    conn = sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True, timeout=10)
    try:
        rows = [r[0] for r in conn.execute(f"pragma integrity_check({int(limit)})")]
    except sqlite3.DatabaseError as exc:
        return [str(exc)]
    finally:
        conn.close()
    return [] if rows == ["ok"] else rows
