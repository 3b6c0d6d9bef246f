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
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from engine.errors import ConfigError, UserError
from engine.execution_keys import validate_execution
from engine.methods import BadKey, check_against_model, resolve_paths, validate_method
from engine.models.pipeline_index import PipelineError, check_side, inspect_pipeline
from engine.models.registry import INDEX_FILE, SHIPPED_DIR, ModelNotFound, resolve_model
from engine.prompts import PromptsError, read_prompts
from engine.run_config import EvalConfig, ModelOptions, ModelRef, RunConfig, SamplingConfig
from engine.expectations import BadExpectation, Expectation, parse_expectation

INCEPTION = "inception"

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
    "inception_weights": None,  # feature_model = "inception": default $TORCH_HOME/hub/checkpoints/...
    "reference": None,  # None: the real digits (digits models); else a .npz (mu, sigma) or an image folder
    "clip_model": None,  # None: "digits-clip" for the digits models; "local-dir:<folder>", an open_clip name, "none"
    "clip_weights": None,  # the weights file of an open_clip architecture name
    "seeds": None,  # repeats: each variant once per seed (instead of `seed`)
    "reference_variant": "fp",  # what paired differences d_* compare each run with
    "expect": [],  # expected outcomes, e.g. ["B < A on fid"] (engine/expectations.py)
}

DTYPES = ("auto", "float32", "float16", "bfloat16")
SCHEDULER_RE = re.compile(r"^[A-Z][A-Za-z0-9]*Scheduler$")
DIGITS_KINDS = ("QtuiDigitsPipeline", "QtuiDigitsMMDiTPipeline")  # engine.models.loader's digits kinds
DIGITS_CLIP = "digits-clip"
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
    reference: str | None = None  # resolved path; None: the real digits
    clip_model: str | None = None  # resolved: "local-dir:<abs folder>" or an open_clip name; None: no CLIP
    clip_weights: str | None = None
    seeds: tuple[int, ...] = ()  # the seeds each variant runs with; () means (seed,)
    reference_variant: str = "fp"
    expectations: tuple[Expectation, ...] = ()

    @property
    def run_seeds(self) -> tuple[int, ...]:
        return self.seeds or (self.seed,)

    def run_config(self, variant: str, samples: int | None = None, seed: int | None = None) -> dict:
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
            execution=v.execution,
            autocast=v.autocast,
            sampling=SamplingConfig(
                samples=samples if samples is not None else self.samples,
                steps=self.steps,
                guidance=self.guidance,
                seed=self.seed if seed is None else seed,
                batch_size=self.batch_size,
                negative_prompt=self.negative_prompt,
                prompts=self.prompts,
                prompts_file=None if self.prompts_file is None else str(self.prompts_file),
                prompts_sha256=self.prompts_sha256,
            ),
            eval=EvalConfig(bootstrap=self.bootstrap),
            model_options=self.options,
            reference_variant=self.reference_variant,
            reference=self.reference,
            clip={"model": self.clip_model, "weights": self.clip_weights} if self.clip_model else None,
        ).to_dict()


