"""`vmz-jax compare` / `vmz_jax.compare`: right weights agree with the PyTorch reference at every stage,
a perturbed layer3 weight is caught at layer3, the Caffe2 .pkl and the .pth of one set of weights give
identical outputs, bad inputs exit 2 with one line.

Weights come from the reference's `randomize_` (random non-symmetric kernels, BatchNorm statistics
with means ~ N(0, 0.1) and variances in [0.5, 1.5]) mapped by the strict torch-name table. All fast
tests share one architecture and input shape, so JAX compiles the float32 forward once.
"""

from __future__ import annotations

import importlib
import json
import sys

import numpy as np
import pytest

import vmz_jax
from porting.convert import export_params
from porting.torch_names import torch_to_params
from tests.parity import torch_state_dict
from vmz_jax.cli import main
from vmz_jax.models.variables import expected_shapes
from vmz_jax.reference import vmz_torch
from vmz_jax.weights import checkpoint as ckpt

ARCH = "r2plus1d_10"
CLASSES = 7
SHAPE = "1,4,16,16"
STAGES = ["stem", "layer1", "layer2", "layer3", "layer4", "features", "logits"]
LAYER3_KERNEL = ("layer3", "first", "conv2", "temporal", "kernel")

compare_module = importlib.import_module("vmz_jax.compare")  # `vmz_jax.compare` is the function


