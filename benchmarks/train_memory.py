"""Training memory: donation, rematerialization, and XLA's temp bytes against torch's saved tensors.

    python benchmarks/train_memory.py remat [--arch ir_csn_152 --shape 1x32x224x224]
        temp bytes of the compiled step per remat mode (compiled, never run)
    python benchmarks/train_memory.py time [--arch ir_csn_152 --shape 2x8x112x112 --rounds 5]
        step seconds per remat mode: one process, the modes interleaved round by round, medians
    python benchmarks/train_memory.py scheduler [--arch ir_csn_152 --shape 2x8x112x112 --rounds 5]
        XLA's default compiler options against REMAT_COMPILER_OPTIONS (on CPU: the memory-optimized
        scheduler, the checkpoints kept), remat none and blocks: temp bytes and step seconds, one
        process, the four steps interleaved
    python benchmarks/train_memory.py torch [--shape 1x8x112x112]
        one arch per family: the step's temp bytes (conv_impl="reference", the GPU path; remat none
        and blocks) against the bytes torch's autograd saves for the backward pass of the same step

Each writes a JSON list (--json) and prints a markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any

FAMILIES = ("r2plus1d_18", "r3d_18", "r2d_18", "mc3_18", "ir_csn_152", "ip_csn_152", "c3d")
MB = 1e6


def remat_temp(arch: str, shape: tuple[int, ...], modes: list[str], conv_impl: str) -> list[dict[str, Any]]:
    from vmz_jax.train.memory import train_memory

    rows = []
    for mode in modes:
        start = time.perf_counter()
        report = train_memory(arch, shape, remat=mode, conv_impl=conv_impl, forward=False)
        rows.append({**report.row(), "compile_s": round(time.perf_counter() - start, 1)})
        print(json.dumps(rows[-1]["train"]), mode, flush=True)
    none = rows[0]["train"]["temp"]
    print("| remat | argument MB | aliased MB | temp MB | temp / none | peak MB |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        t = r["train"]
        print(f"| {r['remat']} | {t['argument'] / MB:.0f} | {t['aliased'] / MB:.0f} | {t['temp'] / MB:.0f} | "
              f"{t['temp'] / none:.2f} | {t['peak'] / MB:.0f} |")
    return rows


def remat_time(arch: str, shape: tuple[int, ...], modes: list[str], rounds: int) -> list[dict[str, Any]]:
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    from vmz_jax.models import build
    from vmz_jax.models.remat import set_remat
    from vmz_jax.runtime import reuse_host_memory
    from vmz_jax.train import train_step

    reuse_host_memory()
    rng = np.random.default_rng(0)
    clips = jnp.asarray(rng.standard_normal((*shape, 3)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 400, shape[0]), jnp.int32)
    runs: dict[str, Any] = {}
    first: dict[str, float] = {}
    for mode in modes:
        model = set_remat(build(arch, 400, clip_length=min(shape[1], 8), rngs=nnx.Rngs(0)), mode)
        model.train()
        optimizer = nnx.Optimizer(model, optax.sgd(1e-3, momentum=0.9), wrt=nnx.Param)
        runs[mode] = (model, optimizer)
        start = time.perf_counter()
        float(train_step(model, optimizer, clips, labels)["loss"])
        first[mode] = time.perf_counter() - start
    seconds: dict[str, list[float]] = {mode: [] for mode in modes}
    loads = []
    for _ in range(rounds):
        loads.append(os.getloadavg()[0])
        for mode in modes:
            model, optimizer = runs[mode]
            start = time.perf_counter()
            float(train_step(model, optimizer, clips, labels)["loss"])
            seconds[mode].append(time.perf_counter() - start)
        print({m: round(s[-1], 3) for m, s in seconds.items()}, f"load {loads[-1]:.1f}", flush=True)
    none = statistics.median(seconds[modes[0]])
    rows = [{"arch": arch, "shape": list(shape), "remat": m, "first_s": first[m], "seconds": s,
             "median_s": statistics.median(s), "ratio": statistics.median(s) / none,
             "load": loads} for m, s in seconds.items()]
    print(f"| remat | median s ({rounds} rounds) | / none | all rounds s |\n|---|---:|---:|---|")
    for r in rows:
        print(f"| {r['remat']} | {r['median_s']:.2f} | {r['ratio']:.2f}x | "
              f"{', '.join(f'{s:.2f}' for s in r['seconds'])} |")
    print(f"load average during the rounds: {min(loads):.1f} - {max(loads):.1f} on {os.cpu_count()} cores")
    return rows


def scheduler_ab(arch: str, shape: tuple[int, ...], modes: list[str], rounds: int) -> list[dict[str, Any]]:
    """Each remat mode's step compiled under XLA's default options and under `REMAT_COMPILER_OPTIONS`
    (whatever `train_step` would pick), run interleaved on real weights; medians against none/default."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    from vmz_jax.models import build
    from vmz_jax.models.remat import REMAT_COMPILER_OPTIONS, set_remat
    from vmz_jax.runtime import reuse_host_memory
    from vmz_jax.train.step import compiled_train_step

    reuse_host_memory()
    rng = np.random.default_rng(0)
    clips = jnp.asarray(rng.standard_normal((*shape, 3)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 400, shape[0]), jnp.int32)
    options = REMAT_COMPILER_OPTIONS.get(jax.default_backend(), {})
    runs: dict[tuple[str, str], list[Any]] = {}
    for mode in modes:
        model = set_remat(build(arch, 400, clip_length=min(shape[1], 8), rngs=nnx.Rngs(0)), mode)
        model.train()
        optimizer = nnx.Optimizer(model, optax.sgd(1e-3, momentum=0.9), wrt=nnx.Param)
        graphdef, state = nnx.split((model, optimizer))
        lowered = compiled_train_step(jax.default_backend(), donate=True, remat=False).lower(
            graphdef, state, clips, labels, 0.0, None)
        for name, opts in (("default", {}), ("remat options", options)):
            compiled = lowered.compile(compiler_options=opts)
            own = jax.tree.map(jnp.copy, state)
            for _ in range(2):  # warm-up
                metrics, own = compiled(own, clips, labels)  # the static arguments are compiled in
                float(metrics["loss"])
            runs[(mode, name)] = [compiled, own, [], compiled.memory_analysis().temp_size_in_bytes]
    for _ in range(rounds):
        for run in runs.values():
            compiled, own, seconds, _ = run
            start = time.perf_counter()
            metrics, run[1] = compiled(own, clips, labels)
            float(metrics["loss"])
            seconds.append(time.perf_counter() - start)
    base = statistics.median(runs[(modes[0], "default")][2])
    rows = [{"arch": arch, "shape": list(shape), "remat": mode, "scheduler": name, "temp": run[3],
             "seconds": run[2], "median_s": statistics.median(run[2]),
             "ratio": statistics.median(run[2]) / base} for (mode, name), run in runs.items()]
    print(f"| remat | compiler options | temp MB | median s ({rounds} rounds) | / {modes[0]}, default |\n"
          "|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['remat']} | {r['scheduler']} | {r['temp'] / MB:.0f} | {r['median_s']:.3f} | "
              f"{r['ratio']:.2f}x |")
    return rows


