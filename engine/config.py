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
import math
import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from engine.errors import ConfigError, UserError
from engine.methods import BadKey, check_against_model, validate_method
from engine.models.pipeline_index import PipelineError, check_side, inspect_pipeline
from engine.models.registry import SHIPPED_DIR, ModelNotFound, resolve_model
from engine.prompts import PromptsError, read_prompts
from engine.run_config import EvalConfig, ModelOptions, ModelRef, RunConfig, SamplingConfig

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
    # real pipelines (engine.models.adapters); the digits models need none of these
    "dtype": "auto",  # float32 | float16 | bfloat16 | auto (float16 on CUDA, float32 on CPU)
    "drop_t5": False,  # SD 3.x: load without text_encoder_3 / tokenizer_3
    "scheduler": None,  # a diffusers scheduler class name; default: the pipeline's own
    "height": None,  # default: the model's native size
    "width": None,
    "negative_prompt": "",
    "prompts": None,  # "<file>" (one prompt a line) or a list; default: the digits class prompts
}
DTYPES = ("auto", "float32", "float16", "bfloat16")
SCHEDULER_RE = re.compile(r"^[A-Z][A-Za-z0-9]*Scheduler$")
VARIANT_KEYS = ("description", "method")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class Variant:
    name: str
    description: str
    method: str
    params: dict


