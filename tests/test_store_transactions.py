"""Every store operation that writes more than one statement is one transaction.

For each such operation: another process polling the database while the operation repeats
never sees half of it, and an exception injected between its statements leaves nothing of it
behind. A lint-like check keeps `with <x>.conn:` blocks of several writes out of engine/ (under
sqlite-utils 4.2 each of its write methods commits by itself, so such a block is no
transaction; `Store.transaction()` is)."""

from __future__ import annotations

import ast
import json
import multiprocessing as mp
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from engine.store import Store, db_path

ENGINE = Path(__file__).resolve().parents[1] / "engine"


# ---------------------------------------------------------------- the operations
def tiny_experiment():
    from engine.config import Experiment, Variant

    variants = {name: Variant(name, "", "none", {}) for name in ("a", "b", "c")}
    return Experiment(name="e", description="", model="m", model_path=Path("m"), feature_model="f",
                      feature_model_path=Path("f"), samples=4, steps=2, guidance=1.0, seed=0, batch_size=2,
                      bootstrap=2, variants=variants, seeds=(0, 1))


def new_runs(store: Store, n: int, executor: str = "local", batch: str | None = None) -> list[int]:
    return [store.create_run("e", f"v{k}", {"k": k}, "h", executor=executor, batch=batch) for k in range(n)]


def marks(ids) -> str:
    return ",".join(str(int(i)) for i in ids)


def setup_run(store):
    return {"run": new_runs(store, 1)[0]}


def setup_ingest(store):
    run = new_runs(store, 1, executor="slurm")[0]
    folder = store.run_folder(run)
    folder.mkdir(parents=True)
    return {"run": run, "path": str(folder / "events.jsonl")}


def setup_batch(store):
    return {"runs": new_runs(store, 3, executor="slurm", batch="b")}


def setup_adopt(store):
    ids = new_runs(store, 3, executor="slurm", batch="b")
    with store.transaction() as conn:
        conn.execute(f"update runs set job_id = id || '_0', claimed_by = 'gone' where id in ({marks(ids)})")
    return {"runs": ids}


def setup_queue(store):
    return {"runs": new_runs(store, 6)}


def op_create_runs(store, ctx, i):
    from engine.runner import create_runs

    create_runs(store, tiny_experiment(), ["a", "b", "c"], 4)


def op_ingest(store, ctx, i):
    from engine.run_files import ingest

    now = time.time()
    with open(ctx["path"], "a") as f:
        f.write(json.dumps({"op": "event", "time": now, "stage": "s", "done": i, "total": 0}) + "\n")
        f.write(json.dumps({"op": "metrics", "time": now, "metrics": {"m": i}}) + "\n")
    ingest(store, ctx["run"])


def op_record_submission(store, ctx, i):
    from engine.queue_store import record_submission

    record_submission(store, [{"id": r} for r in ctx["runs"]], [f"{i}_{k}" for k in range(len(ctx["runs"]))])


def before_finish(store, ctx, i):
    with store.transaction() as conn:
        conn.execute("update runs set status = 'running', claimed_by = 's', error = null where id = ?", (ctx["run"],))


def op_finish_and_release(store, ctx, i):
    from engine.queue_store import finish_and_release

    finish_and_release(store, ctx["run"], "failed", f"ended {i}")


def before_release(store, ctx, i):
    with store.transaction() as conn:  # a scheduler elsewhere that stopped beating, with claims
        conn.execute("insert into schedulers (token, host, pid, started_at, heartbeat_at, jobs, gpus) "
                     "values (?, 'elsewhere', 1, 0, 0, 1, 'null')", (f"dead{i}",))
        conn.execute(f"update runs set claimed_by = ? where id in ({marks(ctx['runs'])})", (f"dead{i}",))


def op_release_dead_claims(store, ctx, i):
    from engine.queue_store import release_dead_claims

    release_dead_claims(store)


def before_claim(store, ctx, i):
    with store.transaction() as conn:
        conn.execute(f"update runs set claimed_by = null where id in ({marks(ctx['runs'])})")


def op_claim_slurm_batch(store, ctx, i):
    from engine.queue_store import claim_slurm_batch

    claim_slurm_batch(store, f"t{i}")


