"""Training-step benchmark: one forward + backward + SGD-momentum step of vmz_jax against torch.

Used by `vmz-jax bench --train` and `benchmarks/bench_train.py`. Each contender runs in its own worker
process, so that its peak resident memory (`VmHWM`) is its own and the two runtimes' thread pools
never compete inside one process. The parent drives the workers in rounds (one step of each per
round, after a warm-up) and reports medians, the ratio, the JAX compile time and each worker's peak
RSS. Interleaving puts both sides under the same load, but not under the same penalty from it:
torch's OpenMP threads lose far more to a shared core than XLA's pool, so only a quiet machine gives
ratios worth quoting (`vmz-jax bench` warns when the load average says otherwise). Both workers start
with `vmz_jax.runtime.reuse_host_memory()`, as `vmz-jax finetune` does: freed memory stays in the
heap on both sides, so neither step pays for faulting in fresh pages (torch gains from it too).

Both sides train the same architecture from random weights in train mode (BatchNorm on batch
statistics) with softmax cross-entropy and SGD, momentum 0.9, on one fixed random batch. The JAX side
uses `vmz_jax.train.train_step` with `nnx.Optimizer(model, optax.sgd(lr, momentum=0.9))` when the
training package is present, otherwise an equivalent local jitted step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from vmz_jax.errors import VMZError, one_line

NUM_CLASSES = 400
LEARNING_RATE = 1e-3


def peak_rss_mb() -> float:
    """This process's resident-memory high-water mark (VmHWM), MB; 0 where /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource  # no /proc: ru_maxrss is KiB on Linux, bytes on macOS

    scale = 1 / 1024 / 1024 if sys.platform == "darwin" else 1 / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _batch(shape: tuple[int, ...], seed: int = 0) -> tuple[Any, Any]:
    """One fixed batch (N, T, H, W, 3) float32 and int labels, the same on both sides."""
    import numpy as np

    rng = np.random.default_rng(seed)
    clips = rng.standard_normal((*shape[:4], 3)).astype(np.float32)
    labels = rng.integers(0, NUM_CLASSES, shape[0]).astype(np.int32)
    return clips, labels


def jax_step(arch: str, shape: tuple[int, ...], *, conv_impl: str = "auto", dtype: str = "float32"
             ) -> Callable[[], float]:
    """A ready-to-run JAX training step of `arch` that returns its loss (blocking until done).

    `dtype` is the compute dtype; parameters, BatchNorm statistics and the loss stay float32."""
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from vmz_jax.models import build

    model = build(arch, NUM_CLASSES, conv_impl=conv_impl, clip_length=min(shape[1], 8),
                  dtype=jnp.dtype(dtype))
    model.train()
    optimizer = nnx.Optimizer(model, optax.sgd(LEARNING_RATE, momentum=0.9), wrt=nnx.Param)
    clips_np, labels_np = _batch(shape)
    clips, labels = jnp.asarray(clips_np), jnp.asarray(labels_np)
    try:
        from vmz_jax.train import train_step
    except ImportError:
        train_step = _local_train_step()

    def run() -> float:
        metrics = train_step(model, optimizer, clips, labels)
        return float(metrics["loss"])

    return run


def _local_train_step() -> Callable[..., dict[str, Any]]:
    """The step `vmz_jax.train.train_step` runs, for trees without the training package."""
    import optax
    from flax import nnx

    @nnx.jit
    def step(model: Any, optimizer: Any, clips: Any, labels: Any) -> dict[str, Any]:
        def loss_fn(model: Any) -> Any:
            logits = model(clips)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return {"loss": loss}

    return step


def torch_step(arch: str, shape: tuple[int, ...], dtype: str = "float32") -> Callable[[], float]:
    """The same step on the torch reference (NCDHW, train mode, torch.optim.SGD); bfloat16 runs the
    forward under `torch.autocast("cpu", torch.bfloat16)`, torch's mixed-precision recipe."""
    import torch

    from vmz_jax.reference import vmz_torch

    model = vmz_torch.build(arch, num_classes=NUM_CLASSES, clip_length=min(shape[1], 8)).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=0.9)
    clips_np, labels_np = _batch(shape)
    clips = torch.from_numpy(clips_np).permute(0, 4, 1, 2, 3).contiguous()
    labels = torch.from_numpy(labels_np).long()

    def run() -> float:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", torch.bfloat16, enabled=dtype == "bfloat16"):
            logits = model(clips)
        loss = torch.nn.functional.cross_entropy(logits.float(), labels)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return run


