"""Checkpoints written and read one tensor at a time: byte-identical to the safetensors
library's files, sizes counted from shapes, and loading in place without a model copy."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save

from engine.quant import RTNConfig, quantize_
from engine.quant import safetensors_stream
from engine.quant.checkpoint import dense_bytes, store_and_reload
from engine.quant.packing import load_packed, load_packed_into, packed_file, packed_nbytes, save_packed
from engine.quant.safetensors_stream import state_entries, write


def _unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(32, 64), cross_attention_dim=32, attention_head_dim=8, sample_size=16,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1, norm_num_groups=8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dense_files_are_the_librarys_bytes_and_sizes_come_from_shapes(tmp_path, dtype):
    model = _unet()
    reference = save({k: v.to(dtype) if v.is_floating_point() else v for k, v in model.state_dict().items()})
    assert dense_bytes(model, dtype) == len(reference)
    write(tmp_path / "dense.safetensors", state_entries(model.state_dict(), dtype))
    assert (tmp_path / "dense.safetensors").read_bytes() == reference


def test_mixed_dtypes_and_metadata_match_the_library(tmp_path):
    tensors = {"b": torch.arange(3, dtype=torch.float16), "a": torch.ones(2, 2), "c": torch.arange(5, dtype=torch.uint8),
               "d": torch.tensor([7]), "e": torch.ones(2, dtype=torch.bfloat16), "f": torch.zeros(0),
               "g": torch.ones(2, dtype=torch.float64), "h": torch.arange(2, dtype=torch.int32),
               "i": torch.tensor([True]), "j": torch.tensor([-1], dtype=torch.int8), "k": torch.arange(3, dtype=torch.int16)}
    entries = [safetensors_stream.tensor_entry(k, v) for k, v in tensors.items()]
    write(tmp_path / "x.safetensors", entries, {"note": "ünïcode"})
    assert (tmp_path / "x.safetensors").read_bytes() == save(tensors, metadata={"note": "ünïcode"})


def test_packed_file_streams_one_layer_at_a_time_and_reloads_in_place(tmp_path, monkeypatch):
    model = _unet()
    report = quantize_(model, RTNConfig(bits={"conv": 4, "attention": 3, "linear": 8}, symmetric=False))
    simulated = {k: v.clone() for k, v in model.state_dict().items()}
    tensors, meta = packed_file(model.state_dict(), report.packed, report.half)

    pieces = []
    real_raw = safetensors_stream._raw
    monkeypatch.setattr(safetensors_stream, "_raw", lambda piece, entry: pieces.append(piece.numel() * piece.element_size()) or real_raw(piece, entry))
    size = save_packed(tmp_path / "w.safetensors", model, report.packed, report.half)
    assert (tmp_path / "w.safetensors").read_bytes() == save(tensors, metadata=meta)
    assert size == packed_nbytes(model.state_dict(), report.packed, report.half)
    # no piece is larger than the largest tensor of the model in float32: nothing is concatenated
    largest = max(v.numel() * 4 for v in simulated.values())
    assert max(pieces) <= largest and len(pieces) > len(report.packed)

    fresh = _unet()  # full precision: loading must overwrite every quantized weight
    load_packed_into(fresh, tmp_path / "w.safetensors")
    for key, value in simulated.items():
        assert torch.equal(fresh.state_dict()[key], value), key
    loaded = load_packed(tmp_path / "w.safetensors")
    assert set(loaded) == set(simulated)


def test_reload_refuses_a_file_that_differs_from_the_simulated_model(tmp_path):
    model = _unet()
    report = quantize_(model, RTNConfig(bits={"conv": 4, "attention": 4, "linear": 4}))
    save_packed(tmp_path / "w.safetensors", model, report.packed, report.half)
    with torch.no_grad():
        model.conv_in.weight.add_(1e-3)  # the model no longer holds what the file stores
    with pytest.raises(RuntimeError, match="conv_in.weight differs"):
        load_packed_into(model, tmp_path / "w.safetensors", expect_equal=True)
    assert store_and_reload(model, quantize_(model, RTNConfig(bits={"conv": 4})).packed, [], tmp_path / "v.safetensors") > 0


def test_a_file_missing_a_models_tensor_is_refused(tmp_path):
    model = _unet()
    state = model.state_dict()
    write(tmp_path / "part.safetensors", state_entries({k: v for k, v in state.items() if k != "conv_in.bias"}))
    with pytest.raises(RuntimeError, match="Missing key.*conv_in.bias"):
        load_packed_into(model, tmp_path / "part.safetensors")


def test_truncated_concatenated_codes_are_refused_before_any_tensor_is_loaded(tmp_path):
    from engine.errors import DamagedFile
    from engine.quant.packing import iter_packed

    model = _unet()
    report = quantize_(model, RTNConfig(bits={"conv": 4}))
    tensors, meta = packed_file(model.state_dict(), report.packed, report.half)
    tensors["quant.codes"] = tensors["quant.codes"][:-1].clone()
    (tmp_path / "bad.safetensors").write_bytes(save(tensors, metadata=meta))
    it = iter_packed(tmp_path / "bad.safetensors")
    with pytest.raises(DamagedFile, match="quant.codes is too short"):
        next(it)