def before_adopt(store, ctx, i):
    with store.transaction() as conn:
        conn.execute(f"update runs set claimed_by = 'gone' where id in ({marks(ctx['runs'])})")


def op_adopt_slurm_runs(store, ctx, i):
    from engine.queue_store import adopt_slurm_runs

    adopt_slurm_runs(store, f"t{i}")


def op_move(store, ctx, i):
    from engine.queue_store import move

    move(store, ctx["runs"][i % len(ctx["runs"])], 3 if i % 2 else -3)


@dataclass
class Op:
    setup: Callable  # (store) -> ctx, in the test process
    run: Callable  # (store, ctx, i): the operation under test
    partial: Callable  # (ctx) -> SQL counting what only half of the operation would leave
    before: Callable | None = None  # (store, ctx, i): its own transaction, before each run


OPS = {
    "create_run": Op(
        lambda store: {}, lambda store, ctx, i: store.create_run("e", f"v{i}", {"i": i}, "h"),
        lambda ctx: "select count(*) from runs where folder is null or queue_pos is null "
                    "or folder != printf('run-%05d', id)"),
    "create_runs": Op(
        lambda store: {}, op_create_runs,
        lambda ctx: "select count(*) from (select batch from runs group by batch having count(*) != 6)"),
    "add_event": Op(
        setup_run, lambda store, ctx, i: store.add_event(ctx["run"], "sampling", i, 100),
        lambda ctx: f"select count(*) from runs where id = {ctx['run']} and coalesce(heartbeat_at, -1) != "
                    f"coalesce((select time from events where run_id = {ctx['run']} order by id desc limit 1), -1)"),
    "put_metrics": Op(
        setup_run, lambda store, ctx, i: store.put_metrics(ctx["run"], {f"m{k}": float(i) for k in range(10)}),
        lambda ctx: f"select count(*) from (select count(*) as n, count(distinct value) as d from metrics "
                    f"where run_id = {ctx['run']}) where n not in (0, 10) or d > 1"),
    "put_layers": Op(
        setup_run,
        lambda store, ctx, i: store.put_layers(ctx["run"], [{"name": f"l{k}", "role": "conv", "params": i}
                                                             for k in range(12)]),
        lambda ctx: f"select count(*) from (select count(*) as n, count(distinct params) as d from layers "
                    f"where run_id = {ctx['run']}) where n not in (0, 12) or d > 1"),
    "ingest": Op(
        setup_ingest, op_ingest,
        lambda ctx: f"select count(*) from runs where id = {ctx['run']} and "
                    f"coalesce((select done from events where run_id = {ctx['run']} order by id desc limit 1), -1) != "
                    f"coalesce((select value from metrics where run_id = {ctx['run']} and name = 'm'), -1)"),
    "record_submission": Op(
        setup_batch, op_record_submission,
        lambda ctx: f"select count(*) from (select count(job_id) as n, count(distinct substr(job_id, 1, "
                    f"instr(job_id, '_') - 1)) as d from runs where id in ({marks(ctx['runs'])})) "
                    f"where n not in (0, 3) or d > 1"),
    "finish_and_release": Op(
        setup_run, op_finish_and_release,
        lambda ctx: f"select count(*) from runs where id = {ctx['run']} and "
                    f"(status = 'running') != (claimed_by is not null)",
        before_finish),
    "release_dead_claims": Op(
        lambda store: {"runs": new_runs(store, 3)}, op_release_dead_claims,
        lambda ctx: f"select (select count(*) from runs where id in ({marks(ctx['runs'])}) and claimed_by is not null "
                    f"and claimed_by not in (select token from schedulers)) + (select count(*) from schedulers s "
                    f"where not exists (select 1 from runs where claimed_by = s.token))",
        before_release),
    "claim_slurm_batch": Op(
        setup_batch, op_claim_slurm_batch,
        lambda ctx: f"select count(*) from (select count(claimed_by) as n from runs "
                    f"where id in ({marks(ctx['runs'])})) where n not in (0, 3)",
        before_claim),
    "adopt_slurm_runs": Op(
        setup_adopt, op_adopt_slurm_runs,
        lambda ctx: f"select count(distinct claimed_by) > 1 from runs where id in ({marks(ctx['runs'])})",
        before_adopt),
    "move": Op(
        setup_queue, op_move,
        lambda ctx: "select count(*) - count(distinct queue_pos) from runs where status = 'queued' "
                    "and claimed_by is null"),
}
SINGLE_WRITE = {"create_run"}  # one INSERT: nothing to inject between


