"""The worker's own peak memory over the whole run (`run_peak_mem_mb`, and `run_peak_gpu_mem_mb` on
CUDA), beside the sampling phase's peak that `engine.execution` measures.

The kernel keeps one high-water mark of the resident set (VmHWM; getrusage's ru_maxrss reads the
same mark), and the sampling measurement resets it; CUDA's allocator likewise keeps one peak that
the sampling measurement resets. So every reset goes through here: the peak reached before it is
remembered first, and the run's peak is the largest of those and the current mark. A worker runs
one run, so its process's life is the run's (loading, calibration, quantization, checkpoint,
sampling, metrics).
"""

from __future__ import annotations

import resource

_before_resets = {"rss_kib": 0, "gpu_bytes": 0}


def status_kib(field_name: str) -> int | None:
    """A `/proc/self/status` field in KiB (VmRSS, VmHWM), or None where it cannot be read."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _rss_peak_kib() -> int:
    hwm = status_kib("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def reset_rss_peak() -> bool:
    """Remember the peak so far, then reset the kernel's high-water mark to the current resident
    size (write 5 to /proc/self/clear_refs); False where that cannot be written."""
    _before_resets["rss_kib"] = max(_before_resets["rss_kib"], _rss_peak_kib())
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def reset_gpu_peak(device) -> None:
    import torch

    _before_resets["gpu_bytes"] = max(_before_resets["gpu_bytes"], torch.cuda.max_memory_allocated(device))
    torch.cuda.reset_peak_memory_stats(device)


def run_peak(device) -> dict[str, float]:
    """`run_peak_mem_mb`: the process's peak resident set so far, in MiB; on CUDA also
    `run_peak_gpu_mem_mb`, the allocator's peak so far."""
    out = {"run_peak_mem_mb": max(_before_resets["rss_kib"], _rss_peak_kib()) / 1024}
    if getattr(device, "type", str(device)) == "cuda":
        import torch

        peak = max(_before_resets["gpu_bytes"], torch.cuda.max_memory_allocated(device))
        out["run_peak_gpu_mem_mb"] = peak / 2**20
    return out
