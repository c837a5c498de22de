"""One entry per architecture: everything the rest of the project needs to know about an arch name.

An architecture name is resolved here once (`get`), at the public boundary (`vmz_jax.models.build`,
`vmz_jax.load`, porting, the command line), and the `ModelEntry` is passed on; code below that reads
its fields instead of parsing the name (`"csn" in arch`) or testing the model's class. Adding a
family means adding its entries here, its name tables in `porting` (looked up by the entry's naming
keys: porting sits above models, so models never import it) and, where it has any, its released
weights in `vmz_jax.weights.pretrained`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import jax.numpy as jnp
from flax import nnx

from vmz_jax.errors import VMZError
from vmz_jax.models.audio import AUDIO_DEPTHS, AudioResNet, audio_spec
from vmz_jax.models.audio_visual import AudioVisualResNet, av_name
from vmz_jax.models.c3d import C3D, FC_WIDTH
from vmz_jax.models.resnet import VideoResNet
from vmz_jax.models.specs import RESNET_SPECS, ResNetSpec

__all__ = ["AUDIO_FAMILIES", "CAFFE2_MEAN", "CAFFE2_STD", "FAMILIES", "InputDefaults", "ModelEntry",
           "UnknownArchitectureError", "entries", "entry_of", "get", "names"]

Family = Literal["r2plus1d", "r3d", "r2d", "mc", "rmc", "ir_csn", "ip_csn", "c3d", "audio", "audio_visual"]
FAMILIES: tuple[str, ...] = ("r2plus1d", "r3d", "r2d", "mc", "rmc", "ir_csn", "ip_csn", "c3d", "audio",
                             "audio_visual")
#: The families whose models take log-mels: `a_resnet_<depth>(logmels)` and
#: `av_<trunk>(clips, logmels, head=...)` (`vmz_jax.models.audio`, `vmz_jax.models.audio_visual`).
AUDIO_FAMILIES: tuple[str, ...] = ("audio", "audio_visual")
Crop = Literal["none", "center", "three"]

#: Caffe2 `VideoInputOp` normalization of every released model, RGB, on 0-255 values
#: (shared/spec/PREPROCESSING.md); `vmz_jax.video.preprocess` normalizes with the same numbers.
CAFFE2_MEAN = (110.201, 100.64, 95.9966)
CAFFE2_STD = (58.1489, 56.4701, 55.3324)


class UnknownArchitectureError(VMZError, ValueError):
    """An architecture name that is not in the registry. Also a ValueError, as `build` raised before
    the registry existed."""


@dataclass(frozen=True)
class InputDefaults:
    """What `extract`/`classify` feed an architecture unless told otherwise: clips of `clip_length`
    frames taken every `sampling_rate` frames, the short side resized to `short_side`, then `crop`
    (`crop_size` None: the resized short side), normalized with `mean`/`std` (RGB, 0-255 values)."""

    clip_length: int
    short_side: int
    crop: Crop = "none"
    crop_size: int | None = None
    sampling_rate: int = 1
    mean: tuple[float, float, float] = CAFFE2_MEAN
    std: tuple[float, float, float] = CAFFE2_STD

    def __post_init__(self) -> None:
        if min(self.clip_length, self.short_side, self.sampling_rate) < 1:
            raise ValueError(f"clip_length, short_side and sampling_rate must be positive: {self}")
        if self.crop not in ("none", "center", "three"):
            raise ValueError(f"crop must be none, center or three, not {self.crop!r}")
        if self.crop == "none" and self.crop_size is not None:
            raise ValueError("a crop size needs a crop (center or three)")


# ig65m-pytorch's `extract`: 32 consecutive frames, short side 128, no crop.
IG65M_EXTRACT = InputDefaults(clip_length=32, short_side=128)
# CSN is evaluated upstream on a 256 short side; the clips stay ig65m's 32 consecutive frames.
CSN_INPUT = InputDefaults(clip_length=32, short_side=256)
# C3D's fc6 only takes 16x112x112 clips: centre crops of a 128 short side.
C3D_INPUT = InputDefaults(clip_length=16, short_side=128, crop="center", crop_size=112)

Builder = Callable[..., nnx.Module]


@dataclass(frozen=True)
class ModelEntry:
    """One architecture.

    `builder(num_classes, *, rngs, dtype, param_dtype, conv_impl, clip_length)` makes the randomly
    initialised module (`vmz_jax.models.build` is the public way to call it). `torch_names` and
    `caffe2_names` are the keys of the PyTorch and Caffe2 name tables in `porting`; `torch_names` is
    None for the audio and audio-visual models, which exist only as Caffe2 files (their weights keep
    Caffe2's blob names in every format). `spec`: the residual stages (an audio-visual model's:
    its visual trunk's; its audio tower has the same depth). `spans_clip`:
    the parameter shapes depend on the clip length (r2d_18's stem kernel spans it), so weights fix
    the clip length. `features_are_pooled`: `model.features` is the global average of the last
    stage's output, so a pipeline may pool that output its own way (max, per axis); False where the
    features are something else (C3D's fc7), which leaves nothing to pool.
    """

    name: str
    family: Family
    builder: Builder
    spec: ResNetSpec | None
    torch_names: str | None
    caffe2_names: str
    spans_clip: bool
    feature_dim: int
    features_are_pooled: bool
    input: InputDefaults

    @property
    def depth(self) -> int | None:
        """Number of layers of a residual architecture (None for C3D): files of one architecture
        are mistaken for another of the same depth, which is where porting looks for lookalikes."""
        return self.spec.depth if self.spec is not None else None


def _resnet_builder(spec: ResNetSpec) -> Builder:
    def build(num_classes: int = 400, *, rngs: nnx.Rngs, dtype: Any = jnp.float32,
              param_dtype: Any = jnp.float32, conv_impl: str = "auto", clip_length: int = 8) -> VideoResNet:
        return VideoResNet(spec, num_classes, clip_length=clip_length, dtype=dtype, param_dtype=param_dtype,
                           conv_impl=conv_impl, rngs=rngs)

    build.__qualname__ = build.__name__ = f"build_{spec.name}"
    return build


def _build_c3d(num_classes: int = 400, *, rngs: nnx.Rngs, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32, conv_impl: str = "auto", clip_length: int = 16) -> C3D:
    del clip_length  # C3D runs on 16-frame clips only; its shapes do not depend on it
    return C3D(num_classes, dtype=dtype, param_dtype=param_dtype, conv_impl=conv_impl, rngs=rngs)


def _resnet_family(spec: ResNetSpec) -> Family:
    kinds = set(spec.stage_convs)
    for kind, family in (("2plus1d", "r2plus1d"), ("ir", "ir_csn"), ("ip", "ip_csn")):
        if kinds == {kind}:
            return family  # type: ignore[return-value]
    # The rest are told apart by the stem as much as by the stages: mc2 is a 3-D stem on 2-D stages,
    # rmc2 a 2-D stem on 3-D stages. MCx: 3-D at the bottom (stem), 2-D above; rMCx the reverse.
    if spec.stem == "3d":
        return "r3d" if kinds == {"3d"} else "mc"
    if kinds == {"2d"}:
        return "r2d"  # R2D (its stem spans the clip) and fR2D (frame by frame)
    return "rmc"


def _resnet_entry(spec: ResNetSpec) -> ModelEntry:
    family = _resnet_family(spec)
    return ModelEntry(
        name=spec.name, family=family, builder=_resnet_builder(spec), spec=spec,
        torch_names="resnet", caffe2_names="resnet", spans_clip=spec.stem == "full_time",
        feature_dim=spec.feature_dim, features_are_pooled=True,
        input=CSN_INPUT if family in ("ir_csn", "ip_csn") else IG65M_EXTRACT)


def _audio_entry(depth: int) -> ModelEntry:
    spec = audio_spec(depth)

    def build(num_classes: int = 400, *, rngs: nnx.Rngs, dtype: Any = jnp.float32,
              param_dtype: Any = jnp.float32, conv_impl: str = "auto", clip_length: int = 8) -> AudioResNet:
        return AudioResNet(depth, num_classes, clip_length=clip_length, dtype=dtype, param_dtype=param_dtype,
                           conv_impl=conv_impl, rngs=rngs)

    build.__qualname__ = build.__name__ = f"build_{spec.name}"
    return ModelEntry(name=spec.name, family="audio", builder=build, spec=spec, torch_names=None,
                      caffe2_names="audio", spans_clip=False, feature_dim=spec.feature_dim,
                      features_are_pooled=False, input=IG65M_EXTRACT)


def _audio_visual_entry(spec: ResNetSpec) -> ModelEntry:
    def build(num_classes: int = 400, *, rngs: nnx.Rngs, dtype: Any = jnp.float32,
              param_dtype: Any = jnp.float32, conv_impl: str = "auto",
              clip_length: int = 8) -> AudioVisualResNet:
        return AudioVisualResNet(spec, num_classes, clip_length=clip_length, dtype=dtype,
                                 param_dtype=param_dtype, conv_impl=conv_impl, rngs=rngs)

    name = av_name(spec)
    build.__qualname__ = build.__name__ = f"build_{name}"
    return ModelEntry(name=name, family="audio_visual", builder=build, spec=spec, torch_names=None,
                      caffe2_names="audio_visual", spans_clip=False, feature_dim=spec.feature_dim,
                      features_are_pooled=False, input=_resnet_entry(spec).input)


# Caffe2's `av_joint_models`: av_resnet-{r2plus1d, r3d, ir-csn, ip-csn} at the depths of its
# BLOCK_CONFIG that the visual family has.
_AV_TRUNKS = tuple(spec for spec in RESNET_SPECS.values()
                   if _resnet_family(spec) in ("r2plus1d", "r3d", "ir_csn", "ip_csn")
                   and spec.depth in AUDIO_DEPTHS)

_ENTRIES: dict[str, ModelEntry] = {
    **{name: _resnet_entry(spec) for name, spec in RESNET_SPECS.items()},
    "c3d": ModelEntry(name="c3d", family="c3d", builder=_build_c3d, spec=None, torch_names="c3d",
                      caffe2_names="c3d", spans_clip=False, feature_dim=FC_WIDTH, features_are_pooled=False,
                      input=C3D_INPUT),
    **{entry.name: entry for entry in map(_audio_entry, AUDIO_DEPTHS)},
    **{entry.name: entry for entry in map(_audio_visual_entry, _AV_TRUNKS)},
}


def names() -> tuple[str, ...]:
    """Every architecture name, in the registry's order (families together, shallow first)."""
    return tuple(_ENTRIES)


def entries() -> tuple[ModelEntry, ...]:
    """Every entry, in the order of `names`."""
    return tuple(_ENTRIES.values())


def get(arch: str | ModelEntry) -> ModelEntry:
    """The entry of `arch`; an entry is returned as is, so functions can take either.

    Raises `UnknownArchitectureError` (a `VMZError`, one line) listing every known name.
    """
    if isinstance(arch, ModelEntry):
        return arch
    entry = _ENTRIES.get(arch) if isinstance(arch, str) else None
    if entry is None:
        raise UnknownArchitectureError(f"unknown architecture {arch!r}; available: {', '.join(_ENTRIES)}")
    return entry


def entry_of(model: nnx.Module) -> ModelEntry:
    """The entry of a model made by `vmz_jax.models.build` (or `vmz_jax.load`), which records its
    architecture's name on it as `model.arch`. A `VideoResNet` made directly is known by its spec."""
    name = getattr(model, "arch", None)
    if name is None:
        spec = getattr(model, "spec", None)
        name = spec.name if isinstance(spec, ResNetSpec) else None
    if name is None:
        raise VMZError(f"cannot tell the architecture of a {type(model).__name__}: build it with "
                       "vmz_jax.models.build or vmz_jax.load")
    return get(name)
