"""CLIP score: open_clip local-dir loading, agreement with open_clip's own preprocessing and
embeddings, the bootstrap interval, and the shipped digits-clip's zero-shot accuracy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.metrics.clip_score import LOCAL_DIR, ClipLoadError, ClipScorer
from engine.models.registry import SHIPPED_DIR


def test_scores_equal_open_clips_own_pipeline(tiny_clip_dir):
    import open_clip
    from PIL import Image

    scorer = ClipScorer.load(LOCAL_DIR + str(tiny_clip_dir))
    rng = np.random.default_rng(0)
    u8 = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    images = torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    prompts = ["a handwritten digit one", "the number two", "a cat", "a handwritten digit one"]
    got = scorer.scores(images, prompts)

    model, _, preprocess = open_clip.create_model_and_transforms(LOCAL_DIR + str(tiny_clip_dir))
    tokenizer = open_clip.get_tokenizer(LOCAL_DIR + str(tiny_clip_dir))
    with torch.no_grad():
        img = model.encode_image(torch.stack([preprocess(Image.fromarray(a)) for a in u8]), normalize=True)
        txt = model.encode_text(tokenizer(prompts), normalize=True)
    expected = (100 * (img * txt).sum(-1).clamp(min=0)).double().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    assert got.shape == (4,) and (got >= 0).all() and (got <= 100).all()
    assert scorer.model_id.startswith(LOCAL_DIR) and "@" in scorer.model_id


def test_grey_images_are_scored_as_rgb(tiny_clip_dir):
    scorer = ClipScorer.load(LOCAL_DIR + str(tiny_clip_dir))
    grey = torch.rand(2, 1, 32, 32) * 2 - 1
    np.testing.assert_array_equal(scorer.scores(grey, ["a", "b"]), scorer.scores(grey.expand(-1, 3, -1, -1), ["a", "b"]))


def test_load_errors_name_the_problem(tmp_path):
    with pytest.raises(ClipLoadError, match="no open_clip_config.json"):
        ClipScorer.load(LOCAL_DIR + str(tmp_path))
    with pytest.raises(ClipLoadError, match="needs clip_weights"):
        ClipScorer.load("ViT-B-32")
    with pytest.raises(ClipLoadError, match="does not exist"):
        ClipScorer.load("ViT-B-32", tmp_path / "missing.safetensors")
    with pytest.raises(ClipLoadError, match="neither"):
        ClipScorer.load("not-a-model")


def test_mean_interval_covers_mean_and_is_reproducible():
    from engine.evaluate import mean_with_interval

    values = np.random.default_rng(1).uniform(0, 40, 300)
    mean, low, high = mean_with_interval(values, 200, seed=3)
    assert mean == pytest.approx(values.mean()) and low < mean < high
    # close to the normal-theory interval of a mean
    se = values.std(ddof=1) / np.sqrt(len(values))
    assert (high - low) == pytest.approx(2 * 1.96 * se, rel=0.25)
    assert mean_with_interval(values, 200, seed=3) == (mean, low, high)


@pytest.mark.skipif(not (SHIPPED_DIR / "digits-clip").is_dir(), reason="models/digits-clip not present")
def test_shipped_digits_clip_zero_shot_accuracy():
    from engine.data.digits import load_digits_16, split_indices
    from engine.train.digits_clip import zero_shot_accuracy

    images, labels = load_digits_16()
    _, held_out = split_indices(len(images), held_out=0.2, seed=0)
    scorer = ClipScorer.load(LOCAL_DIR + str(SHIPPED_DIR / "digits-clip"))
    assert zero_shot_accuracy(scorer, images[held_out], labels[held_out]) >= 0.9
    # a real digit scores higher with its own prompt than with the next class's
    from engine.data.digits import prompt_for

    x, y = images[held_out][:100], labels[held_out][:100].tolist()
    own = scorer.scores(x, [prompt_for(d) for d in y]).mean()
    wrong = scorer.scores(x, [prompt_for((d + 1) % 10) for d in y]).mean()
    assert own > wrong + 10
