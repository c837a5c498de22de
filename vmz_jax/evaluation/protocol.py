"""The test protocol: which views of a video are scored, by which head, and how they are averaged.

VMZ's published Kinetics numbers come from two Caffe2 scripts (facebookresearch/VMZ, ``c2/tools``):

* ``test_net.py`` (the 112-pixel models: R(2+1)D, R3D, MCx, ..., C3D): 10 clips per video,
  uniformly spaced (``clip_per_video=10``, ``decode_type=1``), one 112 centre crop of frames whose
  short side is 128, the network's global-pool + FC head, softmax per clip, the video score the mean
  of the 10 softmaxes;
* ``test_net_large.py`` with ``--use_convolutional_pred=1`` (the 224-pixel models, ir/ip-CSN; see
  ``c2/scripts/test_irCSN_152_kinetics.sh``): 10 clips at ``sampling_rate_rgb=2``, short side 256,
  ``crop_per_clip=3`` crops of 256x256 along the long side (30 views), and the convolutional head of
  ``c2/models/r3d_model.py``: ``final_avg`` is an AveragePool of kernel (``clip_length // 8``, 7, 7)
  at stride 1 (7 because these networks have ``pool1``; 14 for a network without it at 224/256), so a
  256 crop leaves a 2x2 map; ``last_out`` is the FC as a 1x1x1 convolution, and ``loss_creator.py``
  applies Caffe2's ``Softmax`` (axis 1, which flattens classes x positions into one softmax) and
  ``ReduceBackMean`` over the 3 position axes. The video score is the mean over the 30 views.

The audio models go through the same scripts with ``--input_type 3`` (clips and log-mels; ``2``:
log-mels only), VMZ's ``AVInput`` op cutting each clip's (100, 40) log-mels (`vmz_jax.video.audio`).
The net the test builds (``c2/lib/models/model_builder.py``, no ``g_blend`` at test time) has one
classifier, scored as above: the fusion head ``last_out`` ("av") of an audio-visual model, the one head
of an audio ResNet ("audio"). An audio-visual model is tested as its visual trunk is (the same clips,
crops and head), its log-mels stretched over the video so that each clip's block covers its frames
(``align_audio=1``); with the convolutional head, ``create_av_resnet`` tiles the audio features over
the visual map's positions (`vmz_jax.models.forward.audio_conv_head`). An audio ResNet takes 10
uniformly spaced blocks of the raw log-mels (100 a second; no video upstream), one view each.
`model_head` asks another head of an audio-visual model ("audio", "visual"), which VMZ's test does not.

`Protocol` holds every such choice; `vmz_protocol` gives VMZ's for an architecture and its weights.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from vmz_jax.errors import VMZError
from vmz_jax.models import registry

__all__ = ["AUDIO_ALIGNMENTS", "AVERAGES", "HEADS", "MODEL_HEADS", "Protocol", "vmz_protocol"]

Head = Literal["pool", "conv", "conv-joint"]
Average = Literal["softmax", "logits"]

#: pool: global average pool + FC (the network's own head). conv: the convolutional head with a
#: softmax per position, mean over positions. conv-joint: the convolutional head exactly as Caffe2's
#: VMZ computes it, one softmax over classes x positions (see the module docstring).
HEADS: tuple[str, ...] = ("pool", "conv", "conv-joint")
#: softmax: the video score is the mean of the views' class probabilities; logits: of their logits.
AVERAGES: tuple[str, ...] = ("softmax", "logits")
#: Which classifier of a model that takes log-mels scores: the fusion head of an audio-visual model
#: ("av"), its audio-only or visual-only head, or an audio ResNet's one head ("audio").
MODEL_HEADS: tuple[str, ...] = ("av", "audio", "visual")
#: aligned: each clip's log-mels are stretched over the video to cover its frames (VMZ's input with
#: video); raw: blocks of the raw log-mels, 100 a second (VMZ's audio-only input).
AUDIO_ALIGNMENTS: tuple[str, ...] = ("aligned", "raw")


@dataclass(frozen=True)
class Protocol:
    """How a video is scored: `clips` uniformly spaced clips of `clip_len` frames taken every
    `sampling_rate` frames; frames resized to short side `frame_size` (`resize` "exact": ig65m's
    torch interpolate; "ffmpeg": in the decoder); `crops` (1: centre, 3: along the long side; placed
    as Caffe2's `VideoInputOp` places them, see `vmz_jax.video.preprocess.crop_origins`) square
    crops of `crop_size`; each view scored by `head` (`conv_window`: the spatial kernel of the
    convolutional head's average pool); the video score the mean over views of the softmaxes or
    logits (`average`). `name` says where the values came from ("vmz" or "custom").

    Models that take log-mels: `model_head` names the classifier scored ("av", "audio", "visual";
    None for the visual models) and `audio` how each clip's log-mels are cut ("aligned", "raw");
    both None for visual models, and then left out of `record`."""

    clips: int = 10
    crops: int = 1
    frame_size: int = 128
    crop_size: int = 112
    clip_len: int = 32
    sampling_rate: int = 1
    head: Head = "pool"
    average: Average = "softmax"
    conv_window: int = 7
    resize: Literal["exact", "ffmpeg"] = "exact"
    name: str = "custom"
    model_head: Literal["av", "audio", "visual"] | None = None
    audio: Literal["aligned", "raw"] | None = None

    def __post_init__(self) -> None:
        for key in ("clips", "frame_size", "crop_size", "clip_len", "sampling_rate", "conv_window"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise VMZError(f"protocol: {key.replace('_', '-')} must be a positive whole number, "
                               f"not {value!r}")
        if self.crops not in (1, 3):
            raise VMZError(f"protocol: crops must be 1 (centre) or 3 (along the long side), "
                           f"not {self.crops!r}")
        if self.crop_size > self.frame_size:
            raise VMZError(f"protocol: a {self.crop_size} crop does not fit frames of short side "
                           f"{self.frame_size}")
        if self.head not in HEADS:
            raise VMZError(f"protocol: head must be one of {', '.join(HEADS)}, not {self.head!r}")
        if self.average not in AVERAGES:
            raise VMZError(f"protocol: average must be one of {', '.join(AVERAGES)}, not {self.average!r}")
        if self.resize not in ("exact", "ffmpeg"):
            raise VMZError(f"protocol: resize must be exact or ffmpeg, not {self.resize!r}")
        if self.model_head is not None and self.model_head not in MODEL_HEADS:
            raise VMZError(f"protocol: model head must be one of {', '.join(MODEL_HEADS)}, "
                           f"not {self.model_head!r}")
        if self.audio is not None and self.audio not in AUDIO_ALIGNMENTS:
            raise VMZError(f"protocol: audio must be one of {', '.join(AUDIO_ALIGNMENTS)}, "
                           f"not {self.audio!r}")
        if (self.model_head is None) != (self.audio is None):
            raise VMZError("protocol: a model head (av, audio, visual) and the audio alignment go together")

    @property
    def views(self) -> int:
        """Views per video: clips x crops."""
        return self.clips * self.crops

    def replace(self, **changes: Any) -> Protocol:
        """A copy with `changes`, named "custom" unless they change only the host-side resize."""
        name = self.name if set(changes) <= {"resize", "name"} else changes.get("name", "custom")
        return dataclasses.replace(self, **{**changes, "name": name})

    def record(self) -> dict[str, Any]:
        """The protocol as JSON (what report.json and the pinned run record hold); the audio fields
        only for the models that take log-mels."""
        record = dataclasses.asdict(self)
        if self.model_head is None:
            del record["model_head"], record["audio"]
        return record

    def describe(self) -> str:
        """One line: e.g. ``10 clips x 3 crops of 32x256x256 (every 2nd frame, short side 256),
        conv-joint head, mean of softmaxes``."""
        every = {1: "consecutive frames", 2: "every 2nd frame", 3: "every 3rd frame"}.get(
            self.sampling_rate, f"every {self.sampling_rate}th frame")
        crops = "1 centre crop" if self.crops == 1 else "3 crops"
        head = self.head + (f" {self.conv_window}x{self.conv_window} window" if self.head != "pool" else "")
        audio = "" if self.model_head is None else (
            f", the {self.model_head} classifier, log-mels "
            + ("aligned to each clip's frames" if self.audio == "aligned" else "cut from the raw frames"))
        return (f"{self.name}: {self.clips} clips x {crops} of {self.clip_len}x{self.crop_size}x"
                f"{self.crop_size} ({every}, short side {self.frame_size}, {self.resize} resize), "
                f"{head} head{audio}, mean of {'softmaxes' if self.average == 'softmax' else 'logits'}")

    def forward_kwargs(self) -> dict[str, Any]:
        """`make_forward` arguments that compute one view's score as this protocol averages it."""
        if self.head == "pool":
            return {"output": "probabilities" if self.average == "softmax" else "logits"}
        softmax = ("logits" if self.average == "logits"
                   else "joint" if self.head == "conv-joint" else "position")
        return {"output": "conv_head", "conv_window": self.conv_window, "conv_softmax": softmax}


def _is_pool1(arch: str) -> bool:
    spec = registry.get(arch).spec
    return bool(spec is not None and spec.stem_pool)


def vmz_protocol(arch: str, *, clip_len: int | None = None, trained_crop: int | None = None) -> Protocol:
    """VMZ's test protocol for `arch` with weights trained on `clip_len`-frame clips at
    `trained_crop` pixels (defaults: the registry's input defaults of the arch; 224 for CSN, 112
    otherwise): ``test_net.py`` for 112-pixel models, ``test_net_large.py`` with the convolutional
    head for 224-pixel ones (see the module docstring)."""
    entry = registry.get(arch)
    if entry.family == "audio":
        return Protocol(clips=10, crops=1, frame_size=128, crop_size=112, clip_len=clip_len or
                        entry.input.clip_length, head="pool", model_head="audio", audio="raw", name="vmz")
    if entry.family == "audio_visual":
        assert entry.spec is not None
        trunk = vmz_protocol(entry.spec.name, clip_len=clip_len, trained_crop=trained_crop)
        return dataclasses.replace(trunk, model_head="av", audio="aligned")
    if entry.family == "c3d":
        return Protocol(clips=10, crops=1, frame_size=128, crop_size=112, clip_len=16, head="pool",
                        name="vmz")
    pool1 = _is_pool1(entry.name)
    clip_len = clip_len or entry.input.clip_length
    trained_crop = trained_crop or (224 if pool1 else 112)
    if trained_crop >= 224:
        return Protocol(clips=10, crops=3, frame_size=256, crop_size=256, clip_len=clip_len,
                        sampling_rate=2 if entry.family in ("ir_csn", "ip_csn") else 1,
                        head="conv-joint", conv_window=7 if pool1 else 14, name="vmz")
    return Protocol(clips=10, crops=1, frame_size=128, crop_size=112, clip_len=clip_len, head="pool",
                    name="vmz")
