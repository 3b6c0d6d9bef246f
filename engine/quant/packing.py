"""Real low-bit storage: bit-packed codes in a safetensors file, and dense size references.

Layout of a packed file (format version 3). The quantized layers are concatenated, in model
order, into four tensors:
  `quant.codes`   uint8, each layer's codes as a dense bit stream (`pack_codes`): a layer of
                  n weights at b bits takes ceil(n * b / 8) bytes, every layer starting on a
                  fresh byte
  `quant.scales`  float16, each layer's per-output-channel scales
  `quant.zeros`   uint8, the zero points of the asymmetric layers only (symmetric layers use
                  2^(bits-1)); absent when every layer is symmetric
  `quant.biases`  float16, the biases of the quantized layers that have one
(each written only when non-empty), plus every other state-dict tensor as-is (floating point
ones in float32, integer buffers unchanged), except the weights and biases of the layers kept
in float16 (mixed precision), which are stored under their own names as float16. The metadata
key "qtui_quant" holds compact JSON
`{"version":3,"layers":[[name,bits,symmetric,shape,has_bias],...],"half":[name,...]}`,
symmetric and has_bias as 0/1, in the order of the concatenation (a grouped layer, as GPTQ's
`group_size` makes, adds a sixth element, the group size, and has out x groups scales and
zeros); it is all that is needed to slice the tensors back ("half", present only when some
layers are float16, lists them).

The biases of quantized layers, and the float16 layers, are stored as float16: `quantize_`
rounds them, so the model it leaves behind is reproduced exactly by `load_packed`.

Version 2 differed only in `quant.codes`: codes were packed 4 (bits <= 2), 2 (bits <= 4) or 1
per byte, so 3-bit codes took 4 bits and 5..7-bit codes 8; for 2, 4 and 8 bits the bytes are
the same as version 3's. `load_packed` reads both versions.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from collections.abc import Mapping
from typing import Iterable, Iterator

import torch
from safetensors import safe_open
from torch import nn

from engine.quant.rtn import QuantizedTensor, dequantize
from engine.quant.safetensors_stream import Entry, file_size, state_entries, tensor_entry
from engine.quant.safetensors_stream import write as stream_write

META_KEY = "qtui_quant"
FORMAT_VERSION = 3
READABLE_VERSIONS = (2, 3)
CODES, SCALES, ZEROS, BIASES = "quant.codes", "quant.scales", "quant.zeros", "quant.biases"
QUANT_KEYS = {CODES: torch.uint8, SCALES: torch.float16, ZEROS: torch.uint8, BIASES: torch.float16}


def check_code_bits(bits: object) -> int:
    """`bits` if it is a code width this format stores (an int in 1..8), else ValueError."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an int in 1..8, got {bits!r}")
    return bits


def code_bytes(numel: int, bits: int, version: int = FORMAT_VERSION) -> int:
    """Bytes that `numel` codes of `bits` bits take in a packed file of format `version`:
    ceil(numel * bits / 8) (version 3); version 2 rounded 3 bits up to 4 and 5..7 up to 8."""
    check_code_bits(bits)
    if version == 2:
        return math.ceil(numel / _v2_codes_per_byte(bits))
    return math.ceil(numel * bits / 8)


