"""Model zoo facts that need no reference: parameter totals, shapes, modes, dtypes, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import vmz_jax
from vmz_jax import models
from vmz_jax.models.layers import middle_width
from vmz_jax.models.variables import abstract_shapes

# Published totals for 400 classes (spec/ARCHITECTURES.md): (all nn.Parameters incl. BN affine,
# Caffe2's own count, Caffe2 blobs in the .pkl). The spec describes Caffe2's count as conv + FC
# weights and FC bias, but all four published figures are exactly conv + FC weights (no bias).
TOTALS = {
    "r2plus1d_34": (63_697_175, 63_646_487, 347),
    "r2plus1d_152": (118_226_785, 118_021_015, 1032),
    "ir_csn_152": (29_703_568, 29_551_744, 777),
    "ip_csn_152": (33_016_592, 32_840_832, 1027),
}


def _counts(arch):
    shapes = abstract_shapes(arch, 400)
    size = {path: int(np.prod(shape)) for path, shape in shapes.items()}
    stat = {p for p in shapes if p[-2] == "bn" and p[-1] in ("mean", "var")}
    params = sum(n for p, n in size.items() if p not in stat)
    weights = sum(n for p, n in size.items() if p[-1] == "kernel")
    # one blob per array; stacked arrays hold one blob per block
    blobs = sum(shapes[p][0] if p[1:2] == ("rest",) else 1 for p in shapes)
    return params, weights, blobs


@pytest.mark.parametrize("arch", TOTALS)
def test_parameter_totals_match_published(arch):
    assert _counts(arch) == TOTALS[arch]


def test_middle_widths_are_per_conv():
    assert [middle_width(i, o) for i, o in [(64, 64), (64, 128), (128, 128), (128, 256),
                                           (256, 256), (256, 512), (512, 512)]] == \
        [144, 230, 288, 460, 576, 921, 1152]
    shapes = abstract_shapes("r2plus1d_34")
    assert shapes[("layer2", "first", "conv1", "spatial", "kernel")] == (1, 3, 3, 64, 230)
    assert shapes[("layer2", "first", "conv2", "spatial", "kernel")] == (1, 3, 3, 128, 288)
    assert shapes[("layer4", "rest", "conv1", "temporal", "kernel")] == (2, 3, 1, 1, 1152, 512)


def test_list_models_and_constructors():
    names = vmz_jax.list_models()
    assert len(models.VIDEO_ARCHS) == 35 and "ip_csn_152" in names and "c3d" in names
    audio = [n for n in names if n not in models.VIDEO_ARCHS]
    assert len(audio) == 26 and all(n.startswith(("a_resnet_", "av_")) for n in audio)  # 6 audio, 20 AV
    for name in names:
        assert callable(getattr(models, name))
    with pytest.raises(ValueError, match="unknown architecture"):
        models.build("resnet50")


_stage_outputs = nnx.jit(lambda model, x: model.stage_outputs(x))


def _clip(shape=(2, 8, 32, 32, 3), seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


@pytest.mark.parametrize("arch,dim", [("r2plus1d_10", 512), ("ir_csn_26", 512), ("mc2_18", 512)])
def test_outputs_and_feature_dims(arch, dim):
    model = getattr(models, arch)(num_classes=7, rngs=nnx.Rngs(0))
    model.eval()
    x = _clip()
    out = _stage_outputs(model, x)
    assert set(out) == {"stem", "layer1", "layer2", "layer3", "layer4", "features", "logits"}
    assert out["logits"].shape == (2, 7) and out["logits"].dtype == jnp.float32
    assert out["features"].shape == (2, dim)
    np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(model, x), out["logits"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(nnx.jit(lambda m, x: m.features(x))(model, x), out["features"],
                               rtol=1e-5, atol=1e-6)


def test_bottleneck_feature_dim_is_2048():
    shapes = abstract_shapes("ip_csn_50", 5)
    assert shapes[("fc", "kernel")] == (2048, 5)


def _abstract_outputs(arch, shape):
    def run():
        model = models.build(arch, rngs=nnx.Rngs(0))
        model.eval()
        return model.stage_outputs(jnp.zeros(shape, jnp.float32))
    return jax.eval_shape(run)


def test_full_size_activation_shapes():
    out = _abstract_outputs("r2plus1d_18", (1, 32, 112, 112, 3))
    assert [out[k].shape[1:4] for k in ["stem", "layer1", "layer2", "layer3", "layer4"]] == \
        [(32, 56, 56), (32, 56, 56), (16, 28, 28), (8, 14, 14), (4, 7, 7)]
    out = _abstract_outputs("ir_csn_152", (1, 32, 224, 224, 3))
    assert [out[k].shape[1:] for k in ["stem", "layer2", "layer4"]] == \
        [(32, 56, 56, 64), (16, 28, 28, 512), (4, 7, 7, 2048)]


def test_train_mode_updates_running_statistics_of_scanned_blocks():
    model = models.r3d_16(num_classes=3, rngs=nnx.Rngs(0))
    model.train()
    before = np.asarray(model.layer1.rest.conv1.bn.mean[...]).copy()
    _stage_outputs(model, _clip((2, 4, 16, 16, 3)))
    after = np.asarray(model.layer1.rest.conv1.bn.mean[...])
    assert after.shape == (1, 64) and not np.allclose(before, after)
    # eval mode leaves them alone
    model.eval()
    _stage_outputs(model, _clip((2, 4, 16, 16, 3), seed=1))
    np.testing.assert_array_equal(after, np.asarray(model.layer1.rest.conv1.bn.mean[...]))


def test_bfloat16_compute_keeps_float32_params_and_logits(bfloat16_cpu):
    model = models.ir_csn_26(num_classes=4, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    model.eval()
    assert model.layer2.first.conv2.kernel[...].dtype == jnp.float32
    out = _stage_outputs(model, _clip((1, 8, 24, 24, 3)))
    assert out["layer3"].dtype == jnp.bfloat16
    assert out["logits"].dtype == jnp.float32
    ref = models.ir_csn_26(num_classes=4, rngs=nnx.Rngs(0))
    ref.eval()
    want = _stage_outputs(ref, _clip((1, 8, 24, 24, 3)))["logits"]
    err = float(jnp.max(jnp.abs(out["logits"] - want)) / jnp.max(jnp.abs(want)))
    assert err < 0.1


def test_fully_convolutional_sizes():
    model = models.r2plus1d_10(num_classes=3, rngs=nnx.Rngs(0))
    model.eval()
    for shape in [(1, 5, 17, 23, 3), (1, 16, 40, 24, 3)]:
        assert _stage_outputs(model, _clip(shape))["logits"].shape == (1, 3)


def test_bad_inputs_raise_clear_errors():
    model = models.r2d_18(num_classes=3, clip_length=8, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="needs at least 8 frames"):
        model(_clip((1, 4, 32, 32, 3)))
    with pytest.raises(ValueError, match=r"expected clips \(N, T, H, W, 3\)"):
        model(jnp.zeros((1, 3, 8, 32, 32)))
    with pytest.raises(ValueError, match="C3D needs 16x112x112"):
        _abstract_outputs("c3d", (1, 8, 112, 112, 3))
