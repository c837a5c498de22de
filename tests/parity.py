"""Helpers shared by the parity tests: torch reference -> vmz_jax model with the same weights."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from porting.torch_names import torch_to_params
from vmz_jax.models import build
from vmz_jax.models.forward import make_forward
from vmz_jax.models.variables import set_variables, variable_shapes
from vmz_jax.reference import vmz_torch


def torch_state_dict(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().astype(np.float32) if v.is_floating_point()
            else v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def make_pair(arch: str, seed: int = 0, num_classes: int = 11, clip_length: int = 8,
              dtype=jnp.float32, conv_impl: str = "auto"):
    """A randomized torch reference and the vmz_jax model carrying the same weights, both in eval."""
    ref = vmz_torch.build(arch, num_classes=num_classes, clip_length=clip_length)
    vmz_torch.randomize_(ref, seed)
    ref.eval()
    model = nnx.eval_shape(lambda: build(arch, num_classes, clip_length=clip_length, dtype=dtype,
                                         conv_impl=conv_impl, rngs=nnx.Rngs(seed)))
    params = torch_to_params(torch_state_dict(ref), variable_shapes(model), source=arch)
    set_variables(model, params, source=arch)
    model.eval()
    return ref, model


def jax_stage_outputs(model: nnx.Module, x: np.ndarray) -> dict[str, np.ndarray]:
    """`stage_outputs` through `make_forward` (the function every caller runs) on NTHWC input;
    return NCTHW numpy arrays like the reference."""
    out = make_forward(model, "stages")(jnp.asarray(x))
    return {k: np.asarray(v) if v.ndim == 2 else np.asarray(v).transpose(0, 4, 1, 2, 3)
            for k, v in out.items()}


def torch_stage_outputs(ref: torch.nn.Module, x_ncthw: np.ndarray) -> dict[str, np.ndarray]:
    with torch.no_grad():
        out = ref.forward_stages(torch.from_numpy(x_ncthw))
    return {k: v.numpy() for k, v in out.items()}


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    """max |got - want| / max |want|: one number per tensor, insensitive to near-zero entries."""
    assert got.shape == want.shape, (got.shape, want.shape)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))
