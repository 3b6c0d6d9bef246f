"""Every number must come from the quantized model that was evaluated: for every method (but
`none`) and every family (digits UNet, digits MMDiT, tiny SD, tiny SD 3), quantize as a run does
(`engine.pipeline.quantize_stage`: quantize, store, load back; then `prepare_execution`), then
- count, with forward hooks, the calls that sampling makes to each quantized module (or PTQ's
  int8 graph): every one must be called at every step;
- perturb what the quantized modules hold (their dequantized codes, or with execution = "real"
  the scales of their codes; their activation scales; for PTQ the graph's int8 weights) and check that the sampled images change, for all of them at once
  and for one layer alone; unperturbed, sampling is exactly repeatable.
A method that does not apply to a family must be refused by the catalogue, and a method added to
`engine.methods.METHOD_MODULES` without a case here fails `test_every_method_has_a_case`."""

from __future__ import annotations

import pytest
import torch

from engine.config import load_catalogue
from engine.errors import ConfigError

CALIBRATION = "calibration = { samples = 2, held_out = 1, seed = 1, steps = 2 }\n"
SHORT_CALIBRATION = "calibration = { samples = 2, seed = 1, steps = 2 }\n"
VARIANTS = {  # variant -> its keys
    "rtn": 'method = "rtn"\nbits = 4\n',
    "rtn-real": 'method = "rtn"\nbits = 4\nexecution = "real"\n',  # low-bit modules holding the codes
    "rtn-calibrated": 'method = "rtn"\nbits = 8\nact_bits = 8\n' + CALIBRATION,
    "gptq": 'method = "gptq"\nbits = 4\nact_bits = 8\n' + CALIBRATION,
    "fisher": 'method = "fisher"\nstrategy = "ratio"\nratio = 0.25\nmeasure_sensitivity = false\n'
              'calibration = { samples = 4, seed = 1 }\n',
    "dgq": 'method = "dgq"\nbits = 8\nact_bits = 8\ngroups = 4\n' + SHORT_CALIBRATION,
    "minmax": 'method = "minmax"\nbits = 8\nact_bits = 8\n' + SHORT_CALIBRATION,
    "qat": 'method = "qat"\nbits = 4\nact_bits = 8\nsteps = 2\nbatch_size = 2\n',
    "ptq": 'method = "ptq"\n' + CALIBRATION,
}
PIPELINE_KEYS = {"qat": "train_samples = 2\n"}  # data-free QAT: two FP samples to train on
FAMILIES = ("digits-unet", "digits-mmdit", "sd", "sd3")
# What the catalogue refuses, and why (the methods' own model checks).
REFUSED = {
    ("gptq", "digits-unet"): "needs a transformer denoiser",
    ("gptq", "sd"): "needs a transformer denoiser",
    ("dgq", "digits-mmdit"): "needs a UNet-style denoiser",
    ("dgq", "sd3"): "needs a UNet-style denoiser",
    ("minmax", "digits-mmdit"): "needs a UNet-style denoiser",
    ("minmax", "sd3"): "needs a UNet-style denoiser",
}
PROMPTS = ["a photo of a cat", "a red car on a street", "two dogs playing in the snow"]


def test_every_method_has_a_case():
    from engine.methods import METHOD_MODULES

    methods = {keys.split('"')[1] for keys in VARIANTS.values()}
    assert methods == set(METHOD_MODULES) - {"none"}
    assert {k for k, v in VARIANTS.items() if "calibration" in v and 'method = "rtn"' in v}  # calibrated RTN too


def _catalogue(tmp_path, family: str, model, evaluation: str, variant: str):
    keys = VARIANTS[variant] + (PIPELINE_KEYS.get(variant, "") if family in ("sd", "sd3") else "")
    head = "samples = 2\nsteps = 2\nguidance = 2.0\nbatch_size = 2\nseed = 0\n" + evaluation
    if family in ("sd", "sd3"):
        head += "prompts = [" + ", ".join(f'"{p}"' for p in PROMPTS) + "]\n"
    path = tmp_path / "experiments.toml"
    path.write_text(f'[experiments.x]\nmodel = "{model}"\n{head}\n[experiments.x.variants.v]\n{keys}')
    return path


class Quiet:
    def progress(self, *args, **kwargs):
        pass


def _quantized(tmp_path, toml):
    """The loaded model as a run samples it: quantized, stored, loaded back, execution prepared."""
    from engine.execution import prepare_execution
    from engine.models.loader import load_text_to_image
    from engine.pipeline import CHECKPOINT_FILE, quantize_stage
    from engine.run_config import RunConfig
    from engine.store import Store

    config = load_catalogue(toml).get("x").run_config("v")
    run = RunConfig.from_dict(config)
    store = Store.open(tmp_path / "runs")
    run_id = store.create_run("x", "v", config, "h")
    folder = store.run_folder(run_id)
    folder.mkdir(parents=True, exist_ok=True)
    model = load_text_to_image(run.model.path, torch.device("cpu"), run.model_options)
    result, _ = quantize_stage(store, run_id, run, model, Quiet())
    checkpoint = folder / CHECKPOINT_FILE if result.packed is not None else None
    prepare_execution(model, run, result, checkpoint, lambda *a, **k: None)
    store.close()
    return model, result, run


