"""`vmz-jax bench --suite accelerator`: every number the first minutes on a GPU must produce, unattended.

One process, one device (whatever JAX finds; torch on the same one), a fixed wall-clock budget. In
order of priority, each phase getting a share of the time still left (`PHASES`):

1. the training batch of the biggest model: XLA's memory plan of one compiled step at the forward's
   batch, scaled to the device's memory limit (`largest_batch`), then tried (out of memory: 20% less);
2. torch (`vmz_jax.reference.vmz_torch`): forward and training step of every model, float32 with TF32
   off, and bfloat16 (AMP autocast, channels_last_3d); cudnn.benchmark on. torch runs before JAX because
   JAX's allocator keeps what it once took: run after it, torch would find the device full;
3. ours in float32 at precision HIGHEST (no TF32), through the public API (`make_forward`;
   `vmz_jax.train.train_step` with `nnx.Optimizer(model, optax.sgd(lr, momentum=0.9))`);
4. every depthwise convolution shape of the models (collected from the traced jaxpr, with how often each
   runs) under every implementation ("reference", "fast", "pallas" off CPU), forward and forward + both
   gradients, float32 and bfloat16;
5. whole-model float32 training steps under the `AUTO_IMPL` rows the per-form results suggest, and the
   row this evidence recommends;
6. ours in bfloat16 (`dtype=bfloat16`);
7. the other forms' shapes, A/B'd as in 4.

Each measurement is one warm-up run (compile included), then as many timed runs as its share of the
budget allows (median reported); what no longer fits is recorded as skipped, with the reason. A watchdog
writes what is done and exits when the budget is spent, so the command never overruns. Results are
rewritten after every measurement: `accelerator.json` and `accelerator.md` (tables for
docs/benchmarks.md, ending with the recommended `AUTO_IMPL` row for this platform).

Peak memory: torch's `max_memory_allocated` (reset before each measurement); ours the device's
`peak_bytes_in_use` when this measurement raised it (a lifetime high-water mark cannot be reset, so a
measurement that stays below an earlier one reports only an upper bound; JAX's measurements run in
roughly increasing memory for that reason).

`--tiny` runs the same code on small models and inputs in seconds (what CI runs); its numbers mean
nothing. Imports only jax, flax, optax, numpy and torch: the GPU image has no imageio_ffmpeg.
"""

from __future__ import annotations

import gc
import json
import math
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

NUM_CLASSES = 400
LEARNING_RATE = 1e-3
DTYPES = ("float32", "bfloat16")
#: A per-form implementation must beat the current one by this much to be recommended instead.
MARGIN = 0.05


@dataclass(frozen=True)
class ModelCase:
    arch: str
    forward_shape: tuple[int, int, int, int]  # N, T, H, W
    train_shape: tuple[int, int, int, int]  # N = 0: the largest batch that fits, searched
    max_train_batch: int = 64


@dataclass(frozen=True)
class SuiteConfig:
    models: tuple[ModelCase, ...]
    max_repeats: int
    #: seconds a measurement may spend on timed runs (after its warm-up)
    run_cap_s: float
    #: first guesses of a measurement's cost (seconds) before anything similar has run
    prior_s: dict[str, float]
    tiny: bool


FULL = SuiteConfig(
    models=(ModelCase("r2plus1d_34", (8, 32, 112, 112), (8, 32, 112, 112)),
            ModelCase("ir_csn_152", (8, 32, 224, 224), (0, 32, 224, 224))),
    max_repeats=10, run_cap_s=8.0, tiny=False,
    prior_s={"torch:forward": 10, "torch:train": 20, "ours:forward": 40, "ours:train": 90,
             "ours:plan": 40, "form": 3})
TINY = SuiteConfig(
    models=(ModelCase("r2plus1d_10", (1, 4, 16, 16), (2, 4, 16, 16)),
            ModelCase("ir_csn_26", (1, 4, 16, 16), (0, 4, 16, 16), max_train_batch=2)),
    max_repeats=2, run_cap_s=0.5, tiny=True,
    prior_s={"torch:forward": 1, "torch:train": 2, "ours:forward": 3, "ours:train": 10,
             "ours:plan": 10, "form": 0.5})

#: Phases in order of priority, with the share of the then-remaining time each may use: what decides the
#: issue's questions (float32 against torch, the depthwise form, the row) before bfloat16 and the other forms.
PHASES = (("batch", 0.12), ("torch", 0.25), ("ours float32", 0.5), ("depthwise forms", 0.3), ("rows", 0.5),
          ("ours bfloat16", 0.6), ("other forms", 1.0))


# ------------------------------------------------------------------------------------------------
# budget


class Budget:
    """A hard deadline for the whole run and a soft one per phase (a share of what is left)."""

    def __init__(self, seconds: float, reserve_s: float = 5.0, already_s: float = 0.0):
        self.start = time.monotonic() - already_s
        self.seconds = seconds
        self.deadline = self.start + max(seconds - reserve_s, 0.0)
        self.phase_deadline = self.deadline
        self.phase = ""
        self.started = False

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return min(self.phase_deadline, self.deadline) - time.monotonic()

    def begin(self, phase: str, share: float) -> None:
        now = time.monotonic()
        self.phase = phase
        self.phase_deadline = now + share * max(self.deadline - now, 0.0)
        self.started = False

    def fits(self, estimate_s: float) -> bool:
        """Whether a measurement of about `estimate_s` seconds may start: within the phase's share, or,
        for the phase's first (its most important), within the whole run's deadline."""
        limit = self.left() if self.started else self.deadline - time.monotonic()
        self.started = self.started or estimate_s <= limit
        return estimate_s <= limit


