"""Forward-pass benchmark: vmz_jax against the PyTorch reference, same weights-shape and input.

Used by `vmz-jax bench` and `benchmarks/bench_forward.py`. Reports the median of `repeats` timed
runs after a warm-up, clips/s, the JAX/torch speed ratio, achieved GFLOP/s (multiply-adds x 2,
counted on the reference's convolutions and linear layers) and the jit compile time.

The torch reference is `vmz_jax.reference.vmz_torch` (needs torch: the `torch` extra); without torch
only the JAX numbers are reported.
"""

from __future__ import annotations

import importlib
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vmz_jax.models import build
from vmz_jax.models.forward import make_forward


@dataclass
class BenchResult:
    arch: str
    shape: tuple[int, ...]
    backend: str
    jax_s: float
    compile_s: float
    torch_s: dict[str, float] = field(default_factory=dict)
    gflop: float | None = None

    @property
    def clips_per_s(self) -> float:
        return self.shape[0] / self.jax_s

    def ratio(self, variant: str = "eager") -> float | None:
        """How many times faster JAX is than the given torch variant (> 1 means faster)."""
        t = self.torch_s.get(variant)
        return None if t is None else t / self.jax_s

    def row(self) -> dict[str, Any]:
        out = asdict(self)
        out["clips_per_s"] = self.clips_per_s
        out["ratios"] = {k: self.ratio(k) for k in self.torch_s}
        if self.gflop:
            out["jax_gflop_per_s"] = self.gflop / self.jax_s
        return out


def torch_reference() -> ModuleType | None:
    """The pure-torch reference models (`vmz_jax.reference.vmz_torch`), or None without torch."""
    try:
        return importlib.import_module("vmz_jax.reference.vmz_torch")
    except ImportError:
        return None


def count_flops(ref_model: Any, x: Any) -> float:
    """2 x multiply-adds of every Conv3d and Linear in a torch forward pass."""
    import torch

    macs = 0

    def hook(module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> None:
        nonlocal macs
        if isinstance(module, torch.nn.Conv3d):
            per_output = module.in_channels // module.groups * int(np.prod(module.kernel_size))
        else:
            per_output = module.in_features
        macs += output.numel() * per_output

    handles = [m.register_forward_hook(hook) for m in ref_model.modules()
               if isinstance(m, (torch.nn.Conv3d, torch.nn.Linear))]
    with torch.inference_mode():
        ref_model(x)
    for h in handles:
        h.remove()
    return 2.0 * macs


def jax_forward(arch: str, shape: tuple[int, ...], *, dtype: jnp.dtype = jnp.float32,
                conv_impl: str = "auto") -> tuple[Callable[[], Any], float]:
    """A ready-to-time JAX forward pass (logits) of `arch` in eval mode, and its jit compile seconds.

    The forward is `vmz_jax.models.forward.make_forward`, the function the pipeline runs, with
    "auto" resolved for the backend being timed."""
    model = build(arch, 400, dtype=dtype, conv_impl=conv_impl, clip_length=min(shape[1], 8))
    forward = make_forward(model, "logits", platform=jax.default_backend())
    x = jnp.asarray(np.random.default_rng(0).standard_normal(shape), jnp.float32)
    start = time.perf_counter()
    compiled = forward.lower(x).compile()
    compile_s = time.perf_counter() - start
    state = forward.state
    return lambda: compiled(state, x).block_until_ready(), compile_s


def torch_forwards(arch: str, shape: tuple[int, ...], variants: tuple[str, ...]
                   ) -> tuple[dict[str, Callable[[], Any]], float | None]:
    """Ready-to-time torch reference forward passes per variant, and the model's GFLOP."""
    vmz_torch = torch_reference()
    if vmz_torch is None or not variants:
        return {}, None
    import torch

    n, t, h, w, c = shape
    x = torch.randn(n, c, t, h, w)
    fns: dict[str, Callable[[], Any]] = {}
    gflop = None
    for variant in variants:
        model = vmz_torch.build(arch, num_classes=400, clip_length=min(t, 8)).eval()
        inp = x
        if gflop is None:
            gflop = count_flops(model, x) / 1e9
        if variant == "channels_last_3d":
            model = model.to(memory_format=torch.channels_last_3d)
            inp = x.contiguous(memory_format=torch.channels_last_3d)
        elif variant != "eager":
            raise ValueError(f"unknown torch variant {variant!r}")

        def forward(model: Any = model, inp: Any = inp) -> Any:
            with torch.inference_mode():
                return model(inp)

        fns[variant] = forward
    return fns, gflop


def run(arch: str, shape: tuple[int, ...] = (2, 8, 112, 112, 3), *, repeats: int = 5,
        torch_variants: tuple[str, ...] = ("eager", "channels_last_3d"),
        conv_impl: str = "auto") -> BenchResult:
    """Time JAX and the torch variants interleaved (one run of each per round), medians of `repeats`.

    Interleaving makes a noisy machine slow every contender alike, which keeps the ratios honest.
    """
    contenders: dict[str, Callable[[], Any]] = {}
    contenders["jax"], compile_s = jax_forward(arch, shape, conv_impl=conv_impl)
    torch_fns, gflop = torch_forwards(arch, shape, torch_variants)
    contenders.update(torch_fns)
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for fn in contenders.values():  # warm-up
        fn()
    for _ in range(repeats):
        for name, fn in contenders.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    jax_s = medians.pop("jax")
    return BenchResult(arch, tuple(shape), jax.default_backend(), jax_s, compile_s, medians, gflop)


def format_table(results: list[BenchResult]) -> str:
    lines = ["| arch | input | JAX s | clips/s | GFLOP | JAX GFLOP/s | torch s (eager / CL3D) "
             "| speed-up vs eager / CL3D | compile s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        torch_cells = " / ".join(f"{r.torch_s[k]:.3f}" for k in r.torch_s) or "-"
        ratios = " / ".join(f"{r.ratio(k):.2f}x" for k in r.torch_s) or "-"
        gflop = f"{r.gflop:.1f}" if r.gflop else "-"
        rate = f"{r.gflop / r.jax_s:.0f}" if r.gflop else "-"
        lines.append(f"| {r.arch} | {'x'.join(map(str, r.shape))} | {r.jax_s:.3f} | "
                     f"{r.clips_per_s:.1f} | {gflop} | {rate} | {torch_cells} | {ratios} | "
                     f"{r.compile_s:.1f} |")
    return "\n".join(lines)
