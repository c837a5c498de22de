"""Weight files in any supported format -> our flat parameter tree, and back.

`read_params(path, arch)` reads a torch `.pth` (zip or legacy), a Caffe2 `.pkl`, an `.npz` or a
`.safetensors` file (format detected from the content, `porting.readers`), tells from the names
whether they are VMZ's PyTorch names or Caffe2 blob names, reads the class count (and r2d_18's clip
length) from the file, and maps the arrays strictly onto `arch` (`porting.torch_names`,
`porting.caffe2_names`). `export_params` writes our tree back as a VMZ-named `.pth` / `.npz` or a
Caffe2-named `.pkl`, atomically.

Mapping consumes the arrays as it goes (each source array is dropped once it is copied into the
tree), so a port peaks at about one copy of the weights plus the largest array, not two.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Literal

import numpy as np

from porting import readers
from porting.keymap import NameFn, Path, layout
from vmz_jax.checkpoint import expected_shapes
from vmz_jax.errors import CheckpointError, VMZError

__all__ = ["EXPORT_FORMATS", "SourceInfo", "detect_naming", "export_params", "read_params"]

Naming = Literal["torch", "caffe2"]
StrPath = str | os.PathLike[str]

EXPORT_FORMATS = ("pth", "npz", "pkl")
_TORCH_NAME = re.compile(r"(?:stem|layer[1-4]|conv[1-5][ab]|fc[67]?)\.[0-9A-Za-z_.]+")
_CAFFE2_NAME = re.compile(r"[0-9A-Za-z_]+")
_MESSAGE_LIMIT = 700
_HASH_CHUNK = 1 << 22


@dataclass(frozen=True)
class SourceInfo:
    """What a weights file turned out to be."""

    path: str
    format: str  # one of porting.readers.FORMATS
    naming: Naming  # "torch": VMZ's PyTorch state_dict names; "caffe2": Caffe2 blob names
    num_classes: int  # from the classifier's shape (torch) or its blob name (Caffe2)
    clip_length: int | None  # the clip length the weights fix (r2d_18's stem), None if any works
    sha256: str  # of the whole file


def _arch_check(arch: str) -> None:
    from vmz_jax.models import ARCHS

    if arch not in ARCHS:
        raise VMZError(f"unknown architecture {arch!r}; available: {', '.join(ARCHS)}")


def _spans_clip(arch: str) -> bool:
    """True for architectures whose parameter shapes depend on the clip length (r2d_18)."""
    from vmz_jax.models.specs import RESNET_SPECS

    return arch in RESNET_SPECS and RESNET_SPECS[arch].stem == "full_time"


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(_HASH_CHUNK):
                digest.update(chunk)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return digest.hexdigest()


def detect_naming(names: Iterator[str] | list[str], source: str = "weights") -> Naming:
    """"torch" if the names are VMZ's PyTorch state_dict names (`layer1.0.conv1.0.weight`),
    "caffe2" if they are Caffe2 blob names (`comp_0_conv_1_w`); CheckpointError otherwise."""
    names = list(names)
    torch_like = sum(1 for n in names if _TORCH_NAME.fullmatch(n))
    caffe2_like = sum(1 for n in names if _CAFFE2_NAME.fullmatch(n))
    if torch_like and torch_like >= caffe2_like:
        return "torch"
    if caffe2_like:
        return "caffe2"
    sample = ", ".join(repr(n) for n in names[:3])
    raise CheckpointError(f"{source}: neither VMZ PyTorch names nor Caffe2 blob names (e.g. {sample})")


def _torch_num_classes(arrays: Mapping[str, np.ndarray], source: str) -> int:
    weight = arrays.get("fc.weight")
    if weight is None:
        raise CheckpointError(f"{source}: no classifier 'fc.weight' among the PyTorch names")
    if weight.ndim != 2 or weight.shape[0] <= 0:
        raise CheckpointError(f"{source}: classifier 'fc.weight' has shape {weight.shape}, expected (n, C)")
    return int(weight.shape[0])


def _torch_clip_length(arrays: Mapping[str, np.ndarray]) -> int | None:
    stem = arrays.get("stem.0.weight")
    return int(stem.shape[2]) if stem is not None and stem.ndim == 5 and stem.shape[2] > 0 else None


@dataclass(frozen=True)
class _NameMap:
    name_fn: NameFn
    skip: Callable[[str], bool]


def _name_map(naming: Naming, arch: str, num_classes: int) -> _NameMap:
    if naming == "torch":
        from porting.torch_names import IGNORED_SUFFIXES, torch_name

        return _NameMap(torch_name, lambda name: name.endswith(IGNORED_SUFFIXES))
    from porting.caffe2_names import caffe2_name_fn, is_training_state

    return _NameMap(caffe2_name_fn(arch, num_classes), is_training_state)


def _short(text: str) -> str:
    if len(text) <= _MESSAGE_LIMIT:
        return text
    cut = text.rfind("; ", 0, _MESSAGE_LIMIT)
    return text[: cut if cut > 0 else _MESSAGE_LIMIT] + "; ..."


def _fits(arrays: Mapping[str, np.ndarray], shapes: Mapping[Path, tuple[int, ...]], names: _NameMap) -> bool:
    """Whether the names and shapes of `arrays` are exactly those of a model (no data is touched)."""
    try:
        slots = layout(shapes, names.name_fn)
    except KeyError:
        return False
    present = {name: array.shape for name, array in arrays.items() if not names.skip(name)}
    return present.keys() == slots.keys() and all(
        present[name] == slot.external_shape for name, slot in slots.items()
    )


def _lookalikes(arch: str, arrays: Mapping[str, np.ndarray], naming: Naming, num_classes: int,
                clip_length: int | None) -> list[str]:
    """Architectures of the same depth (ip- vs ir-CSN, R(2+1)D vs R3D, MCx vs rMCx, ...) whose
    names and shapes the file matches exactly. Only run when a port has failed."""
    from vmz_jax.models import ARCHS

    depth = arch.rpartition("_")[2]
    found = []
    for candidate in ARCHS:
        if candidate == arch or candidate.rpartition("_")[2] != depth:
            continue
        shapes = expected_shapes(candidate, num_classes, clip_length if _spans_clip(candidate) else None)
        if _fits(arrays, shapes, _name_map(naming, candidate, num_classes)):
            found.append(candidate)
    return found


class _Consumed(MutableMapping[str, np.ndarray]):
    """A dict of arrays whose `items()` pops each entry as it is handed out, so that the mapping
    code drops every source array right after copying it into the tree."""

    def __init__(self, arrays: dict[str, np.ndarray]) -> None:
        self._arrays = arrays

    def __getitem__(self, key: str) -> np.ndarray:
        return self._arrays[key]

    def __setitem__(self, key: str, value: np.ndarray) -> None:
        self._arrays[key] = value

    def __delitem__(self, key: str) -> None:
        del self._arrays[key]

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._arrays))

    def __len__(self) -> int:
        return len(self._arrays)

    def items(self) -> Iterator[tuple[str, np.ndarray]]:  # type: ignore[override]
        while self._arrays:
            name = next(iter(self._arrays))
            yield name, self._arrays.pop(name)


def read_params(path: StrPath, arch: str, *, num_classes: int | None = None
                ) -> tuple[dict[Path, np.ndarray], SourceInfo]:
    """Read and port a weights file for `arch`: (flat path -> float32 array, SourceInfo).

    The format comes from the content, the naming (PyTorch or Caffe2) from the names, the class
    count from the classifier; `num_classes`, when given, must agree with it. Every problem is one
    `CheckpointError` whose message starts with the path: unreadable or unsafe file, unknown names,
    a class count other than asked, weights of another architecture (named when recognised).
    """
    _arch_check(arch)
    name = os.fsdecode(path)
    fmt = readers.detect_format(name)
    sha256 = _sha256(name)
    arrays = readers.read_weights(name)
    naming = detect_naming(list(arrays), name)
    if naming == "torch":
        found_classes = _torch_num_classes(arrays, name)
        what = f"'fc.weight' is {arrays['fc.weight'].shape}"
        clip_length = _torch_clip_length(arrays) if _spans_clip(arch) else None
    else:
        from porting.caffe2_names import clip_length_from_blobs, num_classes_from_blobs

        found_classes = num_classes_from_blobs(arrays, name)
        what = f"the classifier blob is 'last_out_L{found_classes}'"
        clip_length = clip_length_from_blobs(arrays, arch) if _spans_clip(arch) else None
    if num_classes is not None and num_classes != found_classes:
        raise CheckpointError(
            f"{name}: the file's classifier has {found_classes} classes ({what}), "
            f"but num_classes={num_classes} was asked for"
        )
    shapes = expected_shapes(arch, found_classes, clip_length)
    names = _name_map(naming, arch, found_classes)
    if not _fits(arrays, shapes, names):
        _raise_mismatch(name, arch, arrays, shapes, names, naming, found_classes, clip_length)
    params = _map(_Consumed(arrays), shapes, names, arch, naming, name)
    info = SourceInfo(name, fmt, naming, found_classes, clip_length, sha256)
    return params, info


def _map(arrays: _Consumed, shapes: Mapping[Path, tuple[int, ...]], names: _NameMap, arch: str,
         naming: Naming, source: str) -> dict[Path, np.ndarray]:
    if naming == "torch":
        from porting.torch_names import torch_to_params

        return torch_to_params(arrays, shapes, source=source)
    from porting.caffe2_names import caffe2_to_params

    return caffe2_to_params(arrays, arch, shapes, source=source)


def _raise_mismatch(name: str, arch: str, arrays: dict[str, np.ndarray], shapes: Mapping[Path, tuple[int, ...]],
                    names: _NameMap, naming: Naming, num_classes: int, clip_length: int | None) -> None:
    """Explain why the file does not fit `arch`: the strict mapper's list of problems (shortened),
    and which architecture the file does fit, if any of the same depth."""
    try:
        _map(_Consumed(dict(arrays)), shapes, names, arch, naming, name)
        return
    except CheckpointError as exc:
        detail = str(exc).removeprefix(f"{name}: ")
    others = _lookalikes(arch, arrays, naming, num_classes, clip_length)
    hint = f"; these are {' or '.join(others)} weights" if others else ""
    kind = "PyTorch" if naming == "torch" else "Caffe2"
    raise CheckpointError(_short(f"{name}: {kind} weights that do not fit {arch}{hint}: {detail}"))


# --------------------------------------------------------------------------------------------
# export


def export_params(params: Mapping[Path, np.ndarray], arch: str, dst: StrPath, fmt: str) -> None:
    """Write our flat tree as a VMZ-named `.pth` (zip, `fmt="pth"`) or `.npz` (`"npz"`), or as a
    Caffe2-named `.pkl` (`"pkl"`). Atomic: `dst` is complete or untouched. CheckpointError on
    failure; ValueError for an unknown format."""
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    _arch_check(arch)
    name = os.fsdecode(dst)
    kernel = params.get(("fc", "kernel"))
    if kernel is None or np.ndim(kernel) != 2:
        raise CheckpointError(f"{name}: the weights to export have no classifier ('fc', 'kernel')")
    clip_length = None
    if _spans_clip(arch):
        stem = params.get(("stem", "conv", "kernel"))
        clip_length = int(np.shape(stem)[0]) if stem is not None and np.ndim(stem) == 5 else None
    shapes = expected_shapes(arch, int(np.shape(kernel)[1]), clip_length)
    problems = [f"missing {'.'.join(p)}" for p in shapes if p not in params]
    problems += [f"unexpected {'.'.join(p)}" for p in params if p not in shapes]
    problems += [f"{'.'.join(p)} has shape {np.shape(v)}, expected {shapes[p]}"
                 for p, v in params.items() if p in shapes and tuple(np.shape(v)) != shapes[p]]
    if problems:
        raise CheckpointError(_short(f"{name}: the weights do not fit {arch}: " + "; ".join(problems)))
    if fmt == "pkl":
        from porting.caffe2_names import params_to_caffe2

        readers.write_caffe2_pkl(name, params_to_caffe2(params, arch))
        return
    from porting.torch_names import params_to_torch

    state_dict = params_to_torch(params)
    if fmt == "pth":
        readers.write_pth_zip(name, state_dict)
    else:
        readers.write_npz(name, state_dict)
