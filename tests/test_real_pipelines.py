"""Local diffusers pipelines (SD 1.x-style and SD 3-style, tiny and random, in the real formats):
loading through their adapters, paired sampling, the catalogue's model keys and their errors,
layer roles, and quantization of the real denoisers by the catalogue's methods."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from engine.config import load_catalogue
from engine.errors import ConfigError, UserError
from tests.conftest import engine

PROMPTS = ["a photo of a cat", "a red car on a street", "two dogs playing in the snow"]


def load(path, **options):
    from engine.models.loader import load_text_to_image
    from engine.run_config import ModelOptions

    return load_text_to_image(path, torch.device("cpu"), ModelOptions(**options))


@pytest.fixture(scope="module")
def sd(tiny_sd):
    torch.set_num_threads(1)
    return load(tiny_sd)


@pytest.fixture(scope="module")
def sd3(tiny_sd3):
    torch.set_num_threads(1)
    return load(tiny_sd3)


# --- loading and sampling through the adapters ---------------------------------------------

@pytest.mark.parametrize("which", ["sd", "sd3"])
def test_sample_through_the_adapter(which, request):
    from engine.sampling import InitialLatents, sample_images

    model = request.getfixturevalue(which)
    assert model.kind == {"sd": "StableDiffusionPipeline", "sd3": "StableDiffusion3Pipeline"}[which]
    assert model.sample_shape == ((4, 8, 8) if which == "sd" else (16, 8, 8))
    assert model.flow == (which == "sd3")
    latents = InitialLatents(3, model.sample_shape, seed=0)
    images = sample_images(model, PROMPTS, latents, 3, 4.0, 3, negative_prompt="blurry")
    assert images.shape == (3, 3, 16, 16) and images.dtype == torch.float32
    assert torch.isfinite(images).all() and images.min() >= -1 and images.max() <= 1
    # the prompt matters, and so does the negative prompt under guidance
    other = sample_images(model, PROMPTS[::-1], latents, 3, 4.0, 3, negative_prompt="blurry")
    assert not torch.allclose(images[0], other[0])
    again = sample_images(model, PROMPTS, latents, 3, 4.0, 3, negative_prompt="blurry")
    assert torch.equal(images, again)


def test_sd3_without_t5_pads_its_states(tiny_sd3, sd3):
    dropped = load(tiny_sd3, drop_t5=True)
    assert dropped.pipe.text_encoder_3 is None and sd3.pipe.text_encoder_3 is not None
    with_t5, without = sd3.encode(PROMPTS[:1]), dropped.encode(PROMPTS[:1])
    assert with_t5.states.shape == without.states.shape  # T5 part zero-padded to the joint width
    assert torch.equal(with_t5.pooled, without.pooled)  # pooled vectors are CLIP only
    assert not torch.equal(with_t5.states, without.states)


def test_named_scheduler_and_size(tiny_sd):
    from engine.models.loader import ModelLoadError

    model = load(tiny_sd, scheduler="EulerDiscreteScheduler", height=24, width=32)
    assert type(model.pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    assert model.sample_shape == (4, 12, 16)
    from engine.sampling import initial_noise, sample_images

    images = sample_images(model, PROMPTS[:2], initial_noise(2, model.sample_shape, 0), 2, 3.0, 2)
    assert images.shape == (2, 3, 24, 32)
    with pytest.raises(ModelLoadError, match="FlowMatchEulerDiscreteScheduler.*does not fit.*compatible: "):
        load(tiny_sd, scheduler="FlowMatchEulerDiscreteScheduler")


# --- initial latents: (seed, i) only ---------------------------------------------------------

def test_latents_depend_only_on_seed_and_index(sd):
    from engine.sampling import CALIBRATION, InitialLatents, initial_noise, sample_images

    shape = sd.sample_shape
    full = InitialLatents(6, shape, seed=7)
    assert torch.equal(full[:], torch.cat([full[0:2], full[2:5], full[5:6]]))
    assert torch.equal(initial_noise(4, shape, 7), full[:4])  # a subset is a prefix
    assert not torch.equal(full[0], InitialLatents(1, shape, seed=8)[0])
    calibration = InitialLatents(6, shape, seed=7, stream=CALIBRATION)[:]  # same seed, its own noise
    assert not any(torch.equal(calibration[i], full[j]) for i in range(6) for j in range(6))

    seen = {}
    original = sd.sample_batch

    def recording(batch_size):
        def sample_batch(prompts, latents, *args, **kwargs):
            seen.setdefault(batch_size, []).append(latents.clone())
            return original(prompts, latents, *args, **kwargs)
        return sample_batch

    prompts = [PROMPTS[i % 3] for i in range(6)]
    images = {}
    for batch_size in (2, 3):
        sd.sample_batch = recording(batch_size)
        try:
            images[batch_size] = sample_images(sd, prompts, full, 2, 3.0, batch_size)
        finally:
            del sd.sample_batch
    assert [len(x) for x in seen[2]] == [2, 2, 2] and [len(x) for x in seen[3]] == [3, 3]
    assert torch.equal(torch.cat(seen[2]), torch.cat(seen[3]))
    assert torch.allclose(images[2], images[3], atol=1e-4)  # same inputs; only float summation order differs


# --- roles of the real layer names -----------------------------------------------------------

def test_roles_of_real_denoisers(sd, sd3):
    from engine.quant.roles import quantizable_layers

    roles = {name: role for name, _, role in quantizable_layers(sd.denoiser)}
    attention = {n for n, r in roles.items() if r == "attention"}
    assert attention and all(".attn1." in n or ".attn2." in n for n in attention)
    assert {n.rsplit(".", 1)[-1] for n in attention} == {"to_q", "to_k", "to_v", "0"}
    assert all(n.endswith("to_out.0") for n in attention if n.endswith(".0"))
    assert roles["conv_in"] == "conv" and roles["time_embedding.linear_1"] == "linear"
    assert any(n.endswith("ff.net.2") and r == "linear" for n, r in roles.items())

    roles3 = {name: role for name, _, role in quantizable_layers(sd3.denoiser)}
    block0 = {n.split("attn.", 1)[1] for n, r in roles3.items()
              if n.startswith("transformer_blocks.0.attn.") and r == "attention"}
    assert block0 == {"to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"}
    assert roles3["pos_embed.proj"] == "conv" and roles3["transformer_blocks.0.norm1.linear"] == "linear"
    assert roles3["transformer_blocks.1.ff.net.2"] == "linear" and roles3["context_embedder"] == "linear"


# --- the catalogue -----------------------------------------------------------------------------

SD_TOML = """
[experiments.sd]
model = "{model}"
samples = 6
steps = 2
guidance = 4.0
batch_size = 3
bootstrap = 0
prompts = "prompts.txt"
negative_prompt = "blurry"
height = 16
width = 24
{evaluation}
{extra}
[experiments.sd.variants.fp]
method = "none"

