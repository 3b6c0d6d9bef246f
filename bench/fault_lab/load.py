"""Load: 8 writers (bench/fault_lab/writer.py, the engine's own Store and Reporter) writing runs,
progress, layers and metrics as fast as they can for `seconds`, while qtui's poller polls (in
this process), qtui itself runs on a pseudo-terminal, and `engine export` reads in a loop.
Zero errors anywhere, and every write a writer's ledger says was committed is in the database."""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

from bench.fault_lab.invariants import Verdict, check_database
from bench.fault_lab.lab import Lab
from bench.fault_lab.lock import PollWatcher, complaints
from bench.fault_lab.signals import Outcome


def ledger_problems(lab: Lab, runs: Path, ledgers: list[Path]) -> tuple[list[str], int, int]:
    """(problems, committed writes checked, writes lost)."""
    problems, checked, lost = [], 0, 0
    rows = {r["id"]: r for r in lab.runs(runs)}
    metrics = lab.metrics(runs)
    layer_counts = {r["run_id"]: r["n"] for r in lab.query(runs, "select run_id, count(*) as n from layers group by run_id")}
    event_counts = {r["run_id"]: r["n"] for r in lab.query(runs, "select run_id, count(*) as n from events group by run_id")}
    for path in ledgers:
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            checked += 1
            if "error" in entry:
                problems.append(f"{path.name}: {entry['error'].strip().splitlines()[-1]}")
            elif "run" in entry and entry["run"] not in rows:
                lost += 1
                problems.append(f"{path.name}: run {entry['run']} is gone")
            elif "layers" in entry and layer_counts.get(entry["layers"]) != entry["n"]:
                lost += 1
                problems.append(f"{path.name}: run {entry['layers']} has {layer_counts.get(entry['layers'])} layers of {entry['n']}")
            elif "metrics" in entry:
                for name, value in entry["values"].items():
                    if metrics.get((entry["metrics"], name)) != value:
                        lost += 1
                        problems.append(f"{path.name}: run {entry['metrics']} metric {name} lost")
            elif "done" in entry:
                if rows[entry["done"]]["status"] != "done":
                    lost += 1
                    problems.append(f"{path.name}: run {entry['done']} is {rows[entry['done']]['status']}, written done")
                if event_counts.get(entry["done"], 0) < entry["events"]:
                    lost += 1
                    problems.append(f"{path.name}: run {entry['done']} has {event_counts.get(entry['done'], 0)} events of {entry['events']}")
    return problems, checked, lost


def load_trial(lab: Lab, runs: Path, rng: random.Random, writers: int, seconds: float) -> Outcome:
    verdict = Verdict()
    folder = runs.parent / "load-ledgers"
    folder.mkdir(parents=True, exist_ok=True)
    config = json.loads(lab.runs(runs)[0]["config"])  # a real config: qtui parses it
    config_file = folder / "config.json"
    config_file.write_text(json.dumps(config))
    snapshot = lab.metrics(runs)
    watcher = PollWatcher(runs, every=0.05)
    watcher.start()
    qtui = lab.start_qtui(runs, runs.parent / f"qtui-load-{time.time_ns()}.out")
    time.sleep(3)  # past qtui's look for unattended work: the writers' runs are not for a scheduler
    ledgers = [folder / f"w{i}-{time.time_ns()}.jsonl" for i in range(writers)]
    try:
        procs = [lab.start([sys.executable, "-m", "bench.fault_lab.writer", "--runs-dir", str(runs), "--seconds",
                            str(seconds), "--ledger", str(ledgers[i]), "--name", f"w{i}", "--config", str(config_file)],
                           folder / f"w{i}.out") for i in range(writers)]
        exports, export_errors = 0, []
        end = time.time() + seconds
        while time.time() < end:
            out = folder / "export.json"
            export = lab.engine(runs, "export", "--format", "json", "--out", str(out), out=folder / "export.out")
            code = export.wait(120)
            exports += 1
            if code != 0:
                export_errors.append(f"engine export exit {code}")
            else:
                try:
                    json.loads(out.read_text())
                except ValueError as exc:
                    export_errors.append(f"engine export wrote bad JSON: {exc}")
        for i, p in enumerate(procs):
            if p.wait(seconds + 120) != 0:
                verdict.problems.append(f"writer {i} exit {p.popen.returncode}: {p.text()[-200:]!r}")
        verdict.problems += export_errors
        verdict.problems += [f"export: {c}" for c in complaints((folder / "export.out").read_text(errors="replace"))]
        problems, checked, lost = ledger_problems(lab, runs, ledgers)
        verdict.problems += problems
        verdict.lost_metrics += lost
        verdict.add(check_database(lab, runs, snapshot))
        errors = watcher.stop()
        verdict.problems += [f"qtui poller: {e}" for e in errors[:3]]
        if qtui.popen.poll() is not None:
            verdict.problems.append(f"qtui exited ({qtui.popen.returncode}) under load")
        verdict.problems += [f"qtui screen: {c}" for c in complaints(qtui.text())]
        detail = (f"{writers} writers for {seconds:.0f} s: {checked} committed writes checked, "
                  f"{watcher.polls} polls, {exports} exports")
        return Outcome("load", detail, verdict)
    finally:
        watcher.stopped.set()
        lab.cleanup()
