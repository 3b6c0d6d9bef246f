"""A stand-in worker command for tests (`QTUI_WORKER_COMMAND`): fills the filesystem of the
runs folder to the last byte with `runs/filler`, then becomes the real worker, which thus
starts on a full disk (it can write neither the database nor its log). When it has exited,
writes its exit code to the file `$FILLER_MARKER` (outside the full disk) and exits with it."""

from __future__ import annotations

import errno
import os
import subprocess
import sys


def fill(path: str) -> None:
    chunk = b"\0" * 65536
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        for size in (65536, 4096, 1):
            while True:
                try:
                    if os.write(fd, chunk[:size]) < size:
                        break
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
    finally:
        os.close(fd)


if __name__ == "__main__":
    args = sys.argv[1:]
    runs_dir = args[args.index("--runs-dir") + 1]
    fill(os.path.join(runs_dir, "filler"))
    code = subprocess.call([sys.executable, "-u", "-m", "engine.worker", *args])
    with open(os.environ["FILLER_MARKER"], "w") as marker:
        marker.write(str(code))
    sys.exit(code)
