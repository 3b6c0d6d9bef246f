"""The run's peak memory survives the sampling measurement's reset of the kernel's mark."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_the_run_peak_keeps_what_came_before_a_reset():
    # in a fresh process: the peak of this one (pytest's) is not what is measured
    code = textwrap.dedent("""
        import numpy as np
        from engine.run_memory import reset_rss_peak, run_peak, status_kib
        base = status_kib("VmRSS")
        block = np.ones(300 * 2**20 // 8)  # 300 MiB, touched
        del block
        if not reset_rss_peak():
            print("skip"); raise SystemExit
        after_reset = status_kib("VmHWM")
        print(base / 1024, after_reset / 1024, run_peak("cpu")["run_peak_mem_mb"])
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    if out == ["skip"]:
        import pytest

        pytest.skip("/proc/self/clear_refs cannot be written here")
    base, after_reset, peak = map(float, out)
    assert after_reset < base + 150  # the mark was reset: the 300 MiB block is gone from it
    assert peak >= base + 290  # the run's peak still holds it
