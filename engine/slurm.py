"""The Slurm executor: runs go to Slurm through submitit, one job array per batch.

The runs of one `engine run` (one batch) are submitted as one job array whose parallelism is
limited by `array_parallelism`, with the partition, GPUs, CPUs, memory, time, account, QOS and
extra sbatch options of the `[slurm]` settings (`engine.settings`). Each array task runs the
same worker as locally, `python -u -m engine.worker --runs-dir D --run-id N --remote`, with
its output in the run folder's `worker.log`; the worker writes its results to files there and
the scheduler ingests them (`engine.run_files`: why no database is opened on the nodes).

States come from Slurm itself (`squeue`, then `scontrol show job` once the job has left the
queue, then `sacct` when accounting is on). A job id alone is never trusted: every array is
named `qtui-<batch>` and a state whose job name differs belongs to someone else's job that
reused the id (ids restart after a controller loses its state). Cancel is `scancel`.
Torch-free; submitit is imported only to submit.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ACTIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "RESIZING",
                 "STAGE_OUT", "SIGNALING", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD"}
SLURM_TIMEOUT = 20  # seconds for one Slurm command


@dataclass
class JobState:
    state: str  # Slurm's JobState: PENDING, RUNNING, COMPLETED, TIMEOUT, ...
    reason: str  # Slurm's Reason (why pending, or why it ended)
    node: str
    name: str

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES


def slurm_available() -> str | None:
    """None when sbatch works here, else the reason it does not."""
    if shutil.which("sbatch") is None:
        return "sbatch is not on PATH (no Slurm client installed)"
    try:
        out = subprocess.run(["sinfo", "--noheader", "-o", "%P"], capture_output=True, text=True,
                             timeout=SLURM_TIMEOUT)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"sinfo failed: {exc}"
    if out.returncode != 0:
        return f"no Slurm controller answers: {out.stderr.strip() or out.stdout.strip()}"
    return None


def ignore_preemption_signal() -> None:
    """In the worker: Slurm sends submitit's warning signal (USR2) to every process of the job
    step, and its default action would kill the worker long before the time limit."""
    name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    signal.signal(getattr(signal, f"SIG{name}", signal.SIGUSR2), signal.SIG_IGN)


class WorkerJob:
    """What an array task runs (pickled by submitit): the worker command, its output in the
    run's worker.log.

    submitit's own signal handler (USR2, `signal_delay_s` before the time limit) raises an
    UncompletedJobError for a job that is not checkpointable; the worker is left running
    instead, so that Slurm itself ends the job at its limit and its state says TIMEOUT (the
    reason the run is failed with). Any other way out stops the worker first."""

    def __init__(self, command: list[str], log_path: str):
        self.command, self.log_path = command, log_path

    def __call__(self) -> int:
        with open(self.log_path, "ab") as log:
            process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, env=dict(os.environ, PYTHONUNBUFFERED="1"),
                                       preexec_fn=ignore_preemption_signal)
            try:
                while True:
                    try:
                        code = process.wait()
                        break
                    except Exception as exc:  # submitit: "timed-out and not checkpointable"
                        print(f"qtui: {type(exc).__name__}: {exc}; the worker goes on until Slurm's limit",
                              flush=True)
            except BaseException:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    process.kill()
                raise
        if code != 0:
            raise RuntimeError(f"worker exited with code {code}")
        return code


def executor_parameters(slurm: dict, count: int, batch: str) -> dict:
    """submitit.SlurmExecutor parameters from the run's `[slurm]` settings
    (engine.settings.SlurmSettings as a dict)."""
    params = {
        "job_name": f"qtui-{batch}",
        "time": int(slurm.get("time_min") or 60),
        "array_parallelism": int(slurm.get("array_parallelism") or count),
        "signal_delay_s": int(slurm.get("signal_delay_s") or 30),
        "nodes": 1,
        "ntasks_per_node": 1,
    }
    names = {"partition": "partition", "gpus_per_run": "gpus_per_node", "cpus_per_run": "cpus_per_task",
             "mem": "mem", "account": "account", "qos": "qos"}
    for key, name in names.items():
        if slurm.get(key):
            params[name] = slurm[key]
    if slurm.get("extra"):
        params["additional_parameters"] = dict(slurm["extra"])
    return params


def remote_command(runs_dir: Path, run_id: int, python: str) -> list[str]:
    from engine.executor import worker_prefix

    prefix = worker_prefix()
    if not os.environ.get("QTUI_WORKER_COMMAND"):
        prefix = [python, *prefix[1:]]
    return [*prefix, "--runs-dir", str(runs_dir), "--run-id", str(run_id), "--remote"]


def submit_array(runs_dir: Path, runs: list[dict], slurm: dict, batch: str) -> list[str]:
    """Submit one array task per run; returns their job ids ("<array id>_<task>") in order."""
    import submitit

    python = slurm.get("python") or sys.executable  # the job's python: this venv's by default
    executor = submitit.SlurmExecutor(folder=runs_dir / "slurm" / "%j", python=python)
    executor.update_parameters(**executor_parameters(slurm, len(runs), batch))
    jobs = []
    with executor.batch():
        for run in runs:
            log = runs_dir / run["folder"] / "worker.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            jobs.append(executor.submit(WorkerJob(remote_command(runs_dir, run["id"], python), str(log))))
    return [str(job.job_id) for job in jobs]


def _run(args: list[str]) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=SLURM_TIMEOUT)
    except (OSError, subprocess.SubprocessError):
        return None


def squeue_states(job_ids: list[str]) -> dict[str, JobState]:
    """States of the given array tasks still in Slurm's queue (one squeue call)."""
    if not job_ids:
        return {}
    arrays = sorted({j.split("_")[0] for j in job_ids})
    out = _run(["squeue", "--array", "--noheader", "--jobs", ",".join(arrays), "--format", "%i|%T|%r|%N|%j"])
    states = {}
    if out is None or out.returncode != 0:
        return states
    for line in out.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 5 and parts[0] in job_ids:
            states[parts[0]] = JobState(parts[1], parts[2], parts[3], parts[4])
    return states


def finished_state(job_id: str) -> JobState | None:
    """The state of a job that has left the queue: from scontrol (kept for MinJobAge), or
    sacct when accounting is on. None when Slurm no longer knows it."""
    out = _run(["scontrol", "show", "job", "--oneliner", job_id])
    if out is not None and out.returncode == 0 and out.stdout.strip():
        fields = dict(tok.split("=", 1) for tok in out.stdout.split() if "=" in tok)
        return JobState(fields.get("JobState", "UNKNOWN"), fields.get("Reason", ""),
                        fields.get("NodeList", ""), fields.get("JobName", ""))
    out = _run(["sacct", "--noheader", "--parsable2", "--jobs", job_id, "--format", "JobID,State,Reason,NodeList,JobName"])
    if out is not None and out.returncode == 0:
        for line in out.stdout.splitlines():
            parts = line.split("|")
            if len(parts) >= 5 and parts[0] == job_id:
                return JobState(parts[1].split()[0], parts[2], parts[3], parts[4])
    return None


def job_states(job_ids: list[str]) -> dict[str, JobState | None]:
    states: dict[str, JobState | None] = dict(squeue_states(job_ids))
    for job_id in job_ids:
        if job_id not in states:
            states[job_id] = finished_state(job_id)
    return states


def scancel(job_id: str) -> bool:
    out = _run(["scancel", job_id])
    return out is not None and out.returncode == 0


def describe(state: JobState) -> str:
    reason = state.reason if state.reason and state.reason != "None" else ""
    return f"{state.state} ({reason})" if reason else state.state