def process_age() -> float:
    """Seconds since this process started (Linux; 0 elsewhere): the budget counts the imports too."""
    try:
        with open("/proc/self/stat") as f:
            started_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(uptime - started_ticks / os.sysconf("SC_CLK_TCK"), 0.0)
    except (OSError, ValueError, IndexError):
        return 0.0


def largest_batch(plan_bytes: int, plan_batch: int, usable_bytes: int, cap: int) -> int:
    """The largest batch whose memory, scaled linearly from XLA's plan at `plan_batch`, stays within
    `usable_bytes` (at least 1, at most `cap`). Linear scaling slightly overstates the fixed part
    (weights, optimizer state), so the answer errs small."""
    per_clip = plan_bytes / plan_batch
    return max(1, min(cap, int(usable_bytes // per_clip)))


# ------------------------------------------------------------------------------------------------
# the run


@dataclass
class Suite:
    config: SuiteConfig
    budget: Budget
    out_dir: Path
    log: Callable[[str], None]
    results: dict[str, Any] = field(default_factory=dict)
    estimates: dict[str, float] = field(default_factory=dict)
    current: str = ""
    #: the convolution forms each model uses (filled by `phase_forms`)
    model_forms: dict[str, set[str]] = field(default_factory=dict)
    conv_shapes: dict[ConvShape, dict[str, int]] = field(default_factory=dict)
    skipping: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    # bookkeeping ---------------------------------------------------------------------------------

    def estimate(self, key: str, kind: str) -> float:
        return self.estimates.get(key, self.config.prior_s[kind])

    def record(self, section: str, row: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            self.results.setdefault(section, []).append(row)
        self.write()
        return row

    def skip(self, section: str, row: dict[str, Any], estimate_s: float) -> dict[str, Any]:
        reason = (f"budget: needs about {estimate_s:.0f} s, {max(self.budget.left(), 0):.0f} s left "
                  f"in phase {self.budget.phase}")
        if self.budget.phase not in self.skipping:  # one line per phase: the rest are in the report
            self.skipping.add(self.budget.phase)
            self.log(f"skip {describe(row)} and what follows in phase {self.budget.phase}: {reason}")
        return self.record(section, {**row, "status": "skipped", "reason": reason})

    def write(self, cut_off: str | None = None) -> None:
        from vmz_jax.files import atomic_write

        with self.lock:
            self.results["elapsed_s"] = round(self.budget.elapsed(), 2)
            if cut_off:
                self.results["cut_off_during"] = cut_off
                self._fill_unreached(cut_off)
            report = json.dumps(self.results, indent=1, default=str) + "\n"
            table = format_markdown(self.results)
        atomic_write(self.out_dir / "accelerator.json", report, "w")
        atomic_write(self.out_dir / "accelerator.md", table, "w")

    def _fill_unreached(self, cut_off: str) -> None:
        """Every model row the suite owes, recorded as skipped when the budget ended before it."""
        rows = self.results.setdefault("models", [])
        done = {(r["side"], r["arch"], r["task"], r["dtype"]) for r in rows}
        sides = ("torch", "ours") if self.results.get("environment", {}).get("torch_device") else ("ours",)
        for case, task, dtype in model_matrix(self.config, {}):
            for side in sides:
                if (side, case.arch, task, dtype) not in done:
                    rows.append({"side": side, "arch": case.arch, "task": task, "dtype": dtype,
                                 "shape": list(case.forward_shape if task == "forward" else case.train_shape),
                                 "status": "skipped", "reason": f"budget spent (during {cut_off})"})

    @contextmanager
    def measuring(self, what: str) -> Iterator[None]:
        self.current = what
        try:
            yield
        finally:
            self.current = ""
            gc.collect()


def describe(row: dict[str, Any]) -> str:
    keys = ("side", "arch", "task", "dtype", "form", "impl", "row")
    return " ".join(str(row[k]) for k in keys if row.get(k) is not None)


def time_runs(run: Callable[[], Any], budget: Budget, config: SuiteConfig) -> dict[str, float]:
    """Warm-up (first) run, then timed runs while the budget allows: {first_s, step_s, repeats}."""
    start = time.perf_counter()
    outputs = [run()]
    first = time.perf_counter() - start
    times: list[float] = []
    while len(times) < config.max_repeats:
        if times and (sum(times) + times[-1] > config.run_cap_s or not budget.fits(times[-1])):
            break
        start = time.perf_counter()
        outputs.append(run())
        times.append(time.perf_counter() - start)
    timing: dict[str, Any] = {"first_s": first, "step_s": statistics.median(times), "repeats": len(times)}
    if all(isinstance(o, float) for o in outputs):  # a training step's losses, in order
        timing["losses"] = outputs
    return timing


def nonfinite_loss(losses: list[float]) -> str | None:
    """Why a training row's losses are no measurement of training (None when every one is finite)."""
    bad = [i for i, loss in enumerate(losses) if not math.isfinite(loss)]
    if not bad:
        return None
    return (f"loss not finite from step {bad[0] + 1} of {len(losses)} on "
            f"(losses {', '.join(f'{loss:.4g}' for loss in losses)})")


def is_oom(error: BaseException) -> bool:
    text = f"{type(error).__name__}: {error}"
    return "RESOURCE_EXHAUSTED" in text or "OutOfMemory" in text or "out of memory" in text.lower()


# ------------------------------------------------------------------------------------------------
# environment


def configure_environment() -> None:
    """Before JAX starts its backend: allocate on demand (torch shares the device) up to 90%."""
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.90")


def environment(torch_device: str | None) -> dict[str, Any]:
    import flax
    import jax

    from vmz_jax.models.conv import AUTO_IMPL

    device = jax.devices()[0]
    env: dict[str, Any] = {
        "backend": jax.default_backend(), "device": getattr(device, "device_kind", str(device)),
        "device_count": jax.device_count(), "jax": jax.__version__, "flax": flax.__version__,
        "python": sys.version.split()[0], "memory_limit_bytes": memory_limit(),
        "auto_impl_row": dict(AUTO_IMPL.get(jax.default_backend(), {})),
        "xla_env": {k: v for k, v in os.environ.items() if k.startswith(("XLA_", "JAX_"))},
        "torch_device": torch_device, "pallas_unavailable": pallas_unavailable()}
    try:
        import jaxlib

        env["jaxlib"] = jaxlib.__version__
    except ImportError:
        pass
    if torch_device is not None:
        import torch

        env["torch"] = torch.__version__
        env["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return env


def preflight() -> None:
    """Import now everything the phases will need, so that a missing module fails in the first seconds
    rather than after minutes of measurements (torch is optional: without it, ours alone is measured)."""
    import flax.nnx  # noqa: F401
    import optax  # noqa: F401

    import vmz_jax.bench  # noqa: F401
    import vmz_jax.models.forward  # noqa: F401
    import vmz_jax.train  # noqa: F401


def pallas_unavailable() -> str | None:
    """Why the Pallas kernels cannot run here (their module does not import), or None."""
    try:
        import vmz_jax.models.conv_pallas  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any failure: the suite goes on without the kernel
        return f"{type(e).__name__}: {e}"
    return None


def torch_device_for(backend: str) -> str | None:
    """torch's device on JAX's backend ("cuda" for gpu), or None without torch or without that device."""
    try:
        import torch

        from vmz_jax.reference import vmz_torch  # noqa: F401 - the models the torch side runs
    except ImportError:
        return None
    if backend == "cpu":
        return "cpu"
    if backend in ("gpu", "cuda", "rocm") and torch.cuda.is_available():
        return "cuda"
    return None


def memory_limit() -> int | None:
    """The bytes JAX's allocator may take on the device (None where the backend does not say)."""
    import jax

    return (jax.devices()[0].memory_stats() or {}).get("bytes_limit")


def device_peak() -> int | None:
    import jax

    stats = jax.devices()[0].memory_stats()
    return None if not stats else stats.get("peak_bytes_in_use")


def peak_fields(before: int | None) -> dict[str, Any]:
    """Ours: the device's high-water mark if this measurement raised it, else only an upper bound."""
    after = device_peak()
    if after is None:
        return {"peak_bytes": None, "peak_source": "unavailable on this backend"}
    if before is None or after > before:
        return {"peak_bytes": after, "peak_source": "device peak_bytes_in_use"}
    return {"peak_bytes": None, "peak_bytes_at_most": after,
            "peak_source": "below an earlier measurement's high-water mark"}


# ------------------------------------------------------------------------------------------------
# ours


def _dtype(name: str) -> Any:
    import jax.numpy as jnp

    return jnp.dtype(name)


@contextmanager
def precision_for(dtype: str) -> Iterator[None]:
    """float32: every matmul and convolution at HIGHEST (no TF32, no bf16 passes); else the default."""
    import jax

    with jax.default_matmul_precision("highest" if dtype == "float32" else "default"):
        yield


def batch(shape: tuple[int, ...], seed: int = 0) -> tuple[Any, Any]:
    import numpy as np

    rng = np.random.default_rng(seed)
    clips = rng.standard_normal((*shape[:4], 3)).astype(np.float32)
    return clips, rng.integers(0, NUM_CLASSES, shape[0]).astype(np.int32)


def ours_train(arch: str, shape: tuple[int, ...], dtype: str) -> Callable[[], float]:
    """One `vmz_jax.train.train_step` (SGD, momentum 0.9) per call; returns the loss."""
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from vmz_jax.models import build
    from vmz_jax.train import train_step

    model = build(arch, NUM_CLASSES, dtype=_dtype(dtype), clip_length=min(shape[1], 8))
    model.train()
    optimizer = nnx.Optimizer(model, optax.sgd(LEARNING_RATE, momentum=0.9), wrt=nnx.Param)
    clips, labels = (jnp.asarray(a) for a in batch(shape))

    def run() -> float:
        return float(train_step(model, optimizer, clips, labels)["loss"])

    return run


@contextmanager
def auto_row(row: dict[str, str]) -> Iterator[None]:
    """`AUTO_IMPL`'s row of the current backend replaced by `row` (in place: "gpu" and "cuda" share
    one), with JAX's caches cleared on the way in and out so that every function is traced anew."""
    import jax

    from vmz_jax.models.conv import AUTO_IMPL

    table = AUTO_IMPL[jax.default_backend()]
    saved = dict(table)
    table.update(row)
    jax.clear_caches()
    try:
        yield
    finally:
        table.clear()
        table.update(saved)
        jax.clear_caches()


# ------------------------------------------------------------------------------------------------
# torch


def torch_model(arch: str, shape: tuple[int, ...], dtype: str, device: str, train: bool) -> tuple[Any, Any]:
    import torch

    from vmz_jax.reference import vmz_torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)  # the same weights every run, as ours (a row can be rerun as it was)
    model = vmz_torch.build(arch, num_classes=NUM_CLASSES, clip_length=min(shape[1], 8)).to(device)
    model = model.train() if train else model.eval()
    clips = torch.from_numpy(batch(shape)[0]).permute(0, 4, 1, 2, 3).to(device)
    if dtype == "bfloat16":
        model = model.to(memory_format=torch.channels_last_3d)
        clips = clips.contiguous(memory_format=torch.channels_last_3d)
    else:
        clips = clips.contiguous()
    return model, clips


def torch_autocast(dtype: str, device: str) -> Any:
    import torch

    return torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=dtype == "bfloat16")


def torch_forward(arch: str, shape: tuple[int, ...], dtype: str, device: str) -> Callable[[], Any]:
    import torch

    model, clips = torch_model(arch, shape, dtype, device, train=False)

    def run() -> Any:
        with torch.inference_mode(), torch_autocast(dtype, device):
            out = model(clips)
        synchronize(device)
        return out

    return run


def torch_train(arch: str, shape: tuple[int, ...], dtype: str, device: str) -> Callable[[], float]:
    import torch

    model, clips = torch_model(arch, shape, dtype, device, train=True)
    labels = torch.from_numpy(batch(shape)[1]).long().to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=0.9)

    def run() -> float:
        optimizer.zero_grad(set_to_none=True)
        with torch_autocast(dtype, device):
            loss = torch.nn.functional.cross_entropy(model(clips).float(), labels)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return run


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def torch_memory_reset(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def torch_peak(device: str) -> dict[str, Any]:
    if not device.startswith("cuda"):
        return {"peak_bytes": None, "peak_source": "unavailable on this device"}
    import torch

    return {"peak_bytes": int(torch.cuda.max_memory_allocated()), "peak_source": "max_memory_allocated"}


# ------------------------------------------------------------------------------------------------
# convolution shapes and forms


@dataclass(frozen=True)
class ConvShape:
    form: str
    x_shape: tuple[int, ...]
    w_shape: tuple[int, ...]
    stride: tuple[int, int, int]
    padding: tuple[int, int, int]
    groups: int

    def key(self) -> str:
        def dims(s: tuple[int, ...]) -> str:
            return "x".join(map(str, s))

        return (f"{self.form} x{dims(self.x_shape)} w{dims(self.w_shape)} s{dims(self.stride)} "
                f"p{dims(self.padding)} g{self.groups}")


def _sub_jaxprs(params: dict[str, Any]) -> Iterator[Any]:
    for value in params.values():
        for v in value if isinstance(value, (tuple, list)) else (value,):
            inner = getattr(v, "jaxpr", v)  # ClosedJaxpr -> Jaxpr
            if hasattr(inner, "eqns"):
                yield inner


def _count_convs(jaxpr: Any, times: int, counts: dict[ConvShape, int]) -> None:
    from vmz_jax.models.conv import conv_form

    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "conv_general_dilated":
            x, w = (v.aval.shape for v in eqn.invars[:2])
            padding = tuple(lo for lo, _ in eqn.params["padding"])
            groups = eqn.params["feature_group_count"]
            form = conv_form(x[-1], w, padding, groups)  # NDHWC x DHWIO, as reference_conv3d writes
            shape = ConvShape(form, tuple(x), tuple(w), tuple(eqn.params["window_strides"]), padding,
                              groups)
            counts[shape] = counts.get(shape, 0) + times
        repeat = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
        for sub in _sub_jaxprs(eqn.params):
            _count_convs(sub, times * repeat, counts)


def model_conv_shapes(arch: str, shape: tuple[int, ...]) -> dict[ConvShape, int]:
    """Every 3-D convolution of `arch`'s forward at input `shape` and how often it runs (scanned blocks
    counted per block), from the jaxpr of the model with every convolution in its plain `lax` form."""
    import jax
    import jax.numpy as jnp

    from vmz_jax.models import build
    from vmz_jax.models.forward import make_forward

    model = build(arch, NUM_CLASSES, conv_impl="reference", clip_length=min(shape[1], 8))
    forward = make_forward(model, "logits")
    closed = jax.make_jaxpr(forward.fn)(forward.state, jax.ShapeDtypeStruct((*shape[:4], 3), jnp.float32))
    counts: dict[ConvShape, int] = {}
    _count_convs(closed.jaxpr, 1, counts)
    return counts


def form_impls(form: str) -> tuple[str, ...]:
    """The implementations A/B'd for a form: the plain convolution, the rewrite, and any kernel (not on
    CPU, where Pallas kernels run in its interpreter)."""
    import jax

    from vmz_jax.models.conv import KERNEL_IMPLS

    if form == "grouped":
        return ("reference",)
    usable = jax.default_backend() != "cpu" and pallas_unavailable() is None
    kernels = KERNEL_IMPLS.get(form, ()) if usable else ()
    return ("reference", "fast", *kernels)


def conv_functions(shape: ConvShape, impl: str, dtype: str) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """Ready-to-run jitted (forward, forward + both gradients) of one convolution shape."""
    import jax
    import numpy as np

    from vmz_jax.models.conv import conv3d

    rng = np.random.default_rng(0)
    dt = _dtype(dtype)
    x = jax.numpy.asarray(rng.standard_normal(shape.x_shape), dt)
    w = jax.numpy.asarray(rng.standard_normal(shape.w_shape) * 0.1, dt)

    def f(x: Any, w: Any) -> Any:
        return conv3d(x, w, shape.stride, shape.padding, shape.groups, impl)

    y = jax.eval_shape(f, x, w)  # bfloat16 fast forms return their float32 accumulator
    g = jax.numpy.asarray(rng.standard_normal(y.shape), y.dtype)

    def grads(x: Any, w: Any, g: Any) -> Any:
        _, vjp = jax.vjp(f, x, w)
        return vjp(g)

    fwd, bwd = jax.jit(f), jax.jit(grads)
    return (lambda: fwd(x, w).block_until_ready(),
            lambda: jax.block_until_ready(bwd(x, w, g)))


# ------------------------------------------------------------------------------------------------
# phases


def phase_batch(suite: Suite) -> dict[str, int]:
    """The training batch of each model: given, or the largest that XLA's plan says fits."""
    from vmz_jax.train.memory import train_memory  # the donated step's memory plan, compiled only

    batches: dict[str, int] = {}
    limit = memory_limit()
    for case in suite.config.models:
        if case.train_shape[0]:
            batches[case.arch] = case.train_shape[0]
            continue
        plan_shape = (case.forward_shape[0], *case.train_shape[1:])
        row: dict[str, Any] = {"arch": case.arch, "dtype": "float32", "plan_shape": list(plan_shape)}
        if not limit:
            batches[case.arch] = case.max_train_batch
            suite.record("train_batch", {**row, "batch": case.max_train_batch, "status": "fixed",
                                         "reason": "no device memory limit on this backend: the "
                                                   "configured largest batch"})
            continue
        estimate = suite.estimate(f"ours:plan:{case.arch}", "ours:plan")
        if not suite.budget.fits(estimate):
            batches[case.arch] = case.forward_shape[0]
            suite.skip("train_batch", {**row, "batch": case.forward_shape[0]}, estimate)
            continue
        with suite.measuring(f"memory plan of {case.arch}"), precision_for("float32"):
            start = time.perf_counter()
            plan = train_memory(case.arch, plan_shape, dtype="float32", forward=False).train.peak
            suite.estimates[f"ours:train:{case.arch}"] = 2 * (time.perf_counter() - start)
        usable = int(0.9 * limit)
        chosen = largest_batch(plan, plan_shape[0], usable, case.max_train_batch) if plan else plan_shape[0]
        batches[case.arch] = chosen
        suite.log(f"{case.arch}: training step plans {plan} bytes at batch {plan_shape[0]}; "
                  f"limit {limit}: batch {chosen}")
        suite.record("train_batch", {**row, "plan_bytes": plan, "memory_limit_bytes": limit,
                                     "usable_bytes": usable, "batch": chosen, "status": "ok"})
    return batches


def _measure(suite: Suite, section: str, row: dict[str, Any], kind: str,
             prepare: Callable[[], tuple[Callable[[], Any], dict[str, Any]]],
             peak: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    key = f"{kind}:{row['arch']}"
    estimate = suite.estimate(key, kind)
    if not suite.budget.fits(estimate):
        return suite.skip(section, row, estimate)
    start = time.perf_counter()
    try:
        with suite.measuring(describe(row)):
            run, extra = prepare()
            timing = time_runs(run, suite.budget, suite.config)
            result = {**row, **extra, **timing, **peak(), "status": "ok"}
            del run
            if row.get("task") == "train":  # both sides really train: finite losses, or it is said
                result["loss"] = result["losses"][-1]
                reason = nonfinite_loss(result["losses"])
                if reason:
                    suite.log(f"nonfinite {describe(row)}: {reason}")
                    result.update(status="nonfinite", reason=reason)
    except Exception as e:  # noqa: BLE001 - recorded, the suite goes on
        status = "oom" if is_oom(e) else "error"
        suite.log(f"{status} {describe(row)}: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
        return suite.record(section, {**row, "status": status,
                                      "reason": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"})
    spent = time.perf_counter() - start
    suite.estimates[key] = max(suite.estimates.get(key, 0.0), spent)
    shape = row["shape"]
    result["clips_per_s"] = shape[0] / result["step_s"]
    suite.log(f"{describe(row)} {'x'.join(map(str, shape))}: {result['step_s']:.4f} s "
              f"(first {result['first_s']:.1f} s, {result['repeats']} runs)")
    return suite.record(section, result)


def phase_torch(suite: Suite, device: str, batches: dict[str, int]) -> None:
    for case, task, dtype in model_matrix(suite.config, batches):
        shape = task_shape(case, task, batches)
        row = {"side": "torch", "arch": case.arch, "task": task, "dtype": dtype, "shape": list(shape),
               "device": device}
        while True:
            result = _measure(suite, "models", row, f"torch:{task}",
                              partial(_torch_prepare, task, case.arch, shape, dtype, device),
                              partial(torch_peak, device))
            torch_memory_reset(device)
            if not (result["status"] == "oom" and task == "train" and shape[0] > 1):
                break
            shape = (shape[0] // 2, *shape[1:])  # the largest batch torch fits, reported as such
            row = {**row, "shape": list(shape), "note": "torch's batch after an OOM"}


def _torch_prepare(task: str, arch: str, shape: tuple[int, ...], dtype: str, device: str
                   ) -> tuple[Callable[[], Any], dict[str, Any]]:
    torch_memory_reset(device)
    return (torch_forward if task == "forward" else torch_train)(arch, shape, dtype, device), {}


def _ours_prepare(task: str, arch: str, shape: tuple[int, ...], dtype: str
                  ) -> tuple[Callable[[], Any], dict[str, Any]]:
    if task == "forward":  # the forward the pipeline runs, "auto" resolved for this backend
        from vmz_jax.bench import jax_forward

        run, compile_s = jax_forward(arch, (*shape, 3), dtype=_dtype(dtype))
        return run, {"compile_s": compile_s}
    return ours_train(arch, shape, dtype), {}


def model_matrix(config: SuiteConfig, batches: dict[str, int]) -> list[tuple[ModelCase, str, str]]:
    """(model, task, dtype): float32 first (the comparisons that matter most, should the budget cut),
    each dtype's in increasing memory, so that each of ours raises the device's high-water mark."""
    return [(case, task, dtype) for dtype in DTYPES for task in ("forward", "train")
            for case in config.models]


def task_shape(case: ModelCase, task: str, batches: dict[str, int]) -> tuple[int, ...]:
    return case.forward_shape if task == "forward" else (batches[case.arch], *case.train_shape[1:])


def phase_ours(suite: Suite, batches: dict[str, int], row_name: str = "current",
               tasks: tuple[str, ...] = ("forward", "train"), dtypes: tuple[str, ...] = DTYPES,
               section: str = "models", archs: set[str] | None = None) -> list[dict[str, Any]]:
    out = []
    for case, task, dtype in model_matrix(suite.config, batches):
        if task not in tasks or dtype not in dtypes or (archs is not None and case.arch not in archs):
            continue
        shape = task_shape(case, task, batches)
        row = {"side": "ours", "arch": case.arch, "task": task, "dtype": dtype, "shape": list(shape),
               "row": row_name}
        while True:
            before = device_peak()

            with precision_for(dtype):
                result = _measure(suite, section, row, f"ours:{task}",
                                  partial(_ours_prepare, task, case.arch, shape, dtype),
                                  partial(peak_fields, before))
            if result["status"] == "ok" and task == "train":
                result["compile_s"] = max(result["first_s"] - result["step_s"], 0.0)
                suite.write()
            searched = not case.train_shape[0] and section == "models"
            if not (result["status"] == "oom" and task == "train" and searched and shape[0] > 1):
                break
            batches[case.arch] = max(int(shape[0] * 0.8), 1)  # the plan was optimistic: 20% smaller
            shape = task_shape(case, task, batches)
            row = {**row, "shape": list(shape), "note": "batch reduced after an OOM"}
        out.append(result)
    return out


def collect_conv_shapes(suite: Suite) -> dict[ConvShape, dict[str, int]]:
    """Every convolution shape of the models, with how often each model runs it (once per suite)."""
    if not suite.conv_shapes:
        for case in suite.config.models:
            counts = model_conv_shapes(case.arch, case.forward_shape)
            suite.model_forms[case.arch] = {shape.form for shape in counts}
            for shape, count in counts.items():
                suite.conv_shapes.setdefault(shape, {})[case.arch] = count
    return suite.conv_shapes


def phase_forms(suite: Suite, depthwise: bool) -> None:
    """The depthwise convolution shapes of the models (or all the others) under every implementation of
    their form, float32 then bfloat16."""
    shapes = collect_conv_shapes(suite)

    def weight(item: tuple[ConvShape, dict[str, int]]) -> int:
        shape, counts = item
        size = 1
        for d in (*shape.x_shape, *shape.w_shape[:4]):
            size *= d
        return sum(counts.values()) * size

    # the other forms round-robin, heaviest shape of each form first: a budget cut leaves every form
    # A/B'd on its heaviest shapes
    ordered = sorted(shapes.items(), key=weight, reverse=True)
    rank: dict[str, int] = {}
    position = {}
    for item in ordered:
        form = item[0].form
        position[item[0]] = rank[form] = rank.get(form, -1) + 1
    ordered.sort(key=lambda item: position[item[0]])
    items = [item for item in ordered if (item[0].form == "depthwise") == depthwise]
    for dtype in DTYPES:
        for shape, counts in items:
            for impl in form_impls(shape.form):
                row = {"form": shape.form, "impl": impl, "dtype": dtype, "shape_key": shape.key(),
                       "x_shape": list(shape.x_shape), "w_shape": list(shape.w_shape),
                       "stride": list(shape.stride), "padding": list(shape.padding), "groups": shape.groups,
                       "count": counts}
                estimate = suite.estimates.get(f"form:{shape.key()}", suite.config.prior_s["form"])
                if not suite.budget.fits(estimate):
                    suite.skip("forms", row, estimate)
                    continue
                start = time.perf_counter()
                try:
                    with suite.measuring(describe(row) + " " + shape.key()), precision_for(dtype):
                        fwd, train = conv_functions(shape, impl, dtype)
                        f = time_runs(fwd, suite.budget, suite.config)
                        t = time_runs(train, suite.budget, suite.config)
                except Exception as e:  # noqa: BLE001 - recorded
                    suite.record("forms", {**row, "status": "oom" if is_oom(e) else "error",
                                           "reason": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"})
                    continue
                suite.estimates[f"form:{shape.key()}"] = time.perf_counter() - start
                suite.record("forms", {**row, "forward_s": f["step_s"], "train_s": t["step_s"],
                                       "first_s": f["first_s"] + t["first_s"], "status": "ok"})
    suite.log(f"forms ({'depthwise' if depthwise else 'the others'}): {len(items)} shapes")


def summarize_forms(forms: list[dict[str, Any]], current: dict[str, str]) -> dict[str, Any]:
    """Per form and dtype: each implementation's time summed over the shapes measured under every one
    of them (weighted by how often each shape runs), and the fastest by the training time."""
    by: dict[tuple[str, str], dict[str, dict[str, dict[str, float]]]] = {}
    for r in forms:
        if r.get("status") != "ok":
            continue
        weight = sum(r["count"].values())
        cell = by.setdefault((r["form"], r["dtype"]), {}).setdefault(r["shape_key"], {})
        cell[r["impl"]] = {"forward_s": r["forward_s"] * weight, "train_s": r["train_s"] * weight}
    summary: dict[str, Any] = {}
    for (form, dtype), per_shape in sorted(by.items()):
        impls = sorted({impl for cells in per_shape.values() for impl in cells})
        complete = [cells for cells in per_shape.values() if all(i in cells for i in impls)]
        totals = {impl: {k: sum(c[impl][k] for c in complete) for k in ("forward_s", "train_s")}
                  for impl in impls}
        summary.setdefault(form, {})[dtype] = {"shapes": len(complete), "totals": totals}
    recommended = dict(current)
    reasons = {}
    for form, per_dtype in summary.items():
        # the training step decides (its backward is where the forms differ most); both dtypes count
        score = {impl: sum(per_dtype[d]["totals"][impl]["train_s"] for d in per_dtype
                           if impl in per_dtype[d]["totals"]) for impl in
                 set.intersection(*(set(per_dtype[d]["totals"]) for d in per_dtype))}
        if not score:
            continue
        best = min(score, key=score.__getitem__)
        now = current.get(form)
        if now in score and best != now and score[best] > (1 - MARGIN) * score[now]:
            best = now  # within the margin: keep what is there
        recommended[form] = best
        reasons[form] = {impl: round(s, 6) for impl, s in sorted(score.items())}
    return {"per_form": summary, "recommended_row": recommended, "scores_train_s": reasons}


def phase_rows(suite: Suite, batches: dict[str, int], current: dict[str, str]) -> dict[str, Any]:
    """Whole-model float32 training steps under the per-form recommendation and under the all-"reference"
    row (which tests the current row's departures from it), for each model whose convolution forms the
    row changes; then the row this evidence recommends."""
    from vmz_jax.models.conv import FORMS

    collect_conv_shapes(suite)  # which forms each model has
    by_forms = summarize_forms(suite.results.get("forms", []), current)
    suite.results["form_summary"] = by_forms
    candidates = {"forms_recommended": by_forms["recommended_row"],
                  "all_reference": dict.fromkeys(FORMS, "reference")}
    seen = [current]
    for name, row in candidates.items():
        if row in seen:
            continue
        seen.append(row)
        changed = {form for form in FORMS if row.get(form) != current.get(form)}
        archs = {arch for arch, forms in suite.model_forms.items() if changed & forms}
        with auto_row(row):
            for r in phase_ours(suite, batches, name, tasks=("train",), dtypes=("float32",), section="rows",
                                archs=archs):
                r["auto_row"] = row
        suite.write()
    return decide_row(suite.results, current, candidates)


def decide_row(results: dict[str, Any], current: dict[str, str], candidates: dict[str, dict[str, str]]
               ) -> dict[str, Any]:
    """The row to recommend: the candidate whose whole-model training steps (summed over the models
    measured under both) beat the current row's by more than `MARGIN`, else the current row."""
    def steps(rows: list[dict[str, Any]], name: str) -> dict[str, float]:
        return {r["arch"]: r["step_s"] for r in rows if r.get("row") == name and r.get("status") == "ok"
                and r.get("task") == "train" and r.get("dtype") == "float32"}

    base = steps(results.get("models", []), "current")
    evidence = {}
    best_name, best_row, best_ratio = "current", current, 1.0
    for name, row in candidates.items():
        other = steps(results.get("rows", []), name)
        common = sorted(set(base) & set(other))
        if not common:
            continue
        ratio = sum(other[a] for a in common) / sum(base[a] for a in common)
        evidence[name] = {"models": common, "time_vs_current": round(ratio, 4)}
        if ratio < best_ratio * (1 - MARGIN):
            best_name, best_row, best_ratio = name, row, ratio
    return {"current": current, "recommended": best_row, "recommended_from": best_name,
            "whole_model_evidence": evidence}


# ------------------------------------------------------------------------------------------------
# entry point


def run_suite(out_dir: str | os.PathLike[str], *, budget_s: float = 480.0, tiny: bool = False,
              log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the suite into `out_dir` (accelerator.json, accelerator.md); returns the results."""
    configure_environment()
    import jax

    config = TINY if tiny else FULL
    if tiny:  # seconds, not numbers: compile as little as possible
        jax.config.update("jax_disable_most_optimizations", True)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    budget = Budget(budget_s, reserve_s=2.0 if tiny else 8.0, already_s=process_age())

    def say(message: str) -> None:
        print(f"[{budget.elapsed():6.1f}s/{budget_s:.0f}s] {message}", file=sys.stderr, flush=True)

    suite = Suite(config, budget, out, log or say)
    preflight()
    device = torch_device_for(jax.default_backend())
    suite.results.update({"suite": "accelerator", "format": 1, "tiny": tiny, "budget_s": budget_s,
                          "complete": False, "environment": environment(device)})
    current = dict(suite.results["environment"]["auto_impl_row"])
    suite.log(f"{suite.results['environment']['device']} ({jax.default_backend()}), torch on {device}")
    watchdog = threading.Timer(max(budget.deadline - time.monotonic(), 0) + (1.0 if tiny else 6.0),
                               _cut_off, (suite,))
    watchdog.daemon = True
    watchdog.start()
    try:
        phases = dict(PHASES)
        budget.begin("batch", phases["batch"])
        batches = phase_batch(suite)
        suite.results["train_batches"] = batches
        if device is not None:
            budget.begin("torch", phases["torch"])
            phase_torch(suite, device, batches)
        budget.begin("ours float32", phases["ours float32"])
        phase_ours(suite, batches, dtypes=("float32",))
        budget.begin("depthwise forms", phases["depthwise forms"])
        phase_forms(suite, depthwise=True)
        budget.begin("rows", phases["rows"])
        suite.results["auto_impl"] = phase_rows(suite, batches, current)
        budget.begin("ours bfloat16", phases["ours bfloat16"])
        phase_ours(suite, batches, dtypes=("bfloat16",))
        budget.begin("other forms", phases["other forms"])
        phase_forms(suite, depthwise=False)
        suite.results["form_summary"] = summarize_forms(suite.results.get("forms", []), current)
        suite.results["complete"] = not any(r.get("status") == "skipped" for section in
                                            ("models", "forms", "rows", "train_batch")
                                            for r in suite.results.get(section, []))
    finally:
        watchdog.cancel()
        suite.write()
    return suite.results


def _cut_off(suite: Suite) -> None:
    """The budget is spent: write what is done, say what was running, and end the process."""
    suite.log(f"budget spent during {suite.current or 'the last step'}: writing and exiting")
    try:
        suite.write(cut_off=suite.current or "between measurements")
    finally:
        os._exit(0)


# ------------------------------------------------------------------------------------------------
# report


def _mb(v: Any) -> str:
    return f"{v / 2**20:.0f}" if isinstance(v, (int, float)) else "-"


def _s(v: Any, digits: int = 4) -> str:
    return f"{v:.{digits}f}" if isinstance(v, (int, float)) else "-"


def format_markdown(results: dict[str, Any]) -> str:
    env = results.get("environment", {})
    lines = [f"### Accelerator suite: {env.get('device')} ({env.get('backend')}), jax {env.get('jax')}, "
             f"torch {env.get('torch', '-')} on {env.get('torch_device')}"
             + (" (--tiny: shapes for CI, numbers meaningless)" if results.get("tiny") else ""), "",
             f"Budget {results.get('budget_s')} s, used {results.get('elapsed_s')} s"
             + (f"; cut off during {results['cut_off_during']}" if results.get("cut_off_during") else ""),
             ""]
    for b in results.get("train_batch", []):
        lines.append(f"Training batch of {b['arch']}: {b.get('batch')} ({b.get('status')}"
                     + (f"; XLA plans {_mb(b.get('plan_bytes'))} MB at batch {b['plan_shape'][0]}, "
                        f"{_mb(b.get('usable_bytes'))} MB usable" if b.get("plan_bytes") else
                        f": {b.get('reason', '')}") + ")")
    lines += ["", "| model | task | dtype | input | ours s | torch s | speed-up | ours compile s "
              "| ours peak MB | torch peak MB |", "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    models = results.get("models", [])
    ours = [r for r in models if r["side"] == "ours"]
    for r in ours:
        t = next((x for x in models if x["side"] == "torch" and x["arch"] == r["arch"] and
                  x["task"] == r["task"] and x["dtype"] == r["dtype"] and x["shape"] == r["shape"]), {})
        ratio = (f"{t['step_s'] / r['step_s']:.2f}x" if r.get("status") == "ok" and t.get("status") == "ok"
                 else "-")
        peak = _mb(r.get("peak_bytes")) if r.get("peak_bytes") else (
            f"<= {_mb(r['peak_bytes_at_most'])}" if r.get("peak_bytes_at_most") else "-")
        lines.append(f"| {r['arch']} | {r['task']} | {r['dtype']} | {'x'.join(map(str, r['shape']))} | "
                     f"{_s(r.get('step_s')) if r['status'] == 'ok' else r['status']} | "
                     f"{_s(t.get('step_s')) if t.get('status') == 'ok' else t.get('status', '-')} | "
                     f"{ratio} | "
                     f"{_s(r.get('compile_s'), 1)} | {peak} | {_mb(t.get('peak_bytes'))} |")
    unmatched = [x for x in models if x["side"] == "torch" and not any(
        r["arch"] == x["arch"] and r["task"] == x["task"] and r["dtype"] == x["dtype"] and
        r["shape"] == x["shape"] for r in ours)]
    for x in unmatched:
        lines.append(f"| {x['arch']} | {x['task']} | {x['dtype']} | {'x'.join(map(str, x['shape']))} | - | "
                     f"{_s(x.get('step_s')) if x['status'] == 'ok' else x['status']} | - | - | - | "
                     f"{_mb(x.get('peak_bytes'))} |")
    summary = results.get("auto_impl", {})
    form_summary = results.get("form_summary", {})
    if form_summary:
        lines += ["", "Per convolution form (seconds summed over the models' shapes, weighted by how often "
                  "each runs; forward / forward + both gradients):", "",
                  "| form | dtype | shapes | " + " | ".join(f"{i}" for i in ("reference", "fast", "pallas"))
                  + " |", "|---|---|---:|---|---|---|"]
        for form, per_dtype in form_summary.get("per_form", {}).items():
            for dtype, cell in per_dtype.items():
                cells = [f"{_s(cell['totals'][i]['forward_s'])} / {_s(cell['totals'][i]['train_s'])}"
                         if i in cell["totals"] else "-" for i in ("reference", "fast", "pallas")]
                lines.append(f"| {form} | {dtype} | {cell['shapes']} | " + " | ".join(cells) + " |")
    rows = results.get("rows", [])
    if rows:
        lines += ["", "Whole-model float32 training step under other `AUTO_IMPL` rows:", "",
                  "| row | model | input | s | status |", "|---|---|---|---:|---|"]
        for r in rows:
            lines.append(f"| {r['row']} | {r['arch']} | {'x'.join(map(str, r['shape']))} | "
                         f"{_s(r.get('step_s'))} | {r['status']} |")
    if form_summary.get("recommended_row"):
        lines += ["", "The per-form A/B alone (training time, both dtypes, a change only past "
                  f"{MARGIN:.0%}) suggests `{form_summary['recommended_row']!r}`."]
    if summary:
        lines += ["", f"Recommended `AUTO_IMPL[{env.get('backend')!r}]` (from {summary['recommended_from']}; "
                  f"whole-model evidence {json.dumps(summary['whole_model_evidence'])}):", "", "```python",
                  repr(summary["recommended"]), "```"]
    skipped = [describe(r) for s in ("models", "forms", "rows") for r in results.get(s, [])
               if r.get("status") == "skipped"]
    if skipped:
        lines += ["", f"Skipped for the budget ({len(skipped)}): " + "; ".join(skipped[:20])
                  + (" ..." if len(skipped) > 20 else "")]
    return "\n".join(lines) + "\n"

