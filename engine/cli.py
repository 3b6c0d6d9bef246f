"""The `engine` command: list, run, queue, rerun, show, compare, report, export, verify, stats and train. Heavy imports
happen per command."""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
from pathlib import Path

from engine.errors import UserError

TRAINABLE = ("digits-unet", "digits-mmdit", "digits-classifier", "digits-clip")
EXPORT_FORMATS = ("csv", "json", "md", "latex")
TABLE_WIDTH = 320  # the results table, wide enough that no column is squeezed out


def load(args, only: list[str] | None = None):
    """The catalogue of --experiments; with `only`, other experiments that fail their checks
    (a broken model folder) are left out instead of stopping the command."""
    from engine.config import load_catalogue

    return load_catalogue(args.experiments, only)


def open_store(args, create: bool = True, write: bool = True):
    """The store of --runs-dir. A command that writes (`write`) stops first with one line when
    this user cannot write the folder or its database; one that only reads opens such a
    database read-only, with a note on stderr (engine/store_access.py)."""
    from engine.store import Store
    from engine.store_access import open_readonly, write_problem

    problem = write_problem(args.runs_dir)
    if problem and write:
        raise UserError(problem)
    try:
        if problem:
            store = open_readonly(args.runs_dir)
            print(f"note: {problem.split(';')[0]}: reading it read-only", file=sys.stderr)
            return store
        return Store.open(args.runs_dir, create=create)
    except FileNotFoundError:
        raise UserError(f"{args.runs_dir}: no database yet (run an experiment first)") from None
    except UserError:
        raise  # a damaged database: its own message says what to do
    except Exception as exc:  # sqlite3 errors: locked, corrupt, not a database, full disk
        full = no_space_message(exc, args.runs_dir)
        if full:
            raise UserError(full) from None
        raise UserError(f"{args.runs_dir}: cannot open the database ({exc})") from None


