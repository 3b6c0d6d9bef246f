"""GPTQ with lazy batch updates vs column by column, and Hessian accumulation cost per token.

For square Linear layers of each width, the same GPTQ object (same Hessian) is quantized with
lazy batch updates (blocks of --block columns) and column by column (`lazy=False`), alternating
the two in each round; the median of each is compared. Target: the lazy version is faster from
width 1024 on. Both timings include the shared float64 Cholesky inversion, which is reported
separately. Hessian accumulation is timed as `add_batch` over --tokens tokens in batches of 512.

    .venv/bin/python bench/bench_gptq.py [--widths 256 512 1024 2048] [--rounds 3] [--tokens 4096] [--threads N]

On a machine shared with other jobs, 2 threads can be much slower than 1 for small widths
(thread synchronisation with a busy core); `--threads 1` shows the single-core cost.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from engine.quant.gptq import GPTQ

BATCH = 512


def calibration(tokens: int, width: int, gen: torch.Generator) -> torch.Tensor:
    """Correlated inputs: independent noise plus a shared rank-16 component."""
    return torch.randn(tokens, width, generator=gen) + torch.randn(tokens, 16, generator=gen) @ (
        torch.randn(16, width, generator=gen))


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--widths", type=int, nargs="+", default=[256, 512, 1024, 2048])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group", type=int, default=128)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own)")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    warm = GPTQ(nn.Linear(64, 64))  # first-call overheads out of the first width's timings
    warm.add_batch(calibration(BATCH, 64, gen))
    warm.quantize(args.bits)
    print(f"W{args.bits}, group {args.group}, act-order, block {args.block}, {args.rounds} alternating rounds, "
          f"{args.tokens} calibration tokens, {torch.get_num_threads()} threads")
    print(f"{'width':>6} {'H us/token':>11} {'inverse s':>10} {'lazy s':>8} {'column s':>9} "
          f"{'column/lazy':>12}  target")
    for width in args.widths:
        torch.manual_seed(width)
        layer = nn.Linear(width, width)
        x = calibration(args.tokens, width, gen)
        gptq = GPTQ(layer, f"linear{width}")
        h_time = sum(timed(lambda b=b: gptq.add_batch(b)) for b in x.split(BATCH))
        inverse = timed(lambda: gptq._inverse_factor(gptq.H, 0.01))
        opts = dict(bits=args.bits, group_size=min(args.group, width), act_order=True, block_size=args.block)
        lazy_times, column_times = [], []
        results = {}
        for _ in range(args.rounds):
            lazy_times.append(timed(lambda: results.__setitem__("lazy", gptq.quantize(**opts))))
            column_times.append(timed(lambda: results.__setitem__("col", gptq.quantize(**opts, lazy=False))))
        # Float rounding can flip a code that sits on a half-step boundary (then its row's
        # later compensations differ too): report how many, and the proxy losses.
        flips = (results["lazy"].codes != results["col"].codes).sum().item()
        if flips:
            rel = abs(results["lazy"].loss - results["col"].loss) / results["col"].loss
            print(f"  note: {flips} of {width * width} codes differ between lazy and column by column "
                  f"(float rounding); proxy losses differ by {rel:.1e} relative")
        lazy, column = statistics.median(lazy_times), statistics.median(column_times)
        ratio = column / lazy
        target = ("lazy faster " + ("PASS" if ratio > 1 else "FAIL")) if width >= 1024 else ""
        print(f"{width:>6} {h_time / args.tokens * 1e6:>11.2f} {inverse:>10.3f} {lazy:>8.3f} {column:>9.3f} "
              f"{ratio:>12.2f}  {target}")


if __name__ == "__main__":
    main()