def torch_saved_bytes(arch: str, shape: tuple[int, ...]) -> int:
    """Bytes of the distinct storages torch's autograd saves for the backward pass of one training
    step (forward + cross-entropy), parameters excluded (they are the step's arguments on both sides)."""
    import torch

    from vmz_jax.reference import vmz_torch

    model = vmz_torch.build(arch, num_classes=400, clip_length=min(shape[1], 8)).train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    clips = torch.randn(shape[0], 3, *shape[1:4])
    labels = torch.randint(0, 400, (shape[0],))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = torch.nn.functional.cross_entropy(model(clips), labels)
    del loss
    return sum(storages.values())


def against_torch(shape: tuple[int, ...], archs: list[str]) -> list[dict[str, Any]]:
    from vmz_jax.train.memory import train_memory

    rows = []
    for arch in archs:
        arch_shape = (shape[0], 16, 112, 112) if arch == "c3d" else shape
        temps = {mode: train_memory(arch, arch_shape, remat=mode, conv_impl="reference",
                                    forward=False).train.temp for mode in ("none", "blocks")}
        rows.append({"arch": arch, "shape": list(arch_shape), "jax_temp_none": temps["none"],
                     "jax_temp_blocks": temps["blocks"], "torch_saved": torch_saved_bytes(arch, arch_shape)})
        print(json.dumps(rows[-1]), flush=True)
    print("| arch | input | JAX temp MB, remat none | JAX temp MB, remat blocks | torch saved tensors MB |")
    print("|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['arch']} | {'x'.join(map(str, r['shape']))}x3 | {r['jax_temp_none'] / MB:.0f} | "
              f"{r['jax_temp_blocks'] / MB:.0f} | {r['torch_saved'] / MB:.0f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["remat", "time", "scheduler", "torch"])
    parser.add_argument("--arch", default="ir_csn_152")
    parser.add_argument("--archs", nargs="+", default=list(FAMILIES))
    parser.add_argument("--shape", default=None)
    parser.add_argument("--modes", nargs="+", default=["none", "blocks", "full"])
    parser.add_argument("--conv-impl", default="auto")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json")
    a = parser.parse_args()
    default = {"remat": "1x32x224x224", "time": "2x8x112x112", "scheduler": "2x8x112x112",
               "torch": "1x8x112x112"}[a.what]
    shape = tuple(int(v) for v in (a.shape or default).split("x"))
    if a.what == "remat":
        rows = remat_temp(a.arch, shape, a.modes, a.conv_impl)
    elif a.what == "time":
        rows = remat_time(a.arch, shape, a.modes, a.rounds)
    elif a.what == "scheduler":
        rows = scheduler_ab(a.arch, shape, [m for m in a.modes if m != "full"] or a.modes, a.rounds)
    else:
        rows = against_torch(shape, a.archs)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
