"""Caffe2 blob names of the audio ResNet and the audio-visual models <-> our parameter paths.

As `create_acoustic_resnet` / `create_av_resnet` (`c2/lib/models/audio_visual_model.py`) and
`AudioModelBuilder` (`c2/lib/models/builder/audio_model.py`) name them:

* audio: `conv1_w` (16, 1, 3, 3) and `conv1_b` (a 2-D conv with a bias), blocks
  `comp_<i>_conv_<j>_w` (O, I, kH, kW) with BatchNorms `comp_<i>_spatbn_<j>_<field>`, where `i` is
  the global block index counting the three entry blocks (so stage 1 starts at 3) and `j` counts a
  block's convs from 1; shortcuts `shortcut_projection_<i>[_spatbn]`; classifier `last_out_L<n>`.
* audio-visual: the audio tower's names prefixed `a_`, the visual tower's (`porting.caffe2_names`,
  the trunk's own table) prefixed `v_`, the Gradient-Blending heads `a_last_out_L<n>` and
  `v_last_out_L<n>`, the fusion head `av_fc1`, `av_fc2` (FC (out, in) + bias) and `last_out_L<n>`.
"""

from __future__ import annotations

import itertools
import re

import numpy as np

from porting.keymap import DENSE, SAME, NameFn, Transform
from vmz_jax.models import registry
from vmz_jax.models.audio import ENTRY_BLOCKS
from vmz_jax.models.registry import ModelEntry

# BatchNorm fields: ours -> Caffe2 blob suffix (as for the visual models).
BN_FIELDS = {"scale": "s", "bias": "b", "mean": "rm", "var": "riv"}
VISUAL_PREFIX = "v_"
AUDIO_PREFIX = "a_"

# Caffe2's 2-D conv (O, I, kH, kW) <-> ours, a 3-D conv with a one-frame kernel (1, kH, kW, I, O).
CONV2D = Transform(
    "conv2d", lambda w: np.transpose(w, (2, 3, 1, 0))[None], lambda w: np.transpose(w[0], (3, 2, 0, 1))
)

_BN = r"bn\.(?P<field>scale|bias|mean|var)"
_BLOCK = r"layer(?P<stage>[0-4])\.(?P<block>\d+)"
_AUDIO_RULES: tuple[tuple[re.Pattern[str], str, Transform], ...] = tuple(
    (re.compile(pattern), name, transform)
    for pattern, name, transform in (
        (r"conv1\.kernel", "conv1_w", CONV2D),
        (r"conv1\.bias", "conv1_b", SAME),
        (rf"{_BLOCK}\.conv(?P<j>[1-3])\.kernel", "comp_{i}_conv_{j}_w", CONV2D),
        (rf"{_BLOCK}\.conv(?P<j>[1-3])\.{_BN}", "comp_{i}_spatbn_{j}_{bn}", SAME),
        (rf"{_BLOCK}\.downsample\.kernel", "shortcut_projection_{i}_w", CONV2D),
        (rf"{_BLOCK}\.downsample\.{_BN}", "shortcut_projection_{i}_spatbn_{bn}", SAME),
        (r"fc\.kernel", "last_out_L{n}_w", DENSE),
        (r"fc\.bias", "last_out_L{n}_b", SAME),
    )
)
_FUSION = {"fc1": "av_fc1", "fc2": "av_fc2"}
_PARAM_SUFFIX = {"kernel": ("w", DENSE), "bias": ("b", SAME)}


def _audio_name_fn(entry: ModelEntry, num_classes: int, prefix: str = "") -> NameFn:
    assert entry.spec is not None
    blocks = (ENTRY_BLOCKS, *entry.spec.blocks)
    offsets = tuple(itertools.accumulate((0, *blocks)))

    def name(path: str) -> tuple[str, Transform]:
        for pattern, template, transform in _AUDIO_RULES:
            match = pattern.fullmatch(path)
            if match is None:
                continue
            fields = {k: v for k, v in match.groupdict().items() if v is not None}
            if "field" in fields:
                fields["bn"] = BN_FIELDS[fields["field"]]
            if "stage" in fields:
                stage, block = int(fields["stage"]), int(fields["block"])
                if block >= blocks[stage]:
                    break
                fields["i"] = str(offsets[stage] + block)
            return prefix + template.format(n=num_classes, **fields), transform
        raise KeyError(f"no Caffe2 blob name rule for parameter {path!r} of {entry.name}")

    return name


def _audio_visual_name_fn(entry: ModelEntry, num_classes: int) -> NameFn:
    from porting.caffe2_names import caffe2_name_fn

    assert entry.spec is not None
    visual = caffe2_name_fn(entry.spec.name, num_classes)
    audio = _audio_name_fn(registry.get(f"a_resnet_{entry.spec.depth}"), num_classes, AUDIO_PREFIX)

    def name(path: str) -> tuple[str, Transform]:
        tower, _, rest = path.partition(".")
        if tower == "visual":
            blob, transform = visual(rest)
            return VISUAL_PREFIX + blob, transform
        if tower == "audio":
            return audio(rest)
        if tower == "fc" and rest in _PARAM_SUFFIX:
            suffix, transform = _PARAM_SUFFIX[rest]
            return f"last_out_L{num_classes}_{suffix}", transform
        if tower in _FUSION and rest in _PARAM_SUFFIX:
            suffix, transform = _PARAM_SUFFIX[rest]
            return f"{_FUSION[tower]}_{suffix}", transform
        raise KeyError(f"no Caffe2 blob name rule for parameter {path!r} of {entry.name}")

    return name


def audio_name_fn(arch: str | ModelEntry, num_classes: int) -> NameFn:
    """The Caffe2 name map of an audio (`a_resnet_<d>`) or audio-visual (`av_<trunk>`) entry."""
    entry = registry.get(arch)
    if entry.family == "audio":
        return _audio_name_fn(entry, num_classes)
    if entry.family == "audio_visual":
        return _audio_visual_name_fn(entry, num_classes)
    raise ValueError(f"{entry.name} is neither an audio nor an audio-visual model")
