"""Checks of the files a run folder holds, before any library reads them.

A damaged file (truncated by a full disk or a killed copy, a byte flipped, another file in its
place) must give one line naming the file and what is wrong (`engine.errors.DamagedFile`), not
a panic from safetensors' Rust code or a numpy traceback. Torch-free.

- `check_safetensors(path)`: the header of a safetensors file, checked by hand: an 8-byte
  little-endian header length, that many bytes of JSON, every tensor with a known dtype, a
  shape and `data_offsets` whose byte range holds exactly dtype x shape, the ranges contiguous
  from 0 and ending at the end of the file. Returns the parsed header.
- `check_npz(path, required)`: an .npz (a zip of .npy files, each with a CRC-32) read in full,
  so a flipped byte anywhere shows as a CRC error; `required` arrays must be present.
- `fingerprint(path)`: size and sha256, as `Store.add_artifact` records them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import zipfile
import zlib
from pathlib import Path

from engine.errors import DamagedFile

# bytes per element of each safetensors dtype
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
               "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header


def check_safetensors(path: str | Path) -> dict:
    """The header of a safetensors file (tensor name -> entry, and "__metadata__"), or
    DamagedFile saying what is wrong with it (see the module docstring)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise DamagedFile(path, f"truncated: {size} bytes, not even the 8-byte header length")
            header_len = int.from_bytes(prefix, "little")
            if header_len > MAX_HEADER:
                raise DamagedFile(path, f"not a safetensors file (its first 8 bytes give a header of {header_len} bytes)")
            if 8 + header_len > size:
                raise DamagedFile(path, f"truncated: the header says it is {header_len} bytes, the file has "
                                        f"{size - 8} after the length")
            raw = f.read(header_len)
    except OSError as exc:
        raise DamagedFile(path, f"cannot be read ({exc.strerror or exc})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DamagedFile(path, f"garbage header: not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise DamagedFile(path, "garbage header: not a JSON object")
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise DamagedFile(path, "garbage header: __metadata__ is not a table of strings")
    ranges = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        ranges.append((*_tensor_range(path, name, entry), name))
    data = size - 8 - header_len
    end = 0
    for start, stop, name in sorted(ranges):
        if start != end:
            what = "overlaps the tensor before it" if start < end else f"leaves {start - end} bytes unused before it"
            raise DamagedFile(path, f"tensor {name}: its byte range [{start}, {stop}) {what}")
        end = stop
    if end > data:
        raise DamagedFile(path, f"truncated: header says {end} bytes of tensors, file has {data}")
    if end < data:
        raise DamagedFile(path, f"{data - end} bytes after the last tensor (header says {end} bytes of tensors)")
    return header


def _tensor_range(path: Path, name: str, entry: object) -> tuple[int, int]:
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
        raise DamagedFile(path, f"garbage header: tensor {name} has no dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPE_BYTES:
        raise DamagedFile(path, f"garbage header: tensor {name} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise DamagedFile(path, f"garbage header: tensor {name} has shape {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int and o >= 0 for o in offsets)
            or offsets[0] > offsets[1]):
        raise DamagedFile(path, f"garbage header: tensor {name} has data_offsets {offsets!r}")
    need = math.prod(shape) * DTYPE_BYTES[dtype]
    if offsets[1] - offsets[0] != need:
        raise DamagedFile(path, f"tensor {name}: dtype {dtype} x shape {shape} is {need} bytes, its byte range "
                                f"[{offsets[0]}, {offsets[1]}) holds {offsets[1] - offsets[0]}")
    return offsets[0], offsets[1]


def require_tensors(path: str | Path, header: dict, names, why: str = "") -> None:
    """DamagedFile if a tensor in `names` is not in the checked `header`."""
    missing = [n for n in names if n not in header or n == "__metadata__"]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise DamagedFile(path, f"missing tensor{'s' if len(missing) > 1 else ''} {shown}{why}")


def check_npz(path: str | Path, required=()) -> dict:
    """Every array of an .npz, read in full (zip CRC-32s checked), or DamagedFile. `required`:
    arrays that must be present."""
    import numpy as np

    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise DamagedFile(path, "missing") from None
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError, NotImplementedError, RuntimeError,
            zlib.error) as exc:  # a flipped bit can claim a zip version, encryption or a codec
        raise DamagedFile(path, f"damaged .npz ({_npz_problem(path, exc)})") from None
    missing = [k for k in required if k not in arrays]
    if missing:
        raise DamagedFile(path, f"missing array{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
    return arrays


def _npz_problem(path: Path, exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, zipfile.BadZipFile) and "CRC" not in text:
        return f"truncated or not a zip file: {text}"
    return text


def fingerprint(path: str | Path, chunk: int = 1 << 20) -> tuple[int, str]:
    """(size in bytes, sha256 hex) of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        while block := f.read(chunk):
            digest.update(block)
    return size, digest.hexdigest()