@dataclass(frozen=True)
class Catalogue:
    path: Path
    experiments: dict[str, Experiment]
    # Experiments left out because they failed their checks while others were asked for
    # (`load_catalogue(only=...)`): name -> the error they would raise.
    skipped: dict[str, "ConfigError"] = field(default_factory=dict)

    def get(self, name: str) -> Experiment:
        if name in self.skipped:
            raise self.skipped[name]
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
            if key == "feature_model" and values[key] == INCEPTION:
                continue
            try:
                paths[key] = resolve_model(values[key], base=self.path.parent)
            except ModelNotFound as exc:
                self.fail(table, key, str(exc))
        options, info = self.model_options(table, values, paths["model"])
        prompts, prompts_file, digest = self.prompts(table, values["prompts"], info, needs_model is not None)
        if not isinstance(values["negative_prompt"], str):
            self.fail(table, "negative_prompt", f"must be a string, got {values['negative_prompt']!r}")
        evaluation = self.evaluation(table, values, paths)
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
        seeds = self.seeds(table, raw)
        reference = values["reference_variant"]
        if not isinstance(reference, str):
            self.fail(table, "reference_variant", f"must be a variant name, got {reference!r}")
        if "reference_variant" in raw and reference not in variants:
            self.fail(table, "reference_variant", f"no variant {reference!r}; variants: {', '.join(variants)}")
        expect = values["expect"]
        if not isinstance(expect, list):
            self.fail(table, "expect", f"must be a list of strings like \"B < A on fid\", got {expect!r}")
        expectations = []
        for item in expect:
            try:
                expectations.append(parse_expectation(item, variants))
            except BadExpectation as exc:
                self.fail(table, "expect", str(exc))
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
            seeds=seeds,
            reference_variant=reference,
            expectations=tuple(expectations),
            **evaluation,
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


    def seeds(self, table: list[str], raw: dict) -> tuple[int, ...]:
        if "seeds" not in raw:
            return ()
        if "seed" in raw:
            self.fail(table, "seeds", "give either seed or seeds, not both")
        seeds = raw["seeds"]
        if not isinstance(seeds, list) or not seeds:
            self.fail(table, "seeds", f"must be a non-empty list of integers, got {seeds!r}")
        for s in seeds:
            self.integer(table, "seeds", s, 0)
        if len(set(seeds)) != len(seeds):
            self.fail(table, "seeds", f"has a repeated seed: {seeds}")
        return tuple(seeds)

    def local_path(self, value: str) -> Path:
        path = Path(value).expanduser()
        return path if path.is_absolute() else (self.path.parent / path)

    def evaluation(self, table: list[str], values: dict, paths: dict) -> dict:
        """Feature model weights, reference statistics and CLIP model, checked without torch:
        files exist, statistics match the feature model's dimension. Sets paths["feature_model"]."""
        for key in ("inception_weights", "reference", "clip_model", "clip_weights"):
            if values[key] is not None and not isinstance(values[key], str):
                self.fail(table, key, f"must be a string, got {values[key]!r}")
        if paths["model"] is None:  # the model folder is absent: listed as needing it, checked once there
            paths.setdefault("feature_model", None)
            return {"reference": values["reference"], "clip_model": values["clip_model"],
                    "clip_weights": values["clip_weights"]}
        digits = _model_kind(paths["model"]) in DIGITS_KINDS
        if not digits and values["feature_model"] != INCEPTION:
            self.fail(table, "feature_model", f"{values['feature_model']!r} measures the 16x16 digits only; "
                                              f"use feature_model = \"inception\" for model {values['model']!r}")
        if values["feature_model"] == INCEPTION:
            from engine.models.inception import FEATURE_DIM, default_weights_path, missing_weights_message

            explicit = values["inception_weights"] is not None
            weights = self.local_path(values["inception_weights"]) if explicit else default_weights_path()
            if not weights.is_file():
                self.fail(table, "inception_weights" if explicit else "feature_model",
                          missing_weights_message(weights, explicit))
            paths["feature_model"], dim = weights.resolve(), FEATURE_DIM
        else:
            if values["inception_weights"] is not None:
                self.fail(table, "inception_weights", "only applies with feature_model = \"inception\"")
            dim = _classifier_dim(paths["feature_model"])
        reference = None
        if values["reference"] not in (None, "digits"):
            reference = self.reference(table, self.local_path(values["reference"]), dim, values["feature_model"])
        elif not digits:
            self.fail(table, "reference", f"is required for model {values['model']!r} (pytorch-fid statistics "
                                          "'<file.npz>' or a folder of images)")
        clip_model, clip_weights = self.clip(table, values, digits)
        return {"reference": reference, "clip_model": clip_model, "clip_weights": clip_weights}

    def reference(self, table: list[str], path: Path, dim: int, feature_model: str) -> str:
        from engine.metrics.reference import ReferenceError, image_files, npz_dimension

        if path.is_dir():
            if not image_files(path):
                self.fail(table, "reference", f"{path}: no images (png, jpg, ...) in the folder")
        elif path.is_file():
            try:
                found = npz_dimension(path)
            except (ReferenceError, OSError, ValueError) as exc:
                self.fail(table, "reference", f"{path}: not pytorch-fid statistics ({exc})")
            if found != dim:
                self.fail(table, "reference", f"{path}: statistics of dimension {found}, but feature model "
                                              f"{feature_model!r} gives {dim}")
        else:
            self.fail(table, "reference", f"{path} does not exist (a .npz of mu and sigma, or a folder of images)")
        return str(path.resolve())

    def clip(self, table: list[str], values: dict, digits: bool) -> tuple[str | None, str | None]:
        from engine.metrics.clip_score import CONFIG_FILE, LOCAL_DIR

        name, weights = values["clip_model"], values["clip_weights"]
        if name is None:
            name = DIGITS_CLIP if digits else "none"
        if name == "none":
            if weights is not None:
                self.fail(table, "clip_weights", "needs clip_model (an open_clip architecture name)")
            return None, None
        shipped = SHIPPED_DIR / name
        if (shipped / CONFIG_FILE).is_file():
            name = LOCAL_DIR + str(shipped)
        elif name == DIGITS_CLIP:
            self.fail(table, "clip_model", f"the shipped CLIP model is missing: {shipped} (engine train digits-clip)")
        if name.startswith(LOCAL_DIR):
            folder = self.local_path(name[len(LOCAL_DIR):])
            if not (folder / CONFIG_FILE).is_file():
                self.fail(table, "clip_model", f"{folder}: no {CONFIG_FILE} (an open_clip local-dir needs it "
                                               "and open_clip_model.safetensors)")
            if not any(f.suffix in (".safetensors", ".bin", ".pth") for f in folder.iterdir()):
                self.fail(table, "clip_model", f"{folder}: no weights file (open_clip_model.safetensors)")
            if weights is not None:
                self.fail(table, "clip_weights", "a local-dir CLIP model carries its own weights")
            return LOCAL_DIR + str(folder.resolve()), None
        if not _open_clip_architecture(name):
            self.fail(table, "clip_model", f"{name!r} is not 'local-dir:<folder>', {DIGITS_CLIP!r}, 'none' "
                                           "nor an open_clip architecture name")
        if weights is None:
            self.fail(table, "clip_weights", f"is required with clip_model = {name!r} (its weights file; "
                                             "nothing is downloaded)")
        path = self.local_path(weights)
        if not path.is_file():
            self.fail(table, "clip_weights", f"{path} does not exist")
        return name, str(path.resolve())

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
            params = resolve_paths(method, validate_method(method, keys), self.path.parent)
            check_against_model(method, params, lambda: self.model_tensors(model_path) if model_path else None)
            execution, autocast = validate_execution(method, params, raw.get("execution"), raw.get("autocast"))
        except BadKey as exc:
            self.fail(table, exc.key, exc.message)
        return Variant(name=name, description=description, method=method, params=params,
                       execution=execution, autocast=autocast)


