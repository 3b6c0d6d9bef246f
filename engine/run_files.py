"""Remote workers write files, never the database; the head side ingests them.

Why: a worker on another node reaches `runs/` over a shared filesystem (NFS, Lustre, GPFS).
SQLite's WAL mode keeps its index in shared memory (`qtui.db-shm`), which works only between
processes of one machine, and POSIX locks over network filesystems are unreliable: two hosts
writing one database can corrupt it. So a worker started with `--remote` opens no database at
all (`engine.store.forbid_database`): it reads its run from `job.json` in its run folder,
which the head side wrote when it submitted the job, and appends everything it would have
stored (running, progress events, heartbeats, metrics, layers, artifacts, its outcome) as one
JSON object per line to `events.jsonl` in the same folder. Each line is written with one
`write` on a file opened for appending and closed right after, so another host sees whole
lines (close-to-open consistency) and a torn last line is simply not read yet. The scheduler,
on the head node, is the only writer of the database for those runs: `ingest` applies the new
complete lines from the byte offset it recorded (`runs.ingested`), so ingestion resumes where
it stopped, even in another scheduler process. Torch-free.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from engine.atomic_files import DiskFull, disk_full_errno, write_text
from engine.store import Store

JOB_FILE = "job.json"
EVENTS_FILE = "events.jsonl"
SLURM_ENV = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURMD_NODENAME")


def write_job_file(store: Store, run_id: int) -> Path:
    """What a remote worker needs to know: its run, and the finished runs of its experiment
    (for the comparison grid). Written atomically before the job is submitted."""
    run = store.get_run(run_id)
    folder = store.runs_dir / run["folder"]
    folder.mkdir(parents=True, exist_ok=True)
    others = [r for r in store.runs(experiment=run["experiment"]) if r["status"] == "done"]
    write_text(folder / JOB_FILE, json.dumps({"run": run, "experiment_runs": others}, sort_keys=True))
    return folder / JOB_FILE


class FileStore:
    """The part of `Store` a worker and `engine.pipeline.execute` use, writing to files."""

    def __init__(self, runs_dir: str | Path, run_id: int):
        self.runs_dir = Path(runs_dir).resolve()
        self.run_id = run_id
        job = json.loads((self.runs_dir / f"run-{run_id:05d}" / JOB_FILE).read_text())
        self.run = dict(job["run"])
        self.others = job.get("experiment_runs", [])
        self.events_path = self.runs_dir / self.run["folder"] / EVENTS_FILE

    def _append(self, op: str, **fields) -> None:
        line = json.dumps({"op": op, "time": time.time(), **fields}, default=str) + "\n"
        try:
            with open(self.events_path, "a") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            code = disk_full_errno(exc)
            if code is None:
                raise
            raise DiskFull(self.events_path, code) from exc

    # reads: the run itself and the finished runs of its experiment at submission
    def get_run(self, run_id: int) -> dict:
        if run_id == self.run_id:
            return dict(self.run)
        for run in self.others:
            if run["id"] == run_id:
                return dict(run)
        raise KeyError(f"run {run_id} is not known to this remote worker")

    def run_folder(self, run_id: int) -> Path:
        return self.runs_dir / self.get_run(run_id)["folder"]

    def runs(self, experiment: str | None = None, status: str | None = None) -> list[dict]:
        out = [r for r in self.others if r["id"] != self.run_id] + [self.run]
        return sorted(
            (dict(r) for r in out
             if (experiment is None or r["experiment"] == experiment) and (status is None or r["status"] == status)),
            key=lambda r: r["id"],
        )

    # writes
    def mark_running(self, run_id: int, pid: int | None = None) -> bool:
        slurm = {k.lower(): os.environ[k] for k in SLURM_ENV if k in os.environ}
        self._append("running", pid=pid or os.getpid(), host=socket.gethostname(),
                     gpu=os.environ.get("CUDA_VISIBLE_DEVICES"), **slurm)
        self.run["status"] = "running"
        return True

    def add_event(self, run_id: int, stage: str, done: int = 0, total: int = 0, message: str = "") -> None:
        self._append("event", stage=stage, done=done, total=total, message=message)

    def heartbeat(self, run_id: int) -> None:
        self._append("heartbeat")

    def put_metrics(self, run_id: int, metrics: dict) -> None:
        self._append("metrics", metrics={k: None if v is None else float(v) for k, v in metrics.items()})

    def put_layers(self, run_id: int, layers: list[dict]) -> None:
        self._append("layers", layers=layers)

    def add_artifact(self, run_id: int, kind: str, path) -> None:
        from engine.file_checks import fingerprint

        size, sha256 = fingerprint(path) if Path(path).is_file() else (None, None)
        self._append("artifact", kind=kind, path=str(path), size=size, sha256=sha256)

    def finish(self, run_id: int, status: str, error: str | None = None) -> None:
        self._append("finish", status=status, error=error)
        self.run["status"] = status

    def finish_if_unfinished(self, run_id: int, status: str, error: str | None = None) -> bool:
        if self.run["status"] in ("done", "failed", "cancelled"):
            return False
        self.finish(run_id, status, error)
        return True

    def signalled(self, message: str) -> None:
        """Stopped by a signal (scancel, or Slurm's time limit): the head decides the outcome
        from whether the user cancelled it and from Slurm's final state."""
        self._append("signalled", message=message)

    def close(self) -> None:
        pass


def read_new_lines(path: Path, offset: int) -> tuple[list[dict], int]:
    """The complete JSON lines after `offset`, and the offset after them."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except OSError:
        return [], offset
    end = data.rfind(b"\n") + 1
    out = []
    for line in data[:end].splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            out.append({"op": "garbled", "line": line[:200].decode(errors="replace")})
    return out, offset + end


def ingest(store: Store, run_id: int) -> list[dict]:
    """Apply a remote run's new lines to the database; returns the lines applied.

    Applied in order, in one transaction with the offset saved after them: a crash (or a
    locked database) applies all of them or none, and none is applied twice."""
    run = store.get_run(run_id)
    path = store.runs_dir / run["folder"] / EVENTS_FILE
    lines, offset = read_new_lines(path, run.get("ingested") or 0)
    if not lines:
        return []
    with store.transaction() as conn:
        for line in lines:
            apply_line(store, conn, run_id, line)
        conn.execute("update runs set ingested = ? where id = ?", (offset, run_id))
    return lines


def apply_line(store: Store, conn, run_id: int, line: dict) -> None:
    """One line of a remote run's events file, inside `ingest`'s transaction."""
    op = line.get("op")
    if op == "running":
        node = line.get("slurmd_nodename") or line.get("host")
        conn.execute(
            "update runs set status = 'running', started_at = coalesce(started_at, ?), heartbeat_at = ?, "
            "pid = ?, host = ?, node = ? where id = ? and status = 'queued'",
            (utc_from(line["time"]), line["time"], line.get("pid"), line.get("host"), node, run_id),
        )
    elif op == "event":
        store.add_event(run_id, line["stage"], line.get("done", 0), line.get("total", 0), line.get("message", ""))
        conn.execute("update runs set heartbeat_at = ? where id = ?", (line["time"], run_id))
    elif op == "heartbeat":
        conn.execute("update runs set heartbeat_at = ? where id = ?", (line["time"], run_id))
    elif op == "metrics":
        store.put_metrics(run_id, line["metrics"])
    elif op == "layers":
        store.put_layers(run_id, line["layers"])
    elif op == "artifact":
        store.add_artifact(run_id, line["kind"], line["path"], line.get("size"), line.get("sha256"))
    elif op == "finish":
        store.finish_if_unfinished(run_id, line["status"], line.get("error"))


def utc_from(epoch: float) -> str:
    from datetime import datetime, timezone

    return datetime.fromtimestamp(epoch, timezone.utc).isoformat(timespec="milliseconds")