@dataclass(frozen=True)
class Experiment:
    name: str
    description: str
    model: str
    model_path: Path | None  # None when the folder is absent (see needs_model)
    feature_model: str
    feature_model_path: Path
    samples: int
    steps: int
    guidance: float
    seed: int
    batch_size: int
    bootstrap: int
    variants: dict[str, Variant] = field(default_factory=dict)
    options: ModelOptions = field(default_factory=ModelOptions)
    negative_prompt: str = ""
    prompts: tuple[str, ...] | None = None  # inline prompts
    prompts_file: Path | None = None
    prompts_sha256: str | None = None
    needs_model: str | None = None  # a model folder that is not there (yet): listed, not runnable

    def run_config(self, variant: str, samples: int | None = None) -> dict:
        """The full, resolved config of one run: what is stored, hashed and executed."""
        if self.needs_model is not None:
            raise UserError(f"experiment {self.name!r} needs model {self.needs_model}: no such folder "
                            "(put the diffusers pipeline folder there, or change `model`)")
        v = self.variants[variant]
        return RunConfig(
            experiment=self.name,
            variant=v.name,
            description=v.description,
            model=ModelRef(self.model, str(self.model_path)),
            feature_model=ModelRef(self.feature_model, str(self.feature_model_path)),
            method=v.method,
            params=v.params,
            sampling=SamplingConfig(
                samples=samples if samples is not None else self.samples,
                steps=self.steps,
                guidance=self.guidance,
                seed=self.seed,
                batch_size=self.batch_size,
                negative_prompt=self.negative_prompt,
                prompts=self.prompts,
                prompts_file=None if self.prompts_file is None else str(self.prompts_file),
                prompts_sha256=self.prompts_sha256,
            ),
            eval=EvalConfig(bootstrap=self.bootstrap),
            model_options=self.options,
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
        paths, needs_model = {}, None
        for key in ("model", "feature_model"):
            if key == "model" and (needs_model := self.absent_folder(values[key])) is not None:
                paths[key] = None
                continue
            try:
                paths[key] = resolve_model(values[key], base=self.path.parent)
            except ModelNotFound as exc:
                self.fail(table, key, str(exc))
        options, info = self.model_options(table, values, paths["model"])
        prompts, prompts_file, digest = self.prompts(table, values["prompts"], info, needs_model is not None)
        if not isinstance(values["negative_prompt"], str):
            self.fail(table, "negative_prompt", f"must be a string, got {values['negative_prompt']!r}")
        self.integer(table, "samples", values["samples"], 1)
        self.integer(table, "steps", values["steps"], 1, 1000)
        self.integer(table, "seed", values["seed"], 0)
        self.integer(table, "batch_size", values["batch_size"], 1)
        self.integer(table, "bootstrap", values["bootstrap"], 0)
        guidance = values["guidance"]
        if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not 0 <= guidance < math.inf:
            self.fail(table, "guidance", f"must be a finite number >= 0, got {guidance!r}")
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
            options=options,
            negative_prompt=values["negative_prompt"],
            prompts=prompts,
            prompts_file=prompts_file,
            prompts_sha256=digest,
            needs_model=needs_model,
        )

    def absent_folder(self, model: str) -> str | None:
        """The folder a `model` path names when it is not there (None if it is, or if `model`
        is a name rather than a path): such an experiment is listed as needing its model."""
        if not isinstance(model, str) or (SHIPPED_DIR / model).is_dir():
            return None
        if "/" not in model and not model.startswith(("~", ".")):
            return None  # a name: an unknown one is an error
        path = Path(model).expanduser()
        if not path.is_absolute():
            path = self.path.parent / path
        return None if path.exists() else str(path)

    def model_options(self, table, values, model_path: Path | None):
        """The load options, checked against the model folder when it is there."""
        dtype, drop_t5, scheduler = values["dtype"], values["drop_t5"], values["scheduler"]
        if dtype not in DTYPES:
            self.fail(table, "dtype", f"must be one of {', '.join(DTYPES)}, got {dtype!r}")
        if not isinstance(drop_t5, bool):
            self.fail(table, "drop_t5", f"must be true or false, got {drop_t5!r}")
        if scheduler is not None and (not isinstance(scheduler, str) or not SCHEDULER_RE.match(scheduler)):
            self.fail(table, "scheduler", f"must be a diffusers scheduler class name such as "
                                          f"'DDIMScheduler', got {scheduler!r}")
        for key in ("height", "width"):
            if values[key] is not None:
                self.integer(table, key, values[key], 1)
        info = None
        if model_path is not None:
            try:
                info = inspect_pipeline(model_path)
                if drop_t5 and not info.family.t5:
                    self.fail(table, "drop_t5", f"applies to SD 3.x pipelines only, not {info.class_name}")
                info = inspect_pipeline(model_path, drop_t5=drop_t5)
            except PipelineError as exc:
                self.fail(table, "model", str(exc))
            for key in ("height", "width"):
                try:
                    check_side(info, key, values[key])
                except PipelineError as exc:
                    self.fail(table, key, str(exc))
        options = ModelOptions(dtype=dtype, drop_t5=drop_t5, scheduler=scheduler, height=values["height"],
                               width=values["width"])
        return options, info

    def prompts(self, table, value, info, model_absent: bool = False):
        """(inline prompts, prompts file, its sha256); (None, None, None) for the model's own.
        With the model folder absent, an absent prompts file is not an error yet (the experiment
        is listed as needing its model and cannot run)."""
        if value is None:
            if info is not None and not info.is_digits:
                self.fail(table, "prompts", f"is required for {info.class_name} (a file with one prompt a line, "
                                            "or a list)")
            return None, None, None
        if info is not None and info.is_digits:
            self.fail(table, "prompts", "the digits models use their own class prompts; leave it out")
        if isinstance(value, str):
            path = Path(value).expanduser()
            path = path if path.is_absolute() else self.path.parent / path
            if model_absent and not path.exists():
                return None, path, None
            try:
                _, digest = read_prompts(path)
            except PromptsError as exc:
                self.fail(table, "prompts", str(exc))
            return None, path.resolve(), digest
        if (not isinstance(value, list) or not value
                or not all(isinstance(p, str) and p.strip() for p in value)):
            self.fail(table, "prompts", f"must be a file name or a non-empty list of prompts, got {value!r}")
        return tuple(p.strip() for p in value), None, None

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
            check_against_model(method, params, lambda: self.model_tensors(model_path) if model_path else None)
        except BadKey as exc:
            self.fail(table, exc.key, exc.message)
        return Variant(name=name, description=description, method=method, params=params)


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