[experiments.sd.variants.W4]
method = "rtn"
bits = 4

[experiments.sd.variants.W8]
method = "rtn"
bits = 8
"""

SD3_TOML = """
[experiments.sd3]
model = "{model}"
samples = 4
steps = 2
guidance = 3.0
batch_size = 2
bootstrap = 0
prompts = ["a photo of a cat", "a red car on a street"]
{evaluation}
{extra}
[experiments.sd3.variants.gptq]
method = "gptq"
bits = 4
act_bits = 8
calibration = {{ samples = 2, held_out = 1, seed = 1, steps = 2 }}
"""


EVALUATION = {}  # the evaluation keys (Inception weights, reference statistics, CLIP) of the test catalogues


def evaluation_toml(inception_home, tiny_clip_dir, folder) -> str:
    """Inception FID against reference statistics (written to `folder`), and CLIP score, from
    files the tests make: the evaluation keys of a test catalogue."""
    import numpy as np

    from engine.models.inception import FEATURE_DIM, WEIGHTS_NAME

    stats = folder / "reference.npz"
    rng = np.random.default_rng(0)
    np.savez(stats, mu=rng.normal(size=FEATURE_DIM) * 0.1, sigma=np.eye(FEATURE_DIM) * 0.01)
    return "\n".join([
        'feature_model = "inception"',
        f'inception_weights = "{inception_home / "hub" / "checkpoints" / WEIGHTS_NAME}"',
        f'reference = "{stats}"',
        f'clip_model = "local-dir:{tiny_clip_dir}"',
    ])


@pytest.fixture(autouse=True, scope="module")
def evaluation_keys(inception_home, tiny_clip_dir, tmp_path_factory):
    EVALUATION["keys"] = evaluation_toml(inception_home, tiny_clip_dir, tmp_path_factory.mktemp("reference"))
    yield
    EVALUATION.clear()


def write(tmp_path, template, model, extra="", prompts="a photo of a cat\n\n  a red car on a street  \n"):
    (tmp_path / "prompts.txt").write_text(prompts)
    path = tmp_path / "experiments.toml"
    path.write_text(template.format(model=model, extra=extra, evaluation=EVALUATION.get("keys", "")))
    return path


def test_catalogue_keys_reach_the_run_config(tmp_path, tiny_sd, tiny_sd3):
    from engine.prompts import sampling_prompts
    from engine.run_config import RunConfig

    exp = load_catalogue(write(tmp_path, SD_TOML, tiny_sd, 'dtype = "float32"')).get("sd")
    run = RunConfig.from_dict(exp.run_config("W4"))
    assert sampling_prompts(run.sampling) == ["a photo of a cat", "a red car on a street"]
    assert run.sampling.negative_prompt == "blurry" and run.model_options.width == 24
    assert run.model_options.dtype == "float32"
    # a round trip through the stored JSON gives the same config
    assert RunConfig.from_dict(json.loads(json.dumps(run.to_dict()))) == run
    exp3 = load_catalogue(write(tmp_path, SD3_TOML, tiny_sd3, "drop_t5 = true")).get("sd3")
    run3 = RunConfig.from_dict(exp3.run_config("gptq"))
    assert run3.model_options.drop_t5 and list(run3.sampling.prompts) == PROMPTS[:2]
    # a prompts file edited after queueing is refused at run time
    (tmp_path / "prompts.txt").write_text("something else\n")
    with pytest.raises(Exception, match="changed since"):
        sampling_prompts(run.sampling)


def test_digits_configs_keep_their_stored_form(tiny_experiments):
    config = load_catalogue(tiny_experiments).get("tiny").run_config("A")
    assert "model_options" not in config and set(config["sampling"]) == {"samples", "steps", "guidance", "seed",
                                                                         "batch_size"}


def _bad(tmp_path, template, model, extra="", prompts="a cat\n"):
    path = write(tmp_path, template, model, extra, prompts)
    with pytest.raises(ConfigError) as info:
        load_catalogue(path)
    err = info.value
    assert "\n" not in str(err) and err.file == str(path)
    key = err.key.split(".")[-1]
    line = path.read_text().splitlines()[err.line - 1]
    assert key in line or (key not in path.read_text() and line.startswith("[experiments."))  # a missing key: its table
    return str(err)


def test_bad_model_folders_are_clear_errors(tmp_path, tiny_sd):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_sd, broken)
    (broken / "model_index.json").rename(broken / "index.bak")
    assert "has no model_index.json" in _bad(tmp_path, SD_TOML, broken)
    (broken / "index.bak").rename(broken / "model_index.json")
    shutil.rmtree(broken / "vae")
    message = _bad(tmp_path, SD_TOML, broken)
    assert str(broken) in message and "component vae/ is missing" in message
    index = json.loads((tiny_sd / "model_index.json").read_text())
    (broken / "model_index.json").write_text(json.dumps({**index, "_class_name": "FluxPipeline"}))
    message = _bad(tmp_path, SD_TOML, broken)
    assert "'FluxPipeline' is not supported" in message and "StableDiffusion3Pipeline" in message


def test_a_broken_model_folder_stops_only_the_experiments_that_ask_for_it(tmp_path, tiny_sd, tiny_experiments):
    digits = tiny_experiments.read_text()
    broken = tmp_path / "broken"
    shutil.copytree(tiny_sd, broken)
    shutil.rmtree(broken / "vae")
    path = write(tmp_path, SD_TOML, broken)
    path.write_text(path.read_text() + digits)  # plus the tiny digits experiment
    with pytest.raises(ConfigError, match="component vae/ is missing"):
        load_catalogue(path)  # every experiment checked: engine list
    catalogue = load_catalogue(path, only=["tiny"])  # engine run tiny
    assert "tiny" in catalogue.experiments and "sd" not in catalogue.experiments
    with pytest.raises(ConfigError, match="component vae/ is missing"):
        catalogue.get("sd")
    with pytest.raises(ConfigError, match="component vae/ is missing"):
        load_catalogue(path, only=["sd"])


def test_bad_keys_are_clear_errors(tmp_path, tiny_sd):
    assert "height = 17 is not a positive multiple of 2" in _bad(tmp_path, SD_TOML.replace("height = 16", "height = 17"),
                                                                  tiny_sd)
    assert "prompts file is empty" in _bad(tmp_path, SD_TOML, tiny_sd, prompts="\n  \n")
    no_prompts = SD_TOML.replace('prompts = "prompts.txt"\n', "")
    assert "prompts: is required for StableDiffusionPipeline" in _bad(tmp_path, no_prompts, tiny_sd)
    assert "no such prompts file" in _bad(tmp_path, SD_TOML.replace("prompts.txt", "gone.txt"), tiny_sd)
    assert "drop_t5: applies to SD 3.x" in _bad(tmp_path, SD_TOML, tiny_sd, "drop_t5 = true")
    assert "dtype: must be one of" in _bad(tmp_path, SD_TOML, tiny_sd, 'dtype = "int8"')
    assert "scheduler: must be a diffusers scheduler" in _bad(tmp_path, SD_TOML, tiny_sd, 'scheduler = "fast"')


def test_digits_models_keep_their_prompts_and_size(tmp_path, tiny_models):
    base = SD_TOML.replace("height = 16\nwidth = 24\n", "")
    assert "digits models use their own class prompts" in _bad(tmp_path, base, tiny_models["model"])
    no_prompts = SD_TOML.replace('prompts = "prompts.txt"\n', "").replace("height = 16\n", "")
    assert "digits models generate 16x16" in _bad(tmp_path, no_prompts, tiny_models["model"])


def test_absent_model_folder_is_listed_as_needed(tmp_path, tiny_models):
    path = write(tmp_path, SD_TOML, tmp_path / "models" / "stable-diffusion-v1-5")
    exp = load_catalogue(path).get("sd")
    assert exp.needs_model == str(tmp_path / "models" / "stable-diffusion-v1-5")
    with pytest.raises(UserError, match="needs model"):
        exp.run_config("fp")
    listed = engine("list", "--experiments", str(path), "--runs-dir", str(tmp_path / "runs"))
    assert listed.returncode == 0 and "needs model" in listed.stdout
    ran = engine("run", "sd", "--experiments", str(path), "--runs-dir", str(tmp_path / "runs"))
    assert ran.returncode == 2 and "needs model" in ran.stderr and len(ran.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_loader_errors_name_the_path(tmp_path):
    from engine.models.loader import ModelLoadError

    with pytest.raises(ModelLoadError, match="no such model folder"):
        load(tmp_path / "nothing")


# --- the catalogue's methods on the real denoisers ------------------------------------------------

class Quiet:
    def progress(self, *args, **kwargs):
        pass


def quantize_and_sample(tmp_path, toml, experiment, variant):
    """Quantize as a run does (engine.pipeline.quantize_stage: pack, store, load back), then
    sample the run's prompts from the stored weights."""
    from engine.pipeline import quantize_stage
    from engine.prompts import sampling_prompts
    from engine.run_config import RunConfig
    from engine.sampling import InitialLatents, sample_images
    from engine.store import Store

    config = load_catalogue(toml).get(experiment).run_config(variant)
    run = RunConfig.from_dict(config)
    store = Store.open(tmp_path / "runs")
    run_id = store.create_run(experiment, variant, config, "h")
    store.run_folder(run_id).mkdir(parents=True, exist_ok=True)
    model = load(run.model.path, **{k: getattr(run.model_options, k) for k in ("drop_t5", "height", "width")})
    result, metrics = quantize_stage(store, run_id, run, model, Quiet())
    layers = result.layers
    prompts, labels = model.eval_prompts(run.sampling.samples, sampling_prompts(run.sampling))
    assert labels is None and prompts[2] == prompts[0]  # cycling through the prompts in order
    images = sample_images(model, prompts, InitialLatents(len(prompts), model.sample_shape, run.sampling.seed),
                           run.sampling.steps, run.sampling.guidance, run.sampling.batch_size,
                           negative_prompt=run.sampling.negative_prompt)
    return layers, metrics, images


