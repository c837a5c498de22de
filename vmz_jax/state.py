"""A model's variables as a flat {path tuple: array} map, independent of the NNX object layout."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vmz_jax.errors import CheckpointError

Path = tuple[str, ...]


def _flat(model: nnx.Module) -> dict[Path, nnx.Variable]:
    return {tuple(str(k) for k in path): var
            for path, var in nnx.to_flat_state(nnx.state(model, (nnx.Param, nnx.BatchStat)))}


def variable_shapes(model: nnx.Module) -> dict[Path, tuple[int, ...]]:
    return {path: tuple(var.shape) for path, var in _flat(model).items()}


def abstract_shapes(arch: str, num_classes: int = 400, clip_length: int = 8
                    ) -> dict[Path, tuple[int, ...]]:
    """Path -> shape of every variable of `arch`, without allocating or initialising anything
    (from the per-process cache of abstract models in `vmz_jax.checkpoint`)."""
    from vmz_jax.checkpoint import expected_shapes

    return expected_shapes(arch, num_classes, clip_length)


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
