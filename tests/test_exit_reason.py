"""Plain reasons for workers that ended without recording their outcome."""

from __future__ import annotations

import json

from engine.exit_reason import describe_exit

PROGRESS = "\n".join(json.dumps({"event": "progress", "stage": "sampling", "done": d, "total": 100})
                     for d in (20, 40))


def test_signals_say_what_killed_the_worker_and_where():
    assert describe_exit(-9, PROGRESS) == "killed by SIGKILL (out of memory?) during sampling 40/100"
    assert describe_exit(137, "") == "killed by SIGKILL (out of memory?)"  # through a shell: 128 + 9
    assert describe_exit(-11, "") == "killed by SIGSEGV (a crash in native code)"
    assert describe_exit(-15, PROGRESS).startswith("killed by SIGTERM (stopped from outside)")
    assert "{" not in describe_exit(-9, PROGRESS)  # never raw JSON


def test_exit_codes_give_the_last_error_the_log_states():
    log = PROGRESS + "\nTraceback (most recent call last):\n  File \"x.py\", line 1\nRuntimeError: CUDA error\n"
    assert describe_exit(1, log) == "worker exited with code 1 during sampling 40/100: RuntimeError: CUDA error"
    failed = json.dumps({"event": "failed", "error": "ValueError: bad bits"})
    assert describe_exit(2, failed) == "worker exited with code 2: ValueError: bad bits"
    assert describe_exit(0, PROGRESS) == "worker exited without recording a result during sampling 40/100"
    assert describe_exit(3, "") == "worker exited with code 3"
