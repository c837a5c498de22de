"""The audio ResNet and the audio-visual (Gradient-Blending) models against the independent PyTorch
reference written from the Caffe2 builder (vmz_jax.reference.av_torch).

Random, non-symmetric weights and non-trivial BatchNorm statistics are written as a Caffe2 `.pkl`
under the reference's blob names; `vmz_jax.load(arch, checkpoint=...)` reads it strictly, the
reference takes the same blobs by name, and every head's logits and every feature must agree.
"""

from __future__ import annotations

import contextlib

import jax
import numpy as np
import pytest
import torch
from flax import nnx

import vmz_jax
from porting import readers
from porting.convert import export_params, read_params
from vmz_jax.errors import CheckpointError, VMZError
from vmz_jax.models import registry
from vmz_jax.models.variables import get_variables
from vmz_jax.reference import av_torch

NUM_CLASSES = 7
LOGMELS = (2, 100, 40)  # Caffe2's 100 frames x 40 mel bins per clip


def random_blobs(net: av_torch.Caffe2Net, seed: int) -> dict[str, np.ndarray]:
    """Weights scaled by fan-in (activations stay O(1) through 150 layers), BN statistics far from
    (0, 1), every array non-symmetric."""
    rng = np.random.default_rng(seed)
    blobs = {}
    for name, shape in net.blob_shapes().items():
        if name.endswith("_riv"):
            a = rng.uniform(0.5, 1.5, shape)
        elif name.endswith("_rm"):
            a = rng.normal(0.0, 0.2, shape)
        elif name.endswith("_s"):
            a = rng.uniform(0.2, 0.6, shape)  # < 1: residual sums do not blow up with depth
        elif name.endswith("_b"):
            a = rng.normal(0.0, 0.1, shape)
        else:
            fan_in = int(np.prod(shape[1:]))
            a = rng.normal(0.0, (1.0 / fan_in) ** 0.5, shape)
        blobs[name] = a.astype(np.float32)
    return blobs


def reference_outputs(
    arch: str, blobs: dict[str, np.ndarray], clips: np.ndarray | None, logmels: np.ndarray, dtype: torch.dtype
) -> dict[str, np.ndarray]:
    net = av_torch.build(arch, NUM_CLASSES, clip_length=clips.shape[1] if clips is not None else 8)
    net.load_blobs({k: torch.from_numpy(v) for k, v in blobs.items()})
    net = net.to(dtype).eval()
    with torch.no_grad():
        out = av_torch.run(
            net,
            arch,
            NUM_CLASSES,
            torch.from_numpy(logmels).to(dtype),
            None if clips is None else torch.from_numpy(clips.transpose(0, 4, 1, 2, 3)).to(dtype),
        )
    return {k: v.numpy() for k, v in out.items()}


@nnx.jit
def _jax_heads_and_features(model, clips, logmels):
    out = {f"logits_{k}": v for k, v in model.heads(clips, logmels).items()}
    return out | {f"features_{k}": v for k, v in model.features(clips, logmels).items()}


def jax_outputs(model, clips: np.ndarray | None, logmels: np.ndarray) -> dict[str, np.ndarray]:
    if clips is None:
        stages = model.stage_outputs(logmels)
        return {
            "logits_audio": np.asarray(stages["logits"]),
            "features_audio": np.asarray(stages["features"]),
        }
    return {k: np.asarray(v) for k, v in _jax_heads_and_features(model, clips, logmels).items()}


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    assert got.shape == want.shape, (got.shape, want.shape)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def check_parity(
    tmp_path,
    arch: str,
    clip_shape: tuple[int, ...] | None,
    logmel_shape=LOGMELS,
    seed: int = 0,
    dtype=np.float32,
) -> dict[str, float]:
    """Errors per output of `arch` loaded from a random Caffe2 `.pkl`, against the reference."""
    blobs = random_blobs(
        av_torch.build(arch, NUM_CLASSES, clip_length=clip_shape[1] if clip_shape else 8), seed
    )
    path = tmp_path / f"{arch}.pkl"
    readers.write_caffe2_pkl(path, blobs)
    model = vmz_jax.load(arch, checkpoint=path, dtype=dtype)
    rng = np.random.default_rng(seed + 1)
    clips = None if clip_shape is None else rng.standard_normal(clip_shape).astype(dtype)
    logmels = (rng.standard_normal(logmel_shape) * 3 - 5).astype(dtype)  # log-mel-like offset and spread
    want = reference_outputs(
        arch, blobs, clips, logmels, torch.float64 if dtype == np.float64 else torch.float32
    )
    got = jax_outputs(model, clips, logmels)
    assert set(got) == set(want)
    return {k: relative_error(got[k], want[k]) for k in want}


