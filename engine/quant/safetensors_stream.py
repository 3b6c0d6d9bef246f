"""A safetensors file written one tensor at a time, and its size counted from shapes alone.

`safetensors.torch.save_file` needs every tensor in memory at once, and counting a model's bytes
with `len(save(state))` serialises a full copy of it: SD 3.5 Medium's transformer is 9 GB in
float32. Here a file is described by `Entry` rows (name, dtype, shape, and a callable that
produces the tensor's bytes when its turn comes), the header is computed from the rows, and the
data is written entry by entry, so writing holds one tensor (or one chunk of a concatenated one)
at a time; `file_size` gives the exact size without producing any data.

The layout is the one the safetensors library writes (byte for byte, tested): entries sorted
by dtype, widest first (the library's order), then by name; the JSON header compact, with
`__metadata__` first, padded with spaces to a multiple of 8 bytes.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.atomic_files import atomic_path

# The library's dtype names, in its sort order (descending: written first).
DTYPE_NAMES = {
    torch.uint64: "U64", torch.int64: "I64", torch.float64: "F64", torch.float32: "F32",
    torch.uint32: "U32", torch.int32: "I32", torch.bfloat16: "BF16", torch.float16: "F16",
    torch.uint16: "U16", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}
_ORDER = {name: i for i, name in enumerate(DTYPE_NAMES.values())}

Chunks = Callable[[], Iterable[torch.Tensor]]  # the tensor's data, as consecutive flat pieces


@dataclass
class Entry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    chunks: Chunks | None = None  # None: the size is all that is asked for

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty(0, dtype=self.dtype).element_size()


def tensor_entry(name: str, tensor: torch.Tensor, dtype: torch.dtype | None = None) -> Entry:
    """An entry whose data is `tensor` (cast to `dtype` when given), produced when written."""
    dtype = dtype or tensor.dtype
    return Entry(name, dtype, tuple(tensor.shape), lambda: [tensor.detach().to("cpu", dtype)])


def _sorted(entries: list[Entry]) -> list[Entry]:
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise ValueError("two tensors of one safetensors file share a name")
    for e in entries:
        if e.dtype not in DTYPE_NAMES:
            raise ValueError(f"{e.name}: dtype {e.dtype} cannot be stored in safetensors")
    return sorted(entries, key=lambda e: (_ORDER[DTYPE_NAMES[e.dtype]], e.name))


def header_bytes(entries: list[Entry], metadata: dict[str, str] | None = None) -> tuple[bytes, list[Entry]]:
    """The length prefix and padded JSON header of a file of `entries`, and the entries in the
    order their data follows it."""
    ordered = _sorted(entries)
    header: dict = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for e in ordered:
        header[e.name] = {"dtype": DTYPE_NAMES[e.dtype], "shape": list(e.shape),
                          "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text, ordered


def file_size(entries: list[Entry], metadata: dict[str, str] | None = None) -> int:
    """The exact size of the file `write` would make, from names, dtypes and shapes alone."""
    prefix, ordered = header_bytes(entries, metadata)
    return len(prefix) + sum(e.nbytes for e in ordered)


def _raw(piece: torch.Tensor, entry: Entry) -> memoryview:
    if piece.dtype != entry.dtype:
        raise ValueError(f"{entry.name}: a piece of dtype {piece.dtype}, expected {entry.dtype}")
    flat = piece.detach().cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def write(path: str | Path, entries: list[Entry], metadata: dict[str, str] | None = None) -> int:
    """Write the file atomically (`atomic_path`: temporary file, fsync, rename), one piece at a time; checks that
    each entry produces exactly its declared bytes. Returns the size on disk."""
    prefix, ordered = header_bytes(entries, metadata)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(prefix)
        for e in ordered:
            written = 0
            for piece in _pieces(e):
                data = _raw(piece, e)
                fh.write(data)
                written += data.nbytes
            if written != e.nbytes:
                raise ValueError(f"{e.name}: produced {written} bytes, its shape {list(e.shape)} needs {e.nbytes}")
    return os.path.getsize(path)  # atomic_path flushed and fsynced it before the rename


def _pieces(entry: Entry) -> Iterator[torch.Tensor]:
    if entry.chunks is None:
        raise ValueError(f"{entry.name}: no data to write")
    yield from entry.chunks()


def state_entries(state: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> list[Entry]:
    """Entries of a state dict with floating tensors cast to `dtype` (None: as they are); tied
    tensors are written once per name, as `save_pretrained` writes them."""
    out = []
    for name, t in state.items():
        out.append(tensor_entry(name, t, dtype if (dtype is not None and t.is_floating_point()) else None))
    return out