# ---------------------------------------------------------------- another process polls
def _repeat(runs_dir: str, name: str, ctx: dict, seconds: float, started, done_count) -> None:
    op = OPS[name]
    store = Store.open(runs_dir)
    started.set()
    end, i = time.time() + seconds, 0
    while time.time() < end or i < 10:
        i += 1
        if op.before is not None:
            op.before(store, ctx, i)
        op.run(store, ctx, i)
    done_count.value = i
    store.close()


@pytest.mark.parametrize("name", sorted(OPS))
def test_a_reader_never_sees_half_an_operation(tmp_path, name):
    op = OPS[name]
    store = Store.open(tmp_path)
    ctx = op.setup(store)
    store.close()
    spawn = mp.get_context("spawn")
    started, count = spawn.Event(), spawn.Value("i", 0)
    writer = spawn.Process(target=_repeat, args=(str(tmp_path), name, ctx, 1.0, started, count))
    writer.start()
    reader = sqlite3.connect(f"{db_path(tmp_path).as_uri()}?mode=ro", uri=True, timeout=30)
    polls, partial = 0, 0
    try:
        assert started.wait(60)
        sql = op.partial(ctx)
        while writer.is_alive():
            partial += reader.execute(sql).fetchone()[0] > 0
            polls += 1
        writer.join(30)
    finally:
        reader.close()
        if writer.is_alive():
            writer.kill()
    assert writer.exitcode == 0
    assert count.value >= 10 and polls >= 50, (count.value, polls)
    assert partial == 0, f"{partial} of {polls} polls saw half of {name} ({count.value} repeats)"


# ---------------------------------------------------------------- an exception between statements
class Injected(Exception):
    pass


WRITES = ("insert", "update", "delete", "replace", "alter", "create", "drop")


class FailingConnection:
    """A sqlite3 connection that raises before its `fail_at`-th write statement."""

    def __init__(self, conn: sqlite3.Connection, fail_at: int):
        self._conn, self.fail_at, self.writes = conn, fail_at, 0

    def _count(self, sql: str) -> None:
        if sql.lstrip().split(None, 1)[0].lower() in WRITES:
            self.writes += 1
            if self.writes == self.fail_at:
                raise Injected(f"write {self.writes}: {sql[:60]}")

    def execute(self, sql, *args):
        self._count(sql)
        return self._conn.execute(sql, *args)

    def executemany(self, sql, *args):
        self._count(sql)
        return self._conn.executemany(sql, *args)

    def __getattr__(self, name):
        return getattr(self._conn, name)


def dump(store: Store) -> dict:
    conn = store.db.conn
    tables = [r[0] for r in conn.execute("select name from sqlite_master where type = 'table' order by name")]
    return {t: sorted(map(repr, conn.execute(f"select * from {t}").fetchall())) for t in tables}


@pytest.mark.parametrize("name", sorted(set(OPS) - SINGLE_WRITE))
def test_an_exception_between_statements_leaves_nothing(tmp_path, name):
    op = OPS[name]
    store = Store.open(tmp_path)
    ctx = op.setup(store)
    real = store.db.conn
    injected = 0
    for i in range(1, 40):
        fail_at = i + 1  # after 1, 2, ... writes of the operation, until it has no more
        if op.before is not None:
            op.before(store, ctx, i)
        before = dump(store)
        store.db.conn = FailingConnection(real, fail_at)
        try:
            op.run(store, ctx, i)
        except Injected:
            injected += 1
        else:
            break
        finally:
            store.db.conn = real
        assert not real.in_transaction
        assert dump(store) == before, f"{name}: an exception before write {fail_at} left writes behind"
    assert injected >= 1, f"{name} wrote one statement: nothing to inject between"
    op.run(store, ctx, 99)  # and the store still works
    assert not real.in_transaction