# one arch per trunk kind, reduced depth; the fast suite runs the small size, -m slow the other
FAST_CASES = [
    ("a_resnet_18", None, None),
    ("av_r2plus1d_18", (1, 4, 16, 16, 3), (2, 6, 40, 28, 3)),
    ("av_ip_csn_26", (1, 4, 16, 16, 3), (2, 6, 40, 28, 3)),
    ("av_ir_csn_26", (1, 4, 16, 16, 3), (2, 6, 40, 28, 3)),
    ("av_r3d_18", (1, 4, 16, 16, 3), (2, 6, 40, 28, 3)),
]


# the fast suite: the audio tower with a (2+1)D and a CSN trunk; the other kinds and sizes under -m slow
_FAST_ARCHS = ("av_r2plus1d_18", "av_ip_csn_26")
_CASES = [pytest.param(*c, id=c[0], marks=() if c[0] in _FAST_ARCHS else pytest.mark.slow)
          for c in FAST_CASES]


@pytest.mark.parametrize(("arch", "small", "other"), _CASES)
def test_parity_float32(tmp_path, arch, small, other):
    errors = check_parity(tmp_path, arch, small, LOGMELS if small is None else (small[0], 100, 40))
    assert max(errors.values()) < 2e-5, errors
    if small is None:  # a_resnet: a second log-mel length whose last map is also Caffe2's 4 x 2
        errors = check_parity(tmp_path, arch, None, (3, 98, 40))
        assert max(errors.values()) < 2e-5, errors


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "small", "other"), FAST_CASES[1:], ids=[c[0] for c in FAST_CASES[1:]])
def test_parity_float32_second_size(tmp_path, arch, small, other):
    errors = check_parity(tmp_path, arch, other, (other[0], 100, 40))
    assert max(errors.values()) < 2e-5, errors


@pytest.mark.parametrize("arch", ["av_ip_csn_26", pytest.param("a_resnet_26", marks=pytest.mark.slow)])
def test_parity_float64(tmp_path, arch):
    clips = None if arch.startswith("a_") else (1, 6, 40, 28, 3)
    errors = check_parity(tmp_path, arch, clips, (1, 100, 40), dtype=np.float64)
    assert max(errors.values()) < 1e-10, errors


SLOW_ARCHS = [
    a
    for a in registry.names()
    if registry.get(a).family in registry.AUDIO_FAMILIES and a not in {c[0] for c in FAST_CASES}
]


@pytest.mark.slow
@pytest.mark.parametrize("arch", SLOW_ARCHS)
def test_parity_every_arch(tmp_path, arch):
    for clips in (None, None) if arch.startswith("a_") else ((2, 8, 32, 32, 3), (1, 16, 64, 48, 3)):
        errors = check_parity(tmp_path, arch, clips, (clips[0] if clips else 2, 100, 40))
        assert max(errors.values()) < 2e-5, errors
    errors = check_parity(
        tmp_path, arch, None if arch.startswith("a_") else (1, 8, 32, 32, 3), (1, 100, 40), dtype=np.float64
    )
    assert max(errors.values()) < 1e-10, errors


def test_strict_loading_names_every_problem(tmp_path):
    arch = "av_r2plus1d_18"
    blobs = random_blobs(av_torch.build(arch, NUM_CLASSES), 3)
    blobs["v_comp_0_conv_1_middle_w"] = np.full_like(blobs["v_comp_0_conv_1_middle_w"], np.nan)
    riv = blobs.pop("a_comp_4_spatbn_2_riv")
    blobs["a_extra_w"] = np.zeros(3, np.float32)
    path = tmp_path / "bad.pkl"
    readers.write_caffe2_pkl(path, blobs)
    with pytest.raises(CheckpointError) as info:
        vmz_jax.load(arch, checkpoint=path)
    message = str(info.value)
    assert str(path) in message and "'a_extra_w'" in message and "'a_comp_4_spatbn_2_riv'" in message
    del blobs["a_extra_w"]
    blobs["a_comp_4_spatbn_2_riv"] = riv
    readers.write_caffe2_pkl(path, blobs)
    with pytest.raises(
        CheckpointError, match="non-finite values in visual.layer1.first.conv1.spatial.kernel"
    ):
        vmz_jax.load(arch, checkpoint=path)


