"""QAT on diffusers pipelines (tiny SD and SD 3): its training data (a folder of captioned
images encoded by the VAE, or data-free: the full-precision pipeline's own samples), the
family's training loss, and the `train_images` / `train_samples` keys."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from engine.config import load_catalogue
from engine.errors import ConfigError

W4 = {"conv": 4, "attention": 4, "linear": 4}
PROMPTS = ["a photo of a cat", "a red car on a street", "two dogs playing in the snow"]
SAMPLING = {"prompts": PROMPTS, "steps": 2, "guidance": 3.0, "batch_size": 2, "negative_prompt": "blurry"}


def load(path):
    from engine.models.loader import load_text_to_image

    torch.set_num_threads(1)
    return load_text_to_image(path, torch.device("cpu"))


def image_folder(folder, n: int = 3, metadata: bool = False):
    """n random RGB images of odd sizes with captions (same-stem .txt files, or metadata.jsonl)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (20 + 3 * i, 24 + i, 3), dtype=np.uint8)).save(folder / f"im{i}.png")
        if metadata:
            rows.append(json.dumps({"file_name": f"im{i}.png", "text": PROMPTS[i % 3]}))
        else:
            (folder / f"im{i}.txt").write_text(PROMPTS[i % 3] + "\n")
    if metadata:
        (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return folder


@pytest.mark.parametrize("which", ["tiny_sd", "tiny_sd3"])
def test_image_folder_latents_are_the_vae_encodings(tmp_path, request, which):
    """The pool holds each image, resized and centre-cropped, encoded by the VAE with the seeded
    generator and scaled as the denoiser sees latents (SD 3: minus shift_factor); decoding it
    gives back (about) the image the VAE was given."""
    from engine.quant.qat.data import TrainingData, build_pool, load_image

    model = load(request.getfixturevalue(which))
    folder = image_folder(tmp_path / "images", metadata=which == "tiny_sd3")
    pool = build_pool(model, TrainingData(images=str(folder), folder=tmp_path), seed=5, progress=None)
    assert pool.n == 3 and pool.captions == PROMPTS and pool.shape == model.sample_shape
    pixels = torch.stack([load_image(folder / f"im{i}.png", model.height, model.width) for i in range(3)])
    assert pixels.shape == (3, 3, 16, 16) and pixels.min() >= -1 and pixels.max() <= 1
    expected = model.encode_images(pixels, torch.Generator().manual_seed(5))
    assert torch.equal(pool.read(torch.tensor([2, 0])), expected[[2, 0]])
    vae = model.pipe.vae
    raw = vae.encode(pixels).latent_dist.sample(generator=torch.Generator().manual_seed(5))
    shift = vae.config.shift_factor if which == "tiny_sd3" else 0.0
    assert torch.allclose(expected, (raw - shift) * vae.config.scaling_factor, atol=1e-6)
    assert torch.allclose(model.unscale(expected), raw, atol=1e-5)  # `scale` inverts `unscale`


def test_data_free_latents_are_the_fp_pipelines_samples(tmp_path, tiny_sd):
    """Without a folder: seeded draws of the experiment's prompts, sampled by the full-precision
    pipeline with the experiment's steps, guidance, negative prompt and batch size, from initial
    latents of their own stream."""
    from engine.quant.qat.data import TrainingData, build_pool
    from engine.sampling import GENERATED, InitialLatents

    model = load(tiny_sd)
    events = []
    pool = build_pool(model, TrainingData(samples=3, sampling=SAMPLING, folder=tmp_path), seed=2,
                      progress=lambda *a: events.append(a))
    assert pool.n == 3 and set(pool.captions) <= set(PROMPTS)
    noise = InitialLatents(3, model.sample_shape, 2, stream=GENERATED)
    first = model.sample_batch(pool.captions[:2], noise[:2], 2, 3.0, negative_prompt="blurry")
    last = model.sample_batch(pool.captions[2:], noise[2:], 2, 3.0, negative_prompt="blurry")
    assert torch.equal(pool.read(torch.arange(3)), torch.cat([first, last]).float())
    assert events[-1][:3] == ("qat data", 6, 6)  # 3 samples x 2 steps
    (tmp_path / "other").mkdir()
    other = build_pool(model, TrainingData(samples=3, sampling=SAMPLING, folder=tmp_path / "other"), seed=3,
                       progress=None)
    assert not torch.equal(other.read(torch.arange(3)), pool.read(torch.arange(3)))  # the seed matters


@pytest.mark.parametrize("which", ["tiny_sd", "tiny_sd3"])
def test_qat_lowers_the_loss_of_the_stored_model_against_rtn(tmp_path, request, which):
    """Data-free QAT W4: the family's training loss of the converted model, loaded back from
    the packed checkpoint, is the reported `qat_quant_loss` and is below RTN W4's on the same
    held-out batches; every quantized layer holds exactly its codes' values."""
    from engine.quant import RTNConfig, quantize_
    from engine.quant.checkpoint import store_and_reload
    from engine.quant.qat.data import TrainingData
    from engine.quant.qat.finetune import QATConfig, quantize_qat
    from engine.quant.qat.loss import PipelineLoss, mean_loss
    from engine.quant.rtn import dequantize

    path = request.getfixturevalue(which)
    model = load(path)
    cfg = QATConfig(bits=W4, steps=25, lr=1e-3, batch_size=4, seed=0)
    result = quantize_qat(model, cfg, None, TrainingData(samples=4, sampling=SAMPLING, folder=tmp_path))
    assert result.pool.n == 4 and len(result.losses) == 25
    store_and_reload(model.denoiser, result.packed, [], tmp_path / "qat.safetensors")
    held = PipelineLoss(model, result.pool, cfg.batch_size, cfg.seed + 1_000_003)
    batches = [held.batch() for _ in range(cfg.eval_batches)]
    qat_loss = mean_loss(model.denoiser, held, batches)
    assert qat_loss == pytest.approx(result.metrics["qat_quant_loss"], rel=1e-5)
    rtn = load(path)
    quantize_(rtn.denoiser, RTNConfig(bits=W4))
    assert qat_loss < mean_loss(rtn.denoiser, held, batches)
    for name, module in model.denoiser.named_modules():
        if name in result.packed:
            assert torch.equal(module.weight.detach(), dequantize(result.packed[name]))


def test_pipeline_loss_targets_follow_the_prediction_type(tmp_path, tiny_sd):
    """The UNet's loss target is the noise (epsilon) or the velocity (v_prediction), as the
    scheduler says: a denoiser that returns that target scores 0, the other one does not."""
    from types import SimpleNamespace

    from engine.quant.qat.data import TrainingData, build_pool
    from engine.quant.qat.loss import PipelineLoss

    model = load(tiny_sd)
    pool = build_pool(model, TrainingData(samples=2, sampling=SAMPLING, folder=tmp_path), 0, None)
    targets = {}
    for prediction in ("epsilon", "v_prediction"):
        model.scheduler_config = {**model.scheduler_config, "prediction_type": prediction}
        loss = PipelineLoss(model, pool, 3, seed=1)
        batch = loss.batch()
        gen = torch.Generator().manual_seed(batch.noise_seed)
        x0 = pool.read(batch.rows)
        noise = torch.randn(x0.shape, generator=gen)
        _, _, targets[prediction] = model.noised(x0, noise, gen)
        assert torch.equal(targets[prediction], noise) == (prediction == "epsilon")
        oracle = lambda xt, t, states, p=prediction: SimpleNamespace(sample=targets[p])
        assert loss.loss(oracle, batch).item() == 0.0
    wrong = lambda xt, t, states: SimpleNamespace(sample=targets["epsilon"])
    assert loss.loss(wrong, batch).item() > 0.01  # scored against the velocity


def test_missing_training_data_is_a_one_line_error(tmp_path, tiny_sd, tiny_models):
    from engine.quant.qat.data import TrainingData, build_pool
    from engine.quant.qat.finetune import QATConfig, quantize_qat

    model = load(tiny_sd)
    with pytest.raises(ValueError) as info:
        build_pool(model, TrainingData(sampling={**SAMPLING, "prompts": None}, folder=tmp_path), 0, None)
    message = str(info.value)
    assert "\n" not in message and "train_images" in message and "prompts" in message
    assert "StableDiffusionPipeline" in message
    digits = load(tiny_models["model"])
    for data, key in ((TrainingData(images=str(tmp_path)), "train_images"), (TrainingData(samples=4), "train_samples")):
        with pytest.raises(ValueError, match=f"{key}: the digits models fine-tune on the digits data"):
            quantize_qat(digits, QATConfig(bits=W4, steps=1), None, data)


QAT_TOML = """
[experiments.sd]
model = "{model}"
prompts = ["a photo of a cat", "a red car on a street"]

[experiments.sd.variants.q]
method = "qat"
bits = 4
steps = 2
{keys}
"""


@pytest.fixture
def eval_keys(tmp_path, inception_home, tiny_clip_dir) -> str:
    """The evaluation keys a catalogue of a real pipeline needs (tests/test_real_pipelines.py)."""
    from tests.test_real_pipelines import evaluation_toml

    return evaluation_toml(inception_home, tiny_clip_dir, tmp_path)


def _catalogue(tmp_path, tiny_sd, eval_keys: str, keys: str):
    path = tmp_path / "experiments.toml"
    text = QAT_TOML.format(model=tiny_sd, keys=keys)
    path.write_text(text.replace("prompts = ", eval_keys + "\nprompts = ", 1))
    return path


def test_train_images_key_resolves_against_the_catalogue(tmp_path, tiny_sd, eval_keys):
    image_folder(tmp_path / "data" / "imgs")
    exp = load_catalogue(_catalogue(tmp_path, tiny_sd, eval_keys, 'train_images = "data/imgs"')).get("sd")
    assert exp.variants["q"].params["train_images"] == str((tmp_path / "data" / "imgs").resolve())
    plain = load_catalogue(_catalogue(tmp_path, tiny_sd, eval_keys, "")).get("sd")
    assert "train_images" not in plain.variants["q"].params and "train_samples" not in plain.variants["q"].params
    sized = load_catalogue(_catalogue(tmp_path, tiny_sd, eval_keys, "train_samples = 8")).get("sd")
    assert sized.variants["q"].params["train_samples"] == 8


@pytest.mark.parametrize("keys, setup, message", [
    ('train_images = "missing"', None, "missing: no such folder of training images"),
    ('train_images = "imgs"', "no caption", "im1.png: no caption file im1.txt"),
    ('train_images = "imgs"', "empty caption", "im0.txt: the caption is empty"),
    ('train_images = "imgs"', "bad jsonl", "metadata.jsonl:2: not valid JSON"),
    ('train_images = "imgs"', "no images", "no training images"),
    ('train_images = 3', None, "must be a folder of images with captions, got 3"),
    ('train_images = "imgs"\ntrain_samples = 4', None, "applies without train_images"),
    ("train_samples = 0", None, "must be an integer >= 1, got 0"),
], ids=["missing", "no-caption", "empty-caption", "bad-jsonl", "empty-folder", "not-a-string", "both", "zero"])
def test_bad_training_data_keys_are_located_errors(tmp_path, tiny_sd, eval_keys, keys, setup, message):
    folder = tmp_path / "imgs"
    if setup == "no images":
        folder.mkdir()
    elif setup:
        image_folder(folder, metadata=setup == "bad jsonl")
        if setup == "no caption":
            (folder / "im1.txt").unlink()
        elif setup == "empty caption":
            (folder / "im0.txt").write_text("  \n")
        elif setup == "bad jsonl":
            lines = (folder / "metadata.jsonl").read_text().splitlines()
            (folder / "metadata.jsonl").write_text("\n".join([lines[0], "{oops", *lines[2:]]) + "\n")
    path = _catalogue(tmp_path, tiny_sd, eval_keys, keys)
    with pytest.raises(ConfigError) as info:
        load_catalogue(path)
    err = info.value
    assert message in str(err) and "\n" not in str(err) and err.file == str(path)
    key = err.key.rsplit(".", 1)[-1]
    assert key in ("train_images", "train_samples") and key in path.read_text().splitlines()[err.line - 1]
