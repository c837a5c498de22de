"""Will it fit? The device memory of a training step (and of the forward), from XLA, without running.

`train_memory(arch, shape)` builds the model and its SGD-momentum optimizer abstractly
(`nnx.eval_shape`: shapes and dtypes only, nothing allocated), lowers the compiled training step
(`vmz_jax.train.step.lower_train_step`: the one `train_step` and `fit` run, donating the model and
optimizer) and the inference forward (`make_forward`) on `jax.ShapeDtypeStruct` inputs, compiles both
for the default backend (on a GPU machine: for that GPU) and reads `compiled.memory_analysis()`:

* argument bytes: every input buffer (weights, BatchNorm statistics, optimizer state, the batch);
* output bytes: every output buffer (the new state, the metrics);
* aliased bytes: outputs written into their input's buffer (donation): counted once, not twice;
* temp bytes: XLA's scratch arena for everything else alive during the step (the activations kept
  for the backward pass, gradients, workspaces), already packed by XLA's buffer liveness analysis;
* peak = argument + output - aliased + temp: the bytes the step's buffers occupy at once, at most.
  The runtime adds its own (the compiled code, allocator fragmentation, a GPU's cuDNN/cuBLAS
  handles), so leave some headroom.

`vmz-jax bench --train ARCH --shape NxTxHxW --memory` prints it (`format_report`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from vmz_jax.models import build
from vmz_jax.models.forward import make_forward
from vmz_jax.train.config import TrainConfig
from vmz_jax.train.optim import apply_train_mode
from vmz_jax.train.step import lower_train_step

__all__ = ["MemoryReport", "StepMemory", "format_report", "train_memory"]

NUM_CLASSES = 400
LEARNING_RATE = 1e-3
MB = 1e6


@dataclass(frozen=True)
class StepMemory:
    """`compiled.memory_analysis()` of one compiled function, in bytes."""

    argument: int
    output: int
    aliased: int
    temp: int
    code: int

    @property
    def peak(self) -> int:
        """argument + output - aliased + temp (see the module docstring)."""
        return self.argument + self.output - self.aliased + self.temp

    @classmethod
    def of(cls, compiled: Any) -> StepMemory:
        stats = compiled.memory_analysis()
        return cls(int(stats.argument_size_in_bytes), int(stats.output_size_in_bytes),
                   int(stats.alias_size_in_bytes), int(stats.temp_size_in_bytes),
                   int(stats.generated_code_size_in_bytes))

    def row(self) -> dict[str, int]:
        return {**dataclasses.asdict(self), "peak": self.peak}


@dataclass(frozen=True)
class MemoryReport:
    arch: str
    shape: tuple[int, ...]
    dtype: str
    remat: str
    conv_impl: str
    platform: str
    device: str
    param_bytes: int
    model_state_bytes: int  # parameters, BatchNorm statistics, random state
    optimizer_bytes: int
    train: StepMemory
    forward: StepMemory | None

    @property
    def donated_enough(self) -> bool:
        """Whether XLA aliases at least every parameter and optimizer-state byte (one copy of each)."""
        return self.train.aliased >= self.param_bytes + self.optimizer_bytes

    def row(self) -> dict[str, Any]:
        return {"arch": self.arch, "shape": list(self.shape), "dtype": self.dtype, "remat": self.remat,
                "conv_impl": self.conv_impl, "platform": self.platform, "device": self.device,
                "param_bytes": self.param_bytes, "model_state_bytes": self.model_state_bytes,
                "optimizer_bytes": self.optimizer_bytes, "donated_enough": self.donated_enough,
                "train": self.train.row(),
                "forward": self.forward.row() if self.forward is not None else None}


def _bytes(tree: Any) -> int:
    def size(x: Any) -> int:
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.eval_shape(jax.random.key_data, x)
        return int(x.size) * jnp.dtype(x.dtype).itemsize

    return sum(size(x) for x in jax.tree.leaves(tree))


def train_memory(arch: str, shape: tuple[int, ...], *, remat: str = "none", dtype: str = "float32",
                 conv_impl: str = "auto", num_classes: int = NUM_CLASSES, forward: bool = True
                 ) -> MemoryReport:
    """Compile (not run) the SGD-momentum training step of `arch` on a batch of `shape` (N, T, H, W)
    clips, and the forward with `forward`, and return XLA's memory analysis of both."""
    config = TrainConfig(dtype=dtype, remat=remat)  # checks both
    n, t, h, w = (int(v) for v in shape[:4])

    def make() -> tuple[nnx.Module, nnx.Optimizer]:
        # clip_length matters only to R2D's whole-clip stem (as in `vmz-jax bench --train`)
        model = build(arch, num_classes, clip_length=min(t, 8), conv_impl=conv_impl, rngs=nnx.Rngs(0))
        return model, nnx.Optimizer(model, optax.sgd(LEARNING_RATE, momentum=0.9), wrt=nnx.Param)

    model, optimizer = nnx.eval_shape(make)
    apply_train_mode(model, config)
    clips = jax.ShapeDtypeStruct((n, t, h, w, 3), jnp.float32)
    labels = jax.ShapeDtypeStruct((n,), jnp.int32)
    train = StepMemory.of(lower_train_step(model, optimizer, clips, labels).compile())
    fwd = None
    if forward:
        fwd = StepMemory.of(make_forward(model).lower(clips).compile())
    device = jax.devices()[0]
    return MemoryReport(
        arch=arch, shape=(n, t, h, w), dtype=dtype, remat=remat, conv_impl=conv_impl,
        platform=device.platform, device=str(getattr(device, "device_kind", device.platform)),
        param_bytes=_bytes(nnx.state(model, nnx.Param)), model_state_bytes=_bytes(nnx.state(model)),
        optimizer_bytes=_bytes(nnx.state(optimizer)), train=train, forward=fwd)


def format_report(report: MemoryReport) -> str:
    """The report as a few aligned lines, in MB (10^6 bytes)."""
    r = report

    def mb(value: int) -> str:
        return f"{value / MB:10.1f} MB"

    lines = [f"{r.arch} {'x'.join(map(str, r.shape))}x3 {r.dtype}, remat {r.remat}, conv {r.conv_impl}, "
             f"on {r.device} ({r.platform}); SGD momentum 0.9",
             f"  parameters           {mb(r.param_bytes)}",
             f"  model state          {mb(r.model_state_bytes)}  (parameters, BatchNorm statistics)",
             f"  optimizer state      {mb(r.optimizer_bytes)}",
             "  train step:"]
    t = r.train
    lines += [f"    argument           {mb(t.argument)}",
              f"    output             {mb(t.output)}",
              f"    aliased (donated)  {mb(t.aliased)}  "
              f"({'>=' if r.donated_enough else '<'} parameters + optimizer state)",
              f"    temp               {mb(t.temp)}",
              f"    peak               {mb(t.peak)}  (argument + output - aliased + temp)"]
    if r.forward is not None:
        f = r.forward
        lines += ["  forward (inference):",
                  f"    argument           {mb(f.argument)}",
                  f"    output             {mb(f.output)}",
                  f"    temp               {mb(f.temp)}",
                  f"    peak               {mb(f.peak)}"]
    return "\n".join(lines)