@pytest.mark.parametrize("fmt", ["pkl", "npz", "safetensors", "pth"])
def test_export_round_trip_keeps_caffe2_names(tmp_path, fmt):
    arch = "av_ir_csn_26"
    blobs = random_blobs(av_torch.build(arch, NUM_CLASSES), 5)
    source = tmp_path / "w.pkl"
    readers.write_caffe2_pkl(source, blobs)
    params, info = read_params(source, arch)
    assert info.naming == "caffe2" and info.num_classes == NUM_CLASSES
    out = tmp_path / f"out.{fmt}"
    export_params(params, arch, out, fmt)
    written = readers.read_weights(out)
    assert written.keys() == blobs.keys()  # every blob, under its Caffe2 name, in every format
    for name, array in blobs.items():
        np.testing.assert_array_equal(written[name], array)
    again, info = read_params(out, arch)
    assert info.naming == "caffe2"
    for path, array in params.items():
        np.testing.assert_array_equal(again[path], array)


def test_heads_and_features_interface(tmp_path):
    arch = "av_r2plus1d_18"
    blobs = random_blobs(av_torch.build(arch, NUM_CLASSES), 1)
    readers.write_caffe2_pkl(tmp_path / "w.pkl", blobs)
    model = vmz_jax.load(arch, checkpoint=tmp_path / "w.pkl")
    rng = np.random.default_rng(0)
    clips, logmels = (
        rng.standard_normal((1, 4, 16, 16, 3), np.float32),
        rng.standard_normal((1, 100, 40), np.float32),
    )
    heads = model.heads(clips, logmels)
    for head in ("av", "audio", "visual"):
        np.testing.assert_allclose(
            np.asarray(model(clips, logmels, head=head)), np.asarray(heads[head]), rtol=1e-6, atol=1e-6
        )
    features = model.features(clips, logmels)
    assert {k: v.shape for k, v in features.items()} == {
        "audio": (1, 512),
        "visual": (1, 512),
        "joint": (1, 512),
    }
    with pytest.raises(ValueError, match="unknown head 'both'"):
        model(clips, logmels, head="both")
    with pytest.raises(ValueError, match="at least 4 frames"):
        model(clips[:, :2], logmels)
    vmz_jax.save(model, tmp_path / "orbax")  # and back through an Orbax checkpoint
    again = vmz_jax.load(arch, checkpoint=tmp_path / "orbax")
    np.testing.assert_array_equal(np.asarray(again.heads(clips, logmels)["av"]), np.asarray(heads["av"]))
    assert set(get_variables(model)) >= {
        ("fc1", "kernel"),
        ("audio", "fc", "kernel"),
        ("visual", "fc", "kernel"),
    }


def test_registry_and_constructors():
    for arch in ("a_resnet_50", "av_ip_csn_152", "av_ir_csn_152", "av_r2plus1d_101", "av_r3d_50"):
        entry = registry.get(arch)
        assert entry.torch_names is None and entry.family in registry.AUDIO_FAMILIES
        assert callable(getattr(vmz_jax.models, arch)) and arch in vmz_jax.list_models()
    assert set(av_torch.ARCHS) == {
        a for a in registry.names() if registry.get(a).family in registry.AUDIO_FAMILIES
    }


@contextlib.contextmanager
def xla_optimizations():
    """XLA's optimizations on, as in training (conftest turns most of them off for compile speed).
    With them off, XLA CPU (jax 0.10.2) computes wrong float64 gradients for the audio tower's last
    stage when one jitted gradient covers the stage, its max pool and the classifier's kernel: up to
    0.96 relative per blob (0.3 absolute) against both the eager gradients and the reference, while
    the stage, the max pool or the classifier alone, or all three with a constant classifier kernel,
    agree within 2e-15."""
    before = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", False)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", before)


