"""Files written whole or not at all, and a full disk said in plain words.

Every file a run writes into its run folder or the runs folder (packed checkpoints, calibration
statistics, eval.npz, samples, grids, caches, job files) goes through `atomic_path`: the writer
fills a temporary file in the same folder (a hidden name ending in the final suffix, so that
numpy, PIL and safetensors write the same format), which is flushed to disk and renamed over the
final name (`os.replace`, atomic on one filesystem) only once it is complete. On any failure the
temporary is removed, so a final name is either the previous complete file, a new complete one,
or absent; never half of one.

A full disk (ENOSPC, EFBIG from a file size limit such as `ulimit -f`, EDQUOT) while writing is
raised as `DiskFull`, whose message starts with "no space left" and names the file
("no space left on device writing runs/run-00003/weights.safetensors"). `disk_full_errno`
recognises it also where a library reports it in its own words (safetensors' Rust errors,
SQLite's "database or disk is full"). Standard library only.
"""

from __future__ import annotations

import errno
import itertools
import os
import re
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

FULL_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
REASONS = {
    errno.ENOSPC: "no space left on device",
    errno.EFBIG: "no space left (file size limit exceeded)",
    errno.EDQUOT: "no space left (disk quota exceeded)",
}
# How libraries that do not raise OSError say it (Rust's io::Error, SQLite's SQLITE_FULL).
FULL_WORDS = (
    ("no space left on device", errno.ENOSPC), ("os error 28", errno.ENOSPC),
    ("database or disk is full", errno.ENOSPC), ("storagefull", errno.ENOSPC),
    ("file too large", errno.EFBIG), ("os error 27", errno.EFBIG),
    ("filetoolarge", errno.EFBIG), ("disk quota exceeded", errno.EDQUOT), ("os error 122", errno.EDQUOT),
)
# SQLite's codes for a full disk: SQLITE_FULL, and a shared-memory file (qtui.db-shm) that could
# not grow (it says only "disk I/O error")
SQLITE_FULL_NAMES = ("SQLITE_FULL", "SQLITE_IOERR_SHMSIZE")
SHORT_WRITE = re.compile(r"\d+ requested and \d+ written")  # numpy's tofile: a short write is a full disk

_counter = itertools.count()


class DiskFull(OSError):
    """The disk (or a file size limit, or a quota) stopped a write of `path`."""

    def __init__(self, path: str | Path, code: int = errno.ENOSPC):
        super().__init__(code, REASONS.get(code, REASONS[errno.ENOSPC]), str(path))
        self.path = Path(path)

    def __str__(self) -> str:
        return f"{self.strerror} writing {shown_path(self.path)}"


def shown_path(path: str | Path) -> str:
    """A path as the user knows it: relative to the working directory when below it."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except (ValueError, OSError):
        return str(path)


def disk_full_errno(exc: BaseException | None) -> int | None:
    """ENOSPC, EFBIG or EDQUOT when `exc` (or what caused it) is a full disk, else None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in FULL_ERRNOS:
            return exc.errno
        if isinstance(exc, sqlite3.Error) and getattr(exc, "sqlite_errorname", None) in SQLITE_FULL_NAMES:
            return errno.ENOSPC
        if not isinstance(exc, (KeyboardInterrupt, SystemExit)):
            text = str(exc).lower().replace(" ", "") if isinstance(exc, Exception) else ""
            for words, code in FULL_WORDS:
                if words.replace(" ", "") in text:
                    return code
            if isinstance(exc, OSError) and SHORT_WRITE.search(str(exc)):
                return errno.ENOSPC
        exc = exc.__cause__ or exc.__context__
    return None


def past_file_size_limit(paths, margin: int = 1 << 16) -> bool:
    """Whether one of `paths` has reached this process's file size limit (RLIMIT_FSIZE), less
    `margin`: SQLite reports EFBIG as a plain "disk I/O error", without the errno."""
    import resource

    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if soft == resource.RLIM_INFINITY:
        return False
    for path in paths:
        try:
            if os.path.getsize(path) + margin >= soft:
                return True
        except OSError:
            pass
    return False


def temporary_path(path: Path) -> Path:
    """A hidden name next to `path`, unique to this process and call, with the same suffix."""
    return path.with_name(f".{path.stem}.tmp-{os.getpid()}-{next(_counter)}{path.suffix}")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """`with atomic_path(final) as tmp: write(tmp)`: `final` appears complete, or not at all.

    The writer must write exactly the path it is given (no suffix appended). A full disk is
    raised as `DiskFull` naming `final`; any failure removes the temporary."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        code = disk_full_errno(exc)
        if isinstance(exc, Exception) and past_file_size_limit([tmp], margin=0):
            code = errno.EFBIG  # numpy says only "N requested and M written"
        try:
            tmp.unlink()
        except OSError:
            pass
        if code is not None and not isinstance(exc, DiskFull):
            raise DiskFull(path, code) from exc
        raise


def _fsync(path: Path) -> None:
    """The bytes on disk before the rename (a crash must not leave a complete name on an empty
    file); a full disk may only show here (delayed allocation, network filesystems)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return path


def write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    return write_bytes(path, text.encode(encoding))
