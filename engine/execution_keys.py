"""A variant's execution keys, checked torch-free when the catalogue loads:

    execution = "simulated"   (default) quantized weights dequantized to FP32 once, FP32 kernels
    execution = "real"        the quantized layers keep their codes in memory (int8, or int4 two
                              per byte) with float16 scales and are dequantized one layer at a
                              time inside forward (engine.quant.lowbit); method "ptq" runs its
                              int8 graph compiled by torch.compile (X86 int8 kernels)
    autocast = "bf16"         sample under torch.autocast in bfloat16 (CPU and CUDA);
               "fp16"         float16 autocast, CUDA only

The device is probed without importing torch (`run_device`): a machine with an NVIDIA driver
runs models on CUDA (as `engine.models.loader.default_device` does when torch sees the GPU).
"""

from __future__ import annotations

import os
import platform

from engine.methods.base import BadKey

EXECUTIONS = ("simulated", "real")
AUTOCASTS = ("bf16", "fp16")
REAL_BITS = (4, 8)  # code widths the low-bit modules hold (engine.quant.lowbit.codes)
X86 = ("x86_64", "amd64", "i386", "i686")


def run_device() -> str:
    """"cuda" when an NVIDIA driver is loaded (the loader then picks the GPU), else "cpu"."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return "cpu"
    return "cuda" if os.path.exists("/proc/driver/nvidia/version") else "cpu"


def cpu_arch() -> str:
    return platform.machine().lower()


def _weight_bits(method: str, params: dict) -> list[int]:
    bits = params.get("bits")
    if isinstance(bits, dict):
        return sorted(set(bits.values()))
    return [bits] if isinstance(bits, int) else []


def validate_execution(method: str, params: dict, execution, autocast) -> tuple[str, str | None]:
    """(execution, autocast), or BadKey naming the key."""
    execution = "simulated" if execution is None else execution
    if execution not in EXECUTIONS:
        raise BadKey("execution", f"must be one of {', '.join(EXECUTIONS)}, got {execution!r}")
    if autocast is not None and autocast not in AUTOCASTS:
        raise BadKey("autocast", f"must be one of {', '.join(AUTOCASTS)} (or left out), got {autocast!r}")
    device = run_device()
    if method == "ptq":
        if device != "cpu" or cpu_arch() not in X86:
            raise BadKey("method", f"'ptq' quantizes for PyTorch's X86 int8 CPU kernels (X86InductorQuantizer); "
                                   f"this machine runs models on {device} ({cpu_arch()}), which cannot run them")
        if autocast is not None:
            raise BadKey("autocast", "method 'ptq' runs an int8 graph; autocast does not apply")
    elif execution == "real":
        if method == "none":
            raise BadKey("execution", "'real' needs quantized weights; method 'none' has none")
        for bits in _weight_bits(method, params):
            if bits not in REAL_BITS:
                raise BadKey("bits", f"execution = 'real' holds {' or '.join(map(str, REAL_BITS))}-bit codes; "
                                     f"{bits} bits run only with execution = 'simulated'")
    if autocast == "fp16" and device != "cuda":
        raise BadKey("autocast", "'fp16' autocast needs a CUDA device and this machine has none; use 'bf16' on CPU")
    return execution, autocast
