"""Rematerialization: recompute a block's activations in the backward pass instead of keeping them.

Training keeps, for the backward pass, every intermediate activation of the forward pass: on long clips
that, not the weights, is what fills the device. With remat a residual block (or a C3D conv group, or
the stem) runs under `jax.checkpoint`: the backward pass keeps its input and recomputes its inside.

Modes (`REMAT_MODES`):

* "none": keep everything (fastest; the default).
* "blocks": keep the outputs of the convolutions that do not widen (a bottleneck's 1x1x1 reduction and
  its 3x3x3 or depthwise conv, a (2+1)D pair's temporal conv: the narrow tensors), recompute the
  widening convolutions (a bottleneck's 1x1x1 expansion to 4x the width, a (2+1)D spatial conv to
  2.25x) and all the elementwise work (BatchNorm, ReLU, residual adds) from them (measured in
  docs/benchmarks.md, "Training memory": ir_csn_152 at 1x32x224x224, 37-40% of none's temp bytes,
  a step at 2x8x112x112 1.15x none's time).
* "full": keep only each block's input and recompute the whole block: the least memory (36-39% of
  none's there), about one more forward pass of time (1.27x).

On a CPU the training step of a rematerializing model is compiled with options of its own
(`REMAT_COMPILER_OPTIONS`: XLA's CPU pipeline would otherwise merge the recomputations outside a
scanned stage back into the forward pass), which the figures above include. A training step jitted
by hand needs them too.

The mode is a plain attribute (`remat`) of the modules that honour it, set by `set_remat`: it is no
part of the model's state, so weights and checkpoints are the same whatever the mode, and it can be
changed on a built (or loaded) model. Changing it retraces the compiled step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from vmz_jax.errors import VMZError
from vmz_jax.models.layers import CONV_OUTPUT

__all__ = ["REMAT_COMPILER_OPTIONS", "REMAT_MODES", "call_checkpointed", "check_remat", "checkpointed",
           "remat_policy", "rematerializes", "set_remat"]

REMAT_MODES = ("none", "blocks", "full")

#: XLA options for compiling the training step of a model that rematerializes (`remat` "blocks" or
#: "full"), per platform: `vmz_jax.train.train_step` uses them, and a step of your own should too
#: (`jax.jit(step, compiler_options=REMAT_COMPILER_OPTIONS.get(jax.default_backend()))`).
#: CPU, two options (docs/benchmarks.md, "Training memory"):
#: * keep the checkpoints: XLA's CPU pipeline drops `jax.checkpoint`'s optimization barriers early
#:   ("cse_barrier_expander"), and common-subexpression elimination then merges each recomputation
#:   outside a loop (the stem, each stage's first block) with the forward pass it repeats: those
#:   blocks kept every activation as if remat were "none". GPUs drop the barriers only after
#:   scheduling. With the pass disabled, ir_csn_152's "blocks" step at 1x32x224x224 takes 1473 MB of
#:   temp bytes instead of 2153.
#: * the memory-optimized scheduler: XLA's default CPU scheduler orders for concurrency and allocated
#:   buffers of later stages (the stacks a scanned stage keeps for its backward pass, gradient
#:   accumulators) while layer1 was still running (r2plus1d_18 at 2x8x112x112, "blocks": 684 MB
#:   instead of 917).
#: The scheduler slows a step that keeps everything (r2plus1d_18 1.16-1.22x) and such a step has no
#: barriers to keep, so a model with remat "none", the fastest mode, keeps XLA's defaults.
REMAT_COMPILER_OPTIONS: dict[str, dict[str, Any]] = {
    "cpu": {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED",
            "xla_disable_hlo_passes": "cse_barrier_expander"}}


def remat_policy(mode: str) -> Callable[..., bool] | None:
    """The `jax.checkpoint` policy of a remat mode ("none" has none: it does not checkpoint)."""
    check_remat(mode)
    if mode == "blocks":
        return jax.checkpoint_policies.save_only_these_names(CONV_OUTPUT)
    if mode == "full":
        return jax.checkpoint_policies.nothing_saveable
    return None


def check_remat(mode: Any) -> str:
    if mode not in REMAT_MODES:
        raise VMZError(f"unknown remat mode {mode!r}: use one of {', '.join(REMAT_MODES)}")
    return mode


def set_remat(model: nnx.Module, mode: str) -> nnx.Module:
    """Set the remat mode of every module of `model` that has one, in place; returns `model`."""
    check_remat(mode)
    for _, module in nnx.iter_modules(model):
        if hasattr(module, "remat"):
            module.remat = mode
    return model


def rematerializes(model: nnx.Module) -> bool:
    """Whether any module of `model` has a remat mode other than "none"."""
    return any(getattr(module, "remat", "none") != "none" for _, module in nnx.iter_modules(model))


def checkpointed(mode: str, fn: Callable[..., Any], *, in_scan: bool = False) -> Callable[..., Any]:
    """`fn` (pure: arrays in, arrays out) under `jax.checkpoint` with the mode's policy, or `fn` itself
    for "none". `in_scan`: `fn` is a `lax.scan` body, which needs no guard against the compiler merging
    the recomputation with the forward pass (jax.checkpoint's `prevent_cse`)."""
    if mode == "none":
        return fn
    return jax.checkpoint(fn, policy=remat_policy(mode), prevent_cse=not in_scan)


def call_checkpointed(mode: str, module: nnx.Module, *args: jax.Array, method: str = "__call__",
                      **static: Any) -> jax.Array:
    """`module.method(*args, **static)` under the mode's checkpoint; the module's state updates
    (BatchNorm running averages) are carried out of the checkpoint and written back."""
    if mode == "none":
        return getattr(module, method)(*args, **static)
    graphdef, state = nnx.split(module)

    def run(state: nnx.State, *args: jax.Array) -> tuple[jax.Array, nnx.State]:
        inner = nnx.merge(graphdef, state)
        return getattr(inner, method)(*args, **static), nnx.state(inner)

    out, state = checkpointed(mode, run)(state, *args)
    nnx.update(module, state)
    return out