# Codes are packed 8 at a time: 8 codes of `bits` bits are exactly `bits` bytes, assembled in
# one int64 (at most 56 bits used below 8 bits). Work goes in chunks of this many codes, to
# bound the temporary int64 tensors (8 bytes per code) on large models.
_CHUNK = 1 << 21


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes (< 2^bits) into a dense 1-D uint8 bit stream: code i occupies stream
    bits [i * bits, (i + 1) * bits), low bit first, stream bit k being bit k % 8 of byte
    k // 8; ceil(numel * bits / 8) bytes, the last one zero-padded. (For 2, 4 and 8 bits this
    is also the byte layout of format version 2.)"""
    check_code_bits(bits)
    if codes.dtype != torch.uint8:
        raise ValueError(f"codes must be uint8, got {codes.dtype}")
    flat = codes.detach().cpu().reshape(-1)
    if flat.numel() and int(flat.max()) >= 2**bits:
        raise ValueError(f"code {int(flat.max())} does not fit in {bits} bits")
    if bits == 8:
        return flat.clone()
    n = flat.numel()
    shifts = torch.arange(8, dtype=torch.int64) * bits
    byte_shifts = torch.arange(bits, dtype=torch.int64) * 8
    parts = []
    for start in range(0, n, _CHUNK):
        part = flat[start : start + _CHUNK].to(torch.int64)
        part = torch.cat([part, part.new_zeros((-part.numel()) % 8)]).reshape(-1, 8)
        words = (part << shifts).sum(dim=1)  # the 8 codes' 8 * bits bits, code 0 lowest
        parts.append(((words[:, None] >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1))
    out = torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8)
    return out[: code_bytes(n, bits)].clone()  # the bytes cut off held only padding zeros


def unpack_codes(packed: torch.Tensor, bits: int, numel: int, version: int = FORMAT_VERSION) -> torch.Tensor:
    """Inverse of `pack_codes`: the first `numel` codes as a 1-D uint8 tensor. `version=2`
    reads the layout of format version 2 (codes 4, 2 or 1 per byte)."""
    check_code_bits(bits)
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError("packed codes must be a 1-D uint8 tensor")
    if packed.numel() != code_bytes(numel, bits, version):
        raise ValueError(f"{packed.numel()} bytes cannot hold exactly {numel} {bits}-bit codes")
    if version == 2:
        return _unpack_v2(packed, bits, numel)
    if bits == 8:
        return packed.clone()
    shifts = torch.arange(8, dtype=torch.int64) * bits
    byte_shifts = torch.arange(bits, dtype=torch.int64) * 8
    mask = 2**bits - 1
    chunk_bytes = _CHUNK // 8 * bits  # whole groups of 8 codes
    parts = []
    for start in range(0, packed.numel(), chunk_bytes):
        part = packed[start : start + chunk_bytes].to(torch.int64)
        part = torch.cat([part, part.new_zeros((-part.numel()) % bits)]).reshape(-1, bits)
        words = (part << byte_shifts).sum(dim=1)
        parts.append(((words[:, None] >> shifts) & mask).to(torch.uint8).reshape(-1))
    out = torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8)
    return out[:numel].clone()


def _v2_codes_per_byte(bits: int) -> int:
    """Format version 2 packed 4 (bits <= 2), 2 (bits <= 4) or 1 code per byte."""
    return 4 if bits <= 2 else 2 if bits <= 4 else 1


def _unpack_v2(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    per_byte = _v2_codes_per_byte(bits)
    if per_byte == 1:
        return packed.clone()
    width = 8 // per_byte
    shifts = torch.arange(per_byte, dtype=torch.int16) * width
    values = (packed.to(torch.int16)[:, None] >> shifts) & (2**width - 1)
    return values.reshape(-1)[:numel].to(torch.uint8)


def _packed_in_model_order(
    state: dict[str, torch.Tensor], packed: dict[str, QuantizedTensor]
) -> list[tuple[str, QuantizedTensor]]:
    """The entries of `packed`, checked against `state`, sorted by state-dict position."""
    position = {key: i for i, key in enumerate(state)}
    for name, qt in packed.items():
        key = f"{name}.weight"
        if key not in state:
            raise ValueError(f"{key} is not in the model's state dict")
        if tuple(state[key].shape) != tuple(qt.shape):
            raise ValueError(f"{key}: shape {tuple(state[key].shape)} != quantized {qt.shape}")
        if tuple(qt.codes.shape) != tuple(qt.shape):
            raise ValueError(f"{key}: codes shape {tuple(qt.codes.shape)} != {qt.shape}")
        channels = qt.n_grids  # output channels, times groups for a grouped layer
        if qt.scale.numel() != channels or (not qt.symmetric and qt.zero.numel() != channels):
            raise ValueError(f"{key}: scale and zero point need {channels} values each")
    return sorted(packed.items(), key=lambda item: position[f"{item[0]}.weight"])


def packed_entries(
    state: dict[str, torch.Tensor], packed: dict[str, QuantizedTensor], half: Iterable[str] = ()
) -> tuple[list[Entry], dict[str, str]]:
    """The tensors of a packed file for a state dict (see `save_packed`), as streamed entries:
    each one's data is produced when it is written, one layer at a time, so writing the file
    holds one layer's packed codes, never a copy of the model. Every check (shapes, float16-exact
    biases and float16 layers) runs here, before anything is written."""
    half = list(half)
    order = _packed_in_model_order(state, packed)
    layers: list[list] = []
    owned: set[str] = set()
    code_bytes_total = grids_total = zeros_total = bias_total = 0
    with_bias = []
    for name, qt in order:
        owned.add(f"{name}.weight")
        bias = state.get(f"{name}.bias")
        if bias is not None:
            if tuple(bias.shape) != (qt.shape[0],):
                raise ValueError(f"{name}.bias: shape {tuple(bias.shape)} != ({qt.shape[0]},)")
            _fp16_exact(f"{name}.bias", bias)
            owned.add(f"{name}.bias")
            with_bias.append(name)
            bias_total += qt.shape[0]
        code_bytes_total += code_bytes(math.prod(qt.shape), qt.bits)
        grids_total += qt.n_grids
        zeros_total += 0 if qt.symmetric else qt.n_grids
        grouped = [qt.group_size] if qt.group_size is not None else []
        layers.append([name, qt.bits, int(qt.symmetric), list(qt.shape), int(bias is not None), *grouped])

    def codes():
        for _, qt in order:
            yield pack_codes(qt.codes, qt.bits)

    def scales():
        for _, qt in order:
            yield qt.scale.detach().cpu().to(torch.float16).reshape(-1)

    def zeros():
        for _, qt in order:
            if not qt.symmetric:
                yield qt.zero.detach().cpu().to(torch.uint8).reshape(-1)

    def biases():
        for name in with_bias:
            yield state[f"{name}.bias"].detach().cpu().to(torch.float16)

    entries: list[Entry] = []
    for key, total, dtype, chunks in ((CODES, code_bytes_total, torch.uint8, codes),
                                      (SCALES, grids_total, torch.float16, scales),
                                      (ZEROS, zeros_total, torch.uint8, zeros),
                                      (BIASES, bias_total, torch.float16, biases)):
        if total:
            entries.append(Entry(key, dtype, (total,), chunks))
    for name in half:
        if name in packed or f"{name}.weight" not in state:
            raise ValueError(f"{name}: a float16 layer must be in the state dict and not packed")
        for key in (f"{name}.weight", f"{name}.bias"):
            if key in state:
                _fp16_exact(key, state[key])
                entries.append(tensor_entry(key, state[key], torch.float16))
                owned.add(key)
    for key, t in state.items():
        if key in owned:
            continue
        if key in QUANT_KEYS:
            raise ValueError(f"state dict key {key} collides with a packed tensor name")
        entries.append(tensor_entry(key, t, torch.float32 if t.is_floating_point() else None))
    info: dict = {"version": FORMAT_VERSION, "layers": layers}
    if half:
        info["half"] = sorted(half)
    return entries, {META_KEY: json.dumps(info, separators=(",", ":"))}


def packed_file(
    state: dict[str, torch.Tensor], packed: dict[str, QuantizedTensor], half: Iterable[str] = ()
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a packed file, in memory (small models and tests only:
    `save_packed` streams the same tensors)."""
    entries, meta = packed_entries(state, packed, half)
    tensors = {e.name: torch.cat([p.reshape(-1) for p in e.chunks()] or [torch.empty(0, dtype=e.dtype)]
                                 ).reshape(e.shape) for e in entries}
    return tensors, meta