def cmd_list(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from engine.methods import describe_variant

    catalogue = load(args)
    counts: dict[str, dict[str, int]] = {}
    if (Path(args.runs_dir) / "qtui.db").exists():
        store = open_store(args, write=False)
        for run in store.runs():
            by = counts.setdefault(run["experiment"], {})
            by[run["status"]] = by.get(run["status"], 0) + 1
    table = Table(title=str(catalogue.path))
    for header in ("experiment", "model", "variants", "runs", "description"):
        table.add_column(header)
    for name, exp in catalogue.experiments.items():
        variants = ", ".join(f"{v} ({describe_variant(exp, x)})" for v, x in exp.variants.items())
        runs = ", ".join(f"{n} {s}" for s, n in sorted(counts.get(name, {}).items())) or "-"
        model = exp.model if exp.needs_model is None else f"needs model {exp.needs_model}"
        table.add_row(name, model, variants, runs, exp.description)
    Console().print(table)
    return 0


def chosen_runs(args):
    """The experiment, its chosen variants and how to launch them (flags over qtui.toml)."""
    from engine.runner import launch_options
    from engine.settings import load_settings, parse_gpus

    catalogue = load(args, only=[args.name])
    experiment = catalogue.get(args.name)
    if experiment.needs_model is not None:
        raise UserError(f"{catalogue.path}: experiment {args.name!r} needs model {experiment.needs_model}: "
                        "no such folder (put the diffusers pipeline folder there, or change `model`)")
    variants = args.variant or list(experiment.variants)
    for v in variants:
        if v not in experiment.variants:
            known = ", ".join(experiment.variants)
            raise UserError(f"{catalogue.path}: experiment {args.name!r} has no variant {v!r}; variants: {known}")
    if args.samples is not None and args.samples < 1:
        raise UserError(f"--samples must be at least 1, got {args.samples}")
    settings = load_settings(args.experiments)
    jobs = args.jobs if args.jobs is not None else settings.jobs
    if jobs < 1:
        raise UserError(f"--jobs must be at least 1, got {jobs}")
    executor = args.executor or settings.executor
    gpus = parse_gpus(args.gpus) if args.gpus is not None else settings.gpus
    if executor == "slurm":
        from engine.slurm import slurm_available

        reason = slurm_available()
        if reason:
            raise UserError(f"--executor slurm: {reason}")
    return experiment, variants, launch_options(executor, jobs, gpus if executor == "local" else None, settings)


def cmd_run(args) -> int:
    from rich.console import Console

    from engine.runner import run_experiment
    from engine.settings import load_settings

    experiment, variants, launch = chosen_runs(args)
    grace = load_settings(args.experiments).cancel_grace_s
    console = Console()
    store = open_store(args)
    try:
        ids = run_experiment(store, experiment, variants, args.samples, launch["jobs"], console, launch, grace)
    except KeyboardInterrupt:
        return 130
    return show_outcome(store, ids, f"{experiment.name} ({store.runs_dir / 'qtui.db'})", console)


def show_outcome(store, ids: list[int], title: str, console) -> int:
    """The results table of the runs, then each one that did not finish done; 1 if any."""
    from rich.console import Console

    from engine.runner import results_table

    Console(width=max(console.width, TABLE_WIDTH)).print(results_table(store, ids, title))
    failed = [r for r in (store.get_run(i) for i in ids) if r["status"] != "done"]
    for run in failed:
        console.print(f"[red]{run['variant']}: {run['status']}: {run['error']}[/red]")
    return 1 if failed else 0


QUEUE_COLUMNS = ("pos", "run", "experiment", "variant", "executor", "where", "state")


def cmd_queue(args) -> int:
    if args.queue_command == "add":
        return cmd_queue_add(args)
    if args.queue_command == "cancel":
        return cmd_queue_cancel(args)
    from rich.console import Console
    from rich.table import Table

    from engine.queue_store import adopt_candidates, live_schedulers, queue_state, queued_runs

    if not (Path(args.runs_dir) / "qtui.db").exists():
        print("the queue is empty (no database yet)")
        return 0
    store = open_store(args, write=False)
    running = [r for r in store.runs(status="running")]
    queued = queued_runs(store)
    table = Table(title=f"queue of {store.runs_dir / 'qtui.db'}")
    for header in QUEUE_COLUMNS:
        table.add_column(header)
    for run in running:
        where, state = queue_state(run)
        table.add_row("-", str(run["id"]), run["experiment"], run["variant"], run.get("executor") or "local",
                      where, state)
    pos = 0
    for run in queued:
        where, state = queue_state(run)
        pos += state == "waiting"  # claimed runs are starting (or pending in Slurm): no place
        table.add_row(str(pos) if state == "waiting" else "-", str(run["id"]), run["experiment"], run["variant"],
                      run.get("executor") or "local", where, state)
    console = Console()
    Console(width=max(console.width, 120)).print(table)
    schedulers = live_schedulers(store)
    if not schedulers and not getattr(store, "read_only", False) and adopt_candidates(store):  # a scheduler died (killed, reboot): resume
        from engine.scheduler import ensure_scheduler
        from engine.settings import load_settings

        settings = load_settings(args.experiments)
        pid = ensure_scheduler(store.runs_dir, settings.jobs, settings.gpus, store)
        print(f"no scheduler was draining this queue: started one (pid {pid})")
    desc = ", ".join(f"pid {s['pid']} on {s['host']} (jobs {s['jobs']}"
                     + (f", gpus {','.join(json.loads(s['gpus']))})" if s["gpus"] and s["gpus"] != "null" else ")")
                     for s in schedulers)
    print(f"schedulers: {desc or 'none (one starts with the next queued run)'}")
    return 0


def cmd_queue_add(args) -> int:
    from engine.runner import queue_runs

    experiment, variants, launch = chosen_runs(args)
    store = open_store(args)
    ids = queue_runs(store, experiment, variants, args.samples, launch)
    for run_id, variant in zip(ids, variants):
        print(f"queued run {run_id}: {experiment.name}/{variant} ({launch['executor']})")
    return 0


def cmd_queue_cancel(args) -> int:
    from engine.executor import cancel_runs
    from engine.settings import load_settings

    grace = load_settings(args.experiments).cancel_grace_s
    store = open_store(args, create=False)
    code = 0
    chosen = []
    for run_id in args.run:
        run = store.db["runs"].get(run_id) if store.db["runs"].count_where("id = ?", [run_id]) else None
        if run is None:
            print(f"error: no run {run_id} in {store.runs_dir / 'qtui.db'}", file=sys.stderr)
            code = 2
        elif run["status"] not in ("queued", "running"):
            print(f"run {run_id} is {run['status']}: nothing to cancel")
        else:
            chosen.append(run)
    killed = {s.run_id for s in cancel_runs(store, [r["id"] for r in chosen], grace) if s.killed}
    for run in chosen:
        run_id = run["id"]
        if store.get_run(run_id)["status"] == "cancelled":
            via = f" (scancel {run['job_id']})" if run.get("job_id") else ""
            if run_id in killed:
                via += f" (killed: still running {grace:g} s after SIGTERM)"
            print(f"cancelled run {run_id}{via}")
        else:
            now = store.get_run(run_id)
            print(f"run {run_id} is {now['status']}: could not cancel it from here (host {now.get('host')})")
            code = 1
    return code


def cmd_rerun(args) -> int:
    """Queue a copy of each run with its stored config, follow them and print the table."""
    from rich.console import Console

    from engine.executor import display_status
    from engine.runner import follow_runs, launch_options, requeue
    from engine.scheduler import ensure_scheduler
    from engine.settings import load_settings

    store = open_store(args, create=False)
    originals = []
    for run_id in args.run:
        if not store.db["runs"].count_where("id = ?", [run_id]):
            raise UserError(f"no run {run_id} in {store.runs_dir / 'qtui.db'}")
        run = store.get_run(run_id)
        if display_status(run) in ("queued", "running"):
            raise UserError(f"run {run_id} is {display_status(run)}: nothing to re-run yet")
        originals.append(run)
    settings = load_settings(args.experiments)
    jobs = args.jobs if args.jobs is not None else settings.jobs
    if jobs < 1:
        raise UserError(f"--jobs must be at least 1, got {jobs}")
    launch = launch_options("local", jobs, settings.gpus)
    ids = [requeue(store, run, launch) for run in originals]
    for old, new in zip(originals, ids):
        print(f"run {new}: re-run of run {old['id']} ({old['experiment']}/{old['variant']})")
    ensure_scheduler(store.runs_dir, jobs, launch.get("gpus"), store)
    if args.no_wait:
        return 0
    console = Console()
    try:
        follow_runs(store, ids, launch, console, settings.cancel_grace_s)
    except KeyboardInterrupt:
        return 130
    return show_outcome(store, ids, f"re-runs ({store.runs_dir / 'qtui.db'})", console)


def cmd_show(args) -> int:
    from rich.console import Console

    from engine.methods import describe_variant
    from engine.runner import results_table

    catalogue = load(args, only=[args.name])
    exp = catalogue.get(args.name)
    console = Console()
    console.print(f"[bold]{exp.name}[/bold]: {exp.description}")
    console.print(f"model {exp.model} ({exp.model_path or 'needs model ' + str(exp.needs_model)}); "
                  f"features {exp.feature_model}; "
                  f"{exp.samples} samples, {exp.steps} sampler steps, guidance {exp.guidance}, seed {exp.seed}")
    for name, v in exp.variants.items():
        console.print(f"  {name}: {v.method} {describe_variant(exp, v)}  {v.description}")
    if exp.seeds:
        console.print(f"  seeds {list(exp.seeds)}: each variant once per seed")
    if (Path(args.runs_dir) / "qtui.db").exists():
        from engine.paired_runs import expectation_outcomes, main_family
        from engine.protocol import family_hash

        store = open_store(args, write=False)
        runs = store.runs(experiment=exp.name)
        if runs:
            family = main_family(runs, family_hash(exp.run_config(next(iter(exp.variants)))))
            table = results_table(store, [r["id"] for r in runs], f"runs of {exp.name}", {exp.name: family})
            Console(width=max(console.width, TABLE_WIDTH)).print(table)
            print_expectations(console, expectation_outcomes(store, exp, family))
            return 0
    console.print("no runs yet")
    print_expectations(console, [])
    for e in exp.expectations:
        console.print(f"  {e.text}: not run yet")
    return 0


def cmd_verify(args) -> int:
    """Each chosen run's files against what the database recorded (engine/verify.py)."""
    from engine.db_check import integrity_problems
    from engine.store import db_path
    from engine.verify import requantize_note, verify_run

    store = open_store(args, create=False, write=False)
    by_id = {r["id"]: r for r in store.runs(experiment=args.experiment)}
    if args.run:
        missing = [i for i in args.run if i not in by_id]
        if missing:
            where = f"experiment {args.experiment!r} of " if args.experiment else ""
            raise UserError(f"no run {missing[0]} in {where}{db_path(store.runs_dir)}")
        runs = [by_id[i] for i in args.run]
    else:
        runs = [r for r in by_id.values() if r["status"] == "done"]
    bad = 0
    for problem in integrity_problems(db_path(store.runs_dir)):
        print(f"{db_path(store.runs_dir)}: integrity check: {problem}")
        bad += 1
    for run in runs:
        problems = verify_run(store, run, requantize=args.requantize)
        for problem in problems:
            print(f"run {run['id']}: {problem}", flush=True)
        if not problems:
            note = requantize_note(run) if args.requantize else None
            print(f"run {run['id']} ok" + (f" ({note})" if note else ""), flush=True)
        bad += bool(problems)
    if not runs:
        print("no runs to verify")
    return 2 if bad else 0


def print_expectations(console, results) -> None:
    """Each expectation: its outcome, and the paired difference per seed."""
    if results:
        console.print("[bold]expectations[/bold] (paired 95% intervals of the difference, per seed):")
    for res in results:
        colour = {"supported": "green", "contradicted": "red"}.get(res.outcome, "yellow")
        console.print(f"  {res.text}: [{colour}]{res.outcome}[/{colour}]")
        for seed, diff, outcome in res.per_seed:
            if diff is not None:
                console.print(f"    seed {seed}: {diff.diff:+.3f} [{diff.low:+.3f}, {diff.high:+.3f}] {outcome}")


def cmd_compare(args) -> int:
    from engine.paired_runs import compare_runs

    store = open_store(args, create=False, write=False)
    diffs = compare_runs(store, args.a, args.b)
    a, b = store.get_run(args.a), store.get_run(args.b)
    first = next(iter(diffs.values()))
    print(f"run {args.a} ({a['experiment']}/{a['variant']}) - run {args.b} ({b['experiment']}/{b['variant']}), "
          f"protocol {a['protocol']}: paired bootstrap over {first.n} shared samples, {first.n_boot} resamples, 95%")
    for metric, d in diffs.items():
        direction = "lower is better" if metric == "fid" else "higher is better"
        who = f"run {args.a} ({a['variant']}) {d.verdict}" if d.verdict != "no significant difference" else d.verdict
        print(f"  {metric:<11} {d.diff:+10.4f}  [{d.low:+.4f}, {d.high:+.4f}]  {who}  ({direction})")
    return 0


def cmd_report(args) -> int:
    from engine.report import write_report

    exp = load(args, only=[args.name]).get(args.name)
    store = open_store(args, create=False, write=False)
    for path in write_report(store, exp, Path(args.out)):
        print(path)
    return 0


def cmd_export(args) -> int:
    from engine.export import export

    store = open_store(args, create=False, write=False)
    text = export(store, args.format, experiment=args.experiment)
    if args.out:
        from engine.atomic_files import write_text

        write_text(args.out, text)
    else:
        sys.stdout.write(text)
    return 0


def cmd_train(args) -> int:
    from engine.models.registry import SHIPPED_DIR

    out = Path(args.out) if args.out else SHIPPED_DIR / args.model
    if args.model == "digits-unet":
        from engine.train.digits_unet import UNetTrainConfig, train_digits_unet

        cfg = UNetTrainConfig(seed=args.seed)
        if args.steps:
            cfg.steps = args.steps
        summary = train_digits_unet(out, cfg)
    elif args.model == "digits-mmdit":
        from engine.train.digits_mmdit import MMDiTTrainConfig, train_digits_mmdit

        cfg = MMDiTTrainConfig(seed=args.seed, save_every=args.save_every)
        if args.steps:
            cfg.steps = args.steps
        summary = train_digits_mmdit(out, cfg)
    elif args.model == "digits-clip":
        from engine.train.digits_clip import ClipTrainConfig, train_digits_clip

        cfg = ClipTrainConfig(seed=args.seed)
        if args.steps:
            cfg.steps = args.steps
        summary = train_digits_clip(out, cfg)
    else:
        from engine.train.digits_classifier import ClassifierTrainConfig, train_digits_classifier

        cfg = ClassifierTrainConfig(seed=args.seed)
        if args.steps:
            cfg.epochs = args.steps
        summary = train_digits_classifier(out, cfg)
    print(f"saved {args.model} to {out}: {summary}")
    return 0


def cmd_stats(args) -> int:
    """Reference statistics of a folder of images, in pytorch-fid's --save-stats format."""
    from engine.metrics.reference import IMAGE_EXTENSIONS, image_files

    folder, out = Path(args.folder), Path(args.out)
    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder")
    if not image_files(folder):
        raise UserError(f"{folder}: no images ({', '.join(IMAGE_EXTENSIONS)})")
    if out.suffix != ".npz":
        raise UserError(f"--out {out}: must end in .npz")
    if out.exists():
        raise UserError(f"--out {out}: already exists")
    if args.feature_model == "inception":
        from engine.models.inception import InceptionWeightsMissing, resolve_weights

        try:
            weights = resolve_weights(args.inception_weights)
        except InceptionWeightsMissing as exc:
            raise UserError(str(exc)) from None
        spec = {"id": "inception", "path": str(weights)}
    else:
        from engine.models.registry import ModelNotFound, resolve_model

        try:
            spec = {"id": args.feature_model, "path": str(resolve_model(args.feature_model))}
        except ModelNotFound as exc:
            raise UserError(str(exc)) from None
    from engine.metrics.features import load_feature_model
    from engine.metrics.reference import folder_features, save_stats, stats_with_floor
    from engine.models.loader import default_device

    extractor = load_feature_model(spec, default_device())
    features = folder_features(folder, extractor)
    stats, floor = stats_with_floor(features)
    save_stats(out, stats, floor=floor)
    print(f"{out}: mu [{stats.mu.shape[0]}], sigma of {stats.n} images from {folder} ({extractor.id})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="engine", description="qtui's headless engine")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--experiments", default="experiments.toml", help="the experiment catalogue")
    common.add_argument("--runs-dir", default="runs", help="folder of the database and run outputs")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", parents=[common], help="the experiments and their runs").set_defaults(func=cmd_list)
    launching = argparse.ArgumentParser(add_help=False)
    launching.add_argument("name")
    launching.add_argument("--variant", action="append", help="run only this variant (repeatable)")
    launching.add_argument("--samples", type=int, help="override the number of samples per variant")
    launching.add_argument("--jobs", type=int, help="local runs at once without GPUs (default 1, or qtui.toml)")
    launching.add_argument("--executor", choices=("local", "slurm"), help="where runs go (default local, or qtui.toml)")
    launching.add_argument("--gpus", help='GPU pool, one run per GPU: "0,1,3" or "all" (default: qtui.toml)')
    p = sub.add_parser("run", parents=[common, launching], help="run an experiment (all variants, or the chosen ones)")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("queue", parents=[common], help="the queue of runs: list (default), add, cancel")
    p.set_defaults(func=cmd_queue, queue_command=None)
    qsub = p.add_subparsers(dest="queue_command")
    q = qsub.add_parser("add", parents=[common, launching], help="queue an experiment's runs without waiting")
    q.set_defaults(func=cmd_queue)
    q = qsub.add_parser("cancel", parents=[common], help="cancel queued or running runs (scancel on Slurm)")
    q.add_argument("run", type=int, nargs="+", help="run ids")
    q.set_defaults(func=cmd_queue)
    p = sub.add_parser("rerun", parents=[common], help="re-run finished runs with their stored configs (locally)")
    p.add_argument("run", type=int, nargs="+", help="run ids")
    p.add_argument("--jobs", type=int, help="runs at once (default 1, or qtui.toml)")
    p.add_argument("--no-wait", action="store_true", help="queue them and return")
    p.set_defaults(func=cmd_rerun)
    p = sub.add_parser("show", parents=[common], help="an experiment's definition and results")
    p.add_argument("name")
    p.set_defaults(func=cmd_show)
    p = sub.add_parser("compare", parents=[common], help="paired differences of two runs of one protocol")
    p.add_argument("a", type=int, metavar="RUN")
    p.add_argument("b", type=int, metavar="RUN")
    p.set_defaults(func=cmd_compare)
    p = sub.add_parser("report", parents=[common], help="a Markdown report of an experiment (tables, plots, samples)")
    p.add_argument("name")
    p.add_argument("--out", required=True, help="directory to write report.md, table.tex and the PNGs into")
    p.set_defaults(func=cmd_report)
    p = sub.add_parser("export", parents=[common], help="the results table (csv, md, latex) or everything (json)")
    p.add_argument("--format", choices=EXPORT_FORMATS, default="csv")
    p.add_argument("--experiment", help="only this experiment")
    p.add_argument("--out", help="file to write (default: standard output)")
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("verify", parents=[common], help="check runs' files against the database (default: every done run)")
    p.add_argument("run", type=int, nargs="*", metavar="RUN", help="run ids")
    p.add_argument("--experiment", help="only this experiment's runs")
    p.add_argument("--requantize", action="store_true", help="GPTQ runs: re-run GPTQ from the calibration file, "
                                                              "codes must equal the checkpoint's")
    p.set_defaults(func=cmd_verify)
    p = sub.add_parser("stats", help="FID reference statistics of a folder of images (pytorch-fid's .npz)")
    p.add_argument("folder")
    p.add_argument("--out", required=True, help="the .npz to write (mu, sigma; pytorch_fid reads it)")
    p.add_argument("--feature-model", default="inception", help="inception (default) or a classifier model")
    p.add_argument("--inception-weights", help="pytorch-fid's weights file (default: $TORCH_HOME/hub/checkpoints/)")
    p.set_defaults(func=cmd_stats)
    p = sub.add_parser("train", help="train an embedded model and save it with save_pretrained")
    p.add_argument("model", choices=TRAINABLE)
    p.add_argument("--out", help="directory to save to (default: the shipped models/ folder)")
    p.add_argument("--steps", type=int, help="training steps (UNet, MMDiT, CLIP) or epochs (classifier)")
    p.add_argument("--save-every", type=int, default=0, help="also save the model every N steps (MMDiT)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # a full disk, or a database locked beyond the wait
        message = no_space_message(exc, getattr(args, "runs_dir", None))
        if message is None and isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
            where = Path(getattr(args, "runs_dir", "runs")) / "qtui.db"
            message = f"{where}: {exc} (another process held it longer than the engine waits)"
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2


def no_space_message(exc: BaseException, runs_dir) -> str | None:
    """"no space left ... writing PATH" for a full disk (the database's path for SQLite's own
    words), None for any other error."""
    from engine.atomic_files import DiskFull, disk_full_errno

    code = disk_full_errno(exc)
    if code is None:
        return None
    if isinstance(exc, DiskFull):
        return str(exc)
    import sqlite3

    if isinstance(exc, sqlite3.Error) and runs_dir is not None:
        return str(DiskFull(Path(runs_dir) / "qtui.db", code))
    return str(DiskFull(getattr(exc, "filename", None) or runs_dir or "?", code))


if __name__ == "__main__":
    sys.exit(main())
