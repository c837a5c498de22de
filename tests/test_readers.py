"""porting.readers: round trips against real torch, the writers, safety, corrupt files, fuzzing."""

from __future__ import annotations

import builtins
import io
import json
import os
import pickle
import re
import signal
import struct
import subprocess
import sys
import tracemalloc
import zipfile
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from porting import readers
from porting.readers import (
    FORMATS,
    detect_format,
    read_weights,
    write_caffe2_pkl,
    write_npz,
    write_pth_legacy,
    write_pth_zip,
)
from vmz_jax.errors import CheckpointError

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# helpers


def _expected(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach()
    return (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()


def _assert_identical(got: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    """Same names in the same order; same dtype, shape and bytes; C-contiguous native arrays that are
    writeable, or read-only views of the file's own bytes (Caffe2 pickles, to avoid a second copy)."""
    assert list(got) == list(expected)
    for name, want in expected.items():
        array = got[name]
        assert isinstance(array, np.ndarray), name
        assert (array.dtype, array.shape) == (want.dtype, want.shape), name
        assert array.tobytes() == want.tobytes(), name
        assert array.flags.c_contiguous and array.dtype.isnative, name
        root = array
        while isinstance(root.base, np.ndarray):
            root = root.base
        assert array.flags.writeable or isinstance(root.base, bytes), name


def _torch_state_dict() -> OrderedDict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, generator=gen)
    flat = torch.arange(20, dtype=torch.float64)
    bits = np.random.default_rng(0).integers(0, 2**32, 24, dtype=np.uint32)  # NaN payloads too
    return OrderedDict(
        weight=base,
        weight_t=base.t(),  # a non-contiguous view of the same storage
        window=base[1:3, 2:5],  # storage offset and strides
        same=base,  # the same tensor twice
        first=flat[:10],  # two views of one float64 storage
        second=flat[10:].view(2, 5),
        bits=torch.from_numpy(bits.view(np.float32).copy()).view(2, 3, 4),
        index=torch.arange(-3, 3, dtype=torch.int64),
        num_batches_tracked=torch.tensor(7, dtype=torch.int64),
    )


def _all_dtypes_state_dict() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return {
        "half": torch.randn(3, 2, generator=gen).half(),
        "bf16": torch.randn(5, generator=gen).bfloat16(),
        "int32": torch.arange(-2, 4, dtype=torch.int32),
        "uint8": torch.arange(250, 256, dtype=torch.uint8),
        "int8": torch.arange(-3, 3, dtype=torch.int8),
        "int16": torch.arange(-3, 3, dtype=torch.int16),
        "bool": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 3),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "expanded": torch.arange(3.0).expand(4, 3),  # stride 0
        "param": torch.nn.Parameter(torch.ones(2, 2)),
    }


def _safetensors_bytes(tensors: dict[str, tuple[str, tuple[int, ...], bytes]]) -> bytes:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    chunks, offset = [], 0
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {
            "dtype": dtype,
            "shape": list(shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        chunks.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(chunks)


def _py2_string(data: bytes) -> bytes:
    """SHORT_BINSTRING / BINSTRING: a Python 2 `str`."""
    if len(data) < 256:
        return b"U" + bytes([len(data)]) + data
    return b"T" + struct.pack("<i", len(data)) + data


def _py2_caffe2_pickle(arrays: dict[str, np.ndarray]) -> bytes:
    """A `{'blobs': {...}}` pickle as Python 2 with numpy 1.x wrote it: names and raw array data
    are `str` (STRING opcodes), numpy lives in `numpy.core`."""
    parts = [b"\x80\x02}q\x00", _py2_string(b"blobs"), b"}q\x01("]
    for name, array in arrays.items():
        shape = b"(" + b"".join(b"J" + struct.pack("<i", n) for n in array.shape) + b"t"
        parts += [
            _py2_string(name.encode()),
            b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85",
            _py2_string(b"b"),
            b"\x87R(K\x01",
            shape,
            b"cnumpy\ndtype\n",
            _py2_string(array.dtype.str[1:].encode()),
            b"K\x00K\x01\x87R(K\x03",
            _py2_string(array.dtype.str[:1].encode()),
            b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89",
            _py2_string(array.tobytes()),
            b"tb",
        ]
    return b"".join(parts) + b"us."


def _handmade_pth_zip(
    path: Path, tensors: list[readers._TensorSpec], data: dict[str, bytes], byteorder="little"
):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", readers._state_dict_pickle(tensors, legacy=False))
        archive.writestr("archive/byteorder", byteorder)
        for key, raw in data.items():
            archive.writestr(f"archive/data/{key}", raw)
        archive.writestr("archive/version", "3\n")


def _float_spec(numel: int, shape: tuple[int, ...], stride: tuple[int, ...]) -> readers._TensorSpec:
    return readers._TensorSpec("w", "FloatStorage", "0", numel, 0, shape, stride)


def _error(path: Path) -> str:
    """read_weights' error message; asserts it is one line starting with the path."""
    with pytest.raises(CheckpointError) as info:
        read_weights(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    return message


# --------------------------------------------------------------------------------------------
# reading what torch, pickle, numpy write


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("wrapper", [None, "state_dict", "model", "model_state"])
def test_torch_round_trip(tmp_path, legacy, wrapper):
    sd = _torch_state_dict()
    obj: object = sd
    if wrapper is not None:
        optimizer = {
            "state": {0: {"momentum_buffer": torch.ones(2)}},
            "param_groups": [{"lr": 0.1}],
        }
        obj = {wrapper: sd, "epoch": 3, "arch": "r2plus1d_34", "optimizer": optimizer}
    path = tmp_path / "model.pth"
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    assert detect_format(path) == ("pth-legacy" if legacy else "pth-zip")
    _assert_identical(read_weights(path), {k: _expected(v) for k, v in sd.items()})


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_torch_dtypes_and_parameters(tmp_path, legacy):
    sd = _all_dtypes_state_dict()
    path = tmp_path / "model.pth"
    torch.save(sd, path, _use_new_zipfile_serialization=not legacy)
    _assert_identical(read_weights(path), {k: _expected(v) for k, v in sd.items()})


def test_torch_module_state_dict_keeps_names(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(3, 4, 3, bias=False), torch.nn.BatchNorm3d(4))
    net(torch.randn(2, 3, 4, 5, 5))  # running stats and num_batches_tracked move
    wrapped = {f"module.{k}": v for k, v in net.state_dict().items()}
    path = tmp_path / "net.pth"
    torch.save({"state_dict": wrapped}, path)
    got = read_weights(path)
    _assert_identical(got, {k: _expected(v) for k, v in wrapped.items()})
    assert got["module.1.num_batches_tracked"].dtype == np.int64


@pytest.mark.parametrize("flat", [False, True], ids=["nested", "flat"])
@pytest.mark.parametrize("protocol", [2, 0, 1, 4, 5])
def test_caffe2_pickle(tmp_path, flat, protocol):
    rng = np.random.default_rng(2)
    blobs = {
        "conv1_w": rng.standard_normal((4, 3, 3, 7, 7)).astype(np.float32),
        b"conv1_spatbn_relu_s": rng.standard_normal(4).astype(np.float32),  # a bytes name
        "last_out_L400_b": np.asfortranarray(rng.standard_normal((3, 2)).astype(">f4")),
        "model_iter": np.int64(150000),  # a numpy scalar
        "lr": np.array([0.001], dtype=np.float32),
        "empty": np.zeros((0, 2), np.float32),
    }
    path = tmp_path / "model.pkl"
    path.write_bytes(pickle.dumps(blobs if flat else {"blobs": blobs}, protocol=protocol))
    assert detect_format(path) == "caffe2-pkl"
    expected = {
        (k.decode() if isinstance(k, bytes) else k): np.array(
            v, dtype=np.asarray(v).dtype.newbyteorder("=")
        )
        for k, v in blobs.items()
    }
    _assert_identical(read_weights(path), expected)


def test_caffe2_python2_pickle(tmp_path):
    arrays = {
        "comp_0_conv_1_w": np.arange(24, dtype=np.float32).reshape(2, 3, 1, 2, 2) * 1.5e9,
        "comp_0_spatbn_1_riv": np.frombuffer(bytes(range(128, 144)), np.float32).copy(),
        "big": np.random.default_rng(3).standard_normal(100).astype(np.float32),  # BINSTRING
    }
    data = _py2_caffe2_pickle(arrays)
    trusted = pickle.loads(data, encoding="latin1")  # our own bytes: check the fixture itself
    assert all(np.array_equal(trusted["blobs"][k], v) for k, v in arrays.items())
    path = tmp_path / "py2.pkl"
    path.write_bytes(data)
    _assert_identical(read_weights(path), arrays)


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_npz(tmp_path, save):
    arrays = {
        "w": np.random.default_rng(4).standard_normal((3, 4)).astype(np.float32),
        "fortran": np.asfortranarray(np.arange(6.0).reshape(2, 3)),
        "big_endian": np.arange(5, dtype=">i8"),
        "mask": np.array([True, False]),
    }
    path = tmp_path / "weights.npz"
    save(path, **arrays)
    assert detect_format(path) == "npz"
    expected = {
        k: np.array(v, dtype=v.dtype.newbyteorder("="), order="C") for k, v in arrays.items()
    }
    _assert_identical(read_weights(path), expected)


def test_safetensors(tmp_path):
    rng = np.random.default_rng(5)
    bf16 = torch.randn(7, generator=torch.Generator().manual_seed(5)).bfloat16()
    arrays = {
        "f32": rng.standard_normal((2, 3)).astype(np.float32),
        "f64": rng.standard_normal(4),
        "f16": rng.standard_normal(3).astype(np.float16),
        "i64": np.arange(-2, 3, dtype=np.int64),
        "i32": np.arange(4, dtype=np.int32).reshape(2, 2),
        "u8": np.arange(250, 256, dtype=np.uint8),
        "bool": np.array([[True, False], [False, True]]),
        "empty": np.zeros((0, 4), np.float32),
    }
    codes = {"f32": "F32", "f64": "F64", "f16": "F16", "i64": "I64", "i32": "I32", "u8": "U8"}
    codes["bool"], codes["empty"] = "BOOL", "F32"
    tensors = {k: (codes[k], v.shape, v.tobytes()) for k, v in arrays.items()}
    tensors["bf16"] = ("BF16", (7,), bf16.view(torch.int16).numpy().tobytes())
    path = tmp_path / "model.safetensors"
    path.write_bytes(_safetensors_bytes(tensors))
    assert detect_format(path) == "safetensors"
    _assert_identical(read_weights(path), {**arrays, "bf16": bf16.float().numpy()})


def test_format_comes_from_content_not_suffix(tmp_path):
    w = torch.arange(6.0).view(2, 3)
    npz = io.BytesIO()
    np.savez(npz, w=w.numpy())
    lies = {  # name -> (format, writer)
        "zip.pkl": ("pth-zip", lambda p: torch.save({"w": w}, p)),
        "legacy.safetensors": (
            "pth-legacy",
            lambda p: torch.save({"w": w}, p, _use_new_zipfile_serialization=False),
        ),
        "blobs.pth": ("caffe2-pkl", lambda p: p.write_bytes(pickle.dumps({"w": w.numpy()}, 2))),
        "arrays.pth": ("npz", lambda p: p.write_bytes(npz.getvalue())),
        "tensors.npz": (
            "safetensors",
            lambda p: p.write_bytes(
                _safetensors_bytes({"w": ("F32", (2, 3), w.numpy().tobytes())})
            ),
        ),
    }
    for name, (fmt, write) in lies.items():
        path = tmp_path / name
        write(path)
        assert detect_format(path) == fmt
        _assert_identical(read_weights(path), {"w": w.numpy()})


# --------------------------------------------------------------------------------------------
# writers


def _writer_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(6)
    return {
        "conv.weight": rng.standard_normal((4, 3, 3, 1, 1)).astype(np.float32),
        "fortran": np.asfortranarray(rng.standard_normal((3, 5))),
        "strided": np.arange(30, dtype=np.float32).reshape(5, 6)[::2, 1::2],
        "big_endian": np.arange(6, dtype=">i4").reshape(2, 3),
        "half": rng.standard_normal(5).astype(np.float16),
        "bn.num_batches_tracked": np.array(12, dtype=np.int64),
        "uint8": np.arange(250, 256, dtype=np.uint8),
        "int8": np.arange(-3, 3, dtype=np.int8),
        "int16": np.arange(-3, 3, dtype=np.int16),
        "mask": np.array([True, False, True]),
        "empty": np.zeros((0, 3), np.float32),
    }


def _native(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: np.array(v, dtype=v.dtype.newbyteorder("="), order="C") for k, v in arrays.items()}


def _data_offsets(path: Path) -> list[int]:
    """Where each storage record's bytes start in a zip written by write_pth_zip."""
    offsets = []
    with zipfile.ZipFile(path) as archive, open(path, "rb") as f:
        for info in archive.infolist():
            if "/data/" in info.filename:
                f.seek(info.header_offset)
                header = struct.unpack("<4s5H3I2H", f.read(30))
                offsets.append(info.header_offset + 30 + header[-2] + header[-1])
    return offsets


def test_write_pth_zip(tmp_path):
    arrays = _writer_arrays()
    path = tmp_path / "out.pth"
    write_pth_zip(path, arrays)
    for kwargs in ({}, {"mmap": True}):
        loaded = torch.load(path, weights_only=True, **kwargs)
        _assert_identical({k: v.numpy() for k, v in loaded.items()}, _native(arrays))
    _assert_identical(read_weights(path), _native(arrays))
    assert all(offset % 64 == 0 for offset in _data_offsets(path))


def test_write_pth_legacy(tmp_path):
    arrays = _writer_arrays()
    path = tmp_path / "out.pth"
    write_pth_legacy(path, arrays)
    assert detect_format(path) == "pth-legacy"
    for weights_only in (False, True):
        loaded = torch.load(path, weights_only=weights_only)
        _assert_identical({k: v.numpy() for k, v in loaded.items()}, _native(arrays))
    _assert_identical(read_weights(path), _native(arrays))


@pytest.mark.parametrize("flat", [False, True], ids=["nested", "flat"])
def test_write_caffe2_pkl(tmp_path, flat):
    arrays = {**_writer_arrays(), "u32": np.arange(3, dtype=np.uint32)}
    path = tmp_path / "out.pkl"
    write_caffe2_pkl(path, arrays, flat=flat)
    assert path.read_bytes()[:2] == b"\x80\x02"  # protocol 2
    trusted = pickle.loads(path.read_bytes(), encoding="latin1")  # our own file
    _assert_identical(trusted if flat else trusted["blobs"], _native(arrays))
    _assert_identical(read_weights(path), _native(arrays))


def test_write_npz(tmp_path):
    arrays = _writer_arrays()
    path = tmp_path / "out.weights"  # no .npz appended
    write_npz(path, arrays)
    assert os.listdir(tmp_path) == ["out.weights"]
    with np.load(path, allow_pickle=False) as loaded:
        _assert_identical(dict(loaded), _native(arrays))
    _assert_identical(read_weights(path), _native(arrays))


@pytest.mark.parametrize("writer", [write_pth_zip, write_pth_legacy, write_caffe2_pkl, write_npz])
def test_writers_are_atomic(tmp_path, writer):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"old")
    with pytest.raises(CheckpointError, match=rf"^{path}: 'z' has unsupported dtype complex128$"):
        writer(path, {"a": np.ones(2, np.float32), "z": np.ones(2, complex)})
    with pytest.raises(CheckpointError, match="unsupported dtype object"):
        writer(path, {"o": np.array([None, 1], dtype=object)})
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["weights.bin"]
    writer(path, {"a": np.ones(2, np.float32)})
    assert os.listdir(tmp_path) == ["weights.bin"]
    _assert_identical(read_weights(path), {"a": np.ones(2, np.float32)})


@pytest.mark.parametrize("writer", [write_pth_zip, write_pth_legacy])
def test_pth_writers_refuse_dtypes_torch_lacks(tmp_path, writer):
    with pytest.raises(CheckpointError, match="unsupported dtype uint32"):
        writer(tmp_path / "x.pth", {"u": np.ones(2, np.uint32)})
    with pytest.raises(CheckpointError, match="not a string"):
        writer(tmp_path / "x.pth", {1: np.ones(2, np.float32)})


# --------------------------------------------------------------------------------------------
# safety: pickles that would run code


class _System:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _Exec:
    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self):
        return (builtins.exec, (self.code,))


def _payloads(marker: Path) -> dict[str, tuple[object, str]]:
    return {
        "os.system": (_System(f"touch {marker}"), rf"'{os.system.__module__}\.system'"),
        # protocol-2 pickles name builtins the Python 2 way
        "builtins.exec": (
            _Exec(f"open({str(marker)!r}, 'w').close()"),
            r"'(__)?builtin(s|__)\.exec'",
        ),
    }


@pytest.mark.parametrize("payload", ["os.system", "builtins.exec"])
@pytest.mark.parametrize("container", ["caffe2-pkl", "pth-zip", "pth-legacy"])
def test_code_execution_is_refused(tmp_path, container, payload):
    marker = tmp_path / f"pwned_{os.urandom(4).hex()}"
    evil, global_name = _payloads(marker)[payload]
    path = tmp_path / "evil.pth"
    obj = (
        {"w": torch.ones(2), "evil": evil} if container != "caffe2-pkl" else {"blobs": {"w": evil}}
    )
    if container == "caffe2-pkl":
        path.write_bytes(pickle.dumps(obj, protocol=2))
    else:
        torch.save(obj, path, _use_new_zipfile_serialization=container == "pth-zip")
    assert detect_format(path) == container
    message = _error(path)
    assert re.search(f"refusing to unpickle forbidden global {global_name}$", message)
    assert not marker.exists()


def test_the_exec_payload_is_live(tmp_path):
    """The payload above does run under a plain unpickler: the refusal is what stops it."""
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps(_payloads(marker)["builtins.exec"][0], protocol=2))
    assert marker.exists()


def test_forbidden_globals_are_named(tmp_path):
    path = tmp_path / "x.pkl"
    path.write_bytes(b"\x80\x02}(X\x01\x00\x00\x00wcos\nsystem\nX\x04\x00\x00\x00true\x85Ru.")
    assert _error(path) == f"{path}: refusing to unpickle forbidden global 'os.system'"
    path.write_bytes(pickle.dumps({"w": torch.ones(2)}, protocol=2))  # storage via torch.load
    assert "forbidden global 'torch.storage._load_from_bytes'" in _error(path)


def test_pickle_tricks_are_refused(tmp_path):
    path = tmp_path / "x.pkl"
    path.write_bytes(b"\x80\x02}(X\x01\x00\x00\x00wX\x03\x00\x00\x00pidQu.")
    assert "refusing a persistent id in a plain pickle" in _error(path)
    path.write_bytes(b"\x80\x02}(X\x01\x00\x00\x00wcnumpy\ndtype\n}bu.")  # BUILD on a global
    assert "refusing to modify global 'numpy.dtype'" in _error(path)
    path.write_bytes(b"\x80\x02}(X\x01\x00\x00\x00wctorch\nFloatStorage\n}bu.")
    assert "refusing to set the state of a ElementType" in _error(path)
    path.write_bytes(b"\x80\x02}(X\x01\x00\x00\x00wcnumpy\ndtype\nX\x01\x00\x00\x00O\x85Ru.")
    assert "refusing numpy dtype 'O'" in _error(path)


def test_readers_source_is_torch_free_and_uses_no_pickle_load():
    source = (REPO / "porting" / "readers.py").read_text()
    assert "import torch" not in source
    assert "pickle.load(" not in source and "pickle.loads(" not in source
    code = "import sys, porting.readers; assert not [m for m in sys.modules if m[:5] == 'torch']"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


# --------------------------------------------------------------------------------------------
# corrupt, truncated and unknown files


def _seed_files() -> dict[str, bytes]:
    """A small valid file of each format."""
    base = torch.arange(12, dtype=torch.float32).view(3, 4)
    sd = {"w": base, "w_t": base.t(), "tail": base[1:, 2:], "n": torch.tensor(3)}
    seeds = {}
    for fmt, zip_format in (("pth-zip", True), ("pth-legacy", False)):
        buffer = io.BytesIO()
        torch.save(sd, buffer, _use_new_zipfile_serialization=zip_format)
        seeds[fmt] = buffer.getvalue()
    blobs = {"conv1_w": np.arange(6, dtype=np.float32).reshape(2, 3), "model_iter": np.int64(5)}
    seeds["caffe2-pkl"] = pickle.dumps({"blobs": blobs}, protocol=2)
    buffer = io.BytesIO()
    np.savez(buffer, w=np.arange(6, dtype=np.float32).reshape(2, 3), b=np.arange(3.0))
    seeds["npz"] = buffer.getvalue()
    seeds["safetensors"] = _safetensors_bytes(
        {
            "w": ("F32", (2, 3), np.arange(6, dtype=np.float32).tobytes()),
            "h": ("BF16", (2,), np.array([0x3F80, 0xC000], np.uint16).tobytes()),
        }
    )
    return seeds


@pytest.fixture(scope="module")
def seeds() -> dict[str, bytes]:
    return _seed_files()


def test_seeds_are_valid(tmp_path, seeds):
    assert sorted(seeds) == sorted(FORMATS)
    for fmt, data in seeds.items():
        path = tmp_path / fmt
        path.write_bytes(data)
        assert detect_format(path) == fmt
        assert read_weights(path)


@pytest.mark.parametrize("fmt", FORMATS)
def test_truncated_files(tmp_path, seeds, fmt):
    data = seeds[fmt]
    path = tmp_path / "cut.bin"
    for cut in sorted(
        {1, 4, 8, 9, 16, 40, len(data) // 3, len(data) // 2, len(data) - 8, len(data) - 1}
    ):
        path.write_bytes(data[:cut])
        _error(path)


def test_missing_empty_directory_garbage(tmp_path):
    assert _error(tmp_path / "nope.pth") == f"{tmp_path / 'nope.pth'}: no such file"
    empty = tmp_path / "empty.pth"
    empty.touch()
    assert _error(empty) == f"{empty}: empty file (0 bytes)"
    assert _error(tmp_path).endswith("is a directory, not a file")
    garbage = tmp_path / "garbage.pth"
    rng = np.random.default_rng(7)
    for prefix in (b"", b"PK\x03\x04", b"\x80\x02", b"(dp0\n"):
        garbage.write_bytes(prefix + rng.integers(0, 256, 2000, dtype=np.uint8).tobytes())
        _error(garbage)
    garbage.write_bytes(b"hello world, this is not a checkpoint")
    assert "unknown format" in _error(garbage)
    with pytest.raises(CheckpointError, match="no such file"):
        detect_format(tmp_path / "nope.pth")


def test_unexpected_contents(tmp_path):
    path = tmp_path / "x.pth"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("notes.txt", "hi")
    assert "neither a torch checkpoint nor an npz file" in _error(path)
    with zipfile.ZipFile(path, "w") as archive:
        for name in ("archive/data.pkl", "archive/constants.pkl", "archive/code/__torch__.py"):
            archive.writestr(name, "")
    assert "TorchScript" in _error(path)
    path.write_bytes(pickle.dumps([np.ones(2)], protocol=2))
    assert "the pickle is not a dict (list)" in _error(path)
    path.write_bytes(pickle.dumps({"blobs": {"w": np.ones(2), "name": "conv1"}}, protocol=2))
    assert "blob 'name' is not an array (str)" in _error(path)
    torch.save({"a": torch.ones(1), "b": 3}, path)
    assert "state_dict entry 'b' is not a tensor (int)" in _error(path)
    torch.save([torch.ones(1)], path)
    assert "the checkpoint is not a dict (list)" in _error(path)
    with open(path, "wb") as f:
        np.savez(f, o=np.array([None, 1], dtype=object))
    assert "unsupported dtype object" in _error(path)


def test_storage_shorter_than_tensor(tmp_path):
    path = tmp_path / "x.pth"
    _handmade_pth_zip(path, [_float_spec(6, (2, 4), (4, 1))], {"0": bytes(24)})
    assert "tensor 'w' needs 8 elements but its storage 0 holds 6" in _error(path)
    _handmade_pth_zip(path, [_float_spec(6, (2, 3), (3, 1))], {"0": bytes(20)})
    assert "zip member archive/data/0 holds 20 bytes, expected 24" in _error(path)
    _handmade_pth_zip(path, [_float_spec(6, (2, 3), (3, 1))], {})
    assert "zip member archive/data/0 is missing" in _error(path)
    _handmade_pth_zip(path, [_float_spec(1, (1 << 40,), (0,))], {"0": bytes(4)})
    assert "absurd broadcast" in _error(path)
    _handmade_pth_zip(path, [_float_spec(6, (2, 3), (3, 1))], {"0": bytes(24)})
    assert read_weights(path)["w"].shape == (2, 3)


def test_big_endian_zip(tmp_path):
    path = tmp_path / "x.pth"
    values = np.arange(6, dtype=">f4").reshape(2, 3)
    bf16 = readers._TensorSpec("h", "BFloat16Storage", "1", 2, 0, (2,), (1,))
    raw = {"0": values.tobytes(), "1": np.array([0x3F80, 0xC000], ">u2").tobytes()}
    _handmade_pth_zip(path, [_float_spec(6, (3, 2), (1, 3)), bf16], raw, byteorder="big")
    expected = {"w": values.T.astype(np.float32), "h": np.array([1.0, -2.0], np.float32)}
    _assert_identical(read_weights(path), expected)
    _handmade_pth_zip(path, [_float_spec(6, (2, 3), (3, 1))], raw, byteorder="middle")
    assert "unknown byte order b'middle'" in _error(path)


@contextmanager
def _allocates_at_most(limit: int):
    tracemalloc.start()
    try:
        yield
        assert tracemalloc.get_traced_memory()[1] < limit
    finally:
        tracemalloc.stop()


def test_absurd_sizes_fail_before_allocating(tmp_path):
    path = tmp_path / "x.pth"
    numel = 1 << 33  # 32 GiB of float32
    spec = _float_spec(numel, (numel,), (1,))
    sys_info = {"protocol_version": 1001, "little_endian": True, "type_sizes": {}}
    header = b"".join(pickle.dumps(x, protocol=2) for x in (readers._TORCH_MAGIC, 1001, sys_info))
    body = readers._state_dict_pickle([spec], legacy=True) + pickle.dumps(["0"], protocol=2)
    path.write_bytes(header + body + struct.pack("<q", numel) + bytes(64))
    with _allocates_at_most(1 << 20):
        assert "truncated file: storage 0 needs 34359738368 bytes, 64 left" in _error(path)
    path.write_bytes(struct.pack("<Q", 1 << 31) + b'{"w": ' + bytes(100))
    with _allocates_at_most(1 << 20):
        assert "safetensors header length 2147483648 exceeds the file" in _error(path)
    path.write_bytes(b"\x80\x02B\xff\xff\xff\x7f" + bytes(10))  # BINBYTES of 2 GiB
    with _allocates_at_most(1 << 20):
        assert "truncated or corrupt pickle" in _error(path)
    path.write_bytes(b"\x80\x04\x95\x00\x00\x00\x00\x01\x00\x00\x00}." + bytes(10))  # FRAME
    with _allocates_at_most(1 << 20):
        assert "pickle frame of 4294967296 bytes exceeds the file" in _error(path)
    path.write_bytes(b"\x80\x02}r\x00\x00\x00\x04.")  # LONG_BINPUT: a memo of 2**27 entries
    with _allocates_at_most(1 << 20):
        assert "pickle memo index 67108864 out of range" in _error(path)


def test_safetensors_buffer_must_be_covered(tmp_path):
    path = tmp_path / "x.safetensors"
    good = _safetensors_bytes({"a": ("F32", (2,), bytes(8)), "b": ("F32", (1,), bytes(4))})
    path.write_bytes(good + bytes(4))
    assert "data buffer holds 16 bytes, tensors use 12" in _error(path)
    header = json.dumps({"a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(12))
    assert "holes or overlapping tensors" in _error(path)
    header = json.dumps({"a": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(8))
    assert "unsupported dtype 'C64'" in _error(path)


# --------------------------------------------------------------------------------------------
# fuzzing: mutated valid files may be read or refused, but only ever with a CheckpointError

_MUTATIONS = st.lists(
    st.tuples(
        st.sampled_from(["flip", "overwrite", "insert", "delete", "truncate"]),
        st.integers(0, 1 << 16),
        st.binary(min_size=1, max_size=8),
    ),
    min_size=1,
    max_size=4,
)


def _mutate(data: bytes, mutations: list[tuple[str, int, bytes]]) -> bytes:
    buffer = bytearray(data)
    for op, position, chunk in mutations:
        position %= len(buffer) + 1
        if op == "flip" and position < len(buffer):
            buffer[position] ^= chunk[0] or 0x80
        elif op == "overwrite":
            buffer[position : position + len(chunk)] = chunk
        elif op == "insert":
            buffer[position:position] = chunk
        elif op == "delete":
            del buffer[position : position + len(chunk)]
        elif op == "truncate":
            del buffer[position:]
    return bytes(buffer)


class _Hang(BaseException):  # not an Exception: the readers must not turn it into an error
    pass


@contextmanager
def _time_limit(seconds: float):
    def expire(signum, frame):
        raise _Hang(f"no answer after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _fuzz(seed: bytes, path: Path, examples: int) -> int:
    """Read `examples` mutations of `seed`; returns how many ran."""
    count = 0

    @settings(
        max_examples=examples,
        deadline=None,  # the per-example limit is _time_limit's
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(mutations=_MUTATIONS)
    def run(mutations):
        nonlocal count
        count += 1
        path.write_bytes(_mutate(seed, mutations))
        with _time_limit(5.0):
            try:
                arrays = read_weights(path)
            except CheckpointError as exc:
                assert str(exc).startswith(f"{path}: ") and "\n" not in str(exc)
            else:
                assert arrays and all(isinstance(a, np.ndarray) for a in arrays.values())

    run()
    return count


@pytest.mark.parametrize("fmt", FORMATS)
def test_fuzz(tmp_path, seeds, fmt):
    assert _fuzz(seeds[fmt], tmp_path / "fuzz.bin", examples=60) >= 60


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
def test_fuzz_long(tmp_path, seeds, fmt):
    assert _fuzz(seeds[fmt], tmp_path / "fuzz.bin", examples=2000) >= 2000