def _fp16_exact(key: str, t: torch.Tensor) -> torch.Tensor:
    """`t` as a CPU float16 tensor; ValueError if that would change a value."""
    t = t.detach().cpu()
    t16 = t.to(torch.float16)
    if not torch.equal(t16.to(t.dtype), t):
        raise ValueError(
            f"{key} is not float16-exact; quantize_ rounds the tensors it stores as float16 "
            "(weights of float16 layers, biases of quantized layers)"
        )
    return t16


def save_packed(
    path: str | Path, model: nn.Module, packed: dict[str, QuantizedTensor], half: Iterable[str] = ()
) -> int:
    """Write `model` with the layers in `packed` stored as low-bit codes and the layers named
    in `half` as float16 tensors; return bytes on disk.

    The biases of the packed layers, and the weights and biases of the `half` layers, are
    stored as float16, so they must already be float16 values (as `quantize_` leaves them);
    a tensor that is not raises ValueError rather than being silently rounded. The file is
    streamed layer by layer (`engine.quant.safetensors_stream`): no copy of the model is made.
    """
    entries, meta = packed_entries(model.state_dict(), packed, half)
    return stream_write(path, entries, meta)


def packed_nbytes(
    state: dict[str, torch.Tensor], packed: dict[str, QuantizedTensor], half: Iterable[str] = ()
) -> int:
    """The exact size in bytes of the file `save_packed` writes for this state, from shapes
    alone (nothing is packed or copied)."""
    entries, meta = packed_entries(state, packed, half)
    return file_size(entries, meta)


