"""The experiment catalogue: `experiments.toml`, validated into plain dataclasses.

    [experiments.NAME]                  # an experiment: model, sampling and evaluation protocol
    model = "digits-unet"
    samples = 1000
    [experiments.NAME.variants.A]       # a variant: a quantization method and its keys
    method = "rtn"
    bits = { conv = 4, attention = 4, linear = 4 }

Every mistake becomes a `ConfigError` naming the file, the key and the line. Nothing here
imports torch.
"""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from engine.errors import ConfigError
from engine.execution_keys import validate_execution
from engine.methods import BadKey, check_against_model, validate_method
from engine.models.registry import ModelNotFound, resolve_model
from engine.run_config import EvalConfig, ModelRef, RunConfig, SamplingConfig

EXPERIMENT_DEFAULTS = {
    "description": "",
    "model": None,  # required
    "feature_model": "digits-classifier",
    "samples": 1000,
    "steps": 20,
    "guidance": 1.0,
    "seed": 0,
    "batch_size": 250,
    "bootstrap": 200,
}
VARIANT_KEYS = ("description", "method", "execution", "autocast")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class Variant:
    name: str
    description: str
    method: str
    params: dict
    execution: str = "simulated"  # engine.execution_keys
    autocast: str | None = None


@dataclass(frozen=True)
class Experiment:
    name: str
    description: str
    model: str
    model_path: Path
    feature_model: str
    feature_model_path: Path
    samples: int
    steps: int
    guidance: float
    seed: int
    batch_size: int
    bootstrap: int
    variants: dict[str, Variant] = field(default_factory=dict)

    def run_config(self, variant: str, samples: int | None = None) -> dict:
        """The full, resolved config of one run: what is stored, hashed and executed."""
        v = self.variants[variant]
        return RunConfig(
            experiment=self.name,
            variant=v.name,
            description=v.description,
            model=ModelRef(self.model, str(self.model_path)),
            feature_model=ModelRef(self.feature_model, str(self.feature_model_path)),
            method=v.method,
            params=v.params,
            execution=v.execution,
            autocast=v.autocast,
            sampling=SamplingConfig(
                samples=samples if samples is not None else self.samples,
                steps=self.steps,
                guidance=self.guidance,
                seed=self.seed,
                batch_size=self.batch_size,
            ),
            eval=EvalConfig(bootstrap=self.bootstrap),
        ).to_dict()


@dataclass(frozen=True)
class Catalogue:
    path: Path
    experiments: dict[str, Experiment]

    def get(self, name: str) -> Experiment:
        if name not in self.experiments:
            known = ", ".join(self.experiments) or "none"
            raise ConfigError(str(self.path), None, f"unknown experiment {name!r}; known: {known}")
        return self.experiments[name]


def config_hash(config: dict) -> str:
    """Hash of what determines a run's results (not its description)."""
    relevant = {k: v for k, v in config.items() if k != "description"}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def find_line(text: str, table: list[str], key: str | None = None) -> int | None:
    """Line (1-based) of `key` inside `[table]`, or of the table header; None if not found."""
    current: list[str] | None = None
    header_line = None
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        header = re.match(r"^\[\s*([^\[\]]+?)\s*\]", stripped)
        if header:
            current = [p.strip().strip('"').strip("'") for p in header.group(1).split(".")]
            if current == table:
                header_line = number
                if key is None:
                    return number
            continue
        if current == table and key is not None:
            if re.match(rf"^[\"']?{re.escape(key)}[\"']?\s*=", stripped):
                return number
    return header_line