def _model_kind(path: Path) -> str | None:
    try:
        return json.loads((Path(path) / INDEX_FILE).read_text()).get("_class_name")
    except (OSError, ValueError):
        return None


def _classifier_dim(path: Path) -> int:
    try:
        return int(json.loads((Path(path) / "config.json").read_text()).get("feature_dim", 128))
    except (OSError, ValueError):
        return 128


def _open_clip_architecture(name: str) -> bool:
    """Whether open_clip ships a config for `name` (looked up on disk, without importing it)."""
    import importlib.util

    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return False
    return any((Path(loc) / "model_configs" / f"{name}.json").is_file() for loc in spec.submodule_search_locations)


def load_catalogue(path: str | Path, only: Iterable[str] | None = None) -> Catalogue:
    """The catalogue at `path`, every experiment checked (against its model folder too). With
    `only`, the experiments named there must pass; any other that fails its checks (say, its
    model folder is broken) is left out and kept in `skipped`, so it stops only commands that ask
    for it. The file's TOML must parse either way."""
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
    experiments, skipped = {}, {}
    asked = None if only is None else set(only)
    for name, body in raw.items():
        try:
            experiments[name] = reader.experiment(name, body)
        except ConfigError as exc:
            if asked is None or name in asked:
                raise
            skipped[name] = exc
    return Catalogue(path=path, experiments=experiments, skipped=skipped)
