"""Weight files in any supported format -> our flat parameter tree, and back.

`read_params(path, arch)` reads a torch `.pth` (zip or legacy), a Caffe2 `.pkl`, an `.npz` or a
`.safetensors` file (format detected from the content, `porting.readers`), tells from the names
whether they are VMZ's PyTorch names or Caffe2 blob names, reads the class count (and r2d_18's clip
length) from the file, and maps the arrays strictly onto `arch` (`porting.torch_names`,
`porting.caffe2_names`). `export_params` writes our tree back as a VMZ-named `.pth` / `.npz` or a
Caffe2-named `.pkl`, atomically.

A port holds about one copy of the weights, not two: the names and shapes are checked first
without touching data (`_fits`), then every source array is moved into the tree and dropped at once
(`_consume`); the file's sha256 is computed in a thread alongside.
"""

from __future__ import annotations

import collections
import ctypes
import hashlib
import json
import os
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import numpy as np

from porting import readers
from porting.keymap import NameFn, Path, Slot, is_stacked, layout
from vmz_jax.errors import CheckpointError, one_line
from vmz_jax.models import registry
from vmz_jax.models.registry import ModelEntry
from vmz_jax.models.variables import check_params, expected_shapes

__all__ = ["EXPORT_FORMATS", "SourceInfo", "detect_naming", "export_params", "read_params"]

Naming = Literal["torch", "caffe2"]
StrPath = str | os.PathLike[str]

EXPORT_FORMATS = ("pth", "npz", "pkl", "safetensors")
_TORCH_NAME = re.compile(r"(?:stem|layer[1-4]|conv[1-5][ab]|fc[67]?)\.[0-9A-Za-z_.]+")
_CAFFE2_NAME = re.compile(r"[0-9A-Za-z_]+")
_MESSAGE_LIMIT = 700
_HASH_CHUNK = 1 << 20
_TRIM_EVERY = 16 << 20  # bytes of source arrays dropped between two malloc_trim calls
_COPY_THREADS = 4
_malloc_trim: Callable[[int], int] | None | bool = None


@dataclass(frozen=True)
class SourceInfo:
    """What a weights file turned out to be."""

    path: str
    format: str  # one of porting.readers.FORMATS
    naming: Naming  # "torch": VMZ's PyTorch state_dict names; "caffe2": Caffe2 blob names
    num_classes: int  # from the classifier's shape (torch) or its blob name (Caffe2)
    clip_length: int | None  # the clip length the weights fix (r2d_18's stem), None if any works
    sha256: str  # of the whole file


def _sha256(path: str, stop: threading.Event | None = None) -> str:
    """The file's sha256 (hex); "" if `stop` is set before the end."""
    digest = hashlib.sha256()
    buffer = bytearray(_HASH_CHUNK)
    view = memoryview(buffer)
    try:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buffer):
                digest.update(view[:n])
                if stop is not None and stop.is_set():
                    return ""
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


def _name_map(naming: Naming, entry: ModelEntry, num_classes: int) -> _NameMap:
    if naming == "torch":
        from porting.torch_names import IGNORED_SUFFIXES, name_fn

        return _NameMap(name_fn(entry), lambda name: name.endswith(IGNORED_SUFFIXES))
    from porting.caffe2_names import caffe2_name_fn, is_training_state

    return _NameMap(caffe2_name_fn(entry, num_classes), is_training_state)


def _short(text: str) -> str:
    return one_line(text, _MESSAGE_LIMIT)


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


def _lookalikes(entry: ModelEntry, arrays: Mapping[str, np.ndarray], naming: Naming, num_classes: int,
                clip_length: int | None) -> list[str]:
    """Architectures of the same depth (ip- vs ir-CSN, R(2+1)D vs R3D, MCx vs rMCx, ...) whose
    names and shapes the file matches exactly. Only run when a port has failed."""
    found = []
    for candidate in registry.entries():
        if (candidate is entry or entry.depth is None or candidate.depth != entry.depth
                or candidate.caffe2_names != entry.caffe2_names):
            continue
        shapes = expected_shapes(candidate, num_classes, clip_length if candidate.spans_clip else None)
        if _fits(arrays, shapes, _name_map(naming, candidate, num_classes)):
            found.append(candidate.name)
    return found


def read_params(path: StrPath, arch: str | ModelEntry, *, num_classes: int | None = None
                ) -> tuple[dict[Path, np.ndarray], SourceInfo]:
    """Read and port a weights file for `arch`: (flat path -> float32 array, SourceInfo).

    The format comes from the content, the naming (PyTorch or Caffe2) from the names, the class
    count from the classifier; `num_classes`, when given, must agree with it. Every problem is one
    `CheckpointError` whose message starts with the path: unreadable or unsafe file, unknown names,
    a class count other than asked, weights of another architecture (named when recognised).
    """
    entry = registry.get(arch)
    name = os.fsdecode(path)
    fmt = readers.detect_format(name)
    stop = threading.Event()
    with ThreadPoolExecutor(1) as pool:  # hashing releases the GIL: it overlaps the port
        digest = pool.submit(_sha256, name, stop)
        try:
            params, naming, found_classes, clip_length = _port(name, entry, num_classes)
        except BaseException:
            stop.set()  # a failed port does not wait for the hash
            raise
        sha256 = digest.result()
    return params, SourceInfo(name, fmt, naming, found_classes, clip_length, sha256)