def test_rtn_w4_w8_on_stable_diffusion(tmp_path, tiny_sd):
    toml = write(tmp_path, SD_TOML, tiny_sd)
    results = {v: quantize_and_sample(tmp_path, toml, "sd", v) for v in ("fp", "W4", "W8")}
    fp_images = results["fp"][2]
    assert fp_images.shape == (6, 3, 16, 24)
    for variant, bits in (("W4", 4), ("W8", 8)):
        layers, metrics, images = results[variant]
        assert {l["role"] for l in layers} == {"conv", "attention", "linear"}
        assert all(l["bits"] == bits for l in layers)
        attention = [l["name"] for l in layers if l["role"] == "attention"]
        assert all(".attn1." in n or ".attn2." in n for n in attention)
        assert metrics["size_ratio"] < (0.2 if bits == 4 else 0.3)
        assert torch.isfinite(images).all() and not torch.equal(images, fp_images)
    err = lambda v: (results[v][2] - fp_images).abs().mean().item()
    assert err("W8") < err("W4")


def test_gptq_w4a8_on_sd3_blocks(tmp_path, tiny_sd3):
    toml = write(tmp_path, SD3_TOML, tiny_sd3, "drop_t5 = true")
    layers, metrics, images = quantize_and_sample(tmp_path, toml, "sd3", "gptq")
    quantized = [l for l in layers if l["bits"] is not None]
    assert quantized and all(l["name"].startswith("transformer_blocks.") and l["bits"] == 4 for l in quantized)
    names = {l["name"] for l in quantized}
    assert {"transformer_blocks.0.attn.add_q_proj", "transformer_blocks.0.attn.to_add_out",
            "transformer_blocks.1.attn.to_out.0"} <= names
    assert all(json.loads(l["extra"])["act"] == "int8 static" for l in quantized)
    assert all(0 < l["out_err"] < 1 for l in quantized)
    outside = [l for l in layers if l["bits"] is None]
    assert {l["name"] for l in outside} >= {"pos_embed.proj", "context_embedder", "proj_out"}
    assert metrics["size_ratio"] < 1 and images.shape == (4, 3, 16, 16) and torch.isfinite(images).all()