def _version(info: object) -> int:
    """The format version of the "qtui_quant" metadata, if this module reads it."""
    version = info.get("version") if isinstance(info, dict) else None
    if type(version) is not int or version not in READABLE_VERSIONS:
        readable = " or ".join(str(v) for v in READABLE_VERSIONS)
        raise ValueError(f"unsupported packed format version {version!r} (expected {readable})")
    return version


def _parse_layers(info: object) -> list[tuple[str, int, bool, tuple[int, ...], bool, int | None]]:
    """Validate the "qtui_quant" metadata and return its layers as typed tuples."""
    _version(info)
    layers = []
    for entry in info.get("layers", []):
        try:
            name, bits, symmetric, shape, has_bias, *grouped = entry
            group = grouped[0] if grouped else None
            ok = (
                len(grouped) <= 1
                and (group is None or (type(group) is int and group > 0 and len(shape) == 2
                                       and shape[1] % group == 0))
                and
                isinstance(name, str)
                and type(bits) is int
                and symmetric in (0, 1)
                and has_bias in (0, 1)
                and isinstance(shape, list)
                and len(shape) >= 1
                and all(type(d) is int and d > 0 for d in shape)
            )
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"malformed packed layer entry {entry!r}")
        check_code_bits(bits)
        layers.append((name, bits, bool(symmetric), tuple(shape), bool(has_bias), group))
    return layers


def _parse_half(info: dict) -> list[str]:
    """The names of the float16 layers in the "qtui_quant" metadata (none if absent)."""
    half = info.get("half", [])
    if not isinstance(half, list) or not all(isinstance(name, str) for name in half):
        raise ValueError(f"malformed list of float16 layers {half!r}")
    return half


class _Reader:
    """Hands out consecutive slices of one concatenated tensor of the file, reading only the
    slice asked for; its length was checked against the metadata before any is read."""

    def __init__(self, key: str, handle, numel: int, dtype: torch.dtype) -> None:
        self.key, self.handle, self.numel, self.dtype, self.pos = key, handle, numel, dtype, 0

    def take(self, n: int) -> torch.Tensor:
        if self.pos + n > self.numel:
            raise ValueError(f"{self.key} is too short for the layers in the metadata")
        self.pos += n
        if self.handle is None:
            return torch.empty(0, dtype=self.dtype)
        return self.handle.get_slice(self.key)[self.pos - n : self.pos]


