"""porting.convert: every format ported from the torch reference's random weights, bit-identical across
formats, logits equal to the reference's, export back to .pth/.npz/.pkl and re-port bit-identical,
clear errors for files that do not fit."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from flax import nnx

import vmz_jax
from porting import readers
from porting.caffe2_names import params_to_caffe2
from porting.convert import EXPORT_FORMATS, SourceInfo, detect_naming, export_params, read_params
from porting.torch_names import params_to_torch, torch_to_params
from tests.parity import relative_error, torch_state_dict
from vmz_jax.errors import CheckpointError, VMZError
from vmz_jax.models import VIDEO_ARCHS as ARCHS
from vmz_jax.models.variables import expected_shapes
from vmz_jax.reference import vmz_torch

NUM_CLASSES = 5
# one architecture per family; the sweep over every architecture is marked slow
FAST_ARCHS = ["r2plus1d_10", "r3d_10", "ir_csn_26", "ip_csn_26", "mc3_18", "rmc3_18", "r2d_18", "r2df_18",
              "c3d"]
FORMATS = {"zip.pth": "pth-zip", "legacy.pth": "pth-legacy", "caffe2.pkl": "caffe2-pkl", "torch.npz": "npz"}

_forward = nnx.jit(lambda model, x: model(x))


# ---- helpers shared with the other test modules ---------------------------------------------------


def random_params(arch: str, num_classes: int = NUM_CLASSES, seed: int = 0, clip_length: int | None = None
                  ) -> dict[tuple[str, ...], np.ndarray]:
    """Random float32 weights for `arch` in our layout (no torch needed)."""
    rng = np.random.default_rng(seed)
    return {path: rng.standard_normal(shape, dtype=np.float32)
            for path, shape in expected_shapes(arch, num_classes, clip_length).items()}


def write_safetensors(path: Path, arrays: dict[str, np.ndarray]) -> None:
    header, offset, blobs = {}, 0, []
    for name, array in arrays.items():
        data = np.ascontiguousarray(array, "<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def same_params(a: dict, b: dict) -> bool:
    """Bit-identical: same paths, dtypes, shapes and bytes."""
    return a.keys() == b.keys() and all(
        np.asarray(a[k]).dtype == np.asarray(b[k]).dtype and np.array_equal(a[k], b[k]) for k in a)


def clip_input(arch: str, clip_length: int = 8, seed: int = 1) -> np.ndarray:
    shape = (1, 16, 112, 112, 3) if arch == "c3d" else (1, clip_length, 32, 32, 3)
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def torch_logits(ref: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return ref(torch.from_numpy(x.transpose(0, 4, 1, 2, 3))).numpy()


# ---- the reference's weights in every format ------------------------------------------------------


def reference_files(arch: str, directory: Path, clip_length: int = 8, formats=tuple(FORMATS)):
    """A randomized torch reference, its weights in our layout (through the strict map, independent of
    porting.convert) and the same weights written in `formats`."""
    ref = vmz_torch.build(arch, num_classes=NUM_CLASSES, clip_length=clip_length)
    vmz_torch.randomize_(ref, 0)
    ref.eval()
    state_dict = torch_state_dict(ref)
    want = torch_to_params(state_dict, expected_shapes(arch, NUM_CLASSES, clip_length), source=arch)
    writers = {
        "zip.pth": lambda p: readers.write_pth_zip(p, state_dict),
        "legacy.pth": lambda p: readers.write_pth_legacy(p, state_dict),
        "torch.npz": lambda p: readers.write_npz(p, state_dict),
        "caffe2.pkl": lambda p: readers.write_caffe2_pkl(p, params_to_caffe2(want, arch)),
    }
    files = {}
    for name in formats:
        files[name] = directory / f"{arch}.{name}"
        writers[name](files[name])
    return ref, want, files


def check_arch(arch: str, directory: Path, formats=tuple(FORMATS), full: bool = True) -> None:
    """Each format ports bit-identically to the strict map of the reference's state_dict, and loads to
    the reference's logits; exported back, each re-ports bit-identically and torch takes the .pth.
    Not `full`: every format is ported, but only the first is also loaded through `vmz_jax.load` (the
    others are bit-identical to it) and only .pth is exported back (`test_export_round_trips` covers
    the other formats on a small net)."""
    ref, want, files = reference_files(arch, directory, formats=formats)
    x = clip_input(arch)
    expected = torch_logits(ref, x)
    for i, (name, path) in enumerate(files.items()):
        params, info = read_params(path, arch)
        assert info == SourceInfo(str(path), FORMATS[name], "caffe2" if name.endswith("pkl") else "torch",
                                  NUM_CLASSES, 8 if arch == "r2d_18" else None, info.sha256)
        assert same_params(params, want), name  # .pkl, .npz and both .pth: bit-identical ports
        del params
        if full or i == 0:
            model = vmz_jax.load(arch, checkpoint=path)
            got = np.asarray(_forward(model, x))
            assert relative_error(got, expected) < 1e-5, name
            del model

    for fmt in EXPORT_FORMATS if full else ("pth",):
        back = directory / f"{arch}.back.{fmt}"
        export_params(want, arch, back, fmt)
        again, info = read_params(back, arch)
        assert info.naming == ("caffe2" if fmt == "pkl" else "torch")
        assert same_params(again, want), fmt
        del again

    # torch takes the exported .pth as is (strict) and gives the reference's logits
    restored = vmz_torch.build(arch, num_classes=NUM_CLASSES)
    restored.load_state_dict(torch.load(directory / f"{arch}.back.pth", weights_only=True), strict=True)
    restored.eval()
    assert np.array_equal(torch_logits(restored, x), expected)


@pytest.mark.parametrize("arch", FAST_ARCHS)
def test_every_format_ports_bit_identically_and_matches_torch(arch, tmp_path):
    # C3D's fc6/fc7 make it 250 MB a file: the fast suite covers its two real formats
    check_arch(arch, tmp_path, ("zip.pth", "caffe2.pkl") if arch == "c3d" else tuple(FORMATS), full=False)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture_every_format(arch, tmp_path):
    check_arch(arch, tmp_path)


@pytest.mark.parametrize("fmt", ["zip.pth", "caffe2.pkl"])
def test_r2d_clip_length_is_read_from_the_stem(fmt, tmp_path):
    ref, want, files = reference_files("r2d_18", tmp_path, clip_length=16, formats=(fmt,))
    params, info = read_params(files[fmt], "r2d_18")
    assert info.clip_length == 16 and same_params(params, want)
    model = vmz_jax.load("r2d_18", checkpoint=files[fmt])
    x = clip_input("r2d_18", clip_length=16)
    assert relative_error(np.asarray(_forward(model, x)), torch_logits(ref, x)) < 1e-5


def test_export_round_trips(tmp_path):
    params = random_params("ir_csn_26")
    for fmt in EXPORT_FORMATS:
        export_params(params, "ir_csn_26", tmp_path / f"w.{fmt}", fmt)
        again, _ = read_params(tmp_path / f"w.{fmt}", "ir_csn_26")
        assert same_params(again, params), fmt
        export_params(again, "ir_csn_26", tmp_path / f"again.{fmt}", fmt)
        assert (tmp_path / f"again.{fmt}").read_bytes() == (tmp_path / f"w.{fmt}").read_bytes(), fmt


# ---- format, naming and class count come from the content ---------------------------------------


def test_format_is_detected_from_content_not_suffix(tmp_path):
    params = random_params("ir_csn_26")
    export_params(params, "ir_csn_26", tmp_path / "really_a_pth.pkl", "pth")
    export_params(params, "ir_csn_26", tmp_path / "really_a_pkl.pth", "pkl")
    export_params(params, "ir_csn_26", tmp_path / "no_suffix", "npz")
    cases = [("really_a_pth.pkl", "pth-zip"), ("really_a_pkl.pth", "caffe2-pkl"), ("no_suffix", "npz")]
    for name, fmt in cases:
        got, info = read_params(tmp_path / name, "ir_csn_26")
        assert info.format == fmt and same_params(got, params)


def test_npz_and_safetensors_with_either_naming(tmp_path):
    params = random_params("ir_csn_26")
    torch_names, caffe2_names = params_to_torch(params), params_to_caffe2(params, "ir_csn_26")
    readers.write_npz(tmp_path / "c2.npz", caffe2_names)
    write_safetensors(tmp_path / "t.safetensors", torch_names)
    write_safetensors(tmp_path / "c2.safetensors", caffe2_names)
    for name, fmt, naming in [("c2.npz", "npz", "caffe2"), ("t.safetensors", "safetensors", "torch"),
                              ("c2.safetensors", "safetensors", "caffe2")]:
        got, info = read_params(tmp_path / name, "ir_csn_26")
        assert (info.format, info.naming) == (fmt, naming)
        assert same_params(got, params)


def test_training_state_is_skipped(tmp_path):
    params = random_params("ir_csn_26")
    blobs = params_to_caffe2(params, "ir_csn_26")
    blobs.update(model_iter=np.array(1000, np.int64), lr=np.array(0.1, np.float32),
                 comp_0_conv_1_w_momentum=np.zeros_like(blobs["comp_0_conv_1_w"]))
    readers.write_caffe2_pkl(tmp_path / "snapshot.pkl", blobs)
    state_dict = params_to_torch(params)
    state_dict["stem.1.num_batches_tracked"] = np.array(7, np.int64)
    readers.write_pth_zip(tmp_path / "snapshot.pth", state_dict)
    for name in ("snapshot.pkl", "snapshot.pth"):
        assert same_params(read_params(tmp_path / name, "ir_csn_26")[0], params)


def test_sha256_is_of_the_file(tmp_path):
    import hashlib

    export_params(random_params("ir_csn_26"), "ir_csn_26", tmp_path / "w.pth", "pth")
    _, info = read_params(tmp_path / "w.pth", "ir_csn_26")
    assert info.sha256 == hashlib.sha256((tmp_path / "w.pth").read_bytes()).hexdigest()


def test_detect_naming():
    assert detect_naming(["stem.0.weight", "layer1.0.conv1.0.weight", "fc.weight"]) == "torch"
    assert detect_naming(["conv1_w", "comp_0_conv_1_w", "last_out_L400_w", "model_iter"]) == "caffe2"
    assert detect_naming(["conv1a.0.weight", "fc6.weight", "fc.bias"]) == "torch"
    with pytest.raises(CheckpointError, match="neither"):
        detect_naming(["a/b", "c d"], "f.npz")


# ---- errors -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["pth", "pkl"])
def test_class_count_contradicting_num_classes(fmt, tmp_path):
    export_params(random_params("ir_csn_26"), "ir_csn_26", tmp_path / f"w.{fmt}", fmt)
    with pytest.raises(CheckpointError) as err:
        read_params(tmp_path / f"w.{fmt}", "ir_csn_26", num_classes=400)
    message = str(err.value)
    assert message.startswith(str(tmp_path / f"w.{fmt}")) and "5 classes" in message
    assert "num_classes=400" in message and "\n" not in message
    assert read_params(tmp_path / f"w.{fmt}", "ir_csn_26", num_classes=5)[1].num_classes == 5


@pytest.mark.parametrize("fmt", ["pth", "pkl"])
def test_weights_of_another_architecture_are_named(fmt, tmp_path):
    path = tmp_path / f"ip.{fmt}"
    export_params(random_params("ip_csn_26"), "ip_csn_26", path, fmt)
    with pytest.raises(CheckpointError) as err:
        read_params(path, "ir_csn_26")
    message = str(err.value)
    assert message.startswith(str(path)) and "do not fit ir_csn_26" in message
    assert "these are ip_csn_26 weights" in message
    assert "unexpected" in message and len(message) < 1000 and "\n" not in message
    with pytest.raises(CheckpointError, match="do not fit r3d_10"):
        vmz_jax.load("r3d_10", checkpoint=path)


def test_non_float32_and_non_finite_values_are_refused(tmp_path):
    state_dict = params_to_torch(random_params("ir_csn_26"))
    half = dict(state_dict, **{"fc.bias": state_dict["fc.bias"].astype(np.float16)})
    readers.write_pth_zip(tmp_path / "half.pth", half)
    with pytest.raises(CheckpointError, match=r"'fc.bias' has dtype float16, expected float32"):
        read_params(tmp_path / "half.pth", "ir_csn_26")
    nan = dict(state_dict)
    nan["layer2.1.conv1.0.weight"] = nan["layer2.1.conv1.0.weight"].copy()
    nan["layer2.1.conv1.0.weight"][0, 0, 0, 0, 0] = np.nan
    readers.write_pth_zip(tmp_path / "nan.pth", nan)
    with pytest.raises(CheckpointError, match=r"non-finite values in layer2\.rest\.conv1\.kernel"):
        read_params(tmp_path / "nan.pth", "ir_csn_26")


def test_unreadable_files(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        read_params(tmp_path / "missing.pth", "ir_csn_26")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="junk.pth: unknown format"):
        read_params(tmp_path / "junk.pth", "ir_csn_26")
    readers.write_npz(tmp_path / "other.npz", {"weights": np.zeros(3, np.float32)})
    with pytest.raises(CheckpointError, match="other.npz"):
        read_params(tmp_path / "other.npz", "ir_csn_26")
    with pytest.raises(VMZError, match="unknown architecture"):
        read_params(tmp_path / "other.npz", "resnet50")


def test_export_is_atomic_and_checked(tmp_path):
    params = random_params("ir_csn_26")
    with pytest.raises(CheckpointError, match="do not fit ir_csn_50"):
        export_params(params, "ir_csn_50", tmp_path / "w.pth", "pth")
    with pytest.raises(CheckpointError, match="cannot write"):
        export_params(params, "ir_csn_26", tmp_path / "no" / "such" / "dir.pth", "pth")
    with pytest.raises(ValueError, match="unknown export format"):
        export_params(params, "ir_csn_26", tmp_path / "w.h5", "h5")
    assert os.listdir(tmp_path) == []
    (tmp_path / "w.npz").write_bytes(b"old")
    broken = dict(params)
    broken[("fc", "bias")] = np.zeros(3, np.float32)
    with pytest.raises(CheckpointError):
        export_params(broken, "ir_csn_26", tmp_path / "w.npz", "npz")
    assert (tmp_path / "w.npz").read_bytes() == b"old" and os.listdir(tmp_path) == ["w.npz"]
