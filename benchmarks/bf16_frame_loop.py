"""The bfloat16 frame loop of large-frame spatial convolutions (`conv.frames_by_rows`): frames per
iteration, and the epilogue (BatchNorm shift, ReLU, cast to bfloat16) inside the loop or after it,
against XLA's convolution with either CPU library (YNNPACK, Eigen). Forward, wall clock, medians of
interleaved rounds; the layer is R(2+1)D's layer1 1x3x3 64->144 at 16x56x56 by default.

    python benchmarks/bf16_frame_loop.py [--rounds 9] [--frames 16] [--size 56] [--cin 64] [--cout 144]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vmz_jax.models import conv

EIGEN = conv._EIGEN_CONVOLUTIONS  # XLA convolutions on Eigen, dots on YNNPACK (conv.CPU_CONVOLUTIONS)


def contenders(n: int, size: int, cin: int, cout: int) -> tuple[dict[str, Any], tuple[Any, ...], float]:
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((n, size, size, cin)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((3, 3, cin, cout)) * 0.05, jnp.bfloat16)
    shift = jnp.asarray(rng.standard_normal(cout), jnp.float32)

    def epilogue(y: jax.Array) -> jax.Array:
        return jnp.maximum(y.astype(jnp.float32) + shift, 0).astype(jnp.bfloat16)

    def loop(step: int, inside: bool) -> Any:
        def run(x: jax.Array, w: jax.Array) -> jax.Array:
            before, conv.FRAMES_PER_STEP = conv.FRAMES_PER_STEP, {conv.cpu_kind(): step}  # read when traced
            try:
                if inside:
                    return conv.frames_by_rows(x, w, (1, 1), (1, 1), epilogue)
                return epilogue(conv.frames_by_rows(x, w, (1, 1), (1, 1)))
            finally:
                conv.FRAMES_PER_STEP = before
        return jax.jit(run)

    def xla(x: jax.Array, w: jax.Array) -> jax.Array:
        return epilogue(conv._conv2d_lax(x, w, (1, 1), (1, 1)))

    fns: dict[str, Any] = {"XLA convolution, YNNPACK": jax.jit(xla),
                           "XLA convolution, Eigen": jax.jit(xla, compiler_options=EIGEN)}
    for step in (1, 2, 4, 8, n):
        if n % step == 0:
            fns[f"{step} frames, epilogue after"] = loop(step, False)
            fns[f"{step} frames, epilogue inside"] = loop(step, True)
    return fns, (x, w), 2 * n * size * size * 9 * cin * cout / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=56)
    parser.add_argument("--cin", type=int, default=64)
    parser.add_argument("--cout", type=int, default=144)
    args = parser.parse_args()
    fns, inputs, gflop = contenders(args.frames, args.size, args.cin, args.cout)
    want = np.asarray(fns["XLA convolution, YNNPACK"](*inputs), np.float32)
    for name, fn in fns.items():
        got = np.asarray(fn(*inputs), np.float32)
        if np.abs(got - want).max() > 0.05 * np.abs(want).max():
            raise SystemExit(f"{name}: differs from XLA's convolution")
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(args.rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn(*inputs).block_until_ready()
            times[name].append(time.perf_counter() - start)
    print(f"1x3x3 {args.cin}->{args.cout} on {args.frames}x{args.size}x{args.size}, bfloat16, "
          f"{gflop:.2f} GFLOP, medians of {args.rounds} rounds")
    print("| contender | ms | GFLOP/s |\n|---|---:|---:|")
    for name, ts in times.items():
        print(f"| {name} | {statistics.median(ts) * 1e3:.1f} | {gflop / statistics.median(ts):.0f} |")


if __name__ == "__main__":
    main()
