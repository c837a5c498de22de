"""StableHLO artifacts with `jax.export`: one serialized module for several platforms.

The convolution forms differ per platform (vmz_jax.models.conv: CPU rewrites on CPU, XLA's plain
grouped 3-D convolutions for cuDNN), and a multi-platform export traces the function once. So the
exported function is `lax.platform_dependent(x, cpu=<forward made for cpu>, cuda=<forward made
for cuda>)`: the module carries one branch per platform and the runtime picks its own. Lowered for a
single platform, only that platform's branch is emitted (what tests check for CUDA). The CPU
rewrites pick their form from concrete frame sizes, so with symbolic H/W the CPU branch uses the
plain convolutions too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import export as jax_export

from vmz_jax.errors import VMZError
from vmz_jax.models.conv import traced_for_any_cpu
from vmz_jax.models.forward import Forward, make_forward

__all__ = ["export_stablehlo", "input_spec"]


def input_spec(
    frames: int | None,
    height: int | None,
    width: int | None,
    min_frames: int,
    min_size: int,
    dtype: Any = jnp.float32,
) -> jax.ShapeDtypeStruct:
    """(batch, T, H, W, 3) with a symbolic batch and symbolic T/H/W where given as None; symbolic
    sizes carry the network's lower bounds as constraints (`t >= min_frames`, ...)."""
    dims = [
        "batch",
        *(str(v) if v is not None else name for v, name in ((frames, "t"), (height, "h"), (width, "w"))),
        "3",
    ]
    constraints = []
    if frames is None:
        constraints.append(f"t >= {min_frames}")
    for v, name in ((height, "h"), (width, "w")):
        if v is None:
            constraints.append(f"{name} >= {min_size}")
    shape = jax_export.symbolic_shape(", ".join(dims), constraints=constraints)
    return jax.ShapeDtypeStruct(shape, dtype)


def _fresh(state: nnx.State) -> nnx.State:
    # New Variable objects at the current trace level: the scanned stages update their (unchanged)
    # state in place, which NNX refuses for Variables created outside the trace.
    return jax.tree.map(lambda a: a, state)


def export_stablehlo(
    model: nnx.Module,
    output: str,
    spec: jax.ShapeDtypeStruct,
    platforms: Sequence[str] = ("cpu", "cuda"),
    *,
    embed_weights: bool = True,
    cpu_conv_impl: str | None = None,
) -> tuple[Any, list[np.ndarray] | None]:
    """`jax.export.Exported` of `model`'s `output` for inputs like `spec`, and the weight arrays it
    takes as its first argument (a list, in order) when `embed_weights` is False (else None).
    `cpu_conv_impl` overrides the CPU branch's convolution form ("reference" for symbolic sizes).
    Traced for CPUs in general (`traced_for_any_cpu`), not for this host's."""
    with traced_for_any_cpu():
        return _export_stablehlo(model, output, spec, tuple(platforms), embed_weights, cpu_conv_impl)


def _export_stablehlo(model: nnx.Module, output: str, spec: jax.ShapeDtypeStruct, platforms: tuple[str, ...],
                      embed_weights: bool, cpu_conv_impl: str | None) -> tuple[Any, list[np.ndarray] | None]:
    unknown = [p for p in platforms if p not in ("cpu", "cuda", "rocm", "tpu")]
    if not platforms or unknown:
        raise VMZError(f"platforms must be among cpu, cuda, rocm, tpu, got {', '.join(platforms) or 'none'}")
    forwards: dict[str, Forward] = {}
    for p in platforms:
        forwards[p] = make_forward(
            model,
            output,
            platform=p,  # type: ignore[arg-type]
            conv_impl=cpu_conv_impl if p == "cpu" else None,
        )
    first = forwards[platforms[0]]
    leaves, _ = jax.tree.flatten(first.state)
    # Weights are the floating-point leaves; the rest (dropout's random keys, counters) stay embedded.
    is_weight = [
        isinstance(a, jax.Array | np.ndarray) and jnp.issubdtype(a.dtype, jnp.floating) for a in leaves
    ]

    def with_weights(weights: list[jax.Array], x: jax.Array) -> Any:
        def branch(fwd: Forward) -> Any:
            own, treedef = jax.tree.flatten(fwd.state)
            it = iter(weights)
            merged = [next(it) if w else a for a, w in zip(own, is_weight, strict=True)]
            state = jax.tree.unflatten(treedef, merged)
            # fresh inside the branch: platform_dependent traces each branch at its own level
            return lambda x: fwd.fn(_fresh(state), x)

        if len(forwards) == 1:
            return branch(first)(x)
        return jax.lax.platform_dependent(x, **{p: branch(f) for p, f in forwards.items()})

    weights = [a for a, w in zip(leaves, is_weight, strict=True) if w]
    if embed_weights:
        constants = [jnp.asarray(a) for a in weights]
        # The barrier keeps XLA from constant-folding the BatchNorm folds over every embedded kernel
        # when the artifact is compiled (seconds per large kernel); at run time they are one cheap
        # elementwise pass over the weights.
        fn = jax.jit(lambda x: with_weights(jax.lax.optimization_barrier(constants), x))
        args: tuple[Any, ...] = (spec,)
    else:
        fn = jax.jit(with_weights)
        args = ([jax.ShapeDtypeStruct(np.shape(a), a.dtype) for a in weights], spec)
    exported = jax_export.export(fn, platforms=platforms)(*args)
    return exported, None if embed_weights else [np.asarray(a) for a in weights]
