"""DGQ's attention in row blocks: the plan respects its bound and covers every row once, and
quantized attention and its calibration statistics computed block by block are those of the
whole probability matrix."""

from __future__ import annotations

import json

import pytest
import torch

from engine.quant.dgq import chunks
from engine.quant.dgq.attention import QuantSoftmaxAttnProcessor, SoftmaxSettings
from engine.quant.dgq.chunks import chunk_plan
from engine.quant.dgq.softmax_stats import SoftmaxRecorder


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("bh, queries, keys, bound", [
    (6, 37, 11, 10**9), (6, 37, 11, 6 * 11 * 5), (6, 36, 11, 6 * 11 * 5 + 3), (6, 37, 11, 55), (6, 12, 10, 10 * 30),
    (6, 37, 11, 1), (128, 4096, 4096, 2**26), (2, 3, 5, 10),
])
def test_plan_covers_every_row_once_within_the_bound(bh, queries, keys, bound):
    plan = chunk_plan(bh, queries, keys, bound)
    seen = torch.zeros(bh, queries, dtype=torch.int64)
    for chunk in plan:
        assert chunk.elements(keys) <= max(bound, keys)  # a single row may exceed a bound below one row
        seen[chunk.heads, chunk.queries] += 1
    assert (seen == 1).all()
    for axis in ("heads", "queries"):  # spans along an axis differ by at most one: no small remainder
        sizes = {getattr(c, axis).stop - getattr(c, axis).start for c in plan}
        assert max(sizes) - min(sizes) <= 1
    if bound >= bh * queries * keys:
        assert len(plan) == 1
    elif bound >= keys:  # rows are packed: fewer than twice the blocks the bound needs
        assert len(plan) < 2 * -(-bh * queries * keys // bound)


def test_plan_refuses_empty_sizes():
    with pytest.raises(ValueError, match="every size must be at least 1"):
        chunk_plan(0, 4, 4)


class _Attention(torch.nn.Module):
    """The part of diffusers' `Attention` that `attend` uses: `get_attention_scores` is the
    real one; scale 1/4 (head dim 16), so scores of integer queries and keys are exact."""

    def __init__(self, heads: int):
        from diffusers.models.attention_processor import Attention

        super().__init__()
        self.real = Attention(query_dim=16 * heads, heads=heads, dim_head=16)
        self.heads, self.largest_block = heads, 0
        self.register_buffer("softmax_delta", torch.tensor(0.3))
        self.register_buffer("softmax_lo", torch.tensor(0.004))

    def get_attention_scores(self, query, key, mask=None):
        probs = self.real.get_attention_scores(query, key, mask)
        self.largest_block = max(self.largest_block, probs.numel())
        return probs


SETTINGS = {
    "dgq": SoftmaxSettings(bits=4),
    "static delta": SoftmaxSettings(bits=6, prompt_scaling=False),
    "uniform": SoftmaxSettings(bits=4, log=False),
    "no start fp": SoftmaxSettings(bits=4, start_fp=False),
    "minmax": SoftmaxSettings(bits=6, log=False, start_fp=False, prompt_scaling=False, minmax=True),
}


def _run(attn, settings, bound, query, key, value, cross):
    proc = QuantSoftmaxAttnProcessor("attn", settings, chunk_elements=bound)
    proc.active = True
    proc.recorder = SoftmaxRecorder(settings.start_fp and not settings.minmax, seed=3)
    attn.largest_block = 0
    out = proc.attend(attn, query, key, value, None, cross)
    return out, proc.recorder


@pytest.mark.parametrize("name", list(SETTINGS))
@pytest.mark.parametrize("cross", [True, False])
def test_blocks_give_the_whole_matrix_result_bit_for_bit(name, cross):
    """Integer queries and keys make every score exact and the values are unit vectors (each
    output row is its probability row, with no sums of products), so nothing depends on the
    order BLAS adds in: the blocked result must equal the one-block result exactly."""
    settings = SETTINGS[name]
    heads, prompts, queries, keys = 2, 3, 12, (10 if cross else 12)
    attn = _Attention(heads)
    g = torch.Generator().manual_seed(7)
    query = torch.randint(-1, 2, (prompts * heads, queries, 16), generator=g).float()
    key = torch.randint(-1, 2, (prompts * heads, keys, 16), generator=g).float()
    key[2:4] *= 2  # one prompt with sharper attention: per-prompt deltas differ
    value = torch.eye(keys, 16).expand(prompts * heads, keys, 16).contiguous()
    whole, whole_rec = _run(attn, settings, None, query, key, value, cross)
    assert attn.largest_block == prompts * heads * queries * keys
    assert (whole[..., keys:] == 0).all() and (whole[..., :keys] > 0).any(-1).all()
    bounds = [keys * 6 * 5, keys * 6, keys * 4, keys * 3, keys, 1]  # heads whole or cut, queries cut, single rows
    for bound in bounds:
        out, rec = _run(attn, settings, bound, query, key, value, cross)
        assert attn.largest_block <= max(bound, keys)
        assert torch.equal(out, whole), (name, bound)
        assert (rec.lo, rec.hi, rec.mean_prompt_delta, rec.cross) == (whole_rec.lo, whole_rec.hi, whole_rec.mean_prompt_delta, cross)
        assert torch.equal(rec.values(), whole_rec.values())
        if cross:  # a sum: in float64, block by block
            assert rec.start_share == pytest.approx(whole_rec.start_share, rel=1e-12)
        else:
            assert rec.start_share is None
    if name == "dgq":  # the quantizer is at work: the output is not the float attention
        float_out = torch.softmax(query @ key.transpose(1, 2) / 4, dim=-1)
        assert not torch.equal(whole[..., :keys], float_out)


@pytest.mark.parametrize("active", [True, False])
def test_blocks_of_a_real_attention_module_match_the_whole_to_rounding(active):
    """A diffusers cross-attention module with random weights and a padding mask, through
    `Attention.forward`: blocks of several queries (the default bound vs one of 40 rows)
    agree with one block within float32 rounding (rtol 1e-5, atol 1e-6); on this CPU they
    are equal."""
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attn = Attention(query_dim=32, cross_attention_dim=24, heads=4, dim_head=8).eval()
    attn.register_buffer("softmax_delta", torch.tensor(0.4))
    attn.register_buffer("softmax_lo", torch.tensor(0.0))
    g = torch.Generator().manual_seed(1)
    hidden, states = torch.randn(3, 64, 32, generator=g), torch.randn(3, 9, 24, generator=g) * 2
    mask = torch.ones(3, 1, 9)
    mask[1, :, 7:] = 0  # prompt 1 is padded: its last keys get no attention
    results = []
    for bound in (None, 9 * 40):
        proc = QuantSoftmaxAttnProcessor("attn", SoftmaxSettings(bits=4), chunk_elements=bound)
        proc.active = active
        proc.recorder = SoftmaxRecorder(True, seed=0)
        attn.set_processor(proc)
        with torch.no_grad():
            results.append((attn(hidden, encoder_hidden_states=states, attention_mask=(mask - 1) * 1e4), proc.recorder))
    (whole, whole_rec), (blocks, rec) = results
    torch.testing.assert_close(blocks, whole, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rec.values(), whole_rec.values(), rtol=1e-5, atol=1e-7)
    for stat in ("lo", "hi", "mean_prompt_delta", "start_share"):
        assert getattr(rec, stat) == pytest.approx(getattr(whole_rec, stat), rel=1e-5, abs=1e-9)
    assert whole_rec.lo == 0.0  # the padded keys


def test_calibration_with_small_blocks_gives_the_same_quantized_unet(monkeypatch):
    """`quantize_denoiser` on an SD-style UNet with the default bound and with a bound that
    cuts every attention call of the 8 x 8 latents into blocks of 4 queries (all 16 prompt x
    head rows): the same calibrated deltas to rounding (rtol 1e-5), and the same quantized
    model: its output differs from the one-block model's by less than 1% of their distance
    from the full-precision output (a difference in the last bit of an activation can move it
    across a level of an 8-bit quantizer; on this CPU the two are equal)."""
    from engine.methods import validate_method
    from engine.quant.dgq.calibration import DGQSettings, quantize_denoiser
    from tests.test_dgq import _sd_style_unet

    g = torch.Generator().manual_seed(0)
    latents, states = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 77, 24, generator=g)
    settings = DGQSettings.from_params(validate_method("dgq", {"bits": 8, "act_bits": 8, "groups": 4}))
    with torch.no_grad():
        reference = _sd_style_unet()(latents, 10, states).sample
    runs, largest = [], []
    for bound in (chunks.MAX_ELEMENTS, 77 * 16 * 4):
        monkeypatch.setattr(chunks, "MAX_ELEMENTS", bound)
        unet = _sd_style_unet()
        probs_of = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.get_attention_scores
        blocks = []

        def spy(*args, probs_of=probs_of, blocks=blocks):
            out = probs_of(*args)
            blocks.append(out.numel())
            return out

        unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.get_attention_scores = spy
        with torch.no_grad():
            result = quantize_denoiser(unet, settings, lambda: [unet(latents, t, states) for t in (900, 10)])
            runs.append((result, unet(latents, 10, states).sample))
        largest.append(max(blocks))
    assert largest == [16 * 64 * 77, 16 * 4 * 77]  # cross-attention at 8 x 8: one block, then 16 blocks
    (whole, whole_out), (blocked, blocked_out) = runs
    rows = [[json.loads(row["extra"]) for row in r.layers if row["role"] == "softmax"] for r in (whole, blocked)]
    assert len(rows[0]) == len(rows[1]) == 8
    for a, b in zip(*rows):
        for stat in ("delta", "calibrated_prompt_delta_mean", "start_share"):
            assert a[stat] == (None if b[stat] is None else pytest.approx(b[stat], rel=1e-5)), stat
    assert (blocked_out - whole_out).norm() < 0.01 * (whole_out - reference).norm()
