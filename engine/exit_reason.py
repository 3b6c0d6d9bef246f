"""A worker that ended without recording its outcome, said in plain words.

`describe_exit(returncode, log_tail)` turns the exit status (negative: killed by that signal,
as `subprocess` reports it; 128 + n: the same through a shell) and the last lines of the
worker's log (JSON progress lines and plain text) into one line such as
"killed by SIGKILL (out of memory?) during sampling 40/100" or
"worker exited with code 1: RuntimeError: CUDA error". A full disk comes first, in the
worker's words when its log has them: "no space left on device writing
runs/run-00003/weights.safetensors (worker exited with code 28 during save 0/1)". Standard
library only.
"""

from __future__ import annotations

import json
import signal

EXIT_NO_SPACE = 28  # a worker that could not record its failure because the disk is full (ENOSPC)
NO_SPACE = "no space left"

HINTS = {"SIGKILL": "out of memory?", "SIGSEGV": "a crash in native code", "SIGBUS": "a crash in native code",
         "SIGABRT": "aborted", "SIGXCPU": "CPU time limit", "SIGTERM": "stopped from outside"}


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def last_words(log_tail: str) -> tuple[str | None, str | None]:
    """(the last error the log states, where the run was: "sampling 40/100")."""
    error = where = None
    for raw in log_tail.splitlines():
        line = raw.strip()
        if not line:
            continue
        if line.startswith("{"):
            try:
                event = json.loads(line)
            except ValueError:
                event = None
            if isinstance(event, dict):
                if event.get("event") == "progress":
                    total = event.get("total")
                    where = f"{event.get('stage')}" + (f" {event.get('done')}/{total}" if total else "")
                elif event.get("event") == "failed" and event.get("error"):
                    error = str(event["error"])
                continue
        if not line.startswith(("Traceback", "File ", "^", "~")):
            error = line
    return error, where


def describe_exit(returncode: int | None, log_tail: str = "") -> str:
    error, where = last_words(log_tail or "")
    during = f" during {where}" if where else ""
    if returncode is not None and (returncode < 0 or 128 < returncode < 160):
        name = signal_name(-returncode if returncode < 0 else returncode - 128)
        hint = HINTS.get(name)
        return f"killed by {name}" + (f" ({hint})" if hint else "") + during
    if returncode and error and error.startswith(NO_SPACE):
        return f"{error} (worker exited with code {returncode}{during})"
    if returncode == EXIT_NO_SPACE:
        return f"{NO_SPACE} on device (worker exited with code {returncode}{during}; its log could not be written)"
    if returncode:
        return f"worker exited with code {returncode}{during}" + (f": {error}" if error else "")
    return "worker exited without recording a result" + during


def read_tail(path, max_bytes: int = 64 * 1024) -> str:
    """The end of a log file (at most `max_bytes`), as text; empty if it cannot be read."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, 2)
            size = handle.tell()
            handle.seek(max(0, size - max_bytes))
            return handle.read().decode(errors="replace")
    except OSError:
        return ""