def _port(name: str, entry: ModelEntry, num_classes: int | None
          ) -> tuple[dict[Path, np.ndarray], Naming, int, int | None]:
    arrays = readers.read_weights(name)
    _release_free_memory()  # what the reader freed (a pickle's raw strings: as much as the weights)
    naming = detect_naming(list(arrays), name)
    if naming == "torch" and entry.torch_names is None:
        raise CheckpointError(f"{name}: PyTorch names, but {entry.name} has no PyTorch port: its weights "
                              "carry Caffe2 blob names in every format")
    if naming == "torch":
        found_classes = _torch_num_classes(arrays, name)
        what = f"'fc.weight' is {arrays['fc.weight'].shape}"
        clip_length = _torch_clip_length(arrays) if entry.spans_clip else None
    else:
        from porting.caffe2_names import clip_length_from_blobs, num_classes_from_blobs

        found_classes = num_classes_from_blobs(arrays, name)
        what = f"the classifier blob is 'last_out_L{found_classes}'"
        clip_length = clip_length_from_blobs(arrays, entry) if entry.spans_clip else None
    if num_classes is not None and num_classes != found_classes:
        raise CheckpointError(
            f"{name}: the file's classifier has {found_classes} classes ({what}), "
            f"but num_classes={num_classes} was asked for"
        )
    shapes = expected_shapes(entry, found_classes, clip_length)
    names = _name_map(naming, entry, found_classes)
    if not _fits(arrays, shapes, names):
        _raise_mismatch(name, entry, arrays, shapes, names, naming, found_classes, clip_length)
    return _consume(arrays, shapes, names, entry, naming, name), naming, found_classes, clip_length


