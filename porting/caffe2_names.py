"""VMZ Caffe2 `.pkl` blob names <-> vmz_jax parameter paths, as one declarative table.

Caffe2's builders (`c2/lib/models/r3d_model.py`, `builder/video_model.py`, `c3d_model.py`) name every
residual conv `comp_<i>_conv_<j>[_middle]_w` and its BatchNorm `comp_<i>_spatbn_<j>[_middle]_<field>`:

* `i` is the *global* block index, counting from 0 across the four stages;
* `j` counts the convs inside a block from 1. Caffe2's channel-wise conv (ir-CSN's `3d-sep`) bumps the
  counter twice, so ir-CSN's depthwise conv is `conv_3` and the last 1x1x1 conv `conv_4`;
* a (2+1)D conv is `..._conv_<j>_middle` (spatial 1x3x3) then `..._conv_<j>` (temporal 3x1x1); ip-CSN's
  middle conv is `..._conv_2_middle` (1x1x1) then `..._conv_2` (depthwise).

Shortcuts are `shortcut_projection_<i>[_spatbn]`, stems `conv1[_middle]` with BatchNorms
`conv1[_middle]_spatbn_relu`, the classifier `last_out_L<num_classes>`; C3D keeps its layer names
(`conv1a`, `conv1a_bn`, ..., `fc6`, `fc7`). BatchNorm fields are `_s`, `_b`, `_rm` and `_riv` (the
running *variance*, despite the name).

The table is written on our "unstacked" paths (`layer2.3.conv1.spatial.kernel`); `porting.keymap` does
the stacking and the strict mapping (every blob used once, all problems reported together).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping

import numpy as np

from porting.keymap import CONV, DENSE, SAME, NameFn, Path, Transform, from_params, to_params
from vmz_jax.errors import CheckpointError
from vmz_jax.models import registry
from vmz_jax.models.registry import ModelEntry
from vmz_jax.models.specs import ResNetSpec

# BatchNorm fields: ours -> Caffe2 blob suffix.
BN_FIELDS = {"scale": "s", "bias": "b", "mean": "rm", "var": "riv"}
# Training state some snapshots carry; skipped by `caffe2_to_params`, nothing else is.
TRAINING_STATE_SUFFIX = "_momentum"
TRAINING_STATE_NAMES = frozenset({"model_iter", "lr"})
DEFAULT_CLIP_LENGTH = 8

_BN = r"bn\.(?P<field>scale|bias|mean|var)"
_BLOCK = r"layer(?P<stage>[1-4])\.(?P<block>\d+)"
_CONV = rf"{_BLOCK}\.conv(?P<conv>[1-3])"
_CLASSIFIER = re.compile(r"last_out_L(\d+)_w")

Rule = tuple[str, str, Transform]

# (our unstacked path, Caffe2 blob name, transform); first match wins. Templates are `str.format`ted
# with the named groups plus `i` (global block index), `j` (Caffe2's conv counter), `n` (number of
# classes) and `bn` (the BatchNorm field's suffix).
RESNET_TABLE: tuple[Rule, ...] = (
    # R(2+1)D stem: conv 1x7x7 -> BN -> ReLU -> conv 3x1x1 -> BN -> ReLU
    (r"stem\.spatial\.kernel", "conv1_middle_w", CONV),
    (rf"stem\.spatial\.{_BN}", "conv1_middle_spatbn_relu_{bn}", SAME),
    (r"stem\.temporal\.kernel", "conv1_w", CONV),
    (rf"stem\.temporal\.{_BN}", "conv1_spatbn_relu_{bn}", SAME),
    # every other stem: one conv -> BN -> ReLU
    (r"stem\.conv\.kernel", "conv1_w", CONV),
    (rf"stem\.conv\.{_BN}", "conv1_spatbn_relu_{bn}", SAME),
    # (2+1)D residual conv (block_type '2.5d'): spatial `_middle`, then temporal
    (rf"{_CONV}\.spatial\.kernel", "comp_{i}_conv_{j}_middle_w", CONV),
    (rf"{_CONV}\.spatial\.{_BN}", "comp_{i}_spatbn_{j}_middle_{bn}", SAME),
    (rf"{_CONV}\.temporal\.kernel", "comp_{i}_conv_{j}_w", CONV),
    (rf"{_CONV}\.temporal\.{_BN}", "comp_{i}_spatbn_{j}_{bn}", SAME),
    # ip-CSN middle conv (block_type '0.3d'): 1x1x1 `_middle`, then depthwise
    (rf"{_CONV}\.pointwise\.kernel", "comp_{i}_conv_{j}_middle_w", CONV),
    (rf"{_CONV}\.pointwise\.{_BN}", "comp_{i}_spatbn_{j}_middle_{bn}", SAME),
    (rf"{_CONV}\.depthwise\.kernel", "comp_{i}_conv_{j}_w", CONV),
    (rf"{_CONV}\.depthwise\.{_BN}", "comp_{i}_spatbn_{j}_{bn}", SAME),
    # single convs: 3x3x3, 1x3x3, 1x1x1 and ir-CSN's depthwise
    (rf"{_CONV}\.kernel", "comp_{i}_conv_{j}_w", CONV),
    (rf"{_CONV}\.{_BN}", "comp_{i}_spatbn_{j}_{bn}", SAME),
    # projection shortcut (block 0 of a stage only)
    (rf"{_BLOCK}\.downsample\.kernel", "shortcut_projection_{i}_w", CONV),
    (rf"{_BLOCK}\.downsample\.{_BN}", "shortcut_projection_{i}_spatbn_{bn}", SAME),
)
C3D_TABLE: tuple[Rule, ...] = (
    # C3D: conv1a..conv5b with BatchNorms conv1a_bn..conv5b_bn; fc6, fc7
    (r"(?P<layer>conv[1-5][ab])\.kernel", "{layer}_w", CONV),
    (rf"(?P<layer>conv[1-5][ab])\.{_BN}", "{layer}_bn_{bn}", SAME),
    (r"(?P<layer>fc[67])\.kernel", "{layer}_w", DENSE),
    (r"(?P<layer>fc[67])\.bias", "{layer}_b", SAME),
)
CLASSIFIER_TABLE: tuple[Rule, ...] = (
    # classifier: FC weight (n, C), bias (n,)
    (r"fc\.kernel", "last_out_L{n}_w", DENSE),
    (r"fc\.bias", "last_out_L{n}_b", SAME),
)


def _compiled(*tables: tuple[Rule, ...]) -> tuple[tuple[re.Pattern[str], str, Transform], ...]:
    return tuple((re.compile(pattern), name, tf) for table in tables for pattern, name, tf in table)


#: naming key (`ModelEntry.caffe2_names`) -> its compiled rules. The "resnet" templates use the
#: entry's `ResNetSpec` (global block index, conv counter); "c3d" keeps C3D's layer names.
RULES = {
    "resnet": _compiled(RESNET_TABLE, CLASSIFIER_TABLE),
    "c3d": _compiled(C3D_TABLE, CLASSIFIER_TABLE),
}


def block_offsets(spec: ResNetSpec) -> tuple[int, int, int, int]:
    """Global index `i` of block 0 of each stage: Caffe2 counts blocks across the whole network."""
    starts = (0, *itertools.accumulate(spec.blocks))[:4]
    return starts[0], starts[1], starts[2], starts[3]


def conv_counter(spec: ResNetSpec, stage: int, conv: int) -> int:
    """Caffe2's `comp_idx` for our block conv `conv` (1-based) of `stage` (1-4).

    Every conv adds 1; the stage's residual conv (conv2 of a bottleneck, both convs of a basic block)
    adds 2 when it is a channel-wise (ir-CSN) conv, since Caffe2's `add_conv` and
    `add_channelwise_conv` each increment the counter.
    """
    residual = (2,) if spec.bottleneck else (1, 2)
    step = {k: 2 if k in residual and spec.stage_convs[stage - 1] == "ir" else 1 for k in (1, 2, 3)}
    return sum(step[k] for k in range(1, conv + 1))


def caffe2_name_fn(arch: str | ModelEntry, num_classes: int) -> NameFn:
    """The name map of `arch` (a name or its `ModelEntry`): our unstacked dotted path -> (Caffe2 blob
    name, transform).

    Raises `UnknownArchitectureError` for an unknown name, KeyError for a path that has no Caffe2
    counterpart in `arch`.
    """
    entry = registry.get(arch)
    if entry.family in registry.AUDIO_FAMILIES:
        from porting.av_names import audio_name_fn

        return audio_name_fn(entry, num_classes)
    rules = RULES[entry.caffe2_names]
    spec = entry.spec

    def name(unstacked_path: str) -> tuple[str, Transform]:
        for pattern, template, transform in rules:
            match = pattern.fullmatch(unstacked_path)
            if match is None:
                continue
            fields = {k: v for k, v in match.groupdict().items() if v is not None}
            if "field" in fields:
                fields["bn"] = BN_FIELDS[fields["field"]]
            if spec is not None and "stage" in fields:
                stage, block = int(fields["stage"]), int(fields["block"])
                if block >= spec.blocks[stage - 1]:
                    break
                fields["i"] = str(block_offsets(spec)[stage - 1] + block)
                if "conv" in fields:
                    fields["j"] = str(conv_counter(spec, stage, int(fields["conv"])))
            return template.format(n=num_classes, **fields), transform
        raise KeyError(f"no Caffe2 blob name rule for parameter {unstacked_path!r} of {entry.name}")

    return name


def is_training_state(name: str) -> bool:
    """The explicit skip rule: `<param>_momentum`, `model_iter` and `lr`, nothing else."""
    if name in TRAINING_STATE_NAMES:
        return True
    return name.endswith(TRAINING_STATE_SUFFIX) and len(name) > len(TRAINING_STATE_SUFFIX)


def num_classes_from_blobs(blobs: Mapping[str, np.ndarray], source: str = "weights") -> int:
    """The number of classes `n` of a Caffe2 file, from its classifier's name `last_out_L<n>_w`.

    The weight must be (n, C). Raises CheckpointError naming `source` when there is no such blob,
    more than one, or the shape disagrees with the name.
    """
    found = sorted((int(m.group(1)), name) for name in blobs if (m := _CLASSIFIER.fullmatch(name)))
    if not found:
        raise CheckpointError(f"{source}: no classifier blob 'last_out_L<n>_w' (is this a VMZ Caffe2 "
                              f"checkpoint?); found {len(blobs)} blob(s)")
    if len(found) > 1:
        raise CheckpointError(f"{source}: ambiguous classifier, several 'last_out_L<n>_w' blobs: "
                              + ", ".join(repr(name) for _, name in found))
    n, name = found[0]
    shape = tuple(np.shape(blobs[name]))
    if n <= 0 or len(shape) != 2 or shape[0] != n:
        raise CheckpointError(f"{source}: classifier {name!r} has shape {shape}, expected ({n}, C)")
    return n


def clip_length_from_blobs(blobs: Mapping[str, np.ndarray], arch: str | ModelEntry) -> int:
    """The clip length the weights were made for, as far as it shapes the model.

    Only an entry that `spans_clip` (r2d_18: its stem kernel spans the clip) depends on it: the
    temporal size of `conv1_w` (O, I, kT, kH, kW). Every other architecture gets 8 (any clip length
    runs). When `conv1_w` is absent or not 5-D, 8 is returned too, and the strict mapping reports
    the blob.
    """
    if not registry.get(arch).spans_clip:
        return DEFAULT_CLIP_LENGTH
    shape = np.shape(blobs["conv1_w"]) if "conv1_w" in blobs else ()
    return int(shape[2]) if len(shape) == 5 and shape[2] > 0 else DEFAULT_CLIP_LENGTH


def _num_classes(shapes: Mapping[Path, tuple[int, ...]]) -> int:
    if ("fc", "kernel") not in shapes:
        raise ValueError("the parameter tree has no classifier ('fc', 'kernel')")
    return int(shapes[("fc", "kernel")][-1])


def caffe2_to_params(blobs: Mapping[str, np.ndarray], arch: str | ModelEntry,
                     shapes: Mapping[Path, tuple[int, ...]], *, source: str = "weights"
                     ) -> dict[Path, np.ndarray]:
    """Map Caffe2 blobs onto the flat parameter tree of `arch` (path -> float32 array), strictly.

    `shapes` is our flat path -> shape map (`vmz_jax.models.variables.abstract_shapes`); the
    classifier's width sets which `last_out_L<n>` is expected. Training state (`is_training_state`) is
    skipped; every other blob must be used exactly once, be float32, have the right shape and be
    finite. All problems are raised together in one `CheckpointError` naming `source`.
    """
    name_fn = caffe2_name_fn(arch, _num_classes(shapes))
    return to_params(blobs, shapes, name_fn, skip=is_training_state, source=source)


def params_to_caffe2(params: Mapping[Path, np.ndarray], arch: str | ModelEntry) -> dict[str, np.ndarray]:
    """Our flat tree -> Caffe2-named blobs in Caffe2 layouts (float32), e.g. to write a `.pkl`."""
    shapes = {path: tuple(np.shape(a)) for path, a in params.items()}
    return from_params(params, caffe2_name_fn(arch, _num_classes(shapes)))
