"""Safe readers and writers for weight files: torch `.pth` (zip and legacy), Caffe2 `.pkl`,
`.npz` and `.safetensors`.

The format is detected from the file's content, never from its name. torch is not imported and no
pickle is loaded with `pickle.load`: pickles go through `_SafeUnpickler`, whose `find_class`
only knows an explicit allow-list of globals, each mapped to an implementation of our own that
builds numpy arrays (`_SAFE_GLOBALS`). Every failure of a reader is a `CheckpointError` whose
message starts with the file's path.
"""

from __future__ import annotations

import collections
import io
import json
import math
import os
import pickle
import pickletools
import re
import stat
import struct
import warnings
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Any

import numpy as np
from numpy.lib.stride_tricks import as_strided

from vmz_jax.errors import CheckpointError, one_line
from vmz_jax.files import atomic_file

__all__ = [
    "FORMATS",
    "detect_format",
    "read_weights",
    "write_caffe2_pkl",
    "write_npz",
    "write_pth_legacy",
    "write_pth_zip",
]

StrPath = str | os.PathLike[str]

FORMATS = ("pth-zip", "pth-legacy", "caffe2-pkl", "npz", "safetensors")

_TORCH_MAGIC = 0x1950A86A20F9469CFC6C  # first pickle of a legacy torch file
_TORCH_PROTOCOL = 1001  # second pickle of a legacy torch file
_MAX_PICKLE_BYTES = 1 << 28  # a zip checkpoint's data.pkl (about 100 kB for a 150-layer net)
_MAX_SMALL_RECORD = 64  # byteorder and friends
_MAX_SAFETENSORS_HEADER = 100 << 20  # the limit of the safetensors library
_MAX_BROADCAST_BYTES = 1 << 28  # a stride-0 tensor may exceed its storage up to this size
_MAX_NDIM = 32
_MAX_DEFLATE_RATIO = 1100  # deflate cannot expand more than 1032:1
_ZIP_ALIGNMENT = 64  # torch aligns storage records so that they can be mmapped
_ZIP_PREFIX = "archive"


class _BadFile(Exception):
    """A problem with the file's content; the public functions prefix the path."""


class _NoBuild:
    """Objects the unpickler hands out; a BUILD opcode applied to them is refused."""

    def __setstate__(self, state: object) -> None:
        raise _BadFile(f"refusing to set the state of a {type(self).__name__.lstrip('_')}")


# --------------------------------------------------------------------------------------------
# dtypes


@dataclass(frozen=True)
class _ElementType(_NoBuild):
    """How a storage's elements are stored: a little-endian numpy dtype, and whether the
    elements are bfloat16 bit patterns (stored as uint16, returned as float32). The
    allow-listed `torch.FloatStorage` & co. unpickle to these."""

    dtype: np.dtype
    bfloat16: bool = False


_TORCH_STORAGES: dict[str, _ElementType] = {
    "FloatStorage": _ElementType(np.dtype("<f4")),
    "DoubleStorage": _ElementType(np.dtype("<f8")),
    "HalfStorage": _ElementType(np.dtype("<f2")),
    "BFloat16Storage": _ElementType(np.dtype("<u2"), bfloat16=True),
    "LongStorage": _ElementType(np.dtype("<i8")),
    "IntStorage": _ElementType(np.dtype("<i4")),
    "ShortStorage": _ElementType(np.dtype("<i2")),
    "CharStorage": _ElementType(np.dtype("i1")),
    "ByteStorage": _ElementType(np.dtype("u1")),
    "BoolStorage": _ElementType(np.dtype("?")),
}

_SAFETENSORS_DTYPES: dict[str, _ElementType] = {
    "F32": _TORCH_STORAGES["FloatStorage"],
    "F64": _TORCH_STORAGES["DoubleStorage"],
    "F16": _TORCH_STORAGES["HalfStorage"],
    "BF16": _TORCH_STORAGES["BFloat16Storage"],
    "I64": _TORCH_STORAGES["LongStorage"],
    "I32": _TORCH_STORAGES["IntStorage"],
    "I16": _TORCH_STORAGES["ShortStorage"],
    "I8": _TORCH_STORAGES["CharStorage"],
    "U8": _TORCH_STORAGES["ByteStorage"],
    "BOOL": _TORCH_STORAGES["BoolStorage"],
}

