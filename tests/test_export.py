"""`vmz_jax.export` / `vmz-jax export`: StableHLO and ONNX artifacts that run without vmz_jax, the
CUDA lowering's convolution forms, bfloat16, other outputs, weights as arguments, safetensors, and
one-line errors. Weights are the PyTorch reference's randomized ones (non-symmetric, non-trivial BN
statistics); inputs are tiny with odd spatial sizes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import vmz_jax
from porting.convert import read_params
from tests.parity import make_pair, relative_error
from vmz_jax.cli import main
from vmz_jax.errors import VMZError
from vmz_jax.models import build
from vmz_jax.models import conv as C
from vmz_jax.models.forward import make_forward
from vmz_jax.models.variables import get_variables

CLASSES = 7
# One architecture per family (the smallest); clip length, and the (T, H, W) the artifact is made for.
FAMILIES = {
    "r2plus1d_10": (4, (4, 17, 19)),
    "r3d_10": (4, (4, 17, 19)),
    "r2d_18": (4, (4, 17, 19)),
    "mc2_18": (4, (4, 17, 19)),
    "rmc2_18": (4, (4, 17, 19)),
    "ir_csn_26": (4, (4, 17, 19)),
    "ip_csn_26": (4, (4, 17, 19)),
    "c3d": (16, (16, 113, 97)),
}
FAST = ("ir_csn_26", "ip_csn_26")
TOL = 1e-5

# Runs in a fresh interpreter: jax / onnxruntime only, never vmz_jax.
RUNNER = textwrap.dedent("""
    import json, sys
    import numpy as np
    import jax
    inputs = np.load(sys.argv[1])
    results = {}
    for path in sys.argv[3:]:
        meta = json.load(open(path + ".json"))
        for key in inputs.files:
            x = inputs[key]
            if path.endswith(".onnx"):
                import onnxruntime
                session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
                y = session.run(None, {"clips": x})[0]
            else:
                exported = jax.export.deserialize(bytearray(open(path, "rb").read()))
                y = np.asarray(exported.call(x))
            results[f"{os.path.basename(path)}:{key}"] = y
    assert "vmz_jax" not in sys.modules and "flax" not in sys.modules, sorted(sys.modules)
    np.savez(sys.argv[2], **results)
