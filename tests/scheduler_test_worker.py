"""A stand-in worker for the scheduler tests: same command line as `engine.worker`, no torch.

It appends one line per start to $SCHED_RECORD ("run_id pid CUDA_VISIBLE_DEVICES start end"),
marks its run running, sleeps $SCHED_SLEEP seconds and finishes it done. With `--remote` it
writes its run folder instead (engine.run_files.FileStore) and may not open the database;
SCHED_HANG=1 makes it sleep until it is stopped (Slurm's time limit, scancel). SCHED_HANG=block
stands in for a worker inside a long torch operation, where a Python SIGTERM handler runs only
once the operation returns: SIGTERM is blocked (pending, not lost) from its start for SCHED_BLOCK_S seconds (default 60), then the handler runs and records the
run cancelled.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    hang = os.environ.get("SCHED_HANG")
    if hang == "block":  # first: threads started later (by imports) inherit the mask
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs-dir", required=True)
    parser.add_argument("--run-id", type=int, required=True)
    parser.add_argument("--remote", action="store_true")
    args = parser.parse_args()
    start = time.time()
    gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "-")
    print(f"worker for run {args.run_id}: CUDA_VISIBLE_DEVICES={gpu}", flush=True)
    record = os.environ.get("SCHED_RECORD")
    if record:  # every launch, before anything can stop a second one
        with open(record, "a") as f:
            f.write(f"start {args.run_id} {os.getpid()}\n")
    if args.remote:
        from engine.run_files import FileStore
        from engine.store import forbid_database

        forbid_database("remote test worker")
        store = FileStore(args.runs_dir, args.run_id)
    else:
        from engine.store import Store

        store = Store.open(args.runs_dir, create=False)
    if not store.mark_running(args.run_id):
        return 0

    def stopped(signum, frame):
        if args.remote:
            store.signalled(f"stopped by signal {signum}")
        else:
            store.finish_if_unfinished(args.run_id, "cancelled", f"stopped by signal {signum}")
        sys.exit(0)

    signal.signal(signal.SIGTERM, stopped)
    if hang == "1":
        while True:
            store.heartbeat(args.run_id)
            time.sleep(1)
    if hang == "block":
        end = time.time() + float(os.environ.get("SCHED_BLOCK_S", "60"))
        while time.time() < end:  # the long operation
            store.heartbeat(args.run_id)
            time.sleep(0.2)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})  # it returns: the handler runs
    time.sleep(float(os.environ.get("SCHED_SLEEP", "0.3")))
    store.add_event(args.run_id, "sampling", 1, 1)
    store.put_metrics(args.run_id, {"fid": float(args.run_id)})
    end = time.time()
    if record:
        with open(record, "a") as f:
            f.write(f"done {args.run_id} {os.getpid()} {gpu} {start} {end}\n")
    store.finish(args.run_id, "done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
