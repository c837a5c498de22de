"""Forward-pass benchmark: vmz_jax against the PyTorch reference, same weights-shape and input.

Used by `vmz-jax bench` and `benchmarks/bench_forward.py`. Reports the median of `repeats` timed
runs after a warm-up, clips/s, the JAX/torch speed ratio, achieved GFLOP/s (multiply-adds x 2,
counted on the reference's convolutions and linear layers) and the jit compile time.

The torch reference is `vmz_jax.reference.vmz_torch` (needs torch: the `torch` extra); without torch
only the JAX numbers are reported. Torch variants: "eager" (float32, NCDHW), "channels_last_3d", and
the same two under `torch.autocast("cpu", torch.bfloat16)` ("autocast", "autocast_channels_last_3d"),
torch's fastest CPU mode. A bfloat16 JAX run can time JAX's float32 forward in the same rounds.
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

#: Every torch variant `torch_forwards` knows, and the short names the table uses.
TORCH_VARIANTS = {"eager": "eager", "channels_last_3d": "CL3D", "autocast": "bf16",
                  "autocast_channels_last_3d": "bf16+CL3D"}


@dataclass
class BenchResult:
    arch: str
    shape: tuple[int, ...]
    backend: str
    jax_s: float
    compile_s: float
    torch_s: dict[str, float] = field(default_factory=dict)
    gflop: float | None = None
    dtype: str = "float32"
    jax_float32_s: float | None = None  # JAX's float32 forward in the same rounds (bfloat16 runs)

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


def dot_peak_gflops(dtype: Any = jnp.bfloat16, size: int = 2048, repeats: int = 5) -> float:
    """This machine's matrix-product speed, GFLOP/s: a jitted size^3 dot of `dtype` inputs accumulated
    in float32 (or wider), the median of `repeats`: the ceiling the convolution forms' dots aim at."""
    rng = np.random.default_rng(0)
    a, b = (jnp.asarray(rng.standard_normal((size, size)), dtype) for _ in range(2))
    dot = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.promote_types(dtype, jnp.float32)))
    dot(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dot(a, b).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times) / 1e9


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
        if variant not in TORCH_VARIANTS:
            raise ValueError(f"unknown torch variant {variant!r}: one of {', '.join(TORCH_VARIANTS)}")
        model = vmz_torch.build(arch, num_classes=400, clip_length=min(t, 8)).eval()
        inp = x
        if gflop is None:
            gflop = count_flops(model, x) / 1e9
        if variant.endswith("channels_last_3d"):
            model = model.to(memory_format=torch.channels_last_3d)
            inp = x.contiguous(memory_format=torch.channels_last_3d)
        bf16 = variant.startswith("autocast")

        def forward(model: Any = model, inp: Any = inp, bf16: bool = bf16) -> Any:
            with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                return model(inp)

        fns[variant] = forward
    return fns, gflop


def run(arch: str, shape: tuple[int, ...] = (2, 8, 112, 112, 3), *, repeats: int = 5,
        torch_variants: tuple[str, ...] = ("eager", "channels_last_3d"),
        conv_impl: str = "auto", dtype: str = "float32", float32_baseline: bool = True) -> BenchResult:
    """Time JAX and the torch variants interleaved (one run of each per round), medians of `repeats`.

    Interleaving makes a noisy machine slow every contender alike, which keeps the ratios honest.
    `dtype` is JAX's compute dtype ("float32" or "bfloat16"); a bfloat16 run also times JAX's float32
    forward as one more contender unless `float32_baseline` is False.
    """
    contenders: dict[str, Callable[[], Any]] = {}
    contenders["jax"], compile_s = jax_forward(arch, shape, conv_impl=conv_impl, dtype=jnp.dtype(dtype))
    if dtype != "float32" and float32_baseline:
        contenders["jax_float32"], _ = jax_forward(arch, shape, conv_impl=conv_impl)
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
    jax_float32_s = medians.pop("jax_float32", None)
    return BenchResult(arch, tuple(shape), jax.default_backend(), jax_s, compile_s, medians, gflop,
                       str(dtype), jax_float32_s)


def format_table(results: list[BenchResult]) -> str:
    """A markdown table; the torch columns name the variants of the first result (all runs of one
    `vmz-jax bench` call time the same ones). bfloat16 runs add JAX's float32 time and the ratio."""
    variants = " / ".join(TORCH_VARIANTS.get(k, k) for k in (results[0].torch_s if results else ())) or "-"
    f32 = any(r.jax_float32_s is not None for r in results)
    lines = ["| arch | input | JAX dtype | JAX s | clips/s | GFLOP | JAX GFLOP/s | "
             + ("JAX float32 s | vs own float32 | " if f32 else "")
             + f"torch s ({variants}) | speed-up vs {variants} | compile s |",
             "|---|---|---|---|---|---|---|" + ("---|---|" if f32 else "") + "---|---|---|"]
    for r in results:
        torch_cells = " / ".join(f"{r.torch_s[k]:.3f}" for k in r.torch_s) or "-"
        ratios = " / ".join(f"{r.ratio(k):.2f}x" for k in r.torch_s) or "-"
        gflop = f"{r.gflop:.1f}" if r.gflop else "-"
        rate = f"{r.gflop / r.jax_s:.0f}" if r.gflop else "-"
        own = ""
        if f32:
            own = (f"{r.jax_float32_s:.3f} | {r.jax_float32_s / r.jax_s:.2f}x | "
                   if r.jax_float32_s is not None else "- | - | ")
        lines.append(f"| {r.arch} | {'x'.join(map(str, r.shape))} | {r.dtype} | {r.jax_s:.3f} | "
                     f"{r.clips_per_s:.1f} | {gflop} | {rate} | {own}{torch_cells} | {ratios} | "
                     f"{r.compile_s:.1f} |")
    return "\n".join(lines)
