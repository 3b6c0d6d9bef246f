"""The persistent queue in SQLite: queued runs are rows, schedulers claim them atomically.

A run is `queued` from creation until its worker marks it `running`. A scheduler claims a
queued run by writing its token into `claimed_by` in a `BEGIN IMMEDIATE` transaction that also
counts the runs already busy on its host (and the GPUs they hold), so two schedulers racing
can never start the same run, nor exceed the concurrency limit or put two runs on one GPU.
A queued run with a claim is starting (its worker is being launched, or its Slurm job waits
in Slurm's queue). The worker's own `queued -> running` update is atomic too
(`Store.mark_running`), so even a run whose claim was released after its scheduler died
cannot run twice. Schedulers register in the `schedulers` table with a heartbeat; one that
stops beating is dead, and its claims are released (or its Slurm runs adopted).
Torch-free.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid

from engine.executor import HEARTBEAT_EVERY, is_lost, pid_alive
from engine.store import BUSY_TIMEOUT_MS, Store, utc_now

SCHEDULER_DEAD_AFTER = 30.0  # seconds without a scheduler heartbeat: it is gone


def write_lock(store: Store):
    """One write transaction taken at its start (BEGIN IMMEDIATE): reads inside it are
    consistent with the writes, whoever else is waiting (`Store.transaction`)."""
    return store.transaction()


def rows(conn, sql: str, args=()) -> list[dict]:
    cur = conn.execute(sql, tuple(args))
    names = [d[0] for d in cur.description]
    return [dict(zip(names, r)) for r in cur.fetchall()]


def new_token() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


# ---------------------------------------------------------------- schedulers
def register_scheduler(store: Store, token: str, jobs: int, gpus: list[str] | None) -> None:
    with write_lock(store) as conn:
        now = time.time()  # once the lock is ours: a wait for it must not age the row
        conn.execute(
            "insert or replace into schedulers (token, host, pid, started_at, heartbeat_at, jobs, gpus) "
            "values (?, ?, ?, ?, ?, ?, ?)",
            (token, socket.gethostname(), os.getpid(), now, now, jobs, json.dumps(gpus)),
        )


def beat(store: Store, token: str) -> None:
    with write_lock(store) as conn:
        conn.execute("update schedulers set heartbeat_at = ? where token = ?", (time.time(), token))


def scheduler_alive(row: dict, now: float | None = None) -> bool:
    """On this host: its process exists (and it beat within the longest a write may wait for a
    lock, so a reused pid does not keep a dead row alive); a scheduler waiting out another
    process's lock cannot beat, and must not be taken for dead meanwhile. Elsewhere: it beat
    within SCHEDULER_DEAD_AFTER seconds."""
    now = time.time() if now is None else now
    age = now - (row["heartbeat_at"] or 0)
    if row["host"] == socket.gethostname():
        return pid_alive(row["pid"]) and age < BUSY_TIMEOUT_MS / 1000 + SCHEDULER_DEAD_AFTER
    return age < SCHEDULER_DEAD_AFTER


def live_schedulers(store: Store) -> list[dict]:
    return [r for r in rows(store.db.conn, "select * from schedulers") if scheduler_alive(r)]


def retire_if_idle(store: Store, token: str, busy: bool) -> bool:
    """Unregister this scheduler if it has nothing to watch and nothing is queued, in one
    transaction: a run queued a moment later either sees no scheduler (and starts one) or is
    seen here (and this scheduler stays)."""
    with write_lock(store) as conn:
        if busy:
            return False
        waiting = conn.execute(
            "select count(*) from runs where status = 'queued' and claimed_by is null"
        ).fetchone()[0]
        if waiting:
            return False
        conn.execute("delete from schedulers where token = ?", (token,))
    return True


def unregister(store: Store, token: str) -> None:
    with store.transaction():
        store.db.conn.execute("delete from schedulers where token = ?", (token,))


def fail_vanished_runs(store: Store, own: set[int] = frozenset()) -> list[int]:
    """Local runs of this host recorded as running whose worker process is gone, with no
    scheduler left to reap it (its scheduler was killed first): failed, with that reason (or
    cancelled, when the user asked for it), so
    that they are not left `running` (shown as lost) for ever. `own`: this scheduler's
    children, which `Scheduler.reap` records with their exit status instead. The update is
    conditional on the same pid, so a worker that records its own outcome meanwhile wins."""
    host = socket.gethostname()
    failed = []
    # Two missed heartbeats as well: the scheduler that started a worker reaps it within a
    # second and records its exit status, which says more; this is for when none is left.
    stale = time.time() - 2 * HEARTBEAT_EVERY
    candidates = rows(store.db.conn, "select id, pid, claimed_by from runs where status = 'running' and host = ? "
                                     "and coalesce(executor, 'local') = 'local' and coalesce(heartbeat_at, 0) < ?",
                      [host, stale])
    watched = {r["token"] for r in live_schedulers(store)}  # their scheduler reaps them
    for run in candidates:
        if run["id"] in own or run["claimed_by"] in watched or not run["pid"] or pid_alive(run["pid"]):
            continue
        # a cancelled run whose canceller died before recording it (its worker killed after
        # the grace) is cancelled all the same
        with store.transaction():
            cur = store.db.conn.execute(
                "update runs set status = case when cancel_requested then 'cancelled' else 'failed' end, "
                "finished_at = ?, error = case when cancel_requested then 'cancelled by the user' else ? end "
                "where id = ? and status = 'running' and pid = ?",
                (utc_now(), f"its worker (pid {run['pid']}) vanished while no scheduler watched it; re-run it",
                 run["id"], run["pid"]),
            )
        if cur.rowcount:
            failed.append(run["id"])
    return failed


def release_dead_claims(store: Store) -> list[int]:
    """Queued runs claimed by a dead scheduler: local ones go back to the queue (their worker,
    if it did start, holds the run by its atomic mark_running); Slurm runs without a job id
    may or may not have been submitted, so they fail with that reason rather than risk two
    jobs. Returns the released run ids."""
    released = []
    with write_lock(store) as conn:
        live = {r["token"] for r in rows(conn, "select * from schedulers") if scheduler_alive(r)}
        claimed = rows(conn, "select id, claimed_by, executor, job_id from runs "
                             "where status = 'queued' and claimed_by is not null")
        for run in claimed:
            if run["claimed_by"] in live:
                continue
            if run["executor"] == "slurm" and run["job_id"]:
                continue  # adopted by a live scheduler (adopt_slurm_runs)
            if run["executor"] == "slurm":
                conn.execute(
                    "update runs set status = 'failed', finished_at = ?, error = ? where id = ?",
                    (utc_now(), "its scheduler died while submitting it to Slurm; re-run it", run["id"]),
                )
            else:
                conn.execute("update runs set claimed_by = null, gpu = null where id = ?", (run["id"],))
            released.append(run["id"])
        dead = [r["token"] for r in rows(conn, "select * from schedulers") if not scheduler_alive(r)]
        for t in dead:
            conn.execute("delete from schedulers where token = ?", (t,))
    return released


def adopt_slurm_runs(store: Store, token: str) -> list[int]:
    """Slurm runs (submitted, not finished) whose scheduler is gone: this one watches them."""
    with write_lock(store) as conn:
        live = {r["token"] for r in rows(conn, "select * from schedulers") if scheduler_alive(r)}
        orphans = [
            r["id"] for r in rows(conn, "select id, claimed_by from runs where executor = 'slurm' "
                                        "and status in ('queued', 'running') and job_id is not null")
            if r["claimed_by"] not in live
        ]
        for run_id in orphans:
            conn.execute("update runs set claimed_by = ? where id = ?", (token, run_id))
    return orphans


# ---------------------------------------------------------------- claims
def busy_local(conn, host: str) -> list[dict]:
    """Local runs of this host that hold a slot: running (and not lost) or starting."""
    out = []
    for run in rows(conn, "select * from runs where executor = 'local' and host = ? and "
                          "(status = 'running' or (status = 'queued' and claimed_by is not null))", [host]):
        if run["status"] == "running" and is_lost(run):
            continue
        out.append(run)
    return out


def claim_local(store: Store, token: str, limit: int, gpus: list[str] | None = None) -> tuple[int, str | None] | None:
    """Claim the first queued local run if a slot (and, with a GPU pool, a free GPU) is free
    on this host. Returns (run id, gpu) or None."""
    host = socket.gethostname()
    with write_lock(store) as conn:
        busy = busy_local(conn, host)
        gpu = None
        if gpus:
            taken = {r["gpu"] for r in busy}
            free = [g for g in gpus if g not in taken]
            if not free:
                return None
            gpu = free[0]
        elif len(busy) >= limit:
            return None
        row = conn.execute(
            "select id from runs where status = 'queued' and claimed_by is null and "
            "coalesce(executor, 'local') = 'local' order by queue_pos, id limit 1"
        ).fetchone()
        if row is None:
            return None
        cur = conn.execute(
            "update runs set claimed_by = ?, claimed_at = ?, host = ?, gpu = ?, executor = 'local' "
            "where id = ? and status = 'queued' and claimed_by is null",
            (token, time.time(), host, gpu, row[0]),
        )
        if cur.rowcount != 1:  # cannot happen under the write lock; never start it twice
            return None
    return row[0], gpu


def claim_slurm_batch(store: Store, token: str) -> list[dict]:
    """Claim the first queued Slurm run and every queued Slurm run of its batch (the runs of one
    `engine run`), in queue order: they are submitted as one job array."""
    with write_lock(store) as conn:
        first = conn.execute(
            "select id, batch from runs where status = 'queued' and claimed_by is null and "
            "executor = 'slurm' order by queue_pos, id limit 1"
        ).fetchone()
        if first is None:
            return []
        if first[1] is None:
            batch = rows(conn, "select * from runs where id = ?", [first[0]])
        else:
            batch = rows(conn, "select * from runs where status = 'queued' and claimed_by is null and "
                               "executor = 'slurm' and batch = ? order by queue_pos, id", [first[1]])
        for run in batch:
            conn.execute("update runs set claimed_by = ?, claimed_at = ? where id = ?",
                         (token, time.time(), run["id"]))
    return batch


def set_fields(store: Store, run_id: int, **fields) -> None:
    with store.transaction():
        store.db["runs"].update(run_id, fields)


def record_submission(store: Store, batch: list[dict], job_ids: list[str]) -> list[tuple[int, str]]:
    """The Slurm job ids of a submitted batch, all in one transaction (a scheduler killed
    halfway must not leave some runs with a job id, adopted, and the others without, failed as
    "died while submitting"). Returns (run id, job id) of the runs no longer queued or running
    (cancelled while they were being submitted): their jobs are to be cancelled."""
    host = socket.gethostname()
    gone = []
    with write_lock(store) as conn:
        for run, job_id in zip(batch, job_ids):
            conn.execute("update runs set job_id = ?, slurm_state = 'PENDING', host = ? where id = ?",
                         (job_id, host, run["id"]))
            status = conn.execute("select status from runs where id = ?", (run["id"],)).fetchone()[0]
            if status not in ("queued", "running"):
                gone.append((run["id"], job_id))
    return gone


def finish_and_release(store: Store, run_id: int, status: str, error: str | None) -> bool:
    """A Slurm run's end as its scheduler sees it: finished (unless its worker already said)
    and its claim released, together. Returns whether the status changed."""
    with write_lock(store):
        changed = store.finish_if_unfinished(run_id, status, error)
        store.db.conn.execute("update runs set claimed_by = null where id = ?", (run_id,))
    return changed


# ---------------------------------------------------------------- the user's view
def queued_runs(store: Store) -> list[dict]:
    """Queued runs in the order they start (claimed ones, which are starting, first)."""
    return rows(store.db.conn, "select * from runs where status = 'queued' "
                               "order by claimed_by is null, queue_pos, id")


def move(store: Store, run_id: int, steps: int) -> bool:
    """Move a waiting (unclaimed) run `steps` places earlier (negative) or later in the queue."""
    with write_lock(store) as conn:
        order = [r[0] for r in conn.execute(
            "select id from runs where status = 'queued' and claimed_by is null order by queue_pos, id")]
        if run_id not in order:
            return False
        i = order.index(run_id)
        j = max(0, min(len(order) - 1, i + steps))
        if i == j:
            return False
        order.insert(j, order.pop(i))
        base = conn.execute("select coalesce(min(queue_pos), 0) from runs where status = 'queued' "
                            "and claimed_by is null").fetchone()[0]
        for k, rid in enumerate(order):
            conn.execute("update runs set queue_pos = ? where id = ?", (base + k, rid))
    return True


def request_cancel(store: Store, run_id: int) -> dict:
    """Mark a run for cancellation; a queued run nobody claimed is cancelled at once.
    Returns the run as it is now (the executor-specific stop is engine.cancel's job)."""
    with write_lock(store) as conn:
        conn.execute(
            "update runs set status = 'cancelled', finished_at = ?, error = 'cancelled by the user' "
            "where id = ? and status = 'queued' and claimed_by is null", (utc_now(), run_id))
        conn.execute("update runs set cancel_requested = 1 where id = ? and status in ('queued', 'running')",
                     (run_id,))
    return store.get_run(run_id)


def adopt_candidates(store: Store) -> bool:
    """Is there work a scheduler should pick up: queued runs, or Slurm runs in flight?"""
    return store.db.conn.execute(
        "select count(*) from runs where status = 'queued' or "
        "(executor = 'slurm' and status = 'running')").fetchone()[0] > 0


def slurm_status(run: dict) -> str:
    """Slurm's own state of a submitted run, with its reason: "PENDING (Priority)"."""
    reason = run.get("slurm_reason")
    state = run.get("slurm_state") or ""
    return f"{state} ({reason})" if reason and reason != "None" else state


def queue_state(run: dict) -> tuple[str, str]:
    """(where, state) of a queued or running run, as the queue views show it: its GPU or
    Slurm job (and node), and waiting / starting / Slurm's state / running."""
    where = ""
    if run.get("job_id"):
        where = f"slurm {run['job_id']}" + (f" on {run['node']}" if run.get("node") else "")
    elif run.get("gpu") is not None:
        where = f"GPU {run['gpu']}" + (f" on {run['host']}" if run.get("host") else "")
    elif run["status"] == "running" and run.get("host"):
        where = run["host"]
    if run["status"] == "queued" and not run.get("claimed_by"):
        return where, "waiting"
    if run.get("slurm_state") and (run["status"] == "queued" or run["slurm_state"] != "RUNNING"):
        return where, slurm_status(run)
    if run["status"] == "queued":
        return where, "starting"
    return where, run["status"]