def test_an_ingest_that_failed_applies_its_lines_once_later(tmp_path):
    from engine.run_files import ingest

    store = Store.open(tmp_path)
    ctx = setup_ingest(store)
    with open(ctx["path"], "a") as f:
        for k in range(3):
            f.write(json.dumps({"op": "event", "time": time.time(), "stage": "s", "done": k, "total": 3}) + "\n")
    real = store.db.conn
    store.db.conn = FailingConnection(real, 3)
    with pytest.raises(Injected):
        ingest(store, ctx["run"])
    store.db.conn = real
    assert store.get_run(ctx["run"])["ingested"] is None
    assert len(ingest(store, ctx["run"])) == 3 and ingest(store, ctx["run"]) == []
    assert [e["done"] for e in store.db["events"].rows_where("run_id = ?", [ctx["run"]])] == [0, 1, 2]


# ---------------------------------------------------------------- the helper itself
def test_a_nested_transaction_is_a_savepoint_of_the_outer_one(tmp_path):
    store = Store.open(tmp_path)
    run = new_runs(store, 1)[0]
    with store.transaction():
        store.put_metrics(run, {"kept": 1.0})
        with pytest.raises(Injected):
            with store.transaction():
                store.put_metrics(run, {"dropped": 2.0})
                raise Injected()
        assert store.db.conn.in_transaction  # the outer one goes on
    assert store.metrics(run) == {"kept": 1.0}
    with pytest.raises(Injected):
        with store.transaction():
            store.put_metrics(run, {"also_dropped": 3.0})
            store.finish(run, "done")
            raise Injected()
    assert store.metrics(run) == {"kept": 1.0} and store.get_run(run)["status"] == "queued"


