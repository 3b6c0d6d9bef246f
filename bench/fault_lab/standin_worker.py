"""A stand-in worker for the claims trial (`QTUI_WORKER_COMMAND`): what a worker does when it
starts, without torch. It records its start (one line per launch in $CLAIMS_RECORD), finds its
run folder (the step that failed when a run was claimed before its folder was set), marks the
run running, reports one event and finishes it done.

    python bench/fault_lab/standin_worker.py --runs-dir D --run-id N
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from engine.store import Store  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs-dir", required=True)
    parser.add_argument("--run-id", type=int, required=True)
    args = parser.parse_args()
    with open(os.environ["CLAIMS_RECORD"], "a") as record:
        record.write(f"{args.run_id} {os.getpid()}\n")
    store = Store.open(args.runs_dir, create=False)
    if not store.run_folder(args.run_id).is_dir():
        store.finish_if_unfinished(args.run_id, "failed", "its run folder is missing")
        return 1
    if not store.mark_running(args.run_id):
        return 0
    time.sleep(0.05)
    store.add_event(args.run_id, "sampling", 1, 1)
    store.finish(args.run_id, "done")
    store.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
