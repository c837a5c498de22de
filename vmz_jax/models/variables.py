"""A model's variables as a flat {path tuple: array} map, independent of the NNX object layout."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vmz_jax.errors import CheckpointError, one_line
from vmz_jax.models import registry
from vmz_jax.models.registry import ModelEntry

Path = tuple[str, ...]


def _flat(model: nnx.Module) -> dict[Path, nnx.Variable]:
    return {tuple(str(k) for k in path): var
            for path, var in nnx.to_flat_state(nnx.state(model, (nnx.Param, nnx.BatchStat)))}


def variable_shapes(model: nnx.Module) -> dict[Path, tuple[int, ...]]:
    return {path: tuple(var.shape) for path, var in _flat(model).items()}




def get_variables(model: nnx.Module) -> dict[Path, np.ndarray]:
    """Every parameter and BatchNorm statistic of `model` as host numpy arrays."""
    return {path: np.asarray(var[...]) for path, var in _flat(model).items()}


def set_variables(model: nnx.Module, values: Mapping[Path, np.ndarray], *,
                  source: str = "variables") -> None:
    """Overwrite every variable of `model`; the key sets and shapes must match exactly."""
    current = _flat(model)
    problems = [f"missing {'.'.join(p)}" for p in current if p not in values]
    problems += [f"unexpected {'.'.join(p)}" for p in values if p not in current]
    problems += [f"{'.'.join(p)} has shape {np.shape(v)}, expected {tuple(current[p].shape)}"
                 for p, v in values.items() if p in current
                 and tuple(np.shape(v)) != tuple(current[p].shape)]
    if problems:
        raise CheckpointError(f"{source}: {len(problems)} problem(s): " + "; ".join(problems))
    # Through nnx.update rather than in place, so that abstract models (nnx.eval_shape) work too.
    nnx.update(model, nnx.from_flat_state([
        (path, var.replace(jnp.asarray(values[path], dtype=var.get_value().dtype)))
        for path, var in current.items()]))
    _materialize_rng_state(model)


def _materialize_rng_state(model: nnx.Module) -> None:
    """Give an abstract model's random streams (C3D's dropout) concrete seeds."""
    updates = []
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.RngState)):
        value = var.get_value()
        if isinstance(value, jax.ShapeDtypeStruct):
            concrete = (jax.random.key(0) if isinstance(var, nnx.RngKey)
                        else jnp.zeros(value.shape, value.dtype))
            updates.append((path, var.replace(concrete)))
    if updates:
        nnx.update(model, nnx.from_flat_state(updates))


@functools.lru_cache(maxsize=16)
def _skeleton(arch: str, num_classes: int, clip_length: int, dtype: str, conv_impl: str) -> tuple[Any, Any]:
    import jax.numpy as jnp
    from flax import nnx

    from vmz_jax.models import build

    model = nnx.eval_shape(lambda: build(arch, num_classes, clip_length=clip_length, dtype=jnp.dtype(dtype),
                                         conv_impl=conv_impl, rngs=nnx.Rngs(0)))
    return nnx.split(model)


def spans_clip(arch: str | ModelEntry) -> bool:
    """True for the architectures whose parameter shapes depend on the clip length (r2d_18: its
    stem's kernel spans the whole clip); every other one runs on any clip length. Raises
    `UnknownArchitectureError` for a name the registry does not know."""
    return registry.get(arch).spans_clip


def abstract_model(arch: str | ModelEntry, num_classes: int, clip_length: int | None = None, *,
                   dtype: Any = "float32", conv_impl: str = "auto") -> Any:
    """A fresh abstract `arch` (every variable a `jax.ShapeDtypeStruct`, nothing allocated) for
    `vmz_jax.models.variables.set_variables`. Tracing the constructor of a 152-layer model takes seconds, so
    the trace is cached per process (one per architecture, class count, dtype and conv_impl; the
    clip length only where it shapes the model) and each call returns an independent copy."""
    import jax.numpy as jnp
    from flax import nnx

    entry = registry.get(arch)  # before the cache, so an unknown name is not traced (nor cached)
    spans = entry.spans_clip
    graphdef, state = _skeleton(entry.name, int(num_classes), int(clip_length or 8) if spans else 8,
                                jnp.dtype(dtype).name, conv_impl)
    model = nnx.merge(graphdef, state, copy=True)
    if clip_length and not spans and hasattr(model, "clip_length"):
        model.clip_length = int(clip_length)  # informative only: shapes do not depend on it
    return model


def expected_shapes(arch: str | ModelEntry, num_classes: int, clip_length: int | None = None
                    ) -> dict[Path, tuple[int, ...]]:
    """Path -> shape of every variable of `arch` (`vmz_jax.models.variables.abstract_shapes`, from the cached
    trace of `abstract_model`). `clip_length` only matters for r2d_18; None means 8."""
    from vmz_jax.models.variables import variable_shapes

    return variable_shapes(abstract_model(arch, num_classes, clip_length))


def abstract_shapes(arch: str | ModelEntry, num_classes: int = 400, clip_length: int | None = None
                    ) -> dict[Path, tuple[int, ...]]:
    """`expected_shapes` with a 400-class head by default (its name before the move to this module,
    which tests and porting still use)."""
    return expected_shapes(arch, num_classes, clip_length)


def check_params(params: Mapping[Path, Any], shapes: Mapping[Path, tuple[int, ...]],
                 source: str) -> None:
    """Raise one CheckpointError listing every missing, unexpected or mis-shaped path."""
    problems = [f"missing {'.'.join(p)}" for p in shapes if p not in params]
    problems += [f"unexpected {'.'.join(p)}" for p in params if p not in shapes]
    problems += [f"{'.'.join(p)} has shape {tuple(np.shape(v))}, expected {shapes[p]}"
                 for p, v in params.items() if p in shapes and tuple(np.shape(v)) != shapes[p]]
    if problems:
        raise CheckpointError(one_line(f"{source}: {len(problems)} problem(s): " + "; ".join(problems)))
