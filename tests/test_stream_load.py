"""The denoiser read tensor by tensor equals diffusers' own `from_pretrained`, and a broken file
is a clear error."""

from __future__ import annotations

import pytest
import torch


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streamed_denoiser_equals_from_pretrained(tiny_sd3, tmp_path, dtype):
    from diffusers import SD3Transformer2DModel

    from engine.models.stream_load import load_model

    original = SD3Transformer2DModel.from_pretrained(tiny_sd3 / "transformer")
    original.to(torch.float16).save_pretrained(tmp_path / "t", variant="fp16", max_shard_size="20KB")  # sharded
    assert len(list((tmp_path / "t").glob("*.fp16-*.safetensors"))) > 1
    streamed = load_model(SD3Transformer2DModel, tmp_path / "t", "fp16", dtype)
    reference = SD3Transformer2DModel.from_pretrained(tmp_path / "t", variant="fp16", dtype=dtype)
    a, b = streamed.state_dict(), reference.state_dict()
    assert set(a) == set(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    x = torch.randn(1, 16, 8, 8, dtype=dtype)
    cond, pooled, t = torch.randn(1, 5, 64, dtype=dtype), torch.randn(1, 64, dtype=dtype), torch.tensor([500.0])
    with torch.no_grad():
        assert torch.equal(streamed(x, cond, pooled, t).sample, reference(x, cond, pooled, t).sample)


def test_a_truncated_or_incomplete_denoiser_is_a_clear_error(tiny_sd3, tmp_path):
    import shutil

    from diffusers import SD3Transformer2DModel

    from engine.errors import DamagedFile
    from engine.models.stream_load import load_model
    from engine.quant.safetensors_stream import state_entries, write

    folder = tmp_path / "t"
    shutil.copytree(tiny_sd3 / "transformer", folder)
    weights = folder / "diffusion_pytorch_model.safetensors"
    state = SD3Transformer2DModel.from_pretrained(folder).state_dict()
    write(weights, state_entries({k: v for k, v in state.items() if k != "proj_out.bias"}))
    with pytest.raises(ValueError, match="lack proj_out.bias"):
        load_model(SD3Transformer2DModel, folder, None, torch.float32)
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 100])
    with pytest.raises(DamagedFile):
        load_model(SD3Transformer2DModel, folder, None, torch.float32)


def test_a_dtype_qtui_does_not_load_is_named(tmp_path):
    from safetensors.torch import save_file

    from engine.errors import DamagedFile
    from engine.models.stream_load import read_tensors

    path = tmp_path / "w.safetensors"
    save_file({"a": torch.ones(2), "b": torch.zeros(2).to(torch.float8_e4m3fn)}, str(path))
    with pytest.raises(DamagedFile, match="tensor b has dtype F8_E4M3"):
        list(read_tensors(path))
