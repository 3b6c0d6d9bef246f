"""Cost and exactness of the paired FID bootstrap at Inception size.

Synthetic features: d = 2048, n = 5000 per run (run b is run a plus a small perturbation, as
two quantized variants sampled from the same noise), reference statistics from 5000 other
vectors, all with a decaying spectrum like Inception pool features. Target: 200 paired
resamples (400 FIDs against the fixed reference) in at most 60 s on 2 cores.

Measured side by side in one run:
- the paired bootstrap (`engine.metrics.paired.paired_fid`: one reference square root, then
  per resample and run `ResampledFID`: one syrk Gram matrix of the distinct rows and one
  symmetric eigenvalue problem),
  timed over `--resamples` resamples (default 200; fewer give a projection to 200 per resample);
- one direct FID (pytorch-fid's way: `feature_stats` + scipy `sqrtm`), for the ratio;
- exactness: the point difference and the first resample's difference against the direct
  computation (`feature_stats(x[idx])` + `frechet_distance`), relative error <= 1e-6.

    .venv/bin/python bench/bench_paired.py [--resamples 200] [--n 5000] [--d 2048]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from engine.metrics.fid import ReferenceSqrt, ResampledFID, feature_stats, frechet_distance
from engine.metrics.paired import bootstrap_resamples, paired_fid


def synthetic(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scales = 1.0 / np.sqrt(1.0 + np.arange(d))  # decaying spectrum
    basis, _ = np.linalg.qr(np.random.default_rng(12345).standard_normal((d, d)))
    return (rng.standard_normal((n, d)) * scales) @ basis.T + 0.1


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--resamples", type=int, default=200)
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--d", type=int, default=2048)
    args = parser.parse_args()
    n, d, k = args.n, args.d, args.resamples

    ref = feature_stats(synthetic(n, d, 0))
    a = synthetic(n, d, 1)
    b = a + 0.05 * synthetic(n, d, 2)
    counts = bootstrap_resamples(n, k, seed=0)

    start = time.perf_counter()
    direct_a = frechet_distance(feature_stats(a), ref)
    t_direct = time.perf_counter() - start
    direct_b = frechet_distance(feature_stats(b), ref)

    start = time.perf_counter()
    result = paired_fid(a, b, ref, counts)
    t_paired = time.perf_counter() - start

    # exactness of the point value and of one resample against the direct computation
    point_rel = abs(result.diff - (direct_a - direct_b)) / abs(direct_a - direct_b)
    root = ReferenceSqrt.of(ref)
    fast = ResampledFID(a, root)(counts[0]) - ResampledFID(b, root)(counts[0])
    rows = np.repeat(np.arange(n), counts[0])
    slow = frechet_distance(feature_stats(a[rows]), ref) - frechet_distance(feature_stats(b[rows]), ref)
    resample_rel = abs(fast - slow) / abs(slow)

    per = t_paired / k  # includes the two point FIDs and one reference square root
    print(f"d={d} n={n}: FID(a) - FID(b) = {result.diff:.6f} [{result.low:.6f}, {result.high:.6f}] ({k} resamples)")
    print(f"one direct FID (sqrtm): {t_direct:.1f} s")
    print(f"paired bootstrap, {k} resamples: {t_paired:.1f} s = {t_paired / t_direct:.1f} direct FIDs "
          f"({per:.2f} s per resample; 200 resamples: {per * 200:.0f} s, target 60 s)")
    print(f"relative error vs direct: point {point_rel:.2e}, first resample {resample_rel:.2e} (target 1e-6)")
    ok = point_rel <= 1e-6 and resample_rel <= 1e-6
    print("exactness:", "OK" if ok else "FAILED", "| time:", "OK" if per * 200 <= 60 else "MISSED")


if __name__ == "__main__":
    main()
