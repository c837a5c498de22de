"""Exported artifacts against the model they came from: forward time of onnxruntime (CPU), the
StableHLO artifact (`jax.export.deserialize(...).call`), JAX (`make_forward`) and the PyTorch
reference, same random weights (non-trivial BN statistics), same input, and the artifact sizes.

    python benchmarks/bench_export.py                                  # r2plus1d_34 ir_csn_152, 2x8x112x112
    python benchmarks/bench_export.py r3d_18 --shape 1x8x112x112 --rounds 5 --json out.json

Rounds are interleaved (each round runs every runtime once, in turn), after one warm-up call each;
the table gives medians and each runtime's time relative to JAX. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import onnxruntime
import torch
from flax import nnx

import vmz_jax
from porting.torch_names import torch_to_params
from vmz_jax.models import build
from vmz_jax.models.forward import make_forward
from vmz_jax.models.variables import set_variables, variable_shapes
from vmz_jax.reference import vmz_torch


def pair(arch: str, clip_length: int):
    ref = vmz_torch.randomize_(vmz_torch.build(arch, num_classes=400, clip_length=clip_length), 0).eval()
    state = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    model = nnx.eval_shape(lambda: build(arch, 400, clip_length=clip_length, rngs=nnx.Rngs(0)))
    set_variables(model, torch_to_params(state, variable_shapes(model), source=arch), source=arch)
    model.eval()
    return ref, model


def bench(arch: str, shape: tuple[int, int, int, int], rounds: int, tmp: str) -> dict:
    n, t, h, w = shape
    ref, model = pair(arch, t)
    x = np.random.default_rng(0).standard_normal((n, t, h, w, 3)).astype(np.float32)
    x_torch = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 4, 1, 2, 3)))
    sizes, export_s = {}, {}
    for fmt, platforms in (("stablehlo", ("cpu", "cuda")), ("onnx", ())):
        start = time.perf_counter()
        result = vmz_jax.export(
            model,
            os.path.join(tmp, f"{arch}.{fmt}"),
            frames=t,
            size=(h, w),
            overwrite=True,
            **({"platforms": platforms} if platforms else {}),
        )
        export_s[fmt] = time.perf_counter() - start
        sizes[fmt] = os.path.getsize(result.path)
    exported = jax.export.deserialize(bytearray(open(os.path.join(tmp, f"{arch}.stablehlo"), "rb").read()))
    session = onnxruntime.InferenceSession(
        os.path.join(tmp, f"{arch}.onnx"), providers=["CPUExecutionProvider"]
    )
    fwd = make_forward(model, "logits")
    hlo = jax.jit(exported.call)
    xj = jnp.asarray(x)
    runners = {
        "onnxruntime": lambda: session.run(None, {"clips": x})[0],
        "stablehlo": lambda: np.asarray(hlo(xj)),
        "jax": lambda: np.asarray(fwd(xj)),
        "torch": lambda: torch_forward(ref, x_torch),
    }
    outputs = {name: run() for name, run in runners.items()}  # warm-up (compiles)
    scale = np.abs(outputs["torch"]).max()
    diffs = {name: float(np.abs(y - outputs["jax"]).max() / scale) for name, y in outputs.items()}
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(v) for name, v in times.items()}
    return {
        "arch": arch,
        "shape": list(shape),
        "median_s": medians,
        "times_s": times,
        "vs_jax": {name: m / medians["jax"] for name, m in medians.items()},
        "max_rel_diff_vs_jax": diffs,
        "artifact_bytes": sizes,
        "export_s": export_s,
    }


def torch_forward(ref, x):
    with torch.inference_mode():
        return ref(x).numpy()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("archs", nargs="*", default=["r2plus1d_34", "ir_csn_152"])
    parser.add_argument("--shape", default="2x8x112x112", help="NxTxHxW")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", help="write the rows here too")
    args = parser.parse_args()
    shape = tuple(int(v) for v in args.shape.split("x"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.archs:
            rows.append(bench(arch, shape, args.rounds, tmp))
            print(f"{arch} done", file=sys.stderr)
    names = ("onnxruntime", "stablehlo", "jax", "torch")
    print(
        f"jax {jax.__version__}, onnxruntime {onnxruntime.__version__}, torch {torch.__version__}, "
        f"{os.cpu_count()} CPUs, {args.rounds} interleaved rounds, median seconds (x JAX's time)\n"
    )
    print(
        "| arch | input | "
        + " | ".join(names)
        + " | StableHLO MB | ONNX MB | max rel diff vs JAX (ort, hlo, torch) |"
    )
    print("|---|---|" + "---|" * len(names) + "---|---|---|")
    for r in rows:
        cells = [f"{r['median_s'][k]:.3f} ({r['vs_jax'][k]:.2f}x)" for k in names]
        d = r["max_rel_diff_vs_jax"]
        print(
            f"| {r['arch']} | {'x'.join(map(str, r['shape']))} | "
            + " | ".join(cells)
            + f" | {r['artifact_bytes']['stablehlo'] / 1e6:.1f} | {r['artifact_bytes']['onnx'] / 1e6:.1f} | "
            f"{d['onnxruntime']:.1e}, {d['stablehlo']:.1e}, {d['torch']:.1e} |"
        )
    if args.json:
        from vmz_jax.files import atomic_write

        atomic_write(args.json, json.dumps(rows, indent=1), mode="w")
    return 0


if __name__ == "__main__":
    sys.exit(main())
