"""Model constructors: `vmz_jax.models.<arch>(num_classes=400, rngs=nnx.Rngs(0))`.

Each returns a randomly initialised `nnx.Module` in train mode (call `.eval()` for inference) with
`model(x)` -> logits, `model.features(x)` -> pooled features and `model.stage_outputs(x)`. What
distinguishes the architectures is in `vmz_jax.models.registry` (one `ModelEntry` per name).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
from flax import nnx

from vmz_jax.models import registry
from vmz_jax.models.c3d import C3D
from vmz_jax.models.registry import ModelEntry
from vmz_jax.models.resnet import VideoResNet
from vmz_jax.models.specs import ResNetSpec

ARCHS: tuple[str, ...] = registry.names()
#: The architectures that take clips alone (every family but the audio and audio-visual ones).
VIDEO_ARCHS: tuple[str, ...] = tuple(e.name for e in registry.entries()
                                     if e.family not in registry.AUDIO_FAMILIES)


def build(arch: str | ModelEntry, num_classes: int = 400, *, rngs: nnx.Rngs | None = None,
          dtype: jnp.dtype = jnp.float32, param_dtype: jnp.dtype = jnp.float32,
          conv_impl: str = "auto", clip_length: int = 8) -> nnx.Module:
    """Build `arch` with random weights. `clip_length` matters only where the entry `spans_clip`
    (r2d_18: its stem spans it). Code handed a model finds its entry with `registry.entry_of(model)`
    (from `model.arch`) instead of testing its class."""
    entry = registry.get(arch)
    return entry.builder(num_classes, rngs=rngs if rngs is not None else nnx.Rngs(0), dtype=dtype,
                         param_dtype=param_dtype, conv_impl=conv_impl, clip_length=clip_length)


def _constructor(entry: ModelEntry) -> Callable[..., Any]:
    def make(num_classes: int = 400, **kwargs: Any) -> nnx.Module:
        return build(entry, num_classes, **kwargs)

    make.__name__ = make.__qualname__ = entry.name
    make.__doc__ = f"Build {entry.name} with random weights; see `vmz_jax.models.build`."
    return make


globals().update({entry.name: _constructor(entry) for entry in registry.entries()})

__all__ = ["ARCHS", "C3D", "VIDEO_ARCHS", "ModelEntry", "ResNetSpec", "VideoResNet", "build", "registry",
           *ARCHS]
