"""A stand-in worker for the load trial: writes through the engine's own Store and Reporter as
fast as it can, as a real worker does (queue a run, mark it running, progress events, layers,
metrics, an artifact, done), and appends every committed write to its ledger (JSON lines), so
the campaign can check that nothing committed was lost.

    python -m bench.fault_lab.writer --runs-dir D --seconds 60 --ledger L --name w3 --config C
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path

from engine.store import Store
from engine.worker import Reporter


class Quiet(Reporter):
    def emit(self, **obj) -> None:  # no stdout: the ledger is the record
        pass


def write_for(store: Store, seconds: float, ledger, name: str, config: dict) -> int:
    errors, n = 0, 0
    end = time.time() + seconds
    while time.time() < end:
        try:
            run_id = store.create_run("load", name, config, f"load-{name}", executor="local")
            ledger.write(json.dumps({"run": run_id}) + "\n")
            store.mark_running(run_id)
            reporter = Quiet(store, run_id, db_interval=0.0)  # every event to the database
            for i in range(20):
                reporter.progress("sampling", i + 1, 20)
            store.heartbeat(run_id)
            layers = [{"name": f"layer{i}", "role": "attention", "params": 100 + i, "bits": 4} for i in range(12)]
            store.put_layers(run_id, layers)
            ledger.write(json.dumps({"layers": run_id, "n": len(layers)}) + "\n")
            metrics = {f"m{i}": float(n * 100 + i) / 7 for i in range(10)}
            store.put_metrics(run_id, metrics)
            ledger.write(json.dumps({"metrics": run_id, "values": metrics}) + "\n")
            store.add_artifact(run_id, "note", store.runs_dir / f"note-{name}.txt")
            store.finish(run_id, "done")
            ledger.write(json.dumps({"done": run_id, "events": 20}) + "\n")
            ledger.flush()
            n += 1
        except Exception:
            errors += 1
            ledger.write(json.dumps({"error": traceback.format_exc(limit=3)}) + "\n")
            ledger.flush()
    return errors


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs-dir", required=True)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--ledger", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--config", required=True)
    args = parser.parse_args()
    config = json.loads(Path(args.config).read_text())
    store = Store.open(args.runs_dir)
    with open(args.ledger, "w") as ledger:
        errors = write_for(store, args.seconds, ledger, args.name, config)
    store.close()
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
