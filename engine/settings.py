"""Engine settings: `qtui.toml` beside `experiments.toml` (how runs are executed, not what).

    [engine]
    executor = "local"        # or "slurm"
    jobs = 1                  # runs at once on this machine without a GPU pool
    gpus = "all"              # or [0, 1, 3] or "0,1,3": one run per GPU
    cancel_grace_s = 10       # a cancelled worker still there this long after SIGTERM gets SIGKILL

    [slurm]
    partition = "gpu"
    gpus_per_run = 1
    cpus_per_run = 8
    mem = "32G"
    time = "02:00:00"         # or minutes; Slurm's minimum is 1 minute
    account = "my-project"
    qos = "normal"
    array_parallelism = 4     # array tasks running at once
    python = "/shared/venv/bin/python"   # the jobs' python (default: this one)
    extra = { constraint = "a100", exclude = "node7" }   # any other sbatch options

Command-line options (`--executor`, `--jobs`, `--gpus`) override the file. A bad value is a
ConfigError naming the file, the key and its line. Torch-free.
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path

from engine.errors import ConfigError

SETTINGS_NAME = "qtui.toml"
EXECUTORS = ("local", "slurm")
ENGINE_KEYS = {"executor", "jobs", "gpus", "cancel_grace_s"}
CANCEL_GRACE_S = 10.0  # seconds from SIGTERM to SIGKILL when a run is cancelled
SLURM_KEYS = {"partition", "gpus_per_run", "cpus_per_run", "mem", "time", "account", "qos",
              "array_parallelism", "python", "extra", "signal_delay_s"}


@dataclass
class SlurmSettings:
    partition: str | None = None
    gpus_per_run: int = 0
    cpus_per_run: int | None = None
    mem: str | None = None
    time_min: int = 60
    account: str | None = None
    qos: str | None = None
    array_parallelism: int | None = None
    python: str | None = None
    signal_delay_s: int = 30
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Settings:
    path: Path | None = None
    executor: str = "local"
    jobs: int = 1
    gpus: list[str] | None = None  # None: no GPU pool
    cancel_grace_s: float = CANCEL_GRACE_S
    slurm: SlurmSettings = field(default_factory=SlurmSettings)


def settings_path(experiments: str | Path) -> Path:
    return Path(experiments).resolve().parent / SETTINGS_NAME


def line_of(text: str, key: str) -> int | None:
    for i, line in enumerate(text.splitlines(), 1):
        if re.match(rf"\s*{re.escape(key)}\s*=", line):
            return i
    return None


def parse_time(value, fail) -> int:
    """Minutes from an int or Slurm's "[D-]HH:MM:SS" / "MM" forms."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    if isinstance(value, str):
        m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", value.strip())
        if m:
            days, a, b, c = (int(x) if x else 0 for x in m.groups())
            if m.group(4) is not None:  # H:M:S
                minutes = days * 1440 + a * 60 + b + (1 if c else 0)
            elif m.group(3) is not None:  # M:S (Slurm's reading of two fields)
                minutes = days * 1440 + a + (1 if b else 0)
            else:
                minutes = days * 1440 + a
            if minutes >= 1:
                return minutes
    fail("time", f"must be minutes (at least 1) or HH:MM:SS, got {value!r}")
    return 0


def parse_gpus(value, fail=None) -> list[str] | None:
    """"all", a list of indices, or "0,1,3"; None or "" for no GPU pool."""
    def bad():
        message = f"must be \"all\", a list of GPU indices or \"0,1,3\", got {value!r}"
        if fail is None:
            raise ConfigError("--gpus", None, message)
        fail("gpus", message)

    if value is None or value == "" or value == []:
        return None
    if value == "all":
        found = detect_gpus()
        return found or None
    if isinstance(value, str):
        items = [x.strip() for x in value.split(",")]
    elif isinstance(value, list):
        items = [str(x) for x in value]
    else:
        bad()
        return None
    if not items or not all(re.fullmatch(r"\d+", x) for x in items) or len(set(items)) != len(items):
        bad()
    return items


def detect_gpus() -> list[str]:
    """The GPU indices `nvidia-smi` lists (none when it is absent: the machine has no GPU)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run([smi, "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return []
    if out.returncode != 0:
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip().isdigit()]


def load_settings(experiments: str | Path = "experiments.toml") -> Settings:
    path = settings_path(experiments)
    if not path.exists():
        return Settings()
    text = path.read_text()
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), None, f"not valid TOML: {exc}") from None

    def fail(key: str, message: str, section: str = "engine"):
        raise ConfigError(str(path), f"{section}.{key}", message, line_of(text, key))

    unknown = set(data) - {"engine", "slurm"}
    if unknown:
        raise ConfigError(str(path), sorted(unknown)[0], "unknown section (expected [engine] and [slurm])")
    engine = data.get("engine", {})
    slurm = data.get("slurm", {})
    for section, table, known in (("engine", engine, ENGINE_KEYS), ("slurm", slurm, SLURM_KEYS)):
        for key in table:
            if key not in known:
                fail(key, f"unknown key; known: {', '.join(sorted(known))}", section)
    settings = Settings(path=path)
    executor = engine.get("executor", "local")
    if executor not in EXECUTORS:
        fail("executor", f"must be one of {', '.join(EXECUTORS)}, got {executor!r}")
    settings.executor = executor
    jobs = engine.get("jobs", 1)
    if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
        fail("jobs", f"must be a whole number of at least 1, got {jobs!r}")
    settings.jobs = jobs
    settings.gpus = parse_gpus(engine.get("gpus"), fail)
    grace = engine.get("cancel_grace_s", CANCEL_GRACE_S)
    if not isinstance(grace, (int, float)) or isinstance(grace, bool) or not math.isfinite(grace) or grace < 0:
        fail("cancel_grace_s", f"must be a number of seconds (at least 0), got {grace!r}")
    settings.cancel_grace_s = float(grace)

    s = SlurmSettings()
    sfail = lambda key, message: fail(key, message, "slurm")
    for key in ("partition", "mem", "account", "qos", "python"):
        if key in slurm:
            if not isinstance(slurm[key], str) or not slurm[key]:
                sfail(key, f"must be a non-empty string, got {slurm[key]!r}")
            setattr(s, key, slurm[key])
    for key, low in (("gpus_per_run", 0), ("cpus_per_run", 1), ("array_parallelism", 1), ("signal_delay_s", 1)):
        if key in slurm:
            value = slurm[key]
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                sfail(key, f"must be a whole number of at least {low}, got {value!r}")
            setattr(s, key, value)
    if "time" in slurm:
        s.time_min = parse_time(slurm["time"], sfail)
    if "extra" in slurm:
        extra = slurm["extra"]
        if not isinstance(extra, dict) or not all(isinstance(v, (str, int, bool)) for v in extra.values()):
            sfail("extra", "must be a table of sbatch options, e.g. { constraint = \"a100\" }")
        s.extra = dict(extra)
    settings.slurm = s
    return settings
