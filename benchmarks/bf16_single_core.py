"""Single-core CPU seconds per forward pass or training step: JAX float32/bfloat16 against torch.

For a machine shared with other work, where wall-clock ratios against torch mean little (torch's
OpenMP threads lose far more to a busy core than XLA's pool): run it pinned to one core, e.g.

    taskset -c 0 python benchmarks/bf16_single_core.py ir_csn_152 --rounds 5
    taskset -c 0 python benchmarks/bf16_single_core.py ir_csn_152 --train --sides jax:bfloat16 torch:bfloat16

torch runs one thread; each contender is timed by `time.process_time()` (the process's CPU seconds),
interleaved, medians. Forward contenders are `vmz_jax.bench`'s (JAX float32 and bfloat16, the four
torch variants); training contenders are `vmz_jax.bench_train`'s steps (torch under bfloat16 autocast
for "torch:bfloat16"), after `reuse_host_memory` as `vmz-jax bench --train` runs them.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import torch

from vmz_jax import bench, bench_train
from vmz_jax.runtime import reuse_host_memory


def _medians(fns: dict[str, Callable[[], Any]], rounds: int, warmup: int) -> dict[str, float]:
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.process_time()
            fn()
            times[name].append(time.process_time() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("arch")
    parser.add_argument("--shape", default="2,8,112,112", help="N,T,H,W")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--train", action="store_true", help="time training steps instead of forwards")
    parser.add_argument("--sides", nargs="+", default=["jax:bfloat16", "torch:bfloat16"],
                        help="--train contenders, SIDE:DTYPE with SIDE jax or torch")
    args = parser.parse_args()
    torch.set_num_threads(1)
    shape = tuple(int(v) for v in args.shape.split(","))
    if args.train:
        reuse_host_memory()
        fns: dict[str, Callable[[], Any]] = {}
        for spec in args.sides:
            side, dtype = spec.split(":")
            fns[spec] = (bench_train.jax_step(args.arch, shape, dtype=dtype) if side == "jax"
                         else bench_train.torch_step(args.arch, shape, dtype))
        medians = _medians(fns, args.rounds, warmup=2)
        print(args.arch, "training step, CPU s:", " | ".join(f"{k} {v:.3f}" for k, v in medians.items()))
        return
    clips = (*shape, 3)
    fns = {"jax float32": bench.jax_forward(args.arch, clips)[0],
           "jax bfloat16": bench.jax_forward(args.arch, clips, dtype=jnp.bfloat16)[0]}
    torch_fns, gflop = bench.torch_forwards(args.arch, clips, tuple(bench.TORCH_VARIANTS))
    fns.update({f"torch {k}": v for k, v in torch_fns.items()})
    medians = _medians(fns, args.rounds, warmup=1)
    rate = (lambda s: f" ({gflop / s:.0f} GFLOP/s)") if gflop else (lambda s: "")
    print(args.arch, "forward, CPU s:", " | ".join(f"{k} {v:.3f}{rate(v)}" for k, v in medians.items()))


if __name__ == "__main__":
    main()