def _perturbations(model, result) -> tuple[list, list]:
    """(hooked modules, perturbations): each perturbation is (label, function changing the
    quantized model in place). A packed method: every packed layer; PTQ: its int8 graph."""
    from engine.quant.ptq.pt2e import GraphDenoiser, graph_tensors

    if result.packed is None:
        assert isinstance(model.denoiser, GraphDenoiser), "a method without packed codes must run its own graph"
        graph = model.denoiser.graph
        int8 = [t for t in graph_tensors(graph).values() if t.dtype == torch.int8]
        assert int8, "the PTQ graph holds no int8 weights"
        halve = lambda ts: [t.copy_(torch.div(t, 2, rounding_mode="floor")) for t in ts]
        return [graph], [("every int8 weight", lambda: halve(int8)), ("one int8 weight", lambda: halve(int8[:1]))]
    layers = [model.denoiser.get_submodule(name) for name in sorted(result.packed)]
    lowbit = lambda m: hasattr(m, "codes")  # execution = "real": codes and fp16 scales, no weight
    own = lambda m, name: lowbit(m) and name in ("scale", "bias")
    scales = [b for m in layers for name, b in m.named_buffers() if b.is_floating_point() and not own(m, name)]
    negate = lambda ms: [(m.scale if lowbit(m) else m.weight.data).neg_() for m in ms]
    out = [("every quantized weight", lambda: negate(layers)), ("one quantized weight", lambda: negate(layers[:1]))]
    if scales:  # activation quantizers: their scales must be what sampling uses too
        out.append(("activation scales", lambda: [b.mul_(16) for b in scales]))
    return layers, out


def _check_sampling_uses_quantized(model, result, run, quantized_inputs: bool):
    from engine.prompts import sampling_prompts
    from engine.sampling import initial_noise, sample_images

    prompts, _ = model.eval_prompts(2, sampling_prompts(run.sampling))
    noise = initial_noise(2, model.sample_shape, 0)
    sample = lambda: sample_images(model, prompts, noise, 2, run.sampling.guidance, 2)
    modules, perturbations = _perturbations(model, result)
    if quantized_inputs and result.packed is not None:
        assert "activation scales" in [label for label, _ in perturbations], "no activation quantizer to perturb"
    calls = [0] * len(modules)
    handles = [m.register_forward_hook(lambda *a, i=i: calls.__setitem__(i, calls[i] + 1))
               for i, m in enumerate(modules)]
    reference = sample()
    for h in handles:
        h.remove()
    assert min(calls) >= 2, f"{calls.count(0)} of {len(calls)} quantized modules not called while sampling"
    assert torch.equal(sample(), reference)  # repeatable: a change below is the perturbation's
    for label, perturb in perturbations:
        with torch.no_grad():
            perturb()
        images = sample()
        assert not torch.allclose(images, reference, rtol=0, atol=1e-6), f"{label} perturbed: the images did not change"
        reference = images


CASES = [(v, f) for f in FAMILIES for v in VARIANTS]


@pytest.mark.parametrize("variant, family", CASES, ids=[f"{f}-{v}" for v, f in CASES])
def test_sampling_goes_through_the_quantized_modules(tmp_path, request, monkeypatch, variant, family):
    torch.set_num_threads(1)
    tiny = request.getfixturevalue("tiny_models")
    model_path = {"digits-unet": lambda: tiny["model"], "digits-mmdit": lambda: request.getfixturevalue("tiny_mmdit"),
                  "sd": lambda: request.getfixturevalue("tiny_sd"), "sd3": lambda: request.getfixturevalue("tiny_sd3")}
    if family.startswith("digits"):
        evaluation = f'feature_model = "{tiny["classifier"]}"\n'
    else:
        from tests.test_real_pipelines import evaluation_toml

        evaluation = evaluation_toml(request.getfixturevalue("inception_home"), request.getfixturevalue("tiny_clip_dir"),
                                     tmp_path) + "\n"
    toml = _catalogue(tmp_path, family, model_path[family](), evaluation, variant)
    refused = REFUSED.get((VARIANTS[variant].split('"')[1], family))
    if refused:
        with pytest.raises(ConfigError, match=refused):
            load_catalogue(toml)
        return
    if variant == "ptq":  # calibration must run through the prepared graph, as sampling calls it
        from engine.quant.ptq import pt2e

        graph_calls = []
        forward = pt2e.GraphDenoiser.forward
        monkeypatch.setattr(pt2e.GraphDenoiser, "forward",
                            lambda self, *a, **k: graph_calls.append(1) or forward(self, *a, **k))
        model, result, run = _quantized(tmp_path, toml)
        assert len(graph_calls) == 2  # 2 calibration prompts: one batch (guidance in it), 2 steps
    else:
        model, result, run = _quantized(tmp_path, toml)
    _check_sampling_uses_quantized(model, result, run, quantized_inputs="act_bits = 8" in VARIANTS[variant])