def _worker(side: str, arch: str, shape: tuple[int, ...], conv_impl: str, dtype: str = "float32") -> None:
    """Serve "step" / "quit" lines on stdin; answer each with one JSON line on stdout.

    The first answer comes after the first (compiling) step: its seconds, the baseline RSS taken
    before the model was built, and the loss, so the parent sees that both sides really train.
    """
    out = sys.stdout
    sys.stdout = sys.stderr  # library chatter must not corrupt the protocol
    from vmz_jax.runtime import reuse_host_memory

    reuse_host_memory()  # both sides: as `vmz-jax finetune` runs, and torch under the same allocator
    if side == "jax" and os.environ.get("VMZ_JAX_TEST"):  # the test suite's tiny inputs: fast compiles
        import jax

        jax.config.update("jax_disable_most_optimizations", True)
    baseline = peak_rss_mb()
    try:
        step = (jax_step(arch, shape, conv_impl=conv_impl, dtype=dtype) if side == "jax"
                else torch_step(arch, shape, dtype))
        start = time.perf_counter()
        loss = step()
        first = time.perf_counter() - start
    except Exception as e:  # noqa: BLE001 - reported to the parent as one line
        print(json.dumps({"error": f"{type(e).__name__}: {e}"}), file=out, flush=True)
        return
    print(json.dumps({"first_s": first, "loss": loss, "baseline_mb": baseline}), file=out, flush=True)
    for line in sys.stdin:
        if line.strip() != "step":
            break
        start = time.perf_counter()
        loss = step()
        print(json.dumps({"s": time.perf_counter() - start, "loss": loss,
                          "peak_mb": peak_rss_mb()}), file=out, flush=True)


class _Worker:
    def __init__(self, side: str, arch: str, shape: tuple[int, ...], conv_impl: str, dtype: str = "float32"):
        cmd = [sys.executable, "-m", "vmz_jax.bench_train", side, arch, "x".join(map(str, shape)),
               conv_impl, dtype]
        self.side = side
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.first = self._read()

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            raise VMZError(f"the {self.side} benchmark worker exited with status "
                           f"{self.proc.returncode}")
        reply = json.loads(line)
        if "error" in reply:
            raise VMZError(one_line(f"the {self.side} benchmark worker failed: {reply['error']}"))
        return reply

    def step(self) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            self.proc.wait()


@dataclass
class TrainBenchResult:
    arch: str
    shape: tuple[int, ...]
    jax_s: float
    compile_s: float
    jax_peak_mb: float
    jax_losses: list[float] = field(default_factory=list)
    torch_s: float | None = None
    torch_peak_mb: float | None = None
    torch_losses: list[float] = field(default_factory=list)
    dtype: str = "float32"

    @property
    def ratio(self) -> float | None:
        """How many times faster JAX's step is than torch's (> 1: faster)."""
        return None if self.torch_s is None else self.torch_s / self.jax_s

    def row(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio}


def run(arch: str, shape: tuple[int, ...] = (2, 8, 112, 112), *, repeats: int = 5,
        torch: bool = True, conv_impl: str = "auto", dtype: str = "float32") -> TrainBenchResult:
    """Time `repeats` interleaved training steps of each side after one warm-up step; medians.

    `compile_s` is the JAX side's first step (trace + compile + run) less its median step.
    """
    shape = tuple(shape[:4])
    workers = [_Worker("jax", arch, shape, conv_impl, dtype)]
    try:
        if torch:
            workers.append(_Worker("torch", arch, shape, conv_impl, dtype))
        replies: dict[str, list[dict[str, Any]]] = {w.side: [] for w in workers}
        for w in workers:  # warm-up
            w.step()
        for _ in range(repeats):
            for w in workers:
                replies[w.side].append(w.step())
    finally:
        for w in workers:
            w.close()
    jax_s = statistics.median(r["s"] for r in replies["jax"])
    result = TrainBenchResult(
        arch, shape, jax_s, max(workers[0].first["first_s"] - jax_s, 0.0),
        replies["jax"][-1]["peak_mb"], [r["loss"] for r in replies["jax"]], dtype=dtype)
    if torch:
        result.torch_s = statistics.median(r["s"] for r in replies["torch"])
        result.torch_peak_mb = replies["torch"][-1]["peak_mb"]
        result.torch_losses = [r["loss"] for r in replies["torch"]]
    return result


def format_table(results: list[TrainBenchResult]) -> str:
    lines = ["| arch | input | JAX s | torch s | speed-up | JAX compile s | JAX peak MB | torch peak MB |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        torch_s = f"{r.torch_s:.3f}" if r.torch_s is not None else "-"
        ratio = f"{r.ratio:.2f}x" if r.ratio is not None else "-"
        torch_mb = f"{r.torch_peak_mb:.0f}" if r.torch_peak_mb is not None else "-"
        dtype = "" if r.dtype == "float32" else f" {r.dtype}"
        lines.append(f"| {r.arch} | {'x'.join(map(str, r.shape))}x3{dtype} | {r.jax_s:.3f} | {torch_s} | "
                     f"{ratio} | {r.compile_s:.1f} | {r.jax_peak_mb:.0f} | {torch_mb} |")
    return "\n".join(lines)


if __name__ == "__main__":  # worker process: python -m vmz_jax.bench_train SIDE ARCH NxTxHxW IMPL
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("side", choices=["jax", "torch"])
    parser.add_argument("arch")
    parser.add_argument("shape")
    parser.add_argument("conv_impl")
    parser.add_argument("dtype", nargs="?", default="float32", choices=["float32", "bfloat16"])
    a = parser.parse_args()
    _worker(a.side, a.arch, tuple(int(v) for v in a.shape.split("x")), a.conv_impl, a.dtype)