def _release_free_memory() -> None:
    """Hand the heap's free pages back to the OS (glibc keeps freed arrays under its mmap threshold,
    32 MB, for reuse; the tree's stacked arrays are separate mappings and would not reuse them, so
    without this a port's resident memory is the source plus the tree)."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL(None).malloc_trim
        except (OSError, AttributeError):  # not glibc
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


def _strict_map(arrays: Mapping[str, np.ndarray], shapes: Mapping[Path, tuple[int, ...]],
                entry: ModelEntry, naming: Naming, source: str) -> dict[Path, np.ndarray]:
    """The reference mappers (`torch_to_params`, `caffe2_to_params`): used for their messages."""
    if naming == "torch":
        from porting.torch_names import torch_to_params

        return torch_to_params(arrays, shapes, arch=entry, source=source)
    from porting.caffe2_names import caffe2_to_params

    return caffe2_to_params(arrays, entry, shapes, source=source)


def _consume(arrays: dict[str, np.ndarray], shapes: Mapping[Path, tuple[int, ...]], names: _NameMap,
             entry: ModelEntry, naming: Naming, source: str) -> dict[Path, np.ndarray]:
    """Map `arrays` onto the tree like `keymap.to_params`, emptying `arrays` as it goes.

    Precondition: `_fits` (every name used once, every slot filled, shapes right). Each source array
    is dropped as soon as it is in the tree; an unstacked array that needs no transpose becomes the
    tree's array as is; stacked outputs are allocated empty and filled block by block. So the port
    holds about one copy of the weights, not two, and writes each byte once. The (transposing)
    copies run on a few threads: numpy releases the GIL while it copies.
    """
    if any(array.dtype != np.float32 for name, array in arrays.items() if not names.skip(name)):
        _strict_map(arrays, shapes, entry, naming, source)  # raises, listing every problem
    slots = layout(shapes, names.name_fn)
    out: dict[Path, np.ndarray] = {}
    for path, shape in shapes.items():
        if is_stacked(path):
            out[path] = np.empty(shape, np.float32)

    def move(slot: Slot, array: np.ndarray) -> Path | None:
        """Put one array in place; return its path if it holds non-finite values."""
        ours = slot.transform.to_ours(array)
        if slot.index is not None:
            out[slot.path][slot.index] = ours
        elif ours is array and array.flags.c_contiguous and array.flags.owndata:
            out[slot.path] = array
        else:
            out[slot.path] = np.ascontiguousarray(ours, np.float32)
        return None if np.isfinite(array).all() else slot.path

    nonfinite: set[Path] = set()
    pending: collections.deque[tuple[Future[Path | None], int]] = collections.deque()
    workers = max(1, min(_COPY_THREADS, os.cpu_count() or 1))
    freed = 0
    with ThreadPoolExecutor(workers) as pool:
        while arrays or pending:
            if arrays and len(pending) < 2 * workers:
                name, array = arrays.popitem()
                if names.skip(name):
                    continue
                pending.append((pool.submit(move, slots[name], array), array.nbytes))
                del array  # the task holds the only reference: it goes when the copy is done
                continue
            future, nbytes = pending.popleft()
            if (path := future.result()) is not None:
                nonfinite.add(path)
            freed += nbytes
            if freed > _TRIM_EVERY:
                _release_free_memory()
                freed = 0
    if nonfinite:
        problems = [f"non-finite values in {'.'.join(p)}" for p in shapes if p in nonfinite]
        raise CheckpointError(_short(f"{source}: {len(problems)} problem(s) mapping onto the model: "
                                     + "; ".join(problems)))
    return {path: out[path] for path in shapes}


def _raise_mismatch(name: str, entry: ModelEntry, arrays: dict[str, np.ndarray],
                    shapes: Mapping[Path, tuple[int, ...]], names: _NameMap, naming: Naming,
                    num_classes: int, clip_length: int | None) -> None:
    """Explain why the file does not fit `arch`: the strict mapper's list of problems (shortened),
    and which architecture the file does fit, if any of the same depth."""
    try:
        _strict_map(arrays, shapes, entry, naming, name)
        return
    except CheckpointError as exc:
        detail = str(exc).removeprefix(f"{name}: ")
    others = _lookalikes(entry, arrays, naming, num_classes, clip_length)
    hint = f"; these are {' or '.join(others)} weights" if others else ""
    kind = "PyTorch" if naming == "torch" else "Caffe2"
    raise CheckpointError(_short(f"{name}: {kind} weights that do not fit {entry.name}{hint}: {detail}"))


# --------------------------------------------------------------------------------------------
# export


def export_params(params: Mapping[Path, np.ndarray], arch: str | ModelEntry, dst: StrPath, fmt: str) -> None:
    """Write our flat tree as a VMZ-named `.pth` (zip, `fmt="pth"`), `.npz` (`"npz"`) or `.safetensors`
    (`"safetensors"`), or as a Caffe2-named `.pkl` (`"pkl"`); architectures without PyTorch names
    (`ModelEntry.torch_names` None: audio, audio-visual) keep their Caffe2 names in every format.
    Atomic: `dst` is complete or untouched. CheckpointError on failure; ValueError for an unknown
    format."""
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    entry = registry.get(arch)
    name = os.fsdecode(dst)
    kernel = params.get(("fc", "kernel"))
    if kernel is None or np.ndim(kernel) != 2:
        raise CheckpointError(f"{name}: the weights to export have no classifier ('fc', 'kernel')")
    clip_length = None
    if entry.spans_clip:
        stem = params.get(("stem", "conv", "kernel"))
        clip_length = int(np.shape(stem)[0]) if stem is not None and np.ndim(stem) == 5 else None
    check_params(params, expected_shapes(entry, int(np.shape(kernel)[1]), clip_length),
                 f"{name}: the weights do not fit {entry.name}")
    if fmt == "pkl" or entry.torch_names is None:
        from porting.caffe2_names import params_to_caffe2

        blobs = params_to_caffe2(params, entry)
        if fmt == "pkl":
            readers.write_caffe2_pkl(name, blobs)
            return
        state_dict = blobs  # no PyTorch port (audio, audio-visual): Caffe2 names in every format
    else:
        from porting.torch_names import params_to_torch

        state_dict = params_to_torch(params, entry)
    if fmt == "pth":
        readers.write_pth_zip(name, state_dict)
    elif fmt == "safetensors":
        write_safetensors(name, state_dict)
    else:
        readers.write_npz(name, state_dict)


_SAFETENSORS_CODES = {"float32": "F32", "float64": "F64", "float16": "F16", "bfloat16": "BF16",
                      "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8",
                      "bool": "BOOL"}


def write_safetensors(path: StrPath, arrays: Mapping[str, np.ndarray]) -> None:
    """Write `arrays` as a `.safetensors` file, atomically, without the `safetensors` package: an 8-byte
    little-endian header length, the JSON header (name -> dtype, shape, byte range; keys sorted, padded
    with spaces to a multiple of 8 bytes as the reference writer does) and the raw little-endian data."""
    from vmz_jax.files import atomic_file

    header: dict[str, object] = {}
    blobs = []
    offset = 0
    for key in sorted(arrays):
        a = np.asarray(arrays[key])
        code = _SAFETENSORS_CODES.get(a.dtype.name)
        if code is None:
            raise CheckpointError(f"{os.fsdecode(path)}: {key} has dtype {a.dtype}, which safetensors "
                                  "cannot hold")
        if a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("<"))
        data = np.ascontiguousarray(a).tobytes()
        header[key] = {"dtype": code, "shape": list(a.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with atomic_file(path) as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for data in blobs:
            f.write(data)