def check_blended_gradients(
    tmp_path, clips_shape: tuple[int, ...], logmels_shape: tuple[int, ...], jit: bool
) -> None:
    """Train-mode float64 gradients of av_r2plus1d_18 under the blended loss, every blob against the
    reference's, relative to the blob's largest gradient."""
    import jax.numpy as jnp

    from porting.caffe2_names import caffe2_name_fn
    from porting.keymap import layout
    from vmz_jax.models import build
    from vmz_jax.models.variables import set_variables
    from vmz_jax.train.blend import BLEND_WEIGHTS, blended_loss

    arch, weights = "av_r2plus1d_18", BLEND_WEIGHTS[("audioset", "none", "av_r2plus1d_101")]
    blobs = random_blobs(av_torch.build(arch, NUM_CLASSES, clip_length=clips_shape[1]), 11)
    readers.write_caffe2_pkl(tmp_path / "w.pkl", blobs)
    params, _ = read_params(tmp_path / "w.pkl", arch)
    model = build(arch, NUM_CLASSES, dtype=jnp.float64, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
    set_variables(model, params)
    model.train()
    rng = np.random.default_rng(12)
    clips = rng.standard_normal(clips_shape)
    logmels = rng.standard_normal(logmels_shape) * 3 - 5
    labels = np.array([3, 5])

    def loss_and_grads(m, clips, logmels, labels):
        def loss_of(m):
            return blended_loss(m.heads(clips, logmels), labels, weights)

        return nnx.value_and_grad(loss_of, has_aux=True)(m)

    if jit:
        with xla_optimizations():
            (loss, parts), grads = nnx.jit(loss_and_grads)(
                model, jnp.asarray(clips), jnp.asarray(logmels), jnp.asarray(labels)
            )
    else:
        (loss, parts), grads = loss_and_grads(
            model, jnp.asarray(clips), jnp.asarray(logmels), jnp.asarray(labels)
        )
    grads = {tuple(str(k) for k in p): np.asarray(v[...]) for p, v in nnx.to_flat_state(grads)}

    net = av_torch.build(arch, NUM_CLASSES, clip_length=clips_shape[1])
    net.load_blobs({k: torch.from_numpy(v) for k, v in blobs.items()})
    net = net.double().train()
    out = av_torch.run(
        net, arch, NUM_CLASSES, torch.from_numpy(logmels), torch.from_numpy(clips.transpose(0, 4, 1, 2, 3))
    )
    target = torch.from_numpy(labels)
    ce = {
        head: torch.nn.functional.cross_entropy(out[f"logits_{head}"], target)
        for head in ("audio", "visual", "av")
    }
    want_loss = weights[0] * ce["audio"] + weights[1] * ce["visual"] + weights[2] * ce["av"]
    want_loss.backward()
    want = want_loss.item()
    assert abs(float(loss) - want) < 1e-10 * abs(want)
    for head in ce:
        assert abs(float(parts[head]) - ce[head].item()) < 1e-10 * abs(ce[head].item())

    name_fn = caffe2_name_fn(arch, NUM_CLASSES)
    slots = layout({p: g.shape for p, g in grads.items()}, name_fn)
    reference_grads = {name: p.grad.numpy() for name, p in net.blobs.items()}
    assert slots.keys() == reference_grads.keys()  # a gradient for every trained blob, named alike
    errors = {}
    for name, slot in slots.items():
        ours = grads[slot.path] if slot.index is None else grads[slot.path][slot.index]
        errors[name] = relative_error(slot.transform.to_external(ours), reference_grads[name])
    worst = max(errors, key=errors.get)
    assert errors[worst] < 1e-10, (worst, errors[worst])
    assert jax.config.jax_enable_x64


def test_blended_loss_gradients_float64_equal_the_reference(tmp_path):
    """Jitted, as a training step runs, on 2 clips of 4x16x16: every blob kind of the full-size test.
    The log-mels stay 100 x 40, the reference's fixed 4 x 2 max-pool window needs a 4 x 2 last map."""
    check_blended_gradients(tmp_path, (2, 4, 16, 16, 3), (2, 100, 40), jit=True)


@pytest.mark.slow
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_blended_loss_gradients_float64_full_size(tmp_path, jit):
    check_blended_gradients(tmp_path, (2, 4, 24, 24, 3), (2, 100, 40), jit=jit)


@pytest.mark.parametrize("arch", [pytest.param("a_resnet_18", marks=pytest.mark.slow), "av_ir_csn_26"])
def test_compare_accepts_the_audio_archs(tmp_path, arch):
    from vmz_jax.compare import AUDIO_STAGES, AUDIO_VISUAL_STAGES, compare

    readers.write_caffe2_pkl(tmp_path / "w.pkl", random_blobs(av_torch.build(arch, NUM_CLASSES), 2))
    result = compare(tmp_path / "w.pkl", arch, shape=(2, 8, 32, 32))
    stages = AUDIO_STAGES if arch.startswith("a_") else AUDIO_VISUAL_STAGES
    assert [row.stage for row in result.rows] == list(stages)
    assert result.first_failure is None and max(row.max_rel for row in result.rows) < 1e-5
    assert "log-mels 2x100x40" in result.input
    with pytest.raises(VMZError, match="random clips and log-mels only"):
        compare(tmp_path / "w.pkl", arch, input=tmp_path / "x.npy")
