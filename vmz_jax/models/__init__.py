"""Model constructors: `vmz_jax.models.<arch>(num_classes=400, rngs=nnx.Rngs(0))`.

Each returns a randomly initialised `nnx.Module` in train mode (call `.eval()` for inference) with
`model(x)` -> logits, `model.features(x)` -> pooled features and `model.stage_outputs(x)`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
from flax import nnx

from vmz_jax.models.c3d import C3D
from vmz_jax.models.resnet import VideoResNet
from vmz_jax.models.specs import RESNET_SPECS, ResNetSpec

ARCHS: tuple[str, ...] = (*RESNET_SPECS, "c3d")


def build(arch: str, num_classes: int = 400, *, rngs: nnx.Rngs | None = None,
          dtype: jnp.dtype = jnp.float32, param_dtype: jnp.dtype = jnp.float32,
          conv_impl: str = "auto", clip_length: int = 8) -> VideoResNet | C3D:
    """Build `arch` with random weights. `clip_length` matters only for r2d_18 (its stem spans it)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; available: {', '.join(ARCHS)}")
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    if arch == "c3d":
        return C3D(num_classes, dtype=dtype, param_dtype=param_dtype, conv_impl=conv_impl,
                   rngs=rngs)
    return VideoResNet(RESNET_SPECS[arch], num_classes, clip_length=clip_length, dtype=dtype,
                       param_dtype=param_dtype, conv_impl=conv_impl, rngs=rngs)


def _constructor(arch: str) -> Callable[..., Any]:
    def make(num_classes: int = 400, **kwargs: Any) -> VideoResNet | C3D:
        return build(arch, num_classes, **kwargs)

    make.__name__ = make.__qualname__ = arch
    make.__doc__ = f"Build {arch} with random weights; see `vmz_jax.models.build`."
    return make


globals().update({arch: _constructor(arch) for arch in ARCHS})

__all__ = ["ARCHS", "C3D", "ResNetSpec", "VideoResNet", "build", *ARCHS]
