"""VMZ PyTorch `state_dict` names <-> vmz_jax parameter paths, as one declarative table.

VMZ's PyTorch models use torchvision's VideoResNet naming (`layer2.0.conv1.0.3.weight`, ...). Our
models name things by what they are (`layer2.first.conv1.temporal.kernel`) and stack blocks 1..n-1 of
each stage (`layer2.rest...`, leading axis = block - 1). The table below is written on "unstacked"
paths (`layer2.0.conv1.temporal.kernel`); `model_layout` does the stacking.

`torch_to_params` maps a whole state_dict and reports every problem at once (missing, unexpected,
mis-shaped, non-float keys) in one `CheckpointError`; `num_batches_tracked` is ignored.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from vmz_jax.errors import CheckpointError

Path = tuple[str, ...]

# BatchNorm fields: ours -> torch.
BN_FIELDS = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
IGNORED_TORCH_SUFFIXES = (".num_batches_tracked",)


@dataclass(frozen=True)
class Transform:
    """How an array changes between the torch layout and ours (and back)."""

    name: str
    to_ours: Callable[[np.ndarray], np.ndarray]
    to_torch: Callable[[np.ndarray], np.ndarray]


# torch Conv3d (O, I/groups, kT, kH, kW) <-> Flax-style (kT, kH, kW, I/groups, O). Only numeric
# parity with non-symmetric weights tells this apart from a full reversal, which has the same shape.
CONV = Transform("conv", lambda w: np.transpose(w, (2, 3, 4, 1, 0)),
                 lambda w: np.transpose(w, (4, 3, 0, 1, 2)))
DENSE = Transform("dense", lambda w: np.transpose(w), lambda w: np.transpose(w))
SAME = Transform("same", lambda w: w, lambda w: w)

_BN = "bn\\.(scale|bias|mean|var)"
_BLOCK = r"layer\d\.\d+"

# (our unstacked path, torch name, transform); first match wins. `{bn}` in the torch name is
# replaced by the torch name of the BatchNorm field matched by the last group.
TABLE: tuple[tuple[str, str, Transform], ...] = (
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
    # C3D: conv1a..conv5b as Sequential(conv, BN, ReLU); fc6, fc7
    (r"(conv\d[ab])\.kernel", r"\1.0.weight", CONV),
    (rf"(conv\d[ab])\.{_BN}", r"\1.1.{bn}", SAME),
    # classifier (and C3D's fc6, fc7)
    (r"(fc\d?)\.kernel", r"\1.weight", DENSE),
    (r"(fc\d?)\.bias", r"\1.bias", SAME),
)
_COMPILED = tuple((re.compile(pattern), name, tf) for pattern, name, tf in TABLE)


def torch_name(unstacked_path: str) -> tuple[str, Transform]:
    """The torch name and transform of one of our (unstacked, dotted) parameter paths."""
    for pattern, template, transform in _COMPILED:
        match = pattern.fullmatch(unstacked_path)
        if match:
            name = match.expand(template.replace("{bn}", ""))
            if "{bn}" in template:
                name += BN_FIELDS[match.group(match.lastindex or 0)]
            return name, transform
    raise KeyError(f"no torch name rule for parameter {unstacked_path!r}")


@dataclass(frozen=True)
class Slot:
    """Where one torch tensor lives in our tree: a path, and an index when the path is stacked."""

    path: Path
    index: int | None
    shape: tuple[int, ...]  # our layout, without the stacking axis
    transform: Transform


def _unstacked(path: Path, index: int | None) -> str:
    parts = list(path)
    if len(parts) > 1 and parts[1] in ("first", "rest"):
        parts[1] = "0" if parts[1] == "first" else str(index + 1)  # type: ignore[operator]
    return ".".join(parts)


def model_layout(shapes: Mapping[Path, tuple[int, ...]]) -> dict[str, Slot]:
    """torch name -> Slot for every array of a model, given our flat path -> shape map."""
    layout = {}
    for path, shape in shapes.items():
        stacked = len(path) > 1 and path[1] == "rest"
        for index in range(shape[0]) if stacked else [None]:
            name, transform = torch_name(_unstacked(path, index))
            layout[name] = Slot(path, index, tuple(shape[1:] if stacked else shape), transform)
    return layout


def _torch_shape(slot: Slot) -> tuple[int, ...]:
    probe = np.empty(slot.shape, dtype=np.uint8)
    return tuple(slot.transform.to_torch(probe).shape)


def torch_to_params(state_dict: Mapping[str, np.ndarray], shapes: Mapping[Path, tuple[int, ...]],
                    *, source: str = "state_dict") -> dict[Path, np.ndarray]:
    """Map a VMZ-named state_dict onto our flat parameter tree (path -> float32 array).

    `shapes` is our flat path -> shape map (from `vmz_jax.models` via `abstract_shapes`). Every
    problem is collected and raised together in one `CheckpointError` that names `source`.
    """
    layout = model_layout(shapes)
    out = {path: np.full(shape, np.nan, np.float32) for path, shape in shapes.items()}
    problems: list[str] = []
    used: set[str] = set()
    for name, array in state_dict.items():
        if name.endswith(IGNORED_TORCH_SUFFIXES):
            continue
        slot = layout.get(name)
        if slot is None:
            problems.append(f"unexpected key {name!r}")
            continue
        array = np.asarray(array)
        if array.dtype != np.float32:
            problems.append(f"{name!r} has dtype {array.dtype}, expected float32")
            continue
        expected = _torch_shape(slot)
        if array.shape != expected:
            problems.append(f"{name!r} has shape {array.shape}, expected {expected}")
            continue
        target = out[slot.path] if slot.index is None else out[slot.path][slot.index]
        target[...] = slot.transform.to_ours(array)
        used.add(name)
    problems += [f"missing key {name!r}" for name in layout if name not in used]
    if not problems:
        problems += [f"non-finite values in {'.'.join(p)}" for p, a in out.items()
                     if not np.isfinite(a).all()]
    if problems:
        raise CheckpointError(f"{source}: {len(problems)} problem(s) mapping onto the model: "
                              + "; ".join(problems))
    return out


def params_to_torch(params: Mapping[Path, np.ndarray]) -> dict[str, np.ndarray]:
    """The inverse map: our flat tree -> VMZ-named state_dict (torch layouts, float32)."""
    shapes = {path: tuple(np.shape(a)) for path, a in params.items()}
    state_dict = {}
    for name, slot in model_layout(shapes).items():
        array = np.asarray(params[slot.path])
        if slot.index is not None:
            array = array[slot.index]
        state_dict[name] = np.ascontiguousarray(slot.transform.to_torch(array), np.float32)
    return state_dict
