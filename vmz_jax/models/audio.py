"""VMZ's audio ResNet (`a_resnet`): a 2-D residual network on log-mel spectrograms.

Caffe2's `create_acoustic_resnet` (`c2/lib/models/audio_visual_model.py`) with the blocks of
`c2/lib/models/builder/audio_model.py`, on one log-mel clip (1 x 100 time frames x 40 mel bins):

* `conv1`: a 3x3 convolution, 1 -> 16 channels, pad 1, *with* a bias and with neither BatchNorm nor
  ReLU after it (`model.Conv` with brew's defaults);
* three basic blocks 16 -> 32 (the first at stride 2), then the four stages of the visual ResNet of
  the same depth (`BLOCK_CONFIG`, basic blocks up to 34 layers, bottlenecks above, the same
  widths), every stage's first block at stride 2 in both time and frequency;
* a max pool over the last 4 x 2 map (`final_avg` is a `MaxPool` despite its name) and the classifier.

A 2-D convolution over (time, mel) is our 3-D convolution with a 1-frame kernel on a (N, 1, F, M, 1)
volume, so the blocks are the visual ones with the "2d" residual conv (`resnet.Stage`, 1x3x3
kernels, (1, 2, 2) strides): BatchNorm folding, the conv forms and the scanned stages come with them.
At 100 x 40 input the last map is 4 x 2 and the global max pool is Caffe2's [4, 2] window; other
sizes get the global max too.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from vmz_jax.models.conv import compute_dtype, conv3d
from vmz_jax.models.layers import _he_normal_fan_out, stat_dtype
from vmz_jax.models.resnet import STAGES, Stage
from vmz_jax.models.specs import ResNetSpec

#: Caffe2's audio input: 100 log-mel frames of 40 mel bins per clip (`gradient_blending.md`).
LOGMEL_FRAMES = 100
MEL_BINS = 40
STEM_WIDTH = 16
ENTRY_WIDTH = 32
ENTRY_BLOCKS = 3
#: Depths `create_acoustic_resnet` builds (its `BLOCK_CONFIG`; 68 is not in our specs).
AUDIO_DEPTHS = (18, 26, 34, 50, 101, 152)


def audio_spec(depth: int) -> ResNetSpec:
    """The four stages of the audio ResNet of `depth` layers. `create_acoustic_resnet` picks blocks,
    widths and block type by depth exactly as the visual builder does (basic blocks for 18 and 34,
    the shallow widths up to 34), so the visual `ResNetSpec` describes them, with 2-D convolutions."""
    if depth not in AUDIO_DEPTHS:
        raise ValueError(f"no audio ResNet of depth {depth}; choose one of {AUDIO_DEPTHS}")
    return ResNetSpec(f"a_resnet_{depth}", "2d", ("2d",) * 4, depth)


class AudioStem(nnx.Module):
    """Caffe2's `conv1`: 3x3 convolution with a bias, 1 -> 16 channels, no BatchNorm, no ReLU."""

    def __init__(
        self,
        *,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        conv_impl: str = "auto",
        rngs: nnx.Rngs,
    ):
        self.kernel = nnx.Param(_he_normal_fan_out(rngs.params(), (1, 3, 3, 1, STEM_WIDTH), param_dtype))
        self.bias = nnx.Param(jnp.zeros((STEM_WIDTH,), param_dtype))
        self.dtype = dtype
        self.conv_impl = conv_impl

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = compute_dtype(self.dtype, self.conv_impl)
        x = x.astype(dtype)
        y = conv3d(x, self.kernel[...].astype(dtype), (1, 1, 1), (0, 1, 1), 1, self.conv_impl)
        acc = stat_dtype(dtype)
        return (y.astype(acc) + self.bias[...].astype(acc)).astype(dtype)


class AudioResNet(nnx.Module):
    """The audio ResNet of `depth` layers on log-mels (N, F, 40) float32; see the module docstring.

    `layer0` holds the three 16 -> 32 entry blocks, `layer1`..`layer4` the four stages, `fc` the
    classifier (`last_out_L<n>`, or `a_last_out_L<n>` inside an audio-visual model)."""

    def __init__(
        self,
        depth: int,
        num_classes: int = 400,
        *,
        clip_length: int = 8,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        conv_impl: str = "auto",
        rngs: nnx.Rngs,
    ):
        spec = audio_spec(depth)
        kw = dict(dtype=dtype, param_dtype=param_dtype, conv_impl=conv_impl, rngs=rngs)
        self.depth = depth
        self.num_classes = num_classes
        self.clip_length = clip_length  # the video frames a log-mel block stands for: metadata only
        self.labels: tuple[str, ...] | None = None
        self.provenance: tuple[tuple[str, Any], ...] | None = None
        self.conv1 = AudioStem(**kw)
        self.layer0 = Stage(
            ENTRY_BLOCKS, STEM_WIDTH, ENTRY_WIDTH, ENTRY_WIDTH, "2d", downsample=True, bottleneck=False, **kw
        )
        in_channels = ENTRY_WIDTH
        for name, blocks, (out_channels, inner) in zip(STAGES, spec.blocks, spec.widths, strict=True):
            setattr(
                self,
                name,
                Stage(
                    blocks,
                    in_channels,
                    out_channels,
                    inner,
                    "2d",
                    downsample=True,
                    bottleneck=spec.bottleneck,
                    **kw,
                ),
            )
            in_channels = out_channels
        self.feature_dim = in_channels
        self.fc = nnx.Linear(
            in_channels,
            num_classes,
            param_dtype=param_dtype,
            rngs=rngs,
            kernel_init=nnx.initializers.lecun_uniform(),
        )  # Caffe2's XavierFill

    @property
    def arch(self) -> str:
        return audio_spec(self.depth).name

    def stage_outputs(self, logmels: jax.Array) -> dict[str, jax.Array]:
        """Activations (N, 1, F', M', C) after `conv1` and each stage, the pooled features, logits."""
        if logmels.ndim != 3:
            raise ValueError(f"expected log-mels (N, frames, {MEL_BINS}), got shape {logmels.shape}")
        h = self.conv1(logmels[:, None, :, :, None])
        out = {"stem": h}
        for name in ("layer0", *STAGES):
            h = getattr(self, name)(h)
            out[name] = h
        out["features"] = jnp.max(h.astype(stat_dtype(h.dtype)), axis=(1, 2, 3))
        out["logits"] = self.fc(out["features"])
        return out

    def features(self, logmels: jax.Array) -> jax.Array:
        """The max-pooled last stage, (N, 512) or (N, 2048)."""
        return self.stage_outputs(logmels)["features"]

    def __call__(self, logmels: jax.Array) -> jax.Array:
        """Logits (N, num_classes)."""
        return self.stage_outputs(logmels)["logits"]
