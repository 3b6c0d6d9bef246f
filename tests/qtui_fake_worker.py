"""A stand-in for `engine.worker` in qtui's process tests: same command line, same store
writes and JSON-line output, no torch. Its behaviour comes from the environment:
FAKE_WORKER_MODE (done | fail | hang | stuck: hangs with SIGTERM blocked, as a worker inside
a long torch operation whose signal handler cannot run until it returns), FAKE_WORKER_STEPS
and FAKE_WORKER_DELAY (seconds per sampling step). Tests point
`engine.executor.worker_command` at it with `use_fake_worker`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def fake_worker_command(runs_dir, run_id) -> list[str]:
    return [sys.executable, "-u", str(HERE / "qtui_fake_worker.py"), "--runs-dir", str(runs_dir),
            "--run-id", str(run_id)]


def use_fake_worker(monkeypatch, mode: str = "done", steps: int = 20, delay: float = 0.02) -> None:
    import engine.executor

    monkeypatch.setattr(engine.executor, "worker_command", fake_worker_command)
    # the scheduler process starts the workers: it reads the stand-in from the environment
    monkeypatch.setenv("QTUI_WORKER_COMMAND", json.dumps([sys.executable, "-u", str(HERE / "qtui_fake_worker.py")]))
    monkeypatch.setenv("FAKE_WORKER_MODE", mode)
    monkeypatch.setenv("FAKE_WORKER_STEPS", str(steps))
    monkeypatch.setenv("FAKE_WORKER_DELAY", str(delay))


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


def main() -> int:
    if os.environ.get("FAKE_WORKER_MODE") == "stuck":  # first: later threads inherit the mask
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    sys.path.insert(0, str(HERE.parent))
    from engine.store import Store

    parser = argparse.ArgumentParser()
    parser.add_argument("--runs-dir", required=True)
    parser.add_argument("--run-id", type=int, required=True)
    args = parser.parse_args()
    mode = os.environ.get("FAKE_WORKER_MODE", "done").replace("stuck", "hang")
    steps = int(os.environ.get("FAKE_WORKER_STEPS", "20"))
    delay = float(os.environ.get("FAKE_WORKER_DELAY", "0.02"))

    store = Store.open(args.runs_dir)
    run_id = args.run_id
    store.mark_running(run_id)
    emit(event="log", message=f"fake worker for run {run_id}, mode {mode}")
    for stage in ("load", "quantize"):
        store.add_event(run_id, stage, 1, 1)
        emit(event="progress", stage=stage, done=1, total=1)
    for done in range(steps + 1):
        store.add_event(run_id, "sampling", done, steps)
        emit(event="progress", stage="sampling", done=done, total=steps)
        time.sleep(delay if mode != "hang" else max(delay, 0.05))
        if mode == "hang" and done == steps:
            while True:  # wait to be cancelled
                time.sleep(0.1)
    if mode == "fail":
        print("Traceback (most recent call last):\nRuntimeError: fake failure", flush=True)
        store.finish(run_id, "failed", "RuntimeError: fake failure")
        return 1
    store.add_event(run_id, "metrics", 1, 1)
    emit(event="progress", stage="metrics", done=1, total=1)
    store.put_metrics(run_id, {"fid": 5.0 + run_id, "fid_ci_low": 4.5, "fid_ci_high": 5.5 + run_id,
                               "prompt_acc": 0.8, "size_bytes": 1000, "size_ratio": 0.25,
                               "latency_ms": 3.0, "peak_mem_mb": 50.0, "mean_bits": 4.0})
    store.put_layers(run_id, [{"name": "conv_in", "role": "conv", "params": 100, "bits": 4,
                               "weight_err": 0.01}])
    store.add_event(run_id, "save", 1, 1)
    store.finish(run_id, "done")
    emit(event="done", status="done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