def test_a_lock_held_past_the_wait_fails_the_whole_operation_and_the_cli_says_it_in_one_line(
        tmp_path, monkeypatch, capsys):
    import engine.store
    from engine.cli import main as engine_main

    store = Store.open(tmp_path)
    run = new_runs(store, 1)[0]
    store.close()
    monkeypatch.setattr(engine.store, "BUSY_TIMEOUT_MS", 300)
    holder = sqlite3.connect(db_path(tmp_path), isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        store = Store.open(tmp_path)
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            store.put_layers(run, [{"name": "l", "role": "conv", "params": 1}])
        assert not store.db.conn.in_transaction
        code = engine_main(["queue", "cancel", str(run), "--runs-dir", str(tmp_path),
                            "--experiments", str(tmp_path / "none.toml")])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1
        assert err.startswith(f"error: {tmp_path / 'qtui.db'}: database is locked"), err
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    store.put_layers(run, [{"name": "l", "role": "conv", "params": 1}])
    assert len(store.layers(run)) == 1 and store.get_run(run)["status"] == "queued"


# ---------------------------------------------------------------- lint: no several writes under `with conn:`
SQLITE_UTILS_WRITES = {"insert", "insert_all", "upsert", "upsert_all", "update", "delete", "delete_where",
                       "create", "create_index", "add_column", "transform", "drop"}
STORE_WRITES = {"create_run", "mark_running", "set_pid", "finish", "finish_if_unfinished", "heartbeat",
                "add_event", "put_metrics", "put_layers", "add_artifact"}
SQL_WRITES = ("insert", "update", "delete", "replace", "alter", "create", "drop")


def write_weight(call: ast.Call) -> int:
    """How many write statements a call may make: 0, 1, or 2 for "several" (executemany)."""
    func = call.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
    if name in ("execute", "executemany"):
        first = call.args[0] if call.args else None
        if isinstance(first, ast.Constant) and isinstance(first.value, str):
            words = first.value.split(None, 1)
            if not words or words[0].lower() not in SQL_WRITES:
                return 0
        elif isinstance(first, ast.JoinedStr):
            head = "".join(v.value for v in first.values if isinstance(v, ast.Constant))
            if head.split(None, 1) and head.split(None, 1)[0].lower() not in SQL_WRITES:
                return 0
        return 2 if name == "executemany" else 1
    return 1 if name in SQLITE_UTILS_WRITES | STORE_WRITES else 0


def count_writes(nodes, in_loop: bool = False) -> int:
    total = 0
    for node in nodes:
        for child in ast.walk(node):
            if isinstance(child, ast.Call):
                looped = in_loop or any(isinstance(a, (ast.For, ast.While, ast.comprehension, ast.ListComp,
                                                       ast.GeneratorExp, ast.SetComp, ast.DictComp))
                                        for a in ancestors(node, child))
                total += write_weight(child) * (2 if looped else 1)
    return total


def ancestors(root: ast.AST, target: ast.AST) -> list[ast.AST]:
    path: list[ast.AST] = []

    def walk(node) -> bool:
        if node is target:
            return True
        for child in ast.iter_child_nodes(node):
            if walk(child):
                path.append(node)
                return True
        return False

    walk(root)
    return path


def conn_blocks(source: str) -> list[tuple[int, int]]:
    """(line, writes) of each `with <x>.conn:` (or `with conn:`) block making several writes."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, (ast.With, ast.AsyncWith)):
            continue
        for item in node.items:
            expr = item.context_expr
            is_conn = (isinstance(expr, ast.Attribute) and expr.attr == "conn") or \
                (isinstance(expr, ast.Name) and expr.id == "conn")
            if is_conn:
                writes = count_writes(node.body)
                if writes > 1:
                    found.append((node.lineno, writes))
    return found


def test_the_lint_finds_several_writes_under_with_conn():
    bad = ("def f(self, run_id):\n"
           "    with self.db.conn:\n"
           "        self.db['runs'].insert({'a': 1})\n"
           "        self.db['runs'].update(run_id, {'folder': 'x'})\n")
    looped = ("def g(store, ids):\n"
              "    with store.db.conn:\n"
              "        for i in ids:\n"
              "            store.db.conn.execute('update runs set x = 1 where id = ?', (i,))\n")
    many = "def h(conn, rows):\n    with conn:\n        conn.executemany('insert into t values (?)', rows)\n"
    fine = ("def k(self, run_id):\n"
            "    with self.db.conn:\n"
            "        self.db.conn.execute('update runs set x = 1 where id = ?', (run_id,))\n"
            "        self.db.conn.execute('select 1')\n"
            "    with self.transaction():\n"
            "        self.db['runs'].insert({'a': 1})\n"
            "        self.db['runs'].update(run_id, {'folder': 'x'})\n")
    assert conn_blocks(bad) == [(2, 2)]
    assert conn_blocks(looped) == [(2, 2)]
    assert conn_blocks(many) == [(2, 2)]
    assert conn_blocks(fine) == []


def test_no_engine_module_wraps_several_writes_in_with_conn():
    offenders = []
    for path in sorted(ENGINE.rglob("*.py")):
        for line, writes in conn_blocks(path.read_text()):
            offenders.append(f"{path.relative_to(ENGINE.parent)}:{line}: `with ...conn:` around {writes}+ writes")
    assert not offenders, ("not one transaction under sqlite-utils (each of its writes commits by itself); "
                           "use `with store.transaction():`\n" + "\n".join(offenders))


def test_a_submission_records_every_job_id_and_names_the_runs_cancelled_meanwhile(tmp_path):
    from engine.queue_store import finish_and_release, record_submission, request_cancel

    store = Store.open(tmp_path)
    ids = new_runs(store, 3, executor="slurm", batch="b")
    request_cancel(store, ids[1])  # unclaimed and queued: cancelled at once
    gone = record_submission(store, [{"id": i} for i in ids], ["7_0", "7_1", "7_2"])
    assert gone == [(ids[1], "7_1")]
    assert [store.get_run(i)["job_id"] for i in ids] == ["7_0", "7_1", "7_2"]
    with store.transaction() as conn:
        conn.execute("update runs set claimed_by = 's' where id = ?", (ids[0],))
    assert finish_and_release(store, ids[0], "failed", "Slurm job 7_0 ended TIMEOUT")
    run = store.get_run(ids[0])
    assert (run["status"], run["claimed_by"]) == ("failed", None)
    assert not finish_and_release(store, ids[0], "cancelled", "again")
    assert store.get_run(ids[0])["status"] == "failed"