def load_packed(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a `save_packed` file back as a float32 state dict, quantized weights dequantized.

    Quantized weights come back as `dequantize` computes them and their biases as the stored
    float16 values in float32; integer buffers keep their dtype. A file without quantization
    metadata (e.g. from `save_dense`) loads as a plain state dict. A damaged file (truncated,
    garbage header, missing tensors, metadata that does not match them) raises
    `engine.errors.DamagedFile` naming the file and what is wrong. This holds the whole model
    in float32: to load a large model, stream `iter_packed` into it (`load_packed_into`).
    """
    return read_packed(path)[0]


def load_packed_codes(path: str | Path) -> dict[str, QuantizedTensor]:
    """The quantized layers of a packed file as stored: codes, scales, zero points (what a
    requantization must reproduce); no float copy of the model is kept."""
    return {key.removesuffix(".weight"): qt for key, _, qt in iter_packed(path) if qt is not None}


class PackedState(Mapping):
    """A packed file's state dict (as `load_packed` gives it), read lazily: its keys come from
    the header, a plain tensor is read when asked for. What a method's `prepare_load` needs (which
    buffers the checkpoint holds, and their small values) without loading the model twice."""

    def __init__(self, path: str | Path):
        from engine.errors import DamagedFile
        from engine.file_checks import check_safetensors

        self.path = Path(path)
        header = check_safetensors(path)
        meta = header.get("__metadata__") or {}
        try:
            info = json.loads(meta[META_KEY]) if META_KEY in meta else None
            layers = _parse_layers(info) if info is not None else []
        except (ValueError, TypeError, AttributeError) as exc:
            raise DamagedFile(path, f"not a valid packed checkpoint: {exc}") from None
        quant = set(QUANT_KEYS) if info is not None else set()
        self._plain = [k for k in header if k != "__metadata__" and k not in quant]
        self._layers = [f"{name}.{part}" for name, _, _, _, has_bias, _ in layers
                        for part in (("weight", "bias") if has_bias else ("weight",))]

    def __iter__(self):
        return iter(self._plain + self._layers)

    def __len__(self) -> int:
        return len(self._plain) + len(self._layers)

    def __contains__(self, key) -> bool:
        return key in self._plain or key in self._layers

    def __getitem__(self, key: str) -> torch.Tensor:
        if key in self._plain:
            with safe_open(str(self.path), framework="pt", device="cpu") as f:
                t = f.get_tensor(key)
            return t.float() if t.is_floating_point() else t
        for name, value, _ in iter_packed(self.path):  # a quantized layer: rarely asked for
            if name == key:
                return value
        raise KeyError(key)


def read_packed(path: str | Path, keep_codes: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, QuantizedTensor]]:
    """(`load_packed`'s state dict, the QuantizedTensor of each layer if `keep_codes`)."""
    state, quantized = {}, {}
    for key, value, qt in iter_packed(path):
        state[key] = value
        if keep_codes and qt is not None:
            quantized[key.removesuffix(".weight")] = qt
    return state, quantized


def iter_packed(path: str | Path) -> Iterator[tuple[str, torch.Tensor, QuantizedTensor | None]]:
    """The tensors of a packed file one at a time, as `load_packed` gives them (float32,
    quantized weights dequantized), each with its QuantizedTensor (None for plain tensors).
    Only one tensor (one layer's slice of the concatenated codes) is read at a time. The file is
    checked whole before the first tensor is yielded (`engine.errors.DamagedFile`)."""
    from safetensors import SafetensorError

    from engine.errors import DamagedFile
    from engine.file_checks import check_safetensors

    header = check_safetensors(path)
    try:
        yield from _iter_packed(path, header)
    except (ValueError, KeyError, TypeError, AttributeError, SafetensorError) as exc:
        raise DamagedFile(path, f"not a valid packed checkpoint: {exc}") from None


def _numel(header: dict, key: str) -> int:
    return math.prod(header[key]["shape"]) if key in header else 0


def _iter_packed(path, header: dict):
    from engine.file_checks import require_tensors

    meta = header.get("__metadata__") or {}
    info = json.loads(meta[META_KEY]) if META_KEY in meta else None
    layers = _parse_layers(info) if info is not None else []
    version = _version(info) if info is not None else FORMAT_VERSION
    quant_keys = set(QUANT_KEYS) if info is not None else set()
    if info is not None:
        needed = [CODES, SCALES] if layers else []
        needed += [ZEROS] if any(not sym for _, _, sym, _, _, _ in layers) else []
        needed += [BIASES] if any(has_bias for *_, has_bias, _ in layers) else []
        require_tensors(path, header, needed, f" (the metadata lists {len(layers)} quantized layers)")
        _check_totals(header, layers, version)
        for name in _parse_half(info):
            if header.get(f"{name}.weight", {}).get("dtype") != "F16":
                raise ValueError(f"{name} is listed as float16 but {name}.weight is not stored as float16")
    owned = {f"{name}.{part}" for name, *_, has_bias, _ in layers for part in ("weight", "bias")[: 1 + has_bias]}
    with safe_open(str(path), framework="pt", device="cpu") as f:
        for key in f.keys():
            if key in quant_keys:
                continue
            if key in owned:
                raise ValueError(f"{key} is stored both packed and as a plain tensor")
            t = f.get_tensor(key)
            yield key, (t.float() if t.is_floating_point() else t), None
        readers = {}
        for key, dtype in QUANT_KEYS.items():
            if key in header and header[key]["dtype"] != _DTYPE_NAMES[dtype]:
                raise ValueError(f"{key} has dtype {header[key]['dtype']}, expected {_DTYPE_NAMES[dtype]}")
            readers[key] = _Reader(key, f if key in header else None, _numel(header, key), dtype)
        for name, bits, symmetric, shape, has_bias, group in layers:
            channels, numel = shape[0], math.prod(shape)
            grids = channels * (shape[1] // group) if group else channels
            codes = unpack_codes(readers[CODES].take(code_bytes(numel, bits, version)), bits, numel, version)
            scale = readers[SCALES].take(grids)
            zero = (torch.full((grids,), 2 ** (bits - 1), dtype=torch.uint8) if symmetric
                    else readers[ZEROS].take(grids))
            qt = QuantizedTensor(codes.reshape(shape), scale, zero, bits, symmetric, shape, group)
            yield f"{name}.weight", dequantize(qt), qt
            if has_bias:
                yield f"{name}.bias", readers[BIASES].take(channels).float(), None


_DTYPE_NAMES = {torch.uint8: "U8", torch.float16: "F16"}


def _check_totals(header: dict, layers, version: int) -> None:
    """The concatenated tensors hold exactly what the metadata's layers take."""
    totals = {CODES: 0, SCALES: 0, ZEROS: 0, BIASES: 0}
    for _, bits, symmetric, shape, has_bias, group in layers:
        grids = shape[0] * (shape[1] // group) if group else shape[0]
        totals[CODES] += code_bytes(math.prod(shape), bits, version)
        totals[SCALES] += grids
        totals[ZEROS] += 0 if symmetric else grids
        totals[BIASES] += shape[0] if has_bias else 0
    for key, total in totals.items():
        have = _numel(header, key)
        if have < total:
            raise ValueError(f"{key} is too short for the layers in the metadata")
        if have > total:
            raise ValueError(f"{key} has {have - total} unused values")


def load_packed_into(module: nn.Module, path: str | Path, expect_equal: bool = False) -> None:
    """Load a packed file into `module` in place, one tensor at a time, casting each to the
    parameter's dtype: no float32 copy of the model is made. Strict, as `load_state_dict`: the
    file's keys must be exactly the module's state-dict keys, checked before anything is copied
    (RuntimeError naming the missing and unexpected keys). With `expect_equal`, each tensor must
    already equal the module's (the simulated quantized model the file was written from)."""
    state = module.state_dict(keep_vars=True)
    keys = set(PackedState(path))
    missing, unexpected = sorted(set(state) - keys), sorted(keys - set(state))
    if missing or unexpected:
        shown = lambda names: ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        parts = ([f"Missing key(s) in state_dict: {shown(missing)}"] if missing else []) + \
                ([f"Unexpected key(s) in state_dict: {shown(unexpected)}"] if unexpected else [])
        raise RuntimeError(f"{path}: " + "; ".join(parts))
    for key, value, _ in iter_packed(path):
        target = state[key]
        if tuple(value.shape) != tuple(target.shape):
            raise RuntimeError(f"{path}: {key} has shape {tuple(value.shape)}, the model's is {tuple(target.shape)}")
        value = value.to(target.dtype)
        if expect_equal and not torch.equal(value.to(target.device), target.detach()):
            raise RuntimeError(f"{path}: {key} differs from the simulated quantized weight")
        with torch.no_grad():
            target.data.copy_(value)


def packed_breakdown(path: str | Path) -> dict[str, int]:
    """Bytes of a safetensors file by part: header (length prefix, JSON and padding), codes,
    scales, zeros, biases (the `quant.*` tensors) and other (every other tensor). Sums to the
    file size."""
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        header_len = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(header_len))
    parts = {"header": 8 + header_len, "codes": 0, "scales": 0, "zeros": 0, "biases": 0, "other": 0}
    names = {CODES: "codes", SCALES: "scales", ZEROS: "zeros", BIASES: "biases"}
    for key, entry in header.items():
        if key != "__metadata__":
            start, stop = entry["data_offsets"]
            parts[names.get(key, "other")] += stop - start
    gap = size - sum(parts.values())  # bytes not covered by any tensor (none in practice)
    parts["other"] += gap
    return parts


def bits_per_weight(path: str | Path) -> float | None:
    """Real stored bits per weight of the quantized layers of a packed file: 8 x the bytes of
    `quant.codes`, `quant.scales` and `quant.zeros` (codes with each layer's padding to a
    whole byte, scales and zero points) over the number of weights of those layers. Biases,
    float16 and full-precision layers and the file header are not counted (they are in
    `size_bytes`). None when the file holds no quantized layer."""
    with safe_open(str(path), framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
    if META_KEY not in meta:
        return None
    layers = _parse_layers(json.loads(meta[META_KEY]))
    weights = sum(math.prod(shape) for _, _, _, shape, _, _ in layers)
    if weights == 0:
        return None
    parts = packed_breakdown(path)
    return 8 * (parts["codes"] + parts["scales"] + parts["zeros"]) / weights


def save_dense(path: str | Path, model: nn.Module, dtype: torch.dtype = torch.float32) -> int:
    """Write the plain state dict with floating tensors in `dtype`; return bytes on disk."""
    if dtype not in (torch.float32, torch.float16):
        raise ValueError(f"dtype must be torch.float32 or torch.float16, got {dtype}")
    return stream_write(path, state_entries(model.state_dict(), dtype))