def reference_params(arch: str = ARCH, num_classes: int = CLASSES, seed: int = 0, clip_length: int = 8):
    ref = vmz_torch.randomize_(vmz_torch.build(arch, num_classes=num_classes, clip_length=clip_length), seed)
    return torch_to_params(torch_state_dict(ref), expected_shapes(arch, num_classes), source=arch)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The same random weights as .pth, Caffe2 .pkl and an Orbax directory, plus a .pth with one
    layer3 weight tensor scaled by 1.01."""
    directory = tmp_path_factory.mktemp("compare")
    params = reference_params()
    out = {fmt: directory / f"w.{fmt}" for fmt in ("pth", "pkl")}
    for fmt, path in out.items():
        export_params(params, ARCH, path, fmt)
    out["orbax"] = directory / "orbax"
    ckpt.save(out["orbax"], params, {"arch": ARCH, "num_classes": CLASSES})
    # the whole tensor: on a 1x4x16x16 clip, layer3 sees 1x2x2 activations, many channels of which
    # are zero after the ReLU, so a single changed entry may well not show
    perturbed = {**params, LAYER3_KERNEL: params[LAYER3_KERNEL] * np.float32(1.01)}
    out["perturbed"] = directory / "perturbed.pth"
    export_params(perturbed, ARCH, out["perturbed"], "pth")
    return out


def run(capsys, *argv):
    code = main(["compare", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_right_weights_agree_with_torch_at_every_stage(files, capsys, tmp_path):
    report = tmp_path / "compare.json"
    code, out, err = run(capsys, files["pth"], "--arch", ARCH, "--shape", SHAPE, "--json", report)
    assert code == 0, err
    assert err == "" and "every stage within 1e-05" in out
    data = json.loads(report.read_text())
    assert data["ok"] and data["first_failure"] is None and data["against"] == "torch"
    assert [row["stage"] for row in data["rows"]] == STAGES
    assert all(row["max_rel"] < 1e-5 and row["within"] for row in data["rows"])
    # float32 rounding differs between the two implementations: a nonzero difference shows that
    # two separate computations were compared, not one result with itself
    assert max(row["max_abs"] for row in data["rows"]) > 0
    assert data["rows"][0]["shape"] == [1, 4, 8, 8, 64] and data["rows"][-1]["shape"] == [1, CLASSES]
    for stage in STAGES:
        assert any(line.startswith(stage + " ") for line in out.splitlines()), out


def test_float64_from_an_orbax_checkpoint_within_1e_10(files):
    result = vmz_jax.compare(files["orbax"], ARCH, shape=(1, 4, 16, 16), dtype="float64")
    assert result.ok and result.tol == 1e-10 and result.dtype == "float64"
    assert [row.stage for row in result.rows] == STAGES
    assert max(row.max_rel for row in result.rows) < 1e-10


def test_a_perturbed_layer3_weight_fails_first_at_layer3(files, capsys, tmp_path):
    report = tmp_path / "compare.json"
    code, out, err = run(capsys, files["perturbed"], "--arch", ARCH, "--against", files["pth"],
                         "--shape", SHAPE, "--json", report)
    assert code == 1
    assert err.count("\n") == 1 and "layer3 is the first stage over the tolerance" in err
    assert "first stage over 1e-05: layer3" in out
    rows = {row["stage"]: row for row in json.loads(report.read_text())["rows"]}
    assert all(rows[s]["max_abs"] == 0.0 for s in ("stem", "layer1", "layer2"))
    assert all(not rows[s]["within"] for s in ("layer3", "layer4", "features", "logits"))


def test_a_torch_side_that_differs_in_layer3_is_caught(files, monkeypatch):
    """The torch side really is computed from the weights: perturb what it receives."""
    import porting.torch_names as torch_names

    original = torch_names.params_to_torch

    def perturbed(params, arch=None):
        state = original(params, arch)
        state["layer3.0.conv2.0.3.weight"] = state["layer3.0.conv2.0.3.weight"] * 1.01
        return state

    monkeypatch.setattr(torch_names, "params_to_torch", perturbed)
    result = vmz_jax.compare(files["pth"], ARCH, shape=(1, 4, 16, 16))
    assert result.first_failure == "layer3" and not result.ok
    assert all(row.within for row in result.rows[:3])


def test_caffe2_pkl_and_pth_of_the_same_weights_are_identical(files, capsys):
    code, out, err = run(capsys, files["pkl"], "--arch", ARCH, "--against", files["pth"], "--shape", SHAPE)
    assert code == 0, err
    result = vmz_jax.compare(files["pkl"], ARCH, files["pth"], shape=(1, 4, 16, 16), tol=0.0)
    assert result.ok and all(row.max_abs == 0.0 for row in result.rows)


def test_a_saved_model_and_its_pth_export_are_identical(files, tmp_path, capsys):
    """A fine-tuned model goes back to PyTorch users: vmz_jax.save (which records a clip length and
    labels) -> `vmz-jax export` -> the same numbers, although the .pth records no clip length."""
    model = vmz_jax.load(ARCH, checkpoint=files["orbax"])
    vmz_jax.save(model, tmp_path / "saved", labels=[f"class {i}" for i in range(CLASSES)])
    assert main(["export", str(tmp_path / "saved"), str(tmp_path / "saved.pth"), "--arch", ARCH]) == 0
    result = vmz_jax.compare(tmp_path / "saved", ARCH, tmp_path / "saved.pth", shape=(1, 4, 16, 16), tol=0.0)
    assert result.ok and all(row.max_abs == 0.0 for row in result.rows)


def test_a_npy_clip_is_the_input(files, tmp_path):
    clip = np.random.default_rng(3).standard_normal((1, 4, 16, 16, 3)).astype(np.float32)
    np.save(tmp_path / "clip.npy", clip)
    result = vmz_jax.compare(files["pth"], ARCH, input=tmp_path / "clip.npy")
    assert result.ok and result.input_shape == (1, 4, 16, 16, 3) and result.input.endswith("clip.npy")
    x, _ = compare_module.load_input(ARCH, tmp_path / "clip.npy")
    assert np.array_equal(x, clip)


def test_relative_difference_definition():
    row = compare_module._diff("s", np.array([1.0, -2.0, 3.5]), np.array([1.0, -4.0, 3.0]), 0.1)
    assert row.max_abs == 2.0 and row.max_rel == 0.5 and not row.within
    zero = compare_module._diff("s", np.zeros(3), np.zeros(3), 0.0)
    assert zero.max_rel == 0.0 and zero.within
    nan = compare_module._diff("s", np.array([np.nan]), np.array([1.0]), 1.0)
    assert not nan.within


@pytest.mark.parametrize("argv, message", [
    (["{bad}", "--arch", ARCH], "{bad}"),
    (["{missing}", "--arch", ARCH], "{missing}"),
    (["{pth}", "--arch", ARCH, "--against", "{bad}"], "{bad}"),
    (["{pth}", "--arch", "r3d_10"], "{pth}"),  # weights of another architecture
    (["{pth}", "--arch", "resnet50"], "unknown architecture"),
    (["{pth}", "--arch", ARCH, "--input", "{bad_npy}"], "expected a clip array"),
    (["{pth}", "--arch", ARCH, "--input", "{bad_npy}", "--shape", SHAPE], "--shape"),
    (["{pth}", "--arch", ARCH, "--json", "{missing}/report.json"], "no such directory"),
])
def test_bad_input_exits_2_with_one_line(files, capsys, tmp_path, argv, message):
    names = {"bad": tmp_path / "bad.pth", "missing": tmp_path / "missing.pth", "pth": files["pth"],
             "bad_npy": tmp_path / "bad.npy"}
    names["bad"].write_text("not weights\n")
    np.save(names["bad_npy"], np.zeros((4, 16, 16, 3), np.float32))
    argv = [a.format(**names) for a in argv]
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("vmz-jax compare: error: ")
    assert message.format(**names) in err and "Traceback" not in err


def test_argument_errors_exit_2(capsys):
    for argv in (["w.pth", "--arch", ARCH, "--dtype", "float16"], ["w.pth", "--arch", ARCH, "--tol", "-1"],
                 ["w.pth", "--arch", ARCH, "--shape", "1,2,3"]):
        with pytest.raises(SystemExit) as exc:
            main(["compare", *argv])
        assert exc.value.code == 2
    capsys.readouterr()


def test_without_torch_one_line_with_the_install_command(files, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    monkeypatch.delitem(sys.modules, "vmz_jax.reference.vmz_torch")
    monkeypatch.delattr(importlib.import_module("vmz_jax.reference"), "vmz_torch")
    code, out, err = run(capsys, files["pth"], "--arch", ARCH, "--shape", SHAPE)
    assert code == 2 and err.count("\n") == 1
    assert "pip install 'vmz-jax[torch]'" in err
    # and the bench, which treats the reference as optional, goes on without it
    from vmz_jax import bench

    assert bench.torch_reference() is None


@pytest.mark.slow
def test_video_input_float64(files, capsys):
    from importlib import resources

    sample = resources.files("vmz_jax") / "data" / "sample.mp4"
    code, out, err = run(capsys, files["pth"], "--arch", ARCH, "--input", sample, "--dtype", "float64")
    assert code == 0, err
    assert "first 32-frame clip of" in out and "1x32x128x170x3" in out


@pytest.mark.slow
def test_c3d_pool_stages(tmp_path):
    params = reference_params("c3d", num_classes=5)
    export_params(params, "c3d", tmp_path / "c3d.pkl", "pkl")
    result = vmz_jax.compare(tmp_path / "c3d.pkl", "c3d")
    assert result.ok and result.input_shape == (1, 16, 112, 112, 3)
    assert [row.stage for row in result.rows] == ["pool1", "pool2", "pool3", "pool4", "pool5",
                                                 "features", "logits"]


def test_a_change_under_the_tolerance_is_located_against_a_second_file(files, tmp_path):
    """One changed kernel entry may stay under 1e-5 at its own stage (the relative difference is
    against the stage's largest value); against a second file, `first_difference` still names it."""
    params = reference_params()
    nudged = tmp_path / "nudged.pth"
    export_params({**params, LAYER3_KERNEL: params[LAYER3_KERNEL] * np.float32(1.001)}, ARCH, nudged, "pth")
    result = vmz_jax.compare(nudged, ARCH, files["pth"], shape=(1, 4, 16, 16), tol=1.0)  # all "within"
    assert result.ok and result.first_difference == "layer3"
    assert "first stage that differs at all: layer3" in compare_module.format_table(result)
    same = vmz_jax.compare(files["pkl"], ARCH, files["pth"], shape=(1, 4, 16, 16))
    assert same.first_difference is None and "every stage identical" in compare_module.format_table(same)
