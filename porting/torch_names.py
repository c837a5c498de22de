"""VMZ PyTorch `state_dict` names <-> vmz_jax parameter paths, as declarative tables.

VMZ's PyTorch models use torchvision's VideoResNet naming (`layer2.0.conv1.0.3.weight`, ...). Our
models name things by what they are (`layer2.first.conv1.temporal.kernel`) and stack blocks 1..n-1 of
each stage (`layer2.rest...`, leading axis = block - 1). The table below is written on "unstacked"
paths (`layer2.0.conv1.temporal.kernel`); `model_layout` does the stacking.

`torch_to_params` maps a whole state_dict and reports every problem at once (missing, unexpected,
mis-shaped, non-float keys) in one `CheckpointError`; `num_batches_tracked` is ignored. The strict
mapping itself is `porting.keymap`, shared with the Caffe2 map. There is one table per naming key
(`ModelEntry.torch_names`: the ResNets' torchvision-style names, C3D's layer names); every function
takes `arch` (a name or a `ModelEntry`) to pick it.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping

import numpy as np

from porting.keymap import CONV, DENSE, SAME, NameFn, Path, Transform, from_params, layout, to_params
from vmz_jax.models import registry
from vmz_jax.models.registry import ModelEntry

# BatchNorm fields: ours -> torch.
BN_FIELDS = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
IGNORED_SUFFIXES = (".num_batches_tracked",)

_BN = "bn\\.(scale|bias|mean|var)"
_BLOCK = r"layer\d\.\d+"

Rule = tuple[str, str, Transform]

# (our unstacked path, torch name, transform); first match wins. `{bn}` in the torch name is
# replaced by the torch name of the BatchNorm field matched by the last group. One table per naming
# key (`ModelEntry.torch_names`); the classifier rules end each.
RESNET_TABLE: tuple[Rule, ...] = (
    # R(2+1)D stem: Sequential(conv 1x7x7, BN, ReLU, conv 3x1x1, BN, ReLU)
    (r"stem\.spatial\.kernel", "stem.0.weight", CONV),
    (rf"stem\.spatial\.{_BN}", "stem.1.{bn}", SAME),
    (r"stem\.temporal\.kernel", "stem.3.weight", CONV),
    (rf"stem\.temporal\.{_BN}", "stem.4.{bn}", SAME),
    # every other stem: Sequential(conv, BN, ReLU[, MaxPool])
    (r"stem\.conv\.kernel", "stem.0.weight", CONV),
    (rf"stem\.conv\.{_BN}", "stem.1.{bn}", SAME),
    # (2+1)D residual conv: Sequential(Sequential(conv 1x3x3, BN, ReLU, conv 3x1x1), BN, ...)
    (rf"({_BLOCK}\.conv\d)\.spatial\.kernel", r"\1.0.0.weight", CONV),
    (rf"({_BLOCK}\.conv\d)\.spatial\.{_BN}", r"\1.0.1.{bn}", SAME),
    (rf"({_BLOCK}\.conv\d)\.temporal\.kernel", r"\1.0.3.weight", CONV),
    (rf"({_BLOCK}\.conv\d)\.temporal\.{_BN}", r"\1.1.{bn}", SAME),
    # ip-CSN middle conv: Sequential(Sequential(conv 1x1x1, BN, depthwise 3x3x3), BN, ReLU)
    (rf"({_BLOCK}\.conv2)\.pointwise\.kernel", r"\1.0.0.weight", CONV),
    (rf"({_BLOCK}\.conv2)\.pointwise\.{_BN}", r"\1.0.1.{bn}", SAME),
    (rf"({_BLOCK}\.conv2)\.depthwise\.kernel", r"\1.0.2.weight", CONV),
    (rf"({_BLOCK}\.conv2)\.depthwise\.{_BN}", r"\1.1.{bn}", SAME),
    # single convs (3-D, 2-D, depthwise, 1x1x1) and the projection shortcut: Sequential(conv, BN)
    (rf"({_BLOCK}\.(?:conv\d|downsample))\.kernel", r"\1.0.weight", CONV),
    (rf"({_BLOCK}\.(?:conv\d|downsample))\.{_BN}", r"\1.1.{bn}", SAME),
)
C3D_TABLE: tuple[Rule, ...] = (
    # conv1a..conv5b as Sequential(conv, BN, ReLU); fc6, fc7
    (r"(conv[1-5][ab])\.kernel", r"\1.0.weight", CONV),
    (rf"(conv[1-5][ab])\.{_BN}", r"\1.1.{bn}", SAME),
    (r"(fc[67])\.kernel", r"\1.weight", DENSE),
    (r"(fc[67])\.bias", r"\1.bias", SAME),
)
CLASSIFIER_TABLE: tuple[Rule, ...] = (
    (r"fc\.kernel", "fc.weight", DENSE),
    (r"fc\.bias", "fc.bias", SAME),
)
#: naming key (`ModelEntry.torch_names`) -> its rules.
TABLES: dict[str, tuple[Rule, ...]] = {
    "resnet": RESNET_TABLE + CLASSIFIER_TABLE,
    "c3d": C3D_TABLE + CLASSIFIER_TABLE,
}
_COMPILED = {key: tuple((re.compile(pattern), name, tf) for pattern, name, tf in table)
             for key, table in TABLES.items()}


def naming_key(arch: str | ModelEntry | None) -> str | None:
    """The torch naming key of `arch` (None stays None: every table, see `torch_name`)."""
    return None if arch is None else registry.get(arch).torch_names


def torch_name(unstacked_path: str, naming: str | None = None) -> tuple[str, Transform]:
    """The torch name and transform of one of our (unstacked, dotted) parameter paths.

    `naming` is the table's key (`ModelEntry.torch_names`). None tries every table in turn: their
    patterns are disjoint (a test checks it), so a tree maps the same either way; the callers that
    know the architecture pass its key.
    """
    keys = TABLES if naming is None else (naming,)
    for key in keys:
        for pattern, template, transform in _COMPILED[key]:
            match = pattern.fullmatch(unstacked_path)
            if match:
                name = match.expand(template.replace("{bn}", ""))
                if "{bn}" in template:
                    name += BN_FIELDS[match.group(match.lastindex or 0)]
                return name, transform
    where = "" if naming is None else f" in the {naming!r} table"
    raise KeyError(f"no torch name rule for parameter {unstacked_path!r}{where}")


def name_fn(arch: str | ModelEntry | None = None) -> NameFn:
    """`torch_name` bound to the table of `arch` (every table if None)."""
    return functools.partial(torch_name, naming=naming_key(arch))


def model_layout(shapes: Mapping[Path, tuple[int, ...]], arch: str | ModelEntry | None = None) -> dict:
    """torch name -> Slot for every array of a model."""
    return layout(shapes, name_fn(arch))


def torch_to_params(state_dict: Mapping[str, np.ndarray], shapes: Mapping[Path, tuple[int, ...]],
                    *, arch: str | ModelEntry | None = None, source: str = "state_dict"
                    ) -> dict[Path, np.ndarray]:
    """Map a VMZ-named state_dict onto our flat parameter tree (path -> float32 array).

    `shapes` is our flat path -> shape map (`vmz_jax.models.variables.abstract_shapes`). Every problem is
    collected and raised together in one `CheckpointError` that names `source`.
    """
    return to_params(state_dict, shapes, name_fn(arch), source=source,
                     skip=lambda name: name.endswith(IGNORED_SUFFIXES))


def params_to_torch(params: Mapping[Path, np.ndarray], arch: str | ModelEntry | None = None
                    ) -> dict[str, np.ndarray]:
    """Our flat tree -> VMZ-named state_dict (torch layouts, float32)."""
    return from_params(params, name_fn(arch))