# dtype codes numpy pickles name (np.dtype("f4", False, True)); object and structured dtypes are out
_NUMPY_PICKLE_DTYPES = frozenset(
    ["b1", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8"]
)


def _is_plain_numeric(dtype: np.dtype) -> bool:
    """bool, (u)int8..64, float16..64: no objects, fields, subarrays or strings."""
    return (
        dtype.kind in "biuf"
        and dtype.itemsize in (1, 2, 4, 8)
        and dtype.fields is None
        and dtype.subdtype is None
    )


def _to_native(array: np.ndarray, bfloat16: bool = False) -> np.ndarray:
    """An owned, C-contiguous copy in native byte order; bfloat16 bit patterns become float32
    exactly; booleans are normalised to 0/1."""
    if bfloat16:
        result = np.empty(array.shape, np.float32)
        bits = result.view(np.uint32)
        bits[...] = array
        bits <<= 16
        return result
    if array.dtype.kind == "b":
        return np.not_equal(array.view(np.uint8), 0, order="C")
    return np.array(array, dtype=array.dtype.newbyteorder("="), order="C")


def _int_tuple(value: object, what: str) -> tuple[int, ...]:
    """A shape or stride: a tuple/list of non-negative ints."""
    if not isinstance(value, tuple | list) or len(value) > _MAX_NDIM:
        raise _BadFile(f"{what} is not a short tuple of ints")
    if not all(type(n) is int and n >= 0 for n in value):
        raise _BadFile(f"{what} {value!r} is not a tuple of non-negative ints")
    return tuple(value)


# --------------------------------------------------------------------------------------------
# the restricted unpickler: placeholders and the safe implementations of allow-listed globals


@dataclass(frozen=True, eq=False)
class _StorageDecl(_NoBuild):
    """A torch storage declared by a persistent id: its data is read after unpickling."""

    key: str
    element: _ElementType
    numel: int

    @property
    def nbytes(self) -> int:
        return self.numel * self.element.dtype.itemsize


@dataclass(frozen=True, eq=False)
class _TensorRef(_NoBuild):
    """A tensor: a strided view of a storage, materialised once the storage is read."""

    storage: _StorageDecl
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


class _DtypeSpec:
    """A numpy dtype being unpickled: `numpy.dtype(code, align, copy)` then BUILD (byte order)."""

    def __init__(self, dtype: np.dtype) -> None:
        self.dtype = dtype

    def __setstate__(self, state: object) -> None:
        if isinstance(state, tuple) and len(state) >= 2 and isinstance(state[1], bytes):
            state = (state[0], state[1].decode("latin1"), *state[2:])  # Python 2 pickle, raw bytes
        if not isinstance(state, tuple) or len(state) < 2 or state[1] not in ("<", ">", "|", "="):
            raise _BadFile("malformed numpy dtype state")
        if any(part is not None for part in state[2:5]):
            raise _BadFile("structured numpy dtypes are not supported")
        if state[1] in ("<", ">"):
            self.dtype = self.dtype.newbyteorder(state[1])


class _PendingArray:
    """A numpy array being unpickled: `_reconstruct` creates it empty, BUILD fills it in."""

    def __init__(self, array: np.ndarray | None = None) -> None:
        self.array = array

    def __setstate__(self, state: object) -> None:
        if self.array is not None:
            raise _BadFile("numpy array state set twice")
        self.array = _array_from_state(state)


class _NdarrayType(_NoBuild):
    """Stands for `numpy.ndarray`, the first argument of `_reconstruct`."""


class _Allowed:
    """An allow-listed global: calls our implementation; BUILD on it is refused."""

    __slots__ = ("func", "name")

    def __init__(self, name: str, func: Callable[..., object]) -> None:
        self.name = name
        self.func = func

    def __call__(self, *args: object) -> object:
        return self.func(*args)

    def __setstate__(self, state: object) -> None:
        raise _BadFile(f"refusing to modify global '{self.name}'")


def _latin1_bytes(data: object, what: str) -> bytes:
    """Raw bytes as pickles carry them: bytes, or a str from a Python 2 pickle (latin-1)."""
    if isinstance(data, str):
        return data.encode("latin1")
    if isinstance(data, bytes | bytearray):
        return bytes(data)
    raise _BadFile(f"{what} is a {type(data).__name__}, not bytes (object arrays are refused)")


def _array_from_state(state: object) -> np.ndarray:
    """`ndarray.__setstate__((version, shape, dtype, is_fortran, rawdata))`, checked."""
    if isinstance(state, tuple) and len(state) == 5:
        state = state[1:]
    if not isinstance(state, tuple) or len(state) != 4:
        raise _BadFile("malformed numpy array state")
    shape, spec, fortran, raw = state
    shape = _int_tuple(shape, "numpy array shape")
    if not isinstance(spec, _DtypeSpec):
        raise _BadFile("numpy array state without a dtype")
    data = _latin1_bytes(raw, "numpy array data")
    if len(data) != math.prod(shape) * spec.dtype.itemsize:
        raise _BadFile(f"numpy array of shape {shape} has {len(data)} bytes of data")
    return np.frombuffer(data, spec.dtype).reshape(shape, order="F" if fortran else "C")


def _np_reconstruct(subtype: object, shape: object, dtype_code: object) -> _PendingArray:
    if not isinstance(subtype, _NdarrayType):
        raise _BadFile("numpy _reconstruct of something other than numpy.ndarray")
    return _PendingArray()  # the shape and dtype arguments are placeholders; BUILD sets them


def _np_dtype(code: object, align: object = False, copy: object = True) -> _DtypeSpec:
    if isinstance(code, bytes):  # Python 2 pickle read with encoding="bytes"
        code = code.decode("latin1")
    if not isinstance(code, str) or code not in _NUMPY_PICKLE_DTYPES:
        raise _BadFile(f"refusing numpy dtype {code!r}")
    return _DtypeSpec(np.dtype(code))


def _np_scalar(spec: object, data: object) -> _PendingArray:
    if not isinstance(spec, _DtypeSpec):
        raise _BadFile("numpy scalar without a dtype")
    raw = _latin1_bytes(data, "numpy scalar data")
    if len(raw) != spec.dtype.itemsize:
        raise _BadFile(f"numpy scalar of dtype {spec.dtype} has {len(raw)} bytes")
    return _PendingArray(np.frombuffer(raw, spec.dtype).reshape(()))


def _np_frombuffer(buffer: object, spec: object, shape: object, order: object) -> _PendingArray:
    """Protocol-5 numpy pickles: `numpy._core.numeric._frombuffer(buf, dtype, shape, order)`."""
    return _PendingArray(_array_from_state((shape, spec, order == "F", buffer)))


def _codecs_encode(text: object, encoding: object = "utf-8") -> bytes:
    """How protocol-2 pickles written by Python 3 carry bytes: `_codecs.encode(str, 'latin1')`."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _BadFile("refusing _codecs.encode other than str to latin1")
    return text.encode("latin1")


def _empty_bytes(*args: object) -> bytes:
    """Protocol-2 pickles written by Python 3 carry b'' as `builtins.bytes()`."""
    if args:
        raise _BadFile("refusing builtins.bytes with arguments")
    return b""


def _rebuild_tensor(storage: object, offset: object, shape: object, stride: object) -> _TensorRef:
    if not isinstance(storage, _StorageDecl):
        raise _BadFile("tensor without a storage")
    if type(offset) is not int or offset < 0:
        raise _BadFile(f"tensor storage offset {offset!r} is not a non-negative int")
    shape = _int_tuple(shape, "tensor shape")
    stride = _int_tuple(stride, "tensor stride")
    if len(shape) != len(stride):
        raise _BadFile(f"tensor shape {shape} and stride {stride} differ in length")
    return _TensorRef(storage, offset, shape, stride)


def _rebuild_tensor_v2(
    storage: object,
    offset: object,
    shape: object,
    stride: object,
    requires_grad: object = False,
    backward_hooks: object = None,
    metadata: object = None,
) -> _TensorRef:
    return _rebuild_tensor(storage, offset, shape, stride)


def _rebuild_parameter(
    data: object, requires_grad: object = False, backward_hooks: object = None
) -> _TensorRef:
    if not isinstance(data, _TensorRef):
        raise _BadFile("parameter without a tensor")
    return data


def _allow_list() -> dict[tuple[str, str], object]:
    funcs: dict[tuple[str, str], Callable[..., object]] = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("_codecs", "encode"): _codecs_encode,
        ("builtins", "bytes"): _empty_bytes,
        ("__builtin__", "bytes"): _empty_bytes,
        ("numpy", "dtype"): _np_dtype,
    }
    for core in ("numpy.core", "numpy._core"):
        funcs[(f"{core}.multiarray", "_reconstruct")] = _np_reconstruct
        funcs[(f"{core}.multiarray", "scalar")] = _np_scalar
        funcs[(f"{core}.numeric", "_frombuffer")] = _np_frombuffer
    allowed: dict[tuple[str, str], object] = {
        key: _Allowed(".".join(key), func) for key, func in funcs.items()
    }
    allowed[("numpy", "ndarray")] = _NdarrayType()
    allowed.update({("torch", name): element for name, element in _TORCH_STORAGES.items()})
    return allowed


_SAFE_GLOBALS = _allow_list()


class _StorageTable:
    """Validates persistent ids `('storage', storage_type, key, location, numel)` (legacy files
    add a sixth entry, the view metadata, which must be None) and remembers each storage."""

    _KEY = re.compile(r"[0-9A-Za-z_.-]{1,64}")

    def __init__(self, legacy: bool) -> None:
        self.length = 6 if legacy else 5
        self.decls: dict[str, _StorageDecl] = {}

    def declare(self, pid: object) -> _StorageDecl:
        if not isinstance(pid, tuple) or len(pid) != self.length:
            raise _BadFile(f"malformed persistent id {_short_repr(pid)}")
        tag, element, key, location, numel = (
            item.decode("ascii") if isinstance(item, bytes) else item for item in pid[:5]
        )
        if tag != "storage":
            raise _BadFile(f"persistent id of unknown kind {_short_repr(tag)}")
        if not isinstance(element, _ElementType):
            raise _BadFile(f"persistent id names no known storage type: {_short_repr(element)}")
        if not isinstance(key, str) or not self._KEY.fullmatch(key):
            raise _BadFile(f"malformed storage key {_short_repr(key)}")
        if not isinstance(location, str) or type(numel) is not int or numel < 0:
            raise _BadFile(f"malformed persistent id for storage {key}")
        if self.length == 6 and pid[5] is not None:
            raise _BadFile("storage views (torch < 1.0) are not supported")
        decl = self.decls.setdefault(key, _StorageDecl(key, element, numel))
        if (decl.element, decl.numel) != (element, numel):
            raise _BadFile(f"storage {key} declared twice with different types or sizes")
        return decl


class _SafeUnpickler(pickle.Unpickler):
    """An unpickler that knows only `_SAFE_GLOBALS`, and persistent ids only for torch files."""

    def __init__(self, file: IO[bytes], storages: _StorageTable | None, encoding: str) -> None:
        super().__init__(file, encoding=encoding)
        self._storages = storages

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _SAFE_GLOBALS[(module, name)]
        except (KeyError, TypeError):
            raise _BadFile(f"refusing to unpickle forbidden global '{module}.{name}'") from None

    def persistent_load(self, pid: object) -> Any:
        if self._storages is None:
            raise _BadFile("refusing a persistent id in a plain pickle")
        return self._storages.declare(pid)


class _BoundedReader:
    """File reads that never ask for more than the file holds (a read of n bytes may allocate
    n bytes before reading)."""

    def __init__(self, f: IO[bytes]) -> None:
        self.f = f
        start = f.tell()
        self.size = f.seek(0, os.SEEK_END)
        f.seek(start)

    def read(self, n: int = -1) -> bytes:
        left = self.size - self.f.tell()
        return self.f.read(left if n < 0 else min(n, left))

    def readline(self) -> bytes:
        return self.f.readline()

    def tell(self) -> int:
        return self.f.tell()


# Opcode arguments that are length-prefixed byte runs: the prescan skips their payload with a seek
# (reading and latin-1 decoding hundreds of MB of weights just to walk past them doubled the cost).
_LENGTH_PREFIX = {pickletools.TAKEN_FROM_ARGUMENT1: ("<B", 1), pickletools.TAKEN_FROM_ARGUMENT4: ("<i", 4),
                  pickletools.TAKEN_FROM_ARGUMENT4U: ("<I", 4), pickletools.TAKEN_FROM_ARGUMENT8U: ("<Q", 8)}
_OPCODES = {op.code.encode("latin1"): op for op in pickletools.opcodes}


def _prescan_pickle(f: IO[bytes]) -> None:
    """Walk the next pickle's opcodes without executing them, so that sizes the unpickler would
    allocate before reading fail first: a truncated pickle, an argument or frame longer than the
    file, a memo index far beyond the memo (the unpickler zero-fills a memo that large; picklers
    number memo entries 0, 1, 2, ...)."""
    start = f.tell()
    reader = _BoundedReader(f)
    count = 0
    while True:
        code = f.read(1)
        op = _OPCODES.get(code)
        if op is None:
            what = f"unknown opcode {code!r} at byte {f.tell() - 1}" if code else "no STOP opcode"
            raise _BadFile(f"truncated or corrupt pickle ({what})")
        arg = None
        if op.arg is not None:
            prefix = _LENGTH_PREFIX.get(op.arg.n)
            if prefix is None:
                try:
                    arg = op.arg.reader(reader)
                except ValueError as exc:
                    raise _BadFile(f"truncated or corrupt pickle ({exc})") from None
            else:
                head = f.read(prefix[1])
                if len(head) != prefix[1]:
                    raise _BadFile("truncated or corrupt pickle (cut inside a length prefix)")
                (length,) = struct.unpack(prefix[0], head)
                if length < 0 or length > reader.size - f.tell():
                    raise _BadFile(f"truncated or corrupt pickle (an argument of {length} bytes "
                                   "exceeds the file)")
                f.seek(length, os.SEEK_CUR)
        if op.name in ("PUT", "BINPUT", "LONG_BINPUT") and arg > count:  # type: ignore[operator]
            raise _BadFile(f"pickle memo index {arg} out of range")
        if op.name == "FRAME" and arg > reader.size - reader.tell():  # type: ignore[operator]
            raise _BadFile(f"pickle frame of {arg} bytes exceeds the file")
        count += 1
        if op.name == "STOP":
            break
    f.seek(start)


def _unpickle(f: IO[bytes], storages: _StorageTable | None = None, encoding: str = "utf-8") -> Any:
    with warnings.catch_warnings():  # corrupt protocol-0 strings warn about bad escapes
        warnings.simplefilter("ignore", DeprecationWarning)
        _prescan_pickle(f)
        return _SafeUnpickler(f, storages, encoding).load()


def _short_repr(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _describe(value: object) -> str:
    names = {_TensorRef: "tensor", _PendingArray: "numpy array", _StorageDecl: "storage"}
    return names.get(type(value), type(value).__name__)


# --------------------------------------------------------------------------------------------
# torch checkpoints


def _state_dict_refs(obj: object) -> dict[str, _TensorRef]:
    """The state_dict in a torch checkpoint: the object itself, or the dict it holds under
    `state_dict`, `model` or `model_state`. Names are kept as stored."""
    if not isinstance(obj, dict):
        raise _BadFile(f"the checkpoint is not a dict ({_describe(obj)})")
    if not obj or not all(isinstance(value, _TensorRef) for value in obj.values()):
        for wrapper in ("state_dict", "model", "model_state"):
            if isinstance(obj.get(wrapper), dict):
                obj = obj[wrapper]
                break
    refs: dict[str, _TensorRef] = {}
    for name, value in obj.items():
        if not isinstance(name, str):
            raise _BadFile(f"state_dict key {_short_repr(name)} is not a string")
        if not isinstance(value, _TensorRef):
            raise _BadFile(f"state_dict entry '{name}' is not a tensor ({_describe(value)})")
        refs[name] = value
    if not refs:
        raise _BadFile("the checkpoint holds no tensors")
    return refs


def _materialize(name: str, ref: _TensorRef, data: bytes, byteorder: str) -> np.ndarray:
    """Copy tensor `name` out of its storage's bytes, honouring offset and strides."""
    storage = ref.storage
    itemsize = storage.element.dtype.itemsize
    count = math.prod(ref.shape)
    extent = ref.offset
    if count:
        extent += 1 + sum((n - 1) * s for n, s in zip(ref.shape, ref.stride, strict=True))
    if extent > storage.numel:
        raise _BadFile(
            f"tensor '{name}' needs {extent} elements but its storage {storage.key} "
            f"holds {storage.numel}"
        )
    if count * itemsize > max(len(data), _MAX_BROADCAST_BYTES):
        raise _BadFile(f"tensor '{name}' of shape {ref.shape} is an absurd broadcast")
    base = np.frombuffer(data, storage.element.dtype.newbyteorder(byteorder))[ref.offset :]
    strides = tuple(s * itemsize for s in ref.stride)
    view = as_strided(base, shape=ref.shape, strides=strides, writeable=False)
    return _to_native(view, storage.element.bfloat16)


def _materialize_all(
    refs: dict[str, _TensorRef], storages: Iterable[tuple[str, bytes]], byteorder: str = "<"
) -> dict[str, np.ndarray]:
    """Materialise the tensors storage by storage, so that one storage's bytes are held at a
    time. `storages` yields (key, data) for (at least) every storage the tensors use."""
    users: dict[str, list[str]] = {}
    for name, ref in refs.items():
        users.setdefault(ref.storage.key, []).append(name)
    arrays: dict[str, np.ndarray] = {}
    for key, data in storages:
        for name in users.pop(key, ()):
            arrays[name] = _materialize(name, refs[name], data, byteorder)
    if users:
        raise _BadFile(f"storage {next(iter(users))} has no data")
    return {name: arrays[name] for name in refs}


def _open_zip(f: IO[bytes]) -> zipfile.ZipFile:
    try:
        archive = zipfile.ZipFile(f)
    except zipfile.BadZipFile as exc:
        raise _BadFile(f"bad zip archive (truncated?): {exc}") from None
    names = archive.namelist()
    if len(set(names)) != len(names):
        raise _BadFile("zip archive with duplicate member names")
    return archive


def _read_member(
    archive: zipfile.ZipFile, name: str, size: int | None = None, limit: int | None = None
) -> bytes:
    """A zip member's bytes, its declared size checked (`size` exactly, or at most `limit`)
    before anything is decompressed."""
    try:
        info = archive.getinfo(name)
    except KeyError:
        raise _BadFile(f"zip member {name} is missing") from None
    if size is not None and info.file_size != size:
        raise _BadFile(f"zip member {name} holds {info.file_size} bytes, expected {size}")
    if limit is not None and info.file_size > limit:
        raise _BadFile(f"zip member {name} declares an absurd size ({info.file_size} bytes)")
    _check_compression(info)
    with archive.open(info) as member:
        data = member.read()
    if len(data) != info.file_size:
        raise _BadFile(f"zip member {name} is truncated")
    return data


def _check_compression(info: zipfile.ZipInfo) -> None:
    """Refuse members whose declared uncompressed size the compressed data cannot produce, so
    that nothing is decompressed beyond what the file can hold (zip bombs included)."""
    if info.compress_type == zipfile.ZIP_STORED:
        plausible = info.compress_size == info.file_size
    elif info.compress_type == zipfile.ZIP_DEFLATED:
        plausible = info.file_size <= _MAX_DEFLATE_RATIO * info.compress_size + 1024
    else:
        raise _BadFile(f"zip member {info.filename} uses unsupported compression")
    if not plausible:
        raise _BadFile(f"zip member {info.filename} declares implausible sizes")


def _zip_prefix(names: Sequence[str]) -> str | None:
    """The record prefix of a torch zip checkpoint (`<prefix>/data.pkl`), or None."""
    prefixes = [n[: -len("/data.pkl")] for n in names if re.fullmatch(r"[^/]+/data\.pkl", n)]
    if len(prefixes) > 1:
        raise _BadFile("zip archive with several data.pkl records")
    return prefixes[0] if prefixes else None


def _read_pth_zip(f: IO[bytes], size: int) -> dict[str, np.ndarray]:
    with _open_zip(f) as archive:
        names = archive.namelist()
        prefix = _zip_prefix(names)
        if prefix is None:
            raise _BadFile("zip archive without a data.pkl record")
        if f"{prefix}/constants.pkl" in names:
            raise _BadFile("a TorchScript archive (torch.jit.save), not a state_dict checkpoint")
        byteorder = "<"
        if f"{prefix}/byteorder" in names:
            mark = _read_member(archive, f"{prefix}/byteorder", limit=_MAX_SMALL_RECORD)
            if mark not in (b"little", b"big"):
                raise _BadFile(f"unknown byte order {_short_repr(mark)}")
            byteorder = "<" if mark == b"little" else ">"
        pickled = _read_member(archive, f"{prefix}/data.pkl", limit=_MAX_PICKLE_BYTES)
        table = _StorageTable(legacy=False)
        refs = _state_dict_refs(_unpickle(io.BytesIO(pickled), table))
        used = {ref.storage.key: ref.storage for ref in refs.values()}
        storages = (
            (key, _read_member(archive, f"{prefix}/data/{key}", size=decl.nbytes))
            for key, decl in used.items()
        )
        return _materialize_all(refs, storages, byteorder)


def _legacy_storages(
    f: IO[bytes], size: int, keys: object, table: _StorageTable, used: set[str]
) -> Iterator[tuple[str, bytes]]:
    """The raw storages at the end of a legacy file: each an int64 element count, then the
    data. Sizes are checked against the bytes left before anything is read."""
    if not isinstance(keys, list) or not all(isinstance(key, str) for key in keys):
        raise _BadFile("the storage key list is not a list of strings")
    if len(set(keys)) != len(keys):
        raise _BadFile("the storage key list has duplicates")
    for key in keys:
        decl = table.decls.get(key)
        if decl is None:
            raise _BadFile(f"storage {_short_repr(key)} is listed but never used")
        header = f.read(8)
        if len(header) != 8:
            raise _BadFile(f"truncated file: storage {key} is missing")
        (numel,) = struct.unpack("<q", header)
        if numel != decl.numel:
            raise _BadFile(f"storage {key} holds {numel} elements, the pickle says {decl.numel}")
        left = size - f.tell()
        if decl.nbytes > left:
            raise _BadFile(f"truncated file: storage {key} needs {decl.nbytes} bytes, {left} left")
        if key in used:
            yield key, f.read(decl.nbytes)
        else:
            f.seek(decl.nbytes, os.SEEK_CUR)


def _read_pth_legacy(f: IO[bytes], size: int) -> dict[str, np.ndarray]:
    magic = _unpickle(f)
    if type(magic) is not int or magic != _TORCH_MAGIC:
        raise _BadFile("bad magic number for a legacy torch file")
    protocol = _unpickle(f)
    if protocol != _TORCH_PROTOCOL:
        raise _BadFile(f"unsupported legacy torch protocol {_short_repr(protocol)}")
    if not isinstance(_unpickle(f), dict):
        raise _BadFile("malformed legacy torch header (sys_info)")
    table = _StorageTable(legacy=True)
    refs = _state_dict_refs(_unpickle(f, table))
    keys = _unpickle(f)
    used = {ref.storage.key for ref in refs.values()}
    return _materialize_all(refs, _legacy_storages(f, size, keys, table, used))


def _is_legacy_torch(head: bytes) -> bool:
    try:
        magic = _unpickle(io.BytesIO(head), encoding="latin1")
    except Exception:
        return False
    return type(magic) is int and magic == _TORCH_MAGIC


# --------------------------------------------------------------------------------------------
# Caffe2 pickles, npz, safetensors


def _blob_array(name: str, value: object) -> np.ndarray:
    if isinstance(value, _PendingArray):
        if value.array is None:
            raise _BadFile(f"blob '{name}' is a numpy array without data")
        array = value.array
        if array.dtype.isnative and array.dtype.kind != "b" and array.flags.c_contiguous:
            # A read-only view of the pickle's own bytes: no second copy of a 500 MB file.
            return array
        return _to_native(array)
    if isinstance(value, bool | int | float):  # e.g. model_iter or lr stored as Python numbers
        return np.asarray(value)
    raise _BadFile(f"blob '{name}' is not an array ({_describe(value)})")


def _read_caffe2_pkl(f: IO[bytes], size: int) -> dict[str, np.ndarray]:
    # encoding="bytes": Python 2 strings (the arrays' raw data) arrive as bytes, not decoded to str
    # and encoded back, which would hold two more copies of the weights while unpickling.
    obj = _unpickle(f, encoding="bytes")
    if not isinstance(obj, dict):
        raise _BadFile(f"the pickle is not a dict ({_describe(obj)})")
    blobs = obj
    for key in ("blobs", b"blobs"):
        if isinstance(obj.get(key), dict):
            blobs = obj[key]
    arrays: dict[str, np.ndarray] = {}
    for key, value in blobs.items():
        name = key.decode("utf-8") if isinstance(key, bytes) else key
        if not isinstance(name, str):
            raise _BadFile(f"blob name {_short_repr(key)} is not a string")
        if name in arrays:
            raise _BadFile(f"blob '{name}' appears twice")
        arrays[name] = _blob_array(name, value)
    if not arrays:
        raise _BadFile("the pickle holds no blobs")
    return arrays


def _read_npz(f: IO[bytes], size: int) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {}
    with _open_zip(f) as archive:
        for info in archive.infolist():
            if not info.filename.endswith(".npy"):
                raise _BadFile(f"npz member {info.filename} is not an .npy file")
            _check_compression(info)
            with archive.open(info) as member:
                version = np.lib.format.read_magic(member)
                if version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(member)
                elif version == (2, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(member)
                else:
                    raise _BadFile(f"npz member {info.filename}: unsupported .npy version")
                if not _is_plain_numeric(dtype):
                    raise _BadFile(f"npz member {info.filename} has unsupported dtype {dtype}")
                expected = member.tell() + math.prod(shape) * dtype.itemsize
                if info.file_size != expected:
                    raise _BadFile(
                        f"npz member {info.filename} holds {info.file_size} bytes, "
                        f"its header needs {expected}"
                    )
                member.seek(0)
                array = np.lib.format.read_array(member, allow_pickle=False)
            arrays[info.filename[: -len(".npy")]] = _to_native(array)
    if not arrays:
        raise _BadFile("the npz file holds no arrays")
    return arrays


def _read_safetensors(f: IO[bytes], size: int) -> dict[str, np.ndarray]:
    (header_len,) = struct.unpack("<Q", f.read(8))
    if header_len > size - 8 or header_len > _MAX_SAFETENSORS_HEADER:
        raise _BadFile(f"safetensors header length {header_len} exceeds the file ({size} bytes)")
    try:
        header = json.loads(f.read(header_len).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _BadFile(f"safetensors header is not valid JSON ({exc})") from None
    if not isinstance(header, dict) or not isinstance(header.pop("__metadata__", {}), dict):
        raise _BadFile("safetensors header is not a JSON object")
    start, buffer_len = 8 + header_len, size - 8 - header_len
    entries: list[tuple[str, _ElementType, tuple[int, ...], int, int]] = []
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise _BadFile(f"safetensors entry '{name}' is malformed")
        element = _SAFETENSORS_DTYPES.get(info["dtype"]) if isinstance(info["dtype"], str) else None
        if element is None:
            raise _BadFile(f"safetensors entry '{name}' has unsupported dtype {info['dtype']!r}")
        shape = _int_tuple(info["shape"], f"safetensors entry '{name}' shape")
        begin, end = _offsets(name, info["data_offsets"])
        if not begin <= end <= buffer_len:
            raise _BadFile(f"safetensors entry '{name}' lies outside the data buffer")
        if end - begin != math.prod(shape) * element.dtype.itemsize:
            raise _BadFile(f"safetensors entry '{name}' has {end - begin} bytes for {shape}")
        entries.append((name, element, shape, begin, end))
    position = 0
    for _, _, _, begin, end in sorted(entries, key=lambda entry: (entry[3], entry[4])):
        if begin != position:
            raise _BadFile("safetensors data buffer has holes or overlapping tensors")
        position = end
    if position != buffer_len:
        raise _BadFile(f"safetensors data buffer holds {buffer_len} bytes, tensors use {position}")
    arrays: dict[str, np.ndarray] = {}
    for name, element, shape, begin, end in entries:
        f.seek(start + begin)
        data = np.frombuffer(f.read(end - begin), element.dtype).reshape(shape)
        arrays[name] = _to_native(data, element.bfloat16)
    if not arrays:
        raise _BadFile("the safetensors file holds no tensors")
    return arrays


def _offsets(name: str, value: object) -> tuple[int, int]:
    offsets = _int_tuple(value, f"safetensors entry '{name}' data_offsets")
    if len(offsets) != 2:
        raise _BadFile(f"safetensors entry '{name}' data_offsets is not [begin, end]")
    return offsets[0], offsets[1]


# --------------------------------------------------------------------------------------------
# format detection and the public readers

_READERS: dict[str, Callable[[IO[bytes], int], dict[str, np.ndarray]]] = {
    "pth-zip": _read_pth_zip,
    "pth-legacy": _read_pth_legacy,
    "caffe2-pkl": _read_caffe2_pkl,
    "npz": _read_npz,
    "safetensors": _read_safetensors,
}


def _detect(f: IO[bytes]) -> str:
    head = f.read(512)
    f.seek(0)
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        with _open_zip(f) as archive:
            names = archive.namelist()
        f.seek(0)
        if _zip_prefix(names) is not None:
            return "pth-zip"
        if all(name.endswith(".npy") for name in names):
            return "npz"
        raise _BadFile("a zip archive that is neither a torch checkpoint nor an npz file")
    if len(head) > 8 and head[4:8] == bytes(4) and head[8:9] == b"{":
        return "safetensors"  # little-endian u64 header length, then a JSON object
    if head[257:262] == b"ustar":
        raise _BadFile("a tar archive (the oldest torch format) is not supported")
    protocol_2_to_5 = head[:1] == pickle.PROTO and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")
    if protocol_2_to_5 or head[:1] in (b"(", b"}", b"]", b"L", b"I"):  # or protocols 0 and 1
        return "pth-legacy" if _is_legacy_torch(head) else "caffe2-pkl"
    raise _BadFile(f"unknown format (starts with {_short_repr(head[:8])})")


@contextmanager
def _reading(path: StrPath) -> Iterator[tuple[IO[bytes], int, list[str]]]:
    """Open `path` for reading; turn every failure into a one-line CheckpointError that starts
    with the path. Yields the file, its size and a list to name the detected format in."""
    name = os.fsdecode(path)
    context: list[str] = []
    try:
        mode = os.stat(name).st_mode
        if stat.S_ISDIR(mode):
            raise _BadFile("is a directory, not a file")
        if not stat.S_ISREG(mode):
            raise _BadFile("is not a regular file")
        with open(name, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise _BadFile("empty file (0 bytes)")
            yield f, size, context
    except CheckpointError:
        raise
    except Exception as exc:
        what = f"{context[-1]} file" if context else "file"
        raise CheckpointError(f"{name}: {one_line(_explain(exc, what))}") from exc


def _explain(exc: Exception, what: str) -> str:
    if isinstance(exc, _BadFile):
        return str(exc)
    if isinstance(exc, FileNotFoundError):
        return "no such file"
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, MemoryError):
        return f"corrupt {what}: its declared sizes do not fit in memory"
    return f"corrupt {what} ({type(exc).__name__}: {exc})"


def detect_format(path: StrPath) -> str:
    """The format of a weights file, from its content: one of `FORMATS`."""
    with _reading(path) as (f, _, _):
        return _detect(f)


def read_weights(path: StrPath) -> dict[str, np.ndarray]:
    """Name -> array from a torch `.pth` (zip or legacy; the state_dict, also when wrapped under
    `state_dict`, `model` or `model_state`), a Caffe2 `.pkl` (`{'blobs': {...}}` or flat), an
    `.npz` or a `.safetensors` file. Arrays are C-contiguous and native-endian: owned copies, except
    that a Caffe2 pickle's arrays are read-only views of the pickle's own bytes (no second copy of
    the weights); bfloat16 becomes float32 (exactly); Caffe2 scalars (numpy or Python numbers) become 0-d
    arrays. Raises CheckpointError for any problem."""
    with _reading(path) as (f, size, context):
        fmt = _detect(f)
        context.append(fmt)
        return _READERS[fmt](f, size)


# --------------------------------------------------------------------------------------------
# writers (no torch needed; torch.load accepts the .pth files)

_STORAGE_NAMES = {element.dtype: name for name, element in _TORCH_STORAGES.items()}
del _STORAGE_NAMES[np.dtype("<u2")]  # bfloat16 has no numpy dtype to write from


@dataclass(frozen=True)
class _TensorSpec:
    """A tensor entry of a state_dict pickle written by `_state_dict_pickle`."""

    name: str
    storage_type: str
    key: str
    numel: int
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _pickle_int(value: int) -> bytes:
    if -(1 << 31) <= value < 1 << 31:
        return pickle.BININT + struct.pack("<i", value)
    data = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    return pickle.LONG1 + bytes([len(data)]) + data


def _pickle_str(value: str) -> bytes:
    data = value.encode("utf-8")
    return pickle.BINUNICODE + struct.pack("<I", len(data)) + data


def _pickle_tuple(values: Sequence[int]) -> bytes:
    if not values:
        return pickle.EMPTY_TUPLE
    return pickle.MARK + b"".join(_pickle_int(v) for v in values) + pickle.TUPLE


def _pickle_global(module: str, name: str) -> bytes:
    return pickle.GLOBAL + f"{module}\n{name}\n".encode("ascii")


def _state_dict_pickle(tensors: Sequence[_TensorSpec], legacy: bool) -> bytes:
    """The protocol-2 pickle torch.save writes for an OrderedDict of tensors, emitted opcode by
    opcode (pickling the real globals would need torch). Legacy persistent ids carry a sixth
    entry, the (absent) view metadata."""
    ordered_dict = _pickle_global("collections", "OrderedDict") + pickle.EMPTY_TUPLE + pickle.REDUCE
    parts = [pickle.PROTO + b"\x02", ordered_dict, pickle.MARK]
    for t in tensors:
        pid = [
            _pickle_str("storage"),
            _pickle_global("torch", t.storage_type),
            _pickle_str(t.key),
            _pickle_str("cpu"),
            _pickle_int(t.numel),
        ]
        if legacy:
            pid.append(pickle.NONE)
        parts += [
            _pickle_str(t.name),
            _pickle_global("torch._utils", "_rebuild_tensor_v2"),
            pickle.MARK,
            pickle.MARK,
            *pid,
            pickle.TUPLE,
            pickle.BINPERSID,
            _pickle_int(t.offset),
            _pickle_tuple(t.shape),
            _pickle_tuple(t.stride),
            pickle.NEWFALSE,
            ordered_dict,
            pickle.TUPLE,
            pickle.REDUCE,
        ]
    parts += [pickle.SETITEMS, pickle.STOP]
    return b"".join(parts)


def _checked_arrays(
    arrays: Mapping[str, Any], allowed: Callable[[np.dtype], bool]
) -> list[tuple[str, np.ndarray]]:
    """(name, little-endian C-contiguous array) pairs; names must be strings."""
    checked = []
    for name, value in arrays.items():
        if not isinstance(name, str):
            raise _BadFile(f"name {_short_repr(name)} is not a string")
        array = np.asarray(value)
        if not _is_plain_numeric(array.dtype) or not allowed(array.dtype.newbyteorder("<")):
            raise _BadFile(f"'{name}' has unsupported dtype {array.dtype}")
        checked.append((name, np.asarray(array, dtype=array.dtype.newbyteorder("<"), order="C")))
    return checked


def _raw(array: np.ndarray) -> memoryview:
    return memoryview(array.reshape(-1).view(np.uint8))


def _torch_specs(arrays: list[tuple[str, np.ndarray]]) -> list[_TensorSpec]:
    specs = []
    for key, (name, array) in enumerate(arrays):
        stride = tuple(s // array.itemsize for s in array.strides)
        specs.append(
            _TensorSpec(
                name, _STORAGE_NAMES[array.dtype], str(key), array.size, 0, array.shape, stride
            )
        )
    return specs


@contextmanager
def _writing(path: StrPath) -> Iterator[IO[bytes]]:
    """`vmz_jax.files.atomic_file` whose failures become CheckpointErrors that start with the path;
    on failure `path` is left untouched."""
    name = os.fsdecode(path)
    try:
        with atomic_file(name, "wb") as f:
            yield f
    except _BadFile as exc:
        raise CheckpointError(f"{name}: {one_line(str(exc))}") from exc
    except OSError as exc:
        raise CheckpointError(f"{name}: cannot write ({exc.strerror or exc})") from exc


def _write_zip_record(archive: zipfile.ZipFile, f: IO[bytes], name: str, data: Any) -> None:
    """Store `data` uncompressed, its bytes aligned to 64 like torch.save does (padding in an
    extra field), so that torch.load(mmap=True) can map them."""
    nbytes = memoryview(data).nbytes
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    info.file_size = nbytes
    zip64 = nbytes >= 1 << 30  # forced above 1 GiB, so that the header size is known here
    header = 30 + len(name.encode("utf-8")) + 4 + (20 if zip64 else 0)
    padding = -(f.tell() + header) % _ZIP_ALIGNMENT
    info.extra = b"FB" + struct.pack("<H", padding) + b"Z" * padding
    with archive.open(info, "w", force_zip64=zip64) as record:
        record.write(data)


def write_pth_zip(path: StrPath, state_dict: Mapping[str, np.ndarray]) -> None:
    """Write a state_dict as torch.save (zip, torch >= 1.6) would; torch.load(weights_only=True)
    reads it. Supported dtypes: bool, int8/16/32/64, uint8, float16/32/64."""
    with _writing(path) as f:
        arrays = _checked_arrays(state_dict, lambda dtype: dtype in _STORAGE_NAMES)
        specs = _torch_specs(arrays)
        records = [
            ("data.pkl", _state_dict_pickle(specs, legacy=False)),
            (".format_version", b"1"),
            (".storage_alignment", str(_ZIP_ALIGNMENT).encode()),
            ("byteorder", b"little"),
            *(
                (f"data/{spec.key}", _raw(array))
                for spec, (_, array) in zip(specs, arrays, strict=True)
            ),
            ("version", b"3\n"),
        ]
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as archive:
            for name, data in records:
                _write_zip_record(archive, f, f"{_ZIP_PREFIX}/{name}", data)


def write_pth_legacy(path: StrPath, state_dict: Mapping[str, np.ndarray]) -> None:
    """Write a state_dict in the legacy (pre-1.6, non-zip) torch.save format."""
    with _writing(path) as f:
        arrays = _checked_arrays(state_dict, lambda dtype: dtype in _STORAGE_NAMES)
        specs = _torch_specs(arrays)
        sys_info = {
            "protocol_version": _TORCH_PROTOCOL,
            "little_endian": True,
            "type_sizes": {"short": 2, "int": 4, "long": 8},
        }
        for header in (_TORCH_MAGIC, _TORCH_PROTOCOL, sys_info):
            pickle.dump(header, f, protocol=2)
        f.write(_state_dict_pickle(specs, legacy=True))
        pickle.dump([spec.key for spec in specs], f, protocol=2)
        for spec, (_, array) in zip(specs, arrays, strict=True):
            f.write(struct.pack("<q", spec.numel))
            f.write(_raw(array))


def write_caffe2_pkl(path: StrPath, blobs: Mapping[str, np.ndarray], flat: bool = False) -> None:
    """Write a Caffe2-style protocol-2 pickle of `{'blobs': {name: ndarray}}` (or flat)."""
    with _writing(path) as f:
        arrays = dict(_checked_arrays(blobs, lambda dtype: True))
        pickle.dump(arrays if flat else {"blobs": arrays}, f, protocol=2)


def write_npz(path: StrPath, arrays: Mapping[str, np.ndarray]) -> None:
    """Write an uncompressed `.npz` (the name is used as given: no `.npz` is appended)."""
    with _writing(path) as f:
        np.savez(f, **dict(_checked_arrays(arrays, lambda dtype: True)))