def test_example_catalogue_lists_its_experiments_as_needing_their_models():
    from tests.conftest import REPO

    catalogue = load_catalogue(REPO / "examples" / "experiments-sd.toml")
    needs = {name: exp.needs_model for name, exp in catalogue.experiments.items()}
    assert needs == {"sd15-attention-ablation": "/data/models/stable-diffusion-v1-5",
                     "sd35m-gptq-w4a8": "/data/models/stable-diffusion-3.5-medium"}
    gptq = catalogue.get("sd35m-gptq-w4a8")
    assert gptq.options.drop_t5 and gptq.variants["gptq-w4a8"].params["act_bits"] == 8


def test_fisher_on_stable_diffusion_from_generated_latents(tmp_path, tiny_sd):
    extra = '[experiments.sd.variants.fisher]\nmethod = "fisher"\nstrategy = "ratio"\nratio = 0.25\n' \
            'measure_sensitivity = false\ncalibration = {{ samples = 4, seed = 1 }}\n'
    toml = write(tmp_path, SD_TOML + "\n" + extra, tiny_sd)
    layers, metrics, images = quantize_and_sample(tmp_path, toml, "sd", "fisher")
    bits = [l["bits"] for l in layers]
    assert set(bits) == {4, 8} and all(l["fisher"] is not None and l["fisher"] >= 0 for l in layers)
    assert metrics["high_fraction"] > 0 and torch.isfinite(images).all()
    # the statistics were cached under a key that includes the generated data's prompts
    assert list((tmp_path / "runs" / "cache").glob("fisher-*.safetensors"))


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_noise_prediction_objective_inverts_to_the_clean_latents(prediction):
    """x_t and the target of a UNet's calibration inputs give back x_0 through the DDPM algebra."""
    from types import SimpleNamespace

    from diffusers import DDPMScheduler

    from engine.models.adapters.objectives import NoisePrediction

    config = dict(DDPMScheduler(prediction_type=prediction).config)
    owner = SimpleNamespace(scheduler_config=config, path="m")
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(8, 4, 4, 4, generator=gen), torch.randn(8, 4, 4, 4, generator=gen)
    x_t, t, target = NoisePrediction.noised(owner, x0, noise, gen)
    a = DDPMScheduler.from_config(config).alphas_cumprod[t].view(-1, 1, 1, 1)
    if prediction == "epsilon":
        assert torch.equal(target, noise)
        recovered = (x_t - (1 - a).sqrt() * target) / a.sqrt()
    else:
        recovered = a.sqrt() * x_t - (1 - a).sqrt() * target
    assert torch.allclose(recovered, x0, atol=1e-4)
    assert len(set(t.tolist())) == 8  # one timestep per stratum of the schedule


