"""The generic machinery behind every name map: external names <-> our flat parameter tree.

A name map is a function from one of our *unstacked* dotted paths (`layer2.3.conv1.spatial.kernel`,
i.e. with the stacked `first`/`rest` blocks spelled as block numbers) to an external name and a
`Transform` of the array layout. From it, `layout` derives where every external array goes,
`to_params` maps a whole file strictly (each name used once, every problem reported together,
NaN canaries for anything left unfilled) and `from_params` goes back.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from vmz_jax.errors import CheckpointError

Path = tuple[str, ...]


@dataclass(frozen=True)
class Transform:
    """How an array changes between the external layout and ours (and back)."""

    name: str
    to_ours: Callable[[np.ndarray], np.ndarray]
    to_external: Callable[[np.ndarray], np.ndarray]


# Conv3d (O, I/groups, kT, kH, kW) <-> ours (kT, kH, kW, I/groups, O). Only numeric parity with
# non-symmetric weights tells this apart from a full reversal, which gives the same shape.
CONV = Transform("conv", lambda w: np.transpose(w, (2, 3, 4, 1, 0)),
                 lambda w: np.transpose(w, (4, 3, 0, 1, 2)))
DENSE = Transform("dense", np.transpose, np.transpose)
SAME = Transform("same", lambda w: w, lambda w: w)

NameFn = Callable[[str], tuple[str, Transform]]


@dataclass(frozen=True)
class Slot:
    """Where one external array lives in our tree: a path, and an index when the path is stacked."""

    path: Path
    index: int | None
    shape: tuple[int, ...]  # our layout, without the stacking axis
    transform: Transform

    @property
    def external_shape(self) -> tuple[int, ...]:
        return tuple(self.transform.to_external(np.empty(self.shape, np.uint8)).shape)


def _stage_position(path: Path) -> int | None:
    """Where a stage's `first`/`rest` is in `path`: 1 (`layer2.rest...`), or deeper in a model made
    of towers (`visual.layer2.rest...`); None outside the stages."""
    return next((k for k in range(1, len(path)) if path[k] in ("first", "rest")), None)


def is_stacked(path: Path) -> bool:
    """Whether `path` holds a stage's stacked blocks 1..n-1 (leading axis = block - 1)."""
    k = _stage_position(path)
    return k is not None and path[k] == "rest"


def unstacked(path: Path, index: int | None) -> str:
    """`('layer2', 'rest', ...)` with stack index i -> `'layer2.<i + 1>....'`; `first` -> block 0."""
    parts = list(path)
    k = _stage_position(path)
    if k is not None:
        parts[k] = "0" if parts[k] == "first" else str(index + 1)  # type: ignore[operator]
    return ".".join(parts)


def layout(shapes: Mapping[Path, tuple[int, ...]], name_fn: NameFn) -> dict[str, Slot]:
    """External name -> Slot for every array of a model, given our flat path -> shape map."""
    slots = {}
    for path, shape in shapes.items():
        stacked = is_stacked(path)
        for index in range(shape[0]) if stacked else [None]:
            name, transform = name_fn(unstacked(path, index))
            slots[name] = Slot(path, index, tuple(shape[1:] if stacked else shape), transform)
    return slots


def to_params(arrays: Mapping[str, np.ndarray], shapes: Mapping[Path, tuple[int, ...]],
              name_fn: NameFn, *, skip: Callable[[str], bool] = lambda name: False,
              source: str = "weights") -> dict[Path, np.ndarray]:
    """Map named external arrays onto our flat tree (path -> float32 array), strictly.

    Names for which `skip` is true are ignored (training state). Every other name must be used
    exactly once, be float32 and have the right shape; every slot must be filled with finite values.
    All problems are raised together in one `CheckpointError` naming `source`.
    """
    slots = layout(shapes, name_fn)
    out = {path: np.full(shape, np.nan, np.float32) for path, shape in shapes.items()}
    problems: list[str] = []
    used: set[str] = set()
    for name, array in arrays.items():
        if skip(name):
            continue
        slot = slots.get(name)
        if slot is None:
            problems.append(f"unexpected {name!r}")
            continue
        used.add(name)  # present: from here on, problems are about its content, not its absence
        array = np.asarray(array)
        if array.dtype != np.float32:
            problems.append(f"{name!r} has dtype {array.dtype}, expected float32")
            continue
        if array.shape != slot.external_shape:
            problems.append(f"{name!r} has shape {array.shape}, expected {slot.external_shape}")
            continue
        target = out[slot.path] if slot.index is None else out[slot.path][slot.index]
        target[...] = slot.transform.to_ours(array)
    problems += [f"missing {name!r}" for name in slots if name not in used]
    if not problems:  # NaN canary: anything not overwritten, or non-finite in the file
        problems += [f"non-finite values in {'.'.join(p)}" for p, a in out.items()
                     if not np.isfinite(a).all()]
    if problems:
        raise CheckpointError(f"{source}: {len(problems)} problem(s) mapping onto the model: "
                              + "; ".join(problems))
    return out


def from_params(params: Mapping[Path, np.ndarray], name_fn: NameFn) -> dict[str, np.ndarray]:
    """The inverse map: our flat tree -> external names and layouts (float32, contiguous)."""
    shapes = {path: tuple(np.shape(a)) for path, a in params.items()}
    out = {}
    for name, slot in layout(shapes, name_fn).items():
        array = np.asarray(params[slot.path])
        if slot.index is not None:
            array = array[slot.index]
        out[name] = np.ascontiguousarray(slot.transform.to_external(array), np.float32)
    return out
