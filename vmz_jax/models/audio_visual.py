"""VMZ's audio-visual ResNets, trained with Gradient-Blending (`av_resnet-<trunk>` in Caffe2).

Caffe2's `create_av_resnet` (`c2/lib/models/audio_visual_model.py`) runs two towers side by side:

* the visual tower: the video ResNet of the trunk (R(2+1)D, R3D, ir-CSN or ip-CSN) and depth, its
  blobs prefixed `v_`, average-pooled over its last (T/8, 7 or 14, 7 or 14) map;
* the audio tower: the audio ResNet of the same depth (`vmz_jax.models.audio`), prefixed `a_`,
  max-pooled over its last 4 x 2 map;

then the fusion head on their concatenation (2 x 2048 = 4096 for the deep nets): `av_fc1` (4096 ->
2048), ReLU, `av_fc2` (2048 -> 2048), ReLU, `last_out_L<n>`. With `g_blend` the builder adds the
two heads Gradient-Blending trains beside it: `a_last_out_L<n>` on the audio features and
`v_last_out_L<n>` on the visual features. The three heads are "av", "audio" and "visual".

Here the visual tower is a `VideoResNet` whose classifier is `v_last_out`, the audio tower an
`AudioResNet` whose classifier is `a_last_out`, and the fusion head is `fc1`, `fc2`, `fc`.

Pooling: Caffe2's windows cover the whole last map at the sizes it allows (32 or 16 x 224 x 224 and
100 x 40 log-mels), so we pool globally (mean for video, max for audio), which also runs at other
sizes. The stem max-pool (`use_pool1`) is the visual family's own: on for CSN, whose released AV
files are 110.1 GFLOPs at 32x224x224 (the visual ip-CSN-152 with the pool is 108.8, without it four
times that), off for R(2+1)D and R3D. Clips of fewer than 4 frames are refused: there Caffe2's AV
builder strides stage 3 in time and the visual ResNet does not (at 4 to 7 frames both keep stage 4's
time, as `create_av_resnet` does for `clip_length < 8`).
"""

from __future__ import annotations

from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import nnx

from vmz_jax.models.audio import AudioResNet
from vmz_jax.models.resnet import VideoResNet
from vmz_jax.models.specs import ResNetSpec

Head = Literal["av", "audio", "visual"]
HEADS: tuple[str, ...] = ("av", "audio", "visual")
#: Fewest frames for which the visual tower's temporal strides are those of Caffe2's AV builder.
MIN_FRAMES = 4


def av_name(spec: ResNetSpec) -> str:
    """The registry name of the audio-visual model on the visual trunk `spec` (`av_ip_csn_152`)."""
    return f"av_{spec.name}"


class AudioVisualResNet(nnx.Module):
    """Audio and visual ResNet towers of `spec.depth` layers, a fusion head and the two
    Gradient-Blending heads.

    `model(clips, logmels, head="av")` -> logits of one head; `model.heads(clips, logmels)` -> all
    three; `model.features(clips, logmels)` -> {"audio", "visual", "joint"} features, where "joint"
    is the fusion head's last hidden layer (after `av_fc2` and its ReLU). Clips are float32
    (N, T, H, W, 3), normalized as for the visual models; log-mels float32 (N, F, 40).
    """

    def __init__(
        self,
        spec: ResNetSpec,
        num_classes: int = 400,
        *,
        clip_length: int = 8,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        conv_impl: str = "auto",
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, conv_impl=conv_impl, rngs=rngs)
        self.spec = spec
        self.num_classes = num_classes
        self.clip_length = clip_length
        self.labels: tuple[str, ...] | None = None
        self.provenance: tuple[tuple[str, Any], ...] | None = None
        self.visual = VideoResNet(spec, num_classes, clip_length=clip_length, **kw)
        self.audio = AudioResNet(spec.depth, num_classes, **kw)
        joint = spec.feature_dim + self.audio.feature_dim
        hidden = joint // 2
        init = dict(param_dtype=param_dtype, rngs=rngs, kernel_init=nnx.initializers.lecun_uniform())
        self.fc1 = nnx.Linear(joint, hidden, **init)
        self.fc2 = nnx.Linear(hidden, hidden, **init)
        self.fc = nnx.Linear(hidden, num_classes, **init)

    @property
    def arch(self) -> str:
        return av_name(self.spec)

    @property
    def feature_dims(self) -> dict[str, int]:
        return {
            "audio": self.audio.feature_dim,
            "visual": self.spec.feature_dim,
            "joint": self.fc2.out_features,
        }

    def _towers(
        self, clips: jax.Array, logmels: jax.Array
    ) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
        if clips.ndim == 5 and clips.shape[1] < MIN_FRAMES:
            raise ValueError(f"{self.arch} needs clips of at least {MIN_FRAMES} frames, got {clips.shape[1]}")
        if clips.shape[:1] != logmels.shape[:1]:
            raise ValueError(f"clips {clips.shape} and log-mels {logmels.shape} differ in batch size")
        return self.visual.stage_outputs(clips), self.audio.stage_outputs(logmels)

    def _fuse(self, visual: jax.Array, audio: jax.Array) -> jax.Array:
        joint = jnp.concatenate([visual, audio.astype(visual.dtype)], axis=-1)  # Caffe2: [v, a]
        return jax.nn.relu(self.fc2(jax.nn.relu(self.fc1(joint))))

    def fusion_logits(self, visual: jax.Array, audio: jax.Array) -> jax.Array:
        """The "av" head on visual (..., Cv) and audio (..., Ca) features with the same leading axes
        (Caffe2's convolutional prediction applies `av_fc1`, `av_fc2` and `last_out` at every position)."""
        return self.fc(self._fuse(visual, audio))

    def features(self, clips: jax.Array, logmels: jax.Array) -> dict[str, jax.Array]:
        """{"audio": (N, Ca), "visual": (N, Cv), "joint": (N, (Ca + Cv) / 2)}."""
        visual, audio = self._towers(clips, logmels)
        return {
            "audio": audio["features"],
            "visual": visual["features"],
            "joint": self._fuse(visual["features"], audio["features"]),
        }

    def heads(self, clips: jax.Array, logmels: jax.Array) -> dict[str, jax.Array]:
        """Logits (N, num_classes) of every head: {"av", "audio", "visual"}."""
        visual, audio = self._towers(clips, logmels)
        return {
            "av": self.fc(self._fuse(visual["features"], audio["features"])),
            "audio": audio["logits"],
            "visual": visual["logits"],
        }

    def __call__(self, clips: jax.Array, logmels: jax.Array, head: Head = "av") -> jax.Array:
        """Logits (N, num_classes) of `head` ("av": the fusion head, "audio", "visual")."""
        if head not in HEADS:
            raise ValueError(f"unknown head {head!r}; choose one of {', '.join(HEADS)}")
        if head == "audio":
            return self.audio(logmels)
        if head == "visual":
            if clips.shape[1] < MIN_FRAMES:
                raise ValueError(f"{self.arch} needs clips of at least {MIN_FRAMES} frames")
            return self.visual(clips)
        return self.heads(clips, logmels)["av"]
