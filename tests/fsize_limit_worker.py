"""A stand-in worker command for tests (`QTUI_WORKER_COMMAND`): the real worker under a file
size limit of `$FSIZE_LIMIT` bytes (RLIMIT_FSIZE, as `ulimit -f` sets it): a write past it
fails with EFBIG, as a full disk would, for every file the worker writes (database included)."""

from __future__ import annotations

import os
import resource
import sys

if __name__ == "__main__":
    limit = int(os.environ["FSIZE_LIMIT"])
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    os.execv(sys.executable, [sys.executable, "-u", "-m", "engine.worker", *sys.argv[1:]])