""").replace("import json, sys", "import json, os, sys")


def run_without_vmz_jax(
    tmp_path, inputs: dict[str, np.ndarray], artifacts: list[str]
) -> dict[str, np.ndarray]:
    np.savez(tmp_path / "inputs.npz", **inputs)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER, str(tmp_path / "inputs.npz"), str(tmp_path / "out.npz"), *artifacts],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(tmp_path / "out.npz") as z:
        return {k: z[k] for k in z.files}


def pair(arch: str):
    clip, _ = FAMILIES[arch]
    return make_pair(arch, seed=3, num_classes=CLASSES, clip_length=clip)[1]


def check_family(arch: str, tmp_path) -> None:
    model = pair(arch)
    t, h, w = FAMILIES[arch][1]
    rng = np.random.default_rng(0)
    inputs = {f"n{n}": rng.standard_normal((n, t, h, w, 3)).astype(np.float32) for n in (1, 3)}
    artifacts = []
    for fmt in ("stablehlo", "onnx"):
        result = vmz_jax.export(model, tmp_path / f"{arch}.{fmt}", frames=t, size=(h, w))
        assert result.metadata["input_shape"] == ["batch", t, h, w, 3]
        artifacts.append(str(result.path))
    got = run_without_vmz_jax(tmp_path, inputs, artifacts)
    fwd = make_forward(model, "logits")
    for key, x in inputs.items():
        want = np.asarray(fwd(jnp.asarray(x)))
        assert want.shape == (x.shape[0], CLASSES) and np.abs(want).max() > 1e-3
        for fmt in ("stablehlo", "onnx"):
            err = relative_error(got[f"{arch}.{fmt}:{key}"], want)
            assert err < TOL, (arch, fmt, key, err)


@pytest.mark.parametrize("arch", FAST)
def test_artifacts_match_jax_without_vmz_jax(arch, tmp_path):
    check_family(arch, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("arch", [a for a in FAMILIES if a not in FAST])
def test_artifacts_match_jax_every_family(arch, tmp_path):
    check_family(arch, tmp_path)


def _lowering(model, platforms, tmp_path, name):
    """The StableHLO text of `model`'s artifact lowered for `platforms` (weights as arguments: the
    module holds the computation only)."""
    out = tmp_path / f"{name}.stablehlo"
    vmz_jax.export(model, out, frames=8, size=32, platforms=platforms, embed_weights=False)
    return jax.export.deserialize(bytearray(out.read_bytes())).mlir_module()


def _forms(text: str) -> tuple[set[int], int, int]:
    groups = {int(g) for g in re.findall(r"feature_group_count = (\d+)", text)}
    return (groups, len(re.findall(r"stablehlo\.multiply", text)),
            len(re.findall(r"stablehlo\.convolution", text)))


def check_cuda_lowering(arch: str, tmp_path) -> None:
    """Each platform's lowering carries its own row of AUTO_IMPL: CUDA the lax convolutions cuDNN runs
    (the 1x1x1 ones included) and the depthwise layers as multiply-adds (jax-ml/jax#13800); CPU dots
    for the 1x1x1 convolutions. With CUDA's depthwise entry switched, one grouped convolution per
    depthwise layer (groups = channels) instead."""
    model = build(arch, 5, rngs=nnx.Rngs(0))
    model.eval()
    cuda_groups, cuda_muls, cuda_convs = _forms(_lowering(model, ("cuda",), tmp_path, "cuda"))
    cpu_groups, cpu_muls, cpu_convs = _forms(_lowering(model, ("cpu",), tmp_path, "cpu"))
    assert cuda_groups <= {1} and cpu_groups <= {1}  # depthwise: shifted multiply-adds on both
    # each bottleneck has two 1x1x1 convolutions (8 blocks in the module text: first and scanned per
    # stage): lax convolutions on CUDA, dots on CPU
    assert cuda_convs >= cpu_convs + 16, (cuda_convs, cpu_convs)
    both_groups, both_muls, both_convs = _forms(_lowering(model, ("cpu", "cuda"), tmp_path, "both"))
    assert both_convs >= cuda_convs and both_muls >= cpu_muls  # one artifact, a branch per platform
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(C.AUTO_IMPL, "cuda", {**C.AUTO_IMPL["cuda"], "depthwise": "reference"})
        jax.clear_caches()
        grouped, grouped_muls, _ = _forms(_lowering(model, ("cuda",), tmp_path, "grouped"))
    jax.clear_caches()
    assert {64, 128, 256, 512} <= grouped  # the bottleneck (inner) widths of ir_csn_26 and ir_csn_152
    assert grouped_muls + 8 * 26 <= cuda_muls, (grouped_muls, cuda_muls)  # 27 multiply-adds per layer


def test_cuda_lowering_carries_the_cuda_convolution_forms(tmp_path):
    check_cuda_lowering("ir_csn_26", tmp_path)


@pytest.mark.slow
def test_cuda_lowering_ir_csn_152(tmp_path):
    check_cuda_lowering("ir_csn_152", tmp_path)


@pytest.fixture(scope="module")
def csn():
    return pair("ir_csn_26")


def test_bfloat16_features_probabilities_and_weights_as_arguments(csn, tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 4, 17, 19, 3)).astype(np.float32)
    logits = np.asarray(make_forward(csn, "logits")(jnp.asarray(x)))
    # exported on a CPU without bfloat16 instructions, the artifact still computes in bfloat16
    monkeypatch.setattr(C, "cpu_has_bfloat16", lambda: False)
    bf16 = vmz_jax.export(csn, tmp_path / "bf16.stablehlo", frames=4, size=(17, 19), dtype="bfloat16")
    assert bf16.metadata["dtype"] == "bfloat16"
    got = vmz_jax.export.load(bf16.path)(x)
    assert got.dtype == np.float32 and 1e-6 < relative_error(got, logits) < 5e-2

    for output, fmt in (("features", "onnx"), ("probabilities", "stablehlo")):  # the CLI test: ONNX softmax
        want = np.asarray(make_forward(csn, output)(jnp.asarray(x)))
        result = vmz_jax.export(
            csn, tmp_path / f"{output}.{fmt}", output=output, frames=4, size=(17, 19), platforms=("cpu",)
        )
        got = vmz_jax.export.load(result.path)(x)
        assert got.shape == want.shape and relative_error(got, want) < TOL, (output, fmt)
    assert got.shape == (2, CLASSES) and np.allclose(got.sum(-1), 1.0, atol=1e-6)

    args = vmz_jax.export(
        csn, tmp_path / "args.stablehlo", frames=4, size=(17, 19), embed_weights=False, platforms=("cpu",)
    )
    assert [p.name for p in args.files] == [
        "args.stablehlo",
        "args.stablehlo.weights.npz",
        "args.stablehlo.json",
    ]
    loaded = vmz_jax.export.load(args.path)
    assert loaded.metadata["weights"] == "arguments" and relative_error(loaded(x), logits) < TOL
    assert os.path.getsize(args.path) < os.path.getsize(bf16.path) / 4  # the module holds no weights


@pytest.mark.slow  # ~25 s: compiles the plain-convolution forms at two shapes in two runtimes
def test_symbolic_sizes(tmp_path):
    model = pair("r2plus1d_10")
    result = vmz_jax.export(model, tmp_path / "dyn.stablehlo", frames="dynamic", size="dynamic")
    assert (
        result.metadata["input_shape"] == ["batch", "t", "h", "w", 3] and result.metadata["min_frames"] == 8
    )
    onnx = vmz_jax.export(model, tmp_path / "dyn.onnx", frames="dynamic", size="dynamic")
    hlo, ort = vmz_jax.export.load(result.path), vmz_jax.export.load(onnx.path)
    fwd = make_forward(model, "logits")
    for shape in ((1, 8, 33, 41, 3), (2, 9, 48, 35, 3)):
        x = np.random.default_rng(sum(shape)).standard_normal(shape).astype(np.float32)
        want = np.asarray(fwd(jnp.asarray(x)))
        assert relative_error(hlo(x), want) < TOL and relative_error(ort(x), want) < TOL, shape
    assert result.metadata["min_size"] == 32
    with pytest.raises(Exception) as refused:  # the artifact checks its constraints
        hlo(np.zeros((1, 8, 15, 40, 3), np.float32))
    chain, e = [], refused.value
    while e is not None:
        chain.append(str(e))
        e = e.__cause__ or e.__context__
    assert "symbolic shape constraint h >= 32" in " ".join(chain)


def test_orbax_checkpoint_with_labels_through_the_cli(csn, tmp_path, capsys):
    labels = [f"class {i}" for i in range(CLASSES)]
    vmz_jax.save(csn, tmp_path / "model", labels=labels)
    out = tmp_path / "tuned.onnx"
    code = main(
        [
            "export",
            str(tmp_path / "model"),
            str(out),
            "--arch",
            "ir_csn_26",
            "--output",
            "probabilities",
            "--frames",
            "4",
            "--size",
            "17x19",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "onnx" in captured.out and "probabilities" in captured.out
    meta = json.loads((tmp_path / "tuned.onnx.json").read_text())
    assert meta["labels"] == labels and meta["input_layout"] == "NTHWC" and meta["output"] == "probabilities"
    assert meta["mean"] == list(vmz_jax.models.registry.CAFFE2_MEAN)
    import onnx

    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(props["vmz_jax"])["labels"] == labels
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert "BatchNormalization" not in ops and {"Conv", "Transpose", "Softmax"} <= ops
    groups = [
        a.i
        for n in onnx.load(str(out)).graph.node
        if n.op_type == "Conv"
        for a in n.attribute
        if a.name == "group"
    ]
    assert max(groups) == 512  # depthwise: standard Conv with group = channels


def test_safetensors_weights(csn, tmp_path):
    result = vmz_jax.export(csn, tmp_path / "w.safetensors")
    data = result.path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    assert "layer1.0.conv1.0.weight" in header and header["fc.weight"]["dtype"] == "F32"
    assert (8 + n) % 8 == 0
    params, info = read_params(result.path, "ir_csn_26")
    assert info.format == "safetensors" and info.naming == "torch"
    ours = get_variables(csn)
    assert params.keys() == ours.keys() and all(np.array_equal(params[k], ours[k]) for k in ours)


def one_line_exit_2(capsys, *argv) -> str:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_bad_requests_are_one_line_exit_2(csn, tmp_path, capsys):
    vmz_jax.save(csn, tmp_path / "ckpt")
    src = tmp_path / "ckpt"
    (tmp_path / "taken.onnx").write_bytes(b"mine")
    before = sorted(os.listdir(tmp_path))
    assert "cannot tell the format" in one_line_exit_2(
        capsys, "export", src, tmp_path / "m.h5", "--arch", "ir_csn_26"
    )
    assert "bfloat16" in one_line_exit_2(
        capsys, "export", src, tmp_path / "m.onnx", "--arch", "ir_csn_26", "--dtype", "bfloat16"
    )
    assert "holds ir_csn_26 weights, not ip_csn_26" in one_line_exit_2(
        capsys, "export", src, tmp_path / "m.onnx", "--arch", "ip_csn_26"
    )
    assert "already exists" in one_line_exit_2(
        capsys, "export", src, tmp_path / "taken.onnx", "--arch", "ir_csn_26"
    )
    line = one_line_exit_2(
        capsys,
        "export",
        src,
        tmp_path / "m.stablehlo",
        "--arch",
        "ir_csn_26",
        "--frames",
        "dynamic",
        "--size",
        "dynamic",
    )
    assert "ir_csn_26 cannot be exported with these symbolic sizes" in line
    assert sorted(os.listdir(tmp_path)) == before  # nothing written, no temporary files left
    assert (tmp_path / "taken.onnx").read_bytes() == b"mine"

    c3d = build("c3d", 5, rngs=nnx.Rngs(0))
    with pytest.raises(VMZError, match=r"c3d cannot take 16x64x64 clips: C3D needs 16x112x112"):
        vmz_jax.export(c3d, tmp_path / "c.stablehlo", size=64)
    with pytest.raises(VMZError, match="c3d cannot take symbolic sizes"):
        vmz_jax.export(c3d, tmp_path / "c.onnx", frames="dynamic")
    r2d = build("r2d_18", 5, clip_length=4, rngs=nnx.Rngs(0))
    with pytest.raises(VMZError, match="r2d_18 cannot take 2x16x16 clips: .*needs at least 4 frames"):
        vmz_jax.export(r2d, tmp_path / "r.onnx", frames=2, size=16)
    with pytest.raises(VMZError, match="unknown export format 'tflite'"):
        vmz_jax.export(csn, tmp_path / "x.bin", format="tflite")
    with pytest.raises(VMZError, match="unknown output 'stages'"):
        vmz_jax.export(csn, tmp_path / "x.onnx", output="stages")
    assert sorted(os.listdir(tmp_path)) == before


def test_the_facade():
    import vmz_jax.export as ex
    from vmz_jax.export import load

    assert ex is vmz_jax.export and callable(ex) and load is ex.load
    assert ex.format_of("a/b.onnx") == "onnx" and ex.format_of("m.safetensors") == "safetensors"