@pytest.mark.parametrize("template, name, variants, roles", [
    (SD_TOML, "sd", ["fp", "W4", "W8"], {"conv", "attention", "linear"}),
    (SD3_TOML, "sd3", ["gptq"], {"attention", "linear"}),
], ids=["sd", "sd3"])
def test_engine_run_ends_done_on_real_pipelines(tmp_path, tiny_sd, tiny_sd3, template, name, variants, roles):
    """`engine run` end to end on the tiny SD and SD 3 pipelines: RTN W4/W8 and GPTQ W4A8 runs end
    done with Inception FID, CLIP score and per-sample data stored, and the real layer roles."""
    from engine.evaluate import load_eval
    from engine.store import Store

    toml = write(tmp_path, template, tiny_sd if name == "sd" else tiny_sd3)
    args = [a for v in variants for a in ("--variant", v)]
    result = engine("run", name, *args, "--experiments", str(toml), "--runs-dir", str(tmp_path / "runs"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    store = Store.open(tmp_path / "runs")
    runs = {r["variant"]: r for r in store.runs()}
    assert set(runs) == set(variants) and {r["status"] for r in runs.values()} == {"done"}
    for variant, run in runs.items():
        metrics = store.metrics(run["id"])
        assert metrics["fid"] is not None and metrics["fid"] >= 0
        assert 0 <= metrics["clip_score"] <= 100 and "prompt_acc" not in metrics  # no classes to check
        data = load_eval(store.runs_dir / run["folder"])
        n = json.loads(run["config"])["sampling"]["samples"]
        assert data.features.shape == (n, 2048) and len(data.clip) == n
        layers = store.layers(run["id"])
        quantized = {l["role"] for l in layers if l["bits"] is not None}
        assert quantized == (set() if variant == "fp" else roles)
    store.close()


def test_a_folder_with_only_fp16_variant_weights_loads(tmp_path, tiny_sd, sd):
    from engine.sampling import initial_noise, sample_images

    copy = tmp_path / "sd-fp16"
    shutil.copytree(tiny_sd, copy)
    for f in copy.rglob("*.safetensors"):
        f.rename(f.with_name(f.name.replace(".safetensors", ".fp16.safetensors")))
    model = load(copy)
    assert model.info.variant == "fp16" and sd.info.variant is None
    noise = initial_noise(2, sd.sample_shape, 0)
    assert torch.equal(sample_images(model, PROMPTS[:2], noise, 2, 3.0, 2), sample_images(sd, PROMPTS[:2], noise, 2, 3.0, 2))


def test_the_catalogue_checks_real_pipelines_without_torch(tmp_path, tiny_sd3):
    import subprocess
    import sys

    toml = write(tmp_path, SD3_TOML, tiny_sd3, "drop_t5 = true")
    code = ("import sys; from engine.config import load_catalogue; "
            f"load_catalogue({str(toml)!r}).get('sd3').run_config('gptq'); "
            "print(sorted(m for m in ('torch', 'transformers', 'diffusers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_progress_ends_at_the_steps_asked_for_with_pndm(tiny_sd):
    """PNDM makes more denoiser calls than `steps` (its warm-up): progress must still end at
    samples x steps, never beyond, and never go back."""
    from engine.models.loader import load_text_to_image
    from engine.run_config import ModelOptions
    from engine.sampling import InitialLatents, sample_images

    model = load_text_to_image(tiny_sd, options=ModelOptions(scheduler="PNDMScheduler"))
    seen = []
    sample_images(model, ["a cat", "a car", "a dog"], InitialLatents(3, model.sample_shape, 0), 4, 1.0, 2,
                  on_progress=lambda done, total: seen.append((done, total)))
    assert len(model.pipe.scheduler.timesteps) > 4  # the warm-up is there
    assert seen[-1] == (12, 12) and all(d <= t for d, t in seen)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


QAT_PTQ_VARIANTS = """
[experiments.NAME.variants.ptq]
method = "ptq"
calibration = {{ samples = 2, held_out = 1, seed = 1, steps = 2 }}

[experiments.NAME.variants.qat]
method = "qat"
bits = 4
act_bits = 8
steps = 3
batch_size = 2
train_samples = 2
"""


@pytest.mark.parametrize("template, name", [(SD_TOML, "sd"), (SD3_TOML, "sd3")], ids=["sd", "sd3"])
def test_engine_run_qat_and_ptq_on_real_pipelines(tmp_path, tiny_sd, tiny_sd3, template, name):
    """`engine run` of PTQ W8A8 and data-free QAT W4A8 on the tiny SD and SD 3 pipelines: both end
    done with metrics (Inception FID, CLIP score), PTQ with its int8 checkpoint, QAT with the FP
    model's samples it trained on (tests/test_sampling_uses_quantized.py checks that sampling and
    calibration go through the quantized modules)."""
    from engine.quant.ptq.pt2e import read_checkpoint
    from engine.quant.qat.data import LatentPool
    from engine.store import Store

    toml = write(tmp_path, template + QAT_PTQ_VARIANTS.replace("NAME", name), tiny_sd if name == "sd" else tiny_sd3)
    result = engine("run", name, "--variant", "ptq", "--variant", "qat", "--experiments", str(toml),
                    "--runs-dir", str(tmp_path / "runs"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    store = Store.open(tmp_path / "runs")
    runs = {r["variant"]: r for r in store.runs()}
    assert {v: r["status"] for v, r in runs.items()} == {"ptq": "done", "qat": "done"}, \
        {v: r["error"] for v, r in runs.items()}
    metrics = {v: store.metrics(r["id"]) for v, r in runs.items()}
    for m in metrics.values():
        assert m["fid"] is not None and m["fid"] >= 0 and 0 <= m["clip_score"] <= 100
    assert metrics["ptq"]["ptq_int8_layers"] > 0 and metrics["ptq"]["calibration_s"] > 0
    assert {"finetune_s", "qat_fp_loss", "qat_quant_loss", "bits_per_weight"} <= set(metrics["qat"])
    artifacts = {v: {a["kind"]: a["path"] for a in store.artifacts(r["id"])} for v, r in runs.items()}
    _, meta = read_checkpoint(store.runs_dir / artifacts["ptq"]["checkpoint"])
    assert meta["int8_layers"] == metrics["ptq"]["ptq_int8_layers"] and meta["activations"]
    pool = LatentPool(store.runs_dir / artifacts["qat"]["training_data"])
    assert pool.n == 2 and pool.shape == ((4, 8, 12) if name == "sd" else (16, 8, 8))  # SD: 16 x 24 px
    assert set(pool.captions) <= set(PROMPTS[:2]) and torch.isfinite(pool.read(torch.arange(2))).all()
    store.close()