class _Reader:
    """Validates one file, turning every problem into a located ConfigError."""

    def __init__(self, path: Path, text: str):
        self.path, self.text = path, text
        self._tensors: dict[Path, object] = {}

    def model_tensors(self, model_path: Path):
        """The model's layer shapes from its safetensors header (read once per model)."""
        if model_path not in self._tensors:
            from engine.models.layer_shapes import read_model_tensors

            self._tensors[model_path] = read_model_tensors(model_path)
        return self._tensors[model_path]

    def fail(self, table: list[str], key: str | None, message: str):
        first = key.split(".")[0] if key else None
        line = find_line(self.text, table, first)
        dotted = ".".join(table + ([key] if key else []))
        raise ConfigError(str(self.path), dotted, message, line)

    def integer(self, table, key, value, minimum, maximum=None) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(table, key, f"must be an integer, got {value!r}")
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
            self.fail(table, key, f"must be {bound}, got {value}")
        return value

    def experiment(self, name: str, raw) -> Experiment:
        table = ["experiments", name]
        if not isinstance(raw, dict):
            self.fail(table, None, "must be a table")
        if not NAME_RE.match(name):
            self.fail(table, None, "experiment names use letters, digits, '-', '_' and '.'")
        for key in raw:
            if key not in EXPERIMENT_DEFAULTS and key != "variants":
                known = ", ".join(list(EXPERIMENT_DEFAULTS) + ["variants"])
                self.fail(table, key, f"unknown key; keys are {known}")
        values = {**EXPERIMENT_DEFAULTS, **{k: v for k, v in raw.items() if k != "variants"}}
        if values["model"] is None:
            self.fail(table, "model", "is required (a shipped model name or a directory)")
        for key in ("model", "feature_model", "description"):
            if not isinstance(values[key], str):
                self.fail(table, key, f"must be a string, got {values[key]!r}")
        paths = {}
        for key in ("model", "feature_model"):
            try:
                paths[key] = resolve_model(values[key], base=self.path.parent)
            except ModelNotFound as exc:
                self.fail(table, key, str(exc))
        self.integer(table, "samples", values["samples"], 1)
        self.integer(table, "steps", values["steps"], 1, 1000)
        self.integer(table, "seed", values["seed"], 0)
        self.integer(table, "batch_size", values["batch_size"], 1)
        self.integer(table, "bootstrap", values["bootstrap"], 0)
        guidance = values["guidance"]
        if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or guidance < 0:
            self.fail(table, "guidance", f"must be a number >= 0, got {guidance!r}")
        variants_raw = raw.get("variants")
        if not isinstance(variants_raw, dict) or not variants_raw:
            self.fail(table, "variants", "needs at least one [experiments.NAME.variants.V] table")
        variants = {
            v: self.variant(table + ["variants", v], v, r, paths["model"]) for v, r in variants_raw.items()
        }
        return Experiment(
            name=name,
            description=values["description"],
            model=values["model"],
            model_path=paths["model"],
            feature_model=values["feature_model"],
            feature_model_path=paths["feature_model"],
            samples=values["samples"],
            steps=values["steps"],
            guidance=float(guidance),
            seed=values["seed"],
            batch_size=values["batch_size"],
            bootstrap=values["bootstrap"],
            variants=variants,
        )

    def variant(self, table: list[str], name: str, raw, model_path: Path) -> Variant:
        if not isinstance(raw, dict):
            self.fail(table, None, "must be a table")
        if not NAME_RE.match(name):
            self.fail(table, None, "variant names use letters, digits, '-', '_' and '.'")
        description = raw.get("description", "")
        if not isinstance(description, str):
            self.fail(table, "description", "must be a string")
        method = raw.get("method", "rtn" if "bits" in raw else None)
        if method is None:
            self.fail(table, "method", "is required ('none' for full precision, or 'rtn')")
        if not isinstance(method, str):
            self.fail(table, "method", f"must be a string, got {method!r}")
        keys = {k: v for k, v in raw.items() if k not in VARIANT_KEYS}
        try:
            params = validate_method(method, keys)
            check_against_model(method, params, lambda: self.model_tensors(model_path))
            execution, autocast = validate_execution(method, params, raw.get("execution"), raw.get("autocast"))
        except BadKey as exc:
            self.fail(table, exc.key, exc.message)
        return Variant(name=name, description=description, method=method, params=params,
                       execution=execution, autocast=autocast)


def load_catalogue(path: str | Path) -> Catalogue:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(str(path), None, "no such file")
    text = path.read_text(encoding="utf-8")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        found = re.search(r"\(at line (\d+), column \d+\)", str(exc))
        line = int(found.group(1)) if found else None
        message = re.sub(r"\s*\(at line \d+, column \d+\)", "", str(exc))
        raise ConfigError(str(path), None, f"not valid TOML: {message}", line) from None
    reader = _Reader(path, text)
    for key in data:
        if key != "experiments":
            reader.fail([], key, "unknown top-level key; experiments go in [experiments.NAME]")
    raw = data.get("experiments", {})
    if not isinstance(raw, dict):
        reader.fail([], "experiments", "must be a table of experiments")
    experiments = {name: reader.experiment(name, body) for name, body in raw.items()}
    return Catalogue(path=path, experiments=experiments)
