"""GFLOP/s of each convolution form in bfloat16 against float32, on the layer shapes of ir-CSN-152
and R(2+1)D-34 at 2 x 8 x 112 x 112: forward, and forward + both gradients.

Contenders, timed in interleaved rounds (medians): the fast forms in float32, XLA's plain convolution
in bfloat16 (`conv_impl="reference"`), the fast forms in bfloat16, and, with `--before FILE`, another
copy of conv.py in bfloat16 (e.g. `git show REV:vmz_jax/models/conv.py > old.py`).

    python benchmarks/bf16_forms.py [--rounds 5] [--before old_conv.py] [--backward]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vmz_jax.models import conv

# (name, (N, T, H, W, Cin), kernel (kT, kH, kW, Cout), stride, padding)
SHAPES = [
    ("ir-csn layer1 1x1x1 256->64", (2, 8, 28, 28, 256), (1, 1, 1, 64), (1, 1, 1), (0, 0, 0)),
    ("ir-csn layer1 1x1x1 64->256", (2, 8, 28, 28, 64), (1, 1, 1, 256), (1, 1, 1), (0, 0, 0)),
    ("ir-csn layer2 1x1x1 512->128", (2, 4, 14, 14, 512), (1, 1, 1, 128), (1, 1, 1), (0, 0, 0)),
    ("ir-csn layer3 1x1x1 1024->256", (2, 2, 7, 7, 1024), (1, 1, 1, 256), (1, 1, 1), (0, 0, 0)),
    ("ir-csn layer1 depthwise 3x3x3 64", (2, 8, 28, 28, 64), (3, 3, 3, 64), (1, 1, 1), (1, 1, 1)),
    ("ir-csn stem 3x7x7 3->64", (2, 8, 112, 112, 3), (3, 7, 7, 64), (1, 2, 2), (1, 3, 3)),
    ("r(2+1)d layer1 1x3x3 64->144", (2, 8, 56, 56, 64), (1, 3, 3, 144), (1, 1, 1), (0, 1, 1)),
    ("r(2+1)d layer1 3x1x1 144->64", (2, 8, 56, 56, 144), (3, 1, 1, 64), (1, 1, 1), (1, 0, 0)),
    ("r(2+1)d layer2 1x3x3 128->288", (2, 4, 28, 28, 128), (1, 3, 3, 288), (1, 1, 1), (0, 1, 1)),
    ("r(2+1)d layer2 3x1x1 288->128", (2, 4, 28, 28, 288), (3, 1, 1, 128), (1, 1, 1), (1, 0, 0)),
    ("r(2+1)d layer3 1x3x3 256->576", (2, 2, 14, 14, 256), (1, 3, 3, 576), (1, 1, 1), (0, 1, 1)),
    ("r(2+1)d layer3 3x1x1 576->256", (2, 2, 14, 14, 576), (3, 1, 1, 256), (1, 1, 1), (1, 0, 0)),
    ("r(2+1)d layer4 1x3x3 512->1152", (2, 1, 7, 7, 512), (1, 3, 3, 1152), (1, 1, 1), (0, 1, 1)),
]


def _load(path: str) -> Any:
    spec = importlib.util.spec_from_file_location("conv_before", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def _timed(fns: dict[str, Callable[[], Any]], rounds: int, clock: Callable[[], float] = time.perf_counter
           ) -> dict[str, float]:
    for fn in fns.values():
        jax.block_until_ready(fn())
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = clock()
            jax.block_until_ready(fn())
            times[name].append(clock() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def measure(layer: tuple[Any, ...], modules: dict[str, tuple[Any, str, Any]], rounds: int,
            backward: bool, clock: Callable[[], float] = time.perf_counter) -> tuple[float, dict[str, float]]:
    """One layer's GFLOP and each contender's seconds; `modules`: name -> (conv module, impl, dtype)."""
    name, xs, (kt, kh, kw, cout), stride, padding = layer
    groups = xs[-1] if "depthwise" in name else 1
    rng = np.random.default_rng(0)
    x = rng.standard_normal(xs).astype(np.float32)
    w = (rng.standard_normal((kt, kh, kw, xs[-1] // groups, cout)) * 0.05).astype(np.float32)
    out = jax.eval_shape(lambda a, b: conv.reference_conv3d(a, b, stride, padding, groups), x, w).shape
    gflop = 2 * np.prod(out) * kt * kh * kw * xs[-1] // groups / 1e9 * (3 if backward else 1)
    fns = {}
    for label, (module, impl, dtype) in modules.items():
        def f(a: jax.Array, b: jax.Array, module: Any = module, impl: str = impl) -> Any:
            return module.conv3d(a, b, stride, padding, groups, impl).astype(jnp.float32)

        fn = jax.jit(jax.grad(lambda a, b, f=f: jnp.sum(f(a, b) ** 2), argnums=(0, 1)) if backward else f)
        fns[label] = partial(fn, jnp.asarray(x, dtype), jnp.asarray(w, dtype))
    return gflop, _timed(fns, rounds, clock)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--before", help="another conv.py to time in bfloat16 next to this one")
    parser.add_argument("--backward", action="store_true", help="time forward + both gradients")
    parser.add_argument("--only", help="run the shapes whose name contains this")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time by the process's CPU seconds (all threads) instead of wall seconds: "
                             "on a machine shared with other work, what each form costs, not when it ends")
    args = parser.parse_args()
    clock = time.process_time if args.cpu_time else time.perf_counter
    modules = {"float32 fast": (conv, "fast", jnp.float32),
               "bf16 XLA conv": (conv, "reference", jnp.bfloat16),
               "bf16 fast": (conv, "fast", jnp.bfloat16)}
    if args.before:
        modules["bf16 before"] = (_load(args.before), "fast", jnp.bfloat16)
    print(f"cpu_has_bfloat16: {conv.cpu_has_bfloat16()}; "
          f"{'forward + gradients' if args.backward else 'forward'}; "
          f"{'CPU' if args.cpu_time else 'wall'} time")
    print("| layer | GFLOP | " + " | ".join(modules) + " | bf16 fast / float32 |")
    print("|---|---:|" + "---:|" * (len(modules) + 1))
    for layer in SHAPES:
        if args.only and args.only not in layer[0]:
            continue
        gflop, t = measure(layer, modules, args.rounds, args.backward, clock)
        cells = " | ".join(f"{gflop / t[k]:.0f}" for k in modules)
        speedup = t["float32 fast"] / t["bf16 fast"]
        print(f"| {layer[0]} | {gflop:.2f} | {cells} | {speedup:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
