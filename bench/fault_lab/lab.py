"""The fault campaign's laboratory: tiny real models, a tiny experiment, and the processes a
user would start (`engine run`, `engine rerun`, qtui), with their pids found as a user would
find them (the runs table, the schedulers table).

The models are trained here, in a few seconds, and kept in the lab folder between campaigns
(`models/`). Every process gets OMP_NUM_THREADS=1 so that two cores are enough and the numbers
are bit-for-bit deterministic; the baseline numbers of each variant come from undisturbed runs
in the campaign's own runs folder.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EXPERIMENT = "faults"

TOML = """
[experiments.faults]
description = "the fault campaign's tiny experiment"
model = "{mmdit}"
feature_model = "{classifier}"
samples = {samples}
steps = 6
guidance = 2.0
seed = 0
batch_size = 8
bootstrap = 20

[experiments.faults.variants.fp]
method = "none"

[experiments.faults.variants.rtn]
method = "rtn"
bits = 4
scope = "blocks"

[experiments.faults.variants.gptq]
method = "gptq"
bits = 4
group_size = 8
act_bits = 8
calibration = {{ samples = 8, held_out = 4, steps = 4 }}
"""

# Stages a worker reports, by variant (the order they come in).
STAGES = ("load", "calibrate", "held-out", "quantize", "sampling", "metrics", "save")
# Metrics that measure time or memory, not the model: they differ between identical runs.
UNSTABLE = ("_s", "latency_ms", "_mem_mb", "model_bytes")


def stable(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not any(k.endswith(u) or k == u for u in UNSTABLE)}


def build_models(folder: Path) -> dict[str, Path]:
    """A 2-block MMDiT and a classifier, trained for a few steps (once per lab folder)."""
    mmdit, classifier = folder / "digits-mmdit", folder / "classifier"
    if (mmdit / "model_index.json").exists() and (classifier / "config.json").exists():
        return {"mmdit": mmdit, "classifier": classifier}
    import torch

    from engine.train.digits_classifier import ClassifierTrainConfig, train_digits_classifier
    from engine.train.digits_mmdit import MMDiTTrainConfig, train_digits_mmdit

    torch.set_num_threads(1)
    quiet = lambda *a, **k: None
    train_digits_mmdit(mmdit, MMDiTTrainConfig(steps=3, batch_size=8, num_layers=2, num_heads=2, head_dim=8,
                                                text_dim=16), log=quiet)
    train_digits_classifier(classifier, ClassifierTrainConfig(epochs=1), log=quiet)
    return {"mmdit": mmdit, "classifier": classifier}


def environment(**extra: str) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("QTUI_WORKER_COMMAND", None)
    env.update(extra)
    return env


def default_hangup() -> None:
    """In the child: SIGHUP back to its default (a campaign started under nohup would pass its
    SIG_IGN on, and a hangup would then test nothing)."""
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


@dataclass
class Process:
    """A process the lab started in its own session, with its output in a file."""

    popen: subprocess.Popen
    out: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def wait(self, timeout: float) -> int | None:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def text(self) -> str:
        try:
            return self.out.read_text(errors="replace")
        except OSError:
            return ""

    def kill_group(self) -> None:
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.wait(5)


@dataclass
class Lab:
    folder: Path
    samples: int = 48
    models: dict[str, Path] = field(default_factory=dict)
    baselines: dict[str, dict] = field(default_factory=dict)  # variant -> what an undisturbed run gives
    started: list[Process] = field(default_factory=list)

    @property
    def experiments(self) -> Path:
        return self.folder / "experiments.toml"

    def prepare(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.models = build_models(self.folder / "models")
        self.experiments.write_text(TOML.format(mmdit=self.models["mmdit"], classifier=self.models["classifier"],
                                                samples=self.samples))

    # ---------------------------------------------------------------- processes
    def start(self, args: list[str], out: Path, env: dict | None = None, **popen) -> Process:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "ab") as log:
            popen.setdefault("stdin", subprocess.DEVNULL)
            p = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=self.folder,
                                 env=env or environment(), start_new_session=True, preexec_fn=default_hangup,
                                 **popen)
        process = Process(p, out)
        self.started.append(process)
        return process

    def engine(self, runs: Path, *args: str, out: Path | None = None, env: dict | None = None) -> Process:
        """`engine ARGS --experiments lab/experiments.toml --runs-dir RUNS` in its own session."""
        command = [sys.executable, "-m", "engine.cli", *args, "--experiments", str(self.experiments),
                   "--runs-dir", str(runs)]
        return self.start(command, out or runs.parent / f"{runs.name}-engine-{time.time_ns()}.out", env)

    def engine_run(self, runs: Path, variants: list[str], jobs: int = 1, out: Path | None = None) -> Process:
        args = ["run", EXPERIMENT, "--jobs", str(jobs)]
        for v in variants:
            args += ["--variant", v]
        return self.engine(runs, *args, out=out)

    def start_qtui(self, runs: Path, out: Path) -> Process:
        """qtui on a pseudo-terminal of 160x50, as over SSH; its screen output goes to `out`."""
        import fcntl
        import pty
        import struct
        import termios
        import threading

        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 160, 0, 0))
        env = environment(TERM="xterm-256color", COLUMNS="160", LINES="50")
        command = [sys.executable, "-m", "qtui.app", "--runs-dir", str(runs), "--experiments", str(self.experiments)]
        p = subprocess.Popen(command, stdin=slave, stdout=slave, stderr=slave, cwd=self.folder, env=env,
                             start_new_session=True, preexec_fn=default_hangup)
        os.close(slave)

        def drain():
            with open(out, "ab") as sink:
                while True:
                    try:
                        data = os.read(master, 65536)
                    except OSError:
                        break
                    if not data:
                        break
                    sink.write(data)
            os.close(master)

        threading.Thread(target=drain, daemon=True).start()
        process = Process(p, out)
        self.started.append(process)
        return process

    def cleanup(self) -> None:
        """Kill whatever the lab started that is still there (and its session)."""
        for process in self.started:
            if process.popen.poll() is None:
                process.kill_group()
        self.started.clear()

    # ---------------------------------------------------------------- the database, read-only
    def query(self, runs: Path, sql: str, args: tuple = ()) -> list[dict]:
        conn = sqlite3.connect(f"{(runs / 'qtui.db').resolve().as_uri()}?mode=ro", uri=True, timeout=30)
        conn.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in conn.execute(sql, args).fetchall()]
        finally:
            conn.close()

    def runs(self, runs: Path) -> list[dict]:
        if not (runs / "qtui.db").exists():
            return []
        try:
            return self.query(runs, "select * from runs order by id")
        except sqlite3.OperationalError:  # being created right now
            return []

    def metrics(self, runs: Path) -> dict[tuple[int, str], float]:
        if not (runs / "qtui.db").exists():
            return {}
        return {(r["run_id"], r["name"]): r["value"] for r in self.query(runs, "select * from metrics")}

    def last_stage(self, runs: Path, run_id: int) -> str | None:
        rows = self.query(runs, "select stage from events where run_id = ? order by id desc limit 1", (run_id,))
        return rows[0]["stage"] if rows else None

    def scheduler_pids(self, runs: Path) -> list[int]:
        """The pids of the live schedulers of this runs folder (a killed one's row stays until
        another scheduler clears it)."""
        from engine.executor import pid_alive

        try:
            return [r["pid"] for r in self.query(runs, "select pid from schedulers") if pid_alive(r["pid"])]
        except sqlite3.OperationalError:
            return []

    def wait_for(self, check, timeout: float, every: float = 0.05):
        """Poll `check()` until it returns something true; None after `timeout` seconds."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                value = check()
            except sqlite3.OperationalError:
                value = None
            if value:
                return value
            time.sleep(every)
        return None

    def settle(self, runs: Path, timeout: float = 180.0) -> bool:
        """Wait until no run is queued or running and no scheduler is registered."""
        def quiet():
            rows = self.runs(runs)
            return rows and all(r["status"] in ("done", "failed", "cancelled") for r in rows) \
                and not self.scheduler_pids(runs)
        return bool(self.wait_for(quiet, timeout, every=0.2))

    # ---------------------------------------------------------------- baselines
    def record_baselines(self, runs: Path, variants: list[str]) -> None:
        """Undisturbed runs of each variant: their stable metrics, layers, artifact kinds and
        the time each stage took (where to aim a fault)."""
        process = self.engine_run(runs, variants, jobs=1)
        code = process.wait(900)
        if code != 0:
            raise RuntimeError(f"baseline runs failed ({code}):\n{process.text()[-3000:]}")
        for run in self.runs(runs):
            if run["variant"] in variants and run["status"] == "done":
                self.baselines[run["variant"]] = self.describe_run(runs, run["id"])

    def describe_run(self, runs: Path, run_id: int) -> dict:
        metrics = {r["name"]: r["value"] for r in self.query(runs, "select * from metrics where run_id = ?", (run_id,))}
        layers = self.query(runs, "select count(*) as n from layers where run_id = ?", (run_id,))[0]["n"]
        kinds = sorted({r["kind"] for r in self.query(runs, "select kind from artifacts where run_id = ?", (run_id,))})
        events = self.query(runs, "select stage, time from events where run_id = ? order by id", (run_id,))
        spans: dict[str, list[float]] = {}
        for e in events:
            span = spans.setdefault(e["stage"], [e["time"], e["time"]])
            span[1] = e["time"]
        return {"run_id": run_id, "metrics": metrics, "layers": layers, "kinds": kinds,
                "stages": {s: b - a for s, (a, b) in spans.items()}}

    def stage_variant(self, stage: str) -> str:
        """The variant that spends longest in `stage` (where a random moment is easiest to hit)."""
        spans = {v: b["stages"].get(stage, -1.0) for v, b in self.baselines.items()}
        best = max(spans, key=spans.get)
        if spans[best] < 0:
            raise KeyError(stage)
        return best


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1, sort_keys=True))
