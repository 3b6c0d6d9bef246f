"""`engine verify`: are a run's files still the ones it measured?

For each run, every artifact the database lists:
- exists;
- has the size and sha256 recorded when the run wrote it (rows from before fingerprints were
  recorded have none: existence and parsing only);
- parses: safetensors headers checked by hand (`engine.file_checks`), .npz read in full (zip
  CRC-32s), PNGs verified, the packed checkpoint and the calibration file through their loaders.
A done run's packed checkpoint is loaded into the run's model as the pipeline builds it (the
adapter of `engine.models.loader`, the method's `prepare_load` for its activation quantizers)
with `load_state_dict(strict=True)`. With `requantize`, a GPTQ run with a calibration file is
quantized again from that file alone (block-by-block GPTQ from its first block's calibration
inputs, on the freshly loaded full-precision denoiser) and its codes must equal the
checkpoint's bit for bit; a run with `keep_calibration = false` has no file to re-run, which
`requantize_note` says.

`verify_run` returns the problems as lines "FILE: what is wrong" (FILE relative to the run
folder where it lies inside it); no problem means the run is ok.
"""

from __future__ import annotations

import json
from pathlib import Path

from engine.errors import DamagedFile
from engine.file_checks import check_npz, check_safetensors, fingerprint
from engine.store import Store

PACKED_CHECKPOINT = "weights.safetensors"  # engine.pipeline.CHECKPOINT_FILE (no torch import here)


def verify_run(store: Store, run: dict, requantize: bool = False) -> list[str]:
    folder = store.runs_dir / run["folder"]
    problems: list[str] = []
    files: dict[str, Path] = {}
    for artifact in store.artifacts(run["id"]):
        path = Path(artifact["path"])
        name = _shown(path, folder, store.runs_dir)
        problem = check_artifact(path, artifact.get("size"), artifact.get("sha256"))
        if problem:
            problems.append(f"{name}: {problem}")
        else:
            files[artifact["kind"]] = path
    if problems or run["status"] != "done":
        return problems
    checkpoint = files.get("checkpoint")
    if checkpoint is not None and checkpoint.name == PACKED_CHECKPOINT:
        problems += [f"{checkpoint.name}: {p}" for p in check_loads_into_model(run, checkpoint)]
    if requantize and not problems and "calibration" in files and checkpoint is not None:
        problems += check_requantized(run, checkpoint, files["calibration"])
    return problems


def requantize_note(run: dict) -> str | None:
    """Why `--requantize` re-ran nothing for a run that is fine otherwise, or None."""
    config = json.loads(run["config"])
    if config.get("method") == "gptq" and config.get("params", {}).get("keep_calibration") is False:
        return "kept no calibration (keep_calibration = false): not requantized"
    return None


def _shown(path: Path, folder: Path, runs_dir: Path) -> str:
    for base in (folder, runs_dir):
        try:
            return path.relative_to(base).as_posix()
        except ValueError:
            continue
    return str(path)


def fingerprint_problem(path: Path, size: int | None, sha256: str | None) -> str | None:
    """How the file differs from the size and sha256 recorded when the run wrote it, or None
    (also when nothing was recorded)."""
    if sha256 is None:
        return None
    actual_size, actual_sha = fingerprint(path)
    if size is not None and actual_size != size:
        return (f"{actual_size} bytes, {size} when the run wrote it "
                f"({'truncated' if actual_size < size else 'altered'} after the run)")
    if actual_sha != sha256:
        return "sha256 differs from the recorded one (altered after the run)"
    return None


def check_artifact(path: Path, size: int | None, sha256: str | None) -> str | None:
    """What is wrong with one artifact file, or None."""
    if not path.is_file():
        return "missing"
    problem = fingerprint_problem(path, size, sha256)
    if problem:
        return problem
    try:
        parse(path)
    except DamagedFile as exc:
        return exc.problem
    return None


def parse(path: Path) -> None:
    """DamagedFile if the file does not parse as what its name says."""
    if path.suffix == ".safetensors":
        check_safetensors(path)
    elif path.suffix == ".npz":
        check_npz(path)
    elif path.suffix == ".png":
        from PIL import Image

        try:
            with Image.open(path) as image:
                image.verify()
        except Exception as exc:  # PIL raises many kinds for a damaged image
            raise DamagedFile(path, f"damaged PNG ({exc})") from None


def _load_model(run: dict):
    from engine.models.loader import load_text_to_image
    from engine.run_config import RunConfig

    config = RunConfig.from_dict(json.loads(run["config"]))
    return config, load_text_to_image(config.model.path, options=config.model_options)


def check_loads_into_model(run: dict, checkpoint: Path) -> list[str]:
    """The checkpoint, streamed into the run's freshly loaded model (strict)."""
    from engine.methods import load_quantized_file
    from engine.quant.packing import PackedState, iter_packed

    try:
        PackedState(checkpoint)
        for _ in iter_packed(checkpoint):  # read whole, every layer unpacked: damage is named first
            pass
    except DamagedFile as exc:
        return [exc.problem]
    try:
        config, model = _load_model(run)
    except Exception as exc:  # the model folder moved or is damaged: cannot check the fit
        return [f"cannot be checked against the run's model ({type(exc).__name__}: {exc})"]
    try:
        load_quantized_file(model.denoiser, config.method, config.params, checkpoint)
    except DamagedFile as exc:
        return [exc.problem]
    except (RuntimeError, KeyError, ValueError) as exc:
        first = str(exc).strip().splitlines()
        return [f"does not load into the run's model ({' '.join(line.strip() for line in first[:3])})"]
    return []


def check_requantized(run: dict, checkpoint: Path, calibration: Path) -> list[str]:
    """GPTQ again from the calibration file alone: the codes must equal the checkpoint's."""
    import torch

    from engine.quant.calibration_hessians import load_calibration
    from engine.quant.gptq_method import requantize
    from engine.quant.packing import load_packed_codes

    try:
        if load_calibration(calibration)[0].get("method") != "gptq":
            return []  # calibrated RTN: nothing to re-run
        stored = load_packed_codes(checkpoint)
        _, model = _load_model(run)
        again = requantize(model.denoiser, calibration)
    except DamagedFile as exc:
        return [f"{Path(exc.path).name}: {exc.problem}"]
    if set(again) != set(stored):
        return [f"{calibration.name}: requantization gives layers {len(again)}, the checkpoint has {len(stored)}"]
    differ = [name for name, r in again.items() if not torch.equal(r.codes.cpu(), stored[name].codes)]
    if differ:
        return [f"{checkpoint.name}: requantized codes differ from the checkpoint's in {len(differ)} of "
                f"{len(again)} layers (first {differ[0]})"]
    return []


