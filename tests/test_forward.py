"""make_forward: each output equals the model's own methods; platforms pick the convolution forms."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.parity import make_pair, relative_error
from vmz_jax.errors import VMZError
from vmz_jax.models import build
from vmz_jax.models import conv as C
from vmz_jax.models.forward import make_forward, resolve_conv_impl

ARCH = "r2plus1d_10"
SHAPE = (2, 16, 32, 32, 3)  # layer4 is (2, 2, 2, 512): pooling over space and time matters


@pytest.fixture(scope="module")
def model():
    _, m = make_pair(ARCH, seed=5, num_classes=7)  # random weights and BN statistics, eval mode
    return m


@pytest.fixture(scope="module")
def x():
    return jnp.asarray(np.random.default_rng(2).standard_normal(SHAPE), jnp.float32)


@pytest.fixture(scope="module")
def own(model, x):
    """The model's own methods, jitted directly."""
    return jax.tree.map(np.asarray, nnx.jit(lambda m, v: m.stage_outputs(v))(model, x))


def test_named_outputs_equal_the_models_methods(model, x, own):
    logits = np.asarray(make_forward(model, "logits")(x))
    assert logits.shape == (2, 7) and relative_error(logits, own["logits"]) < 1e-5
    probs = np.asarray(make_forward(model, "probabilities")(x))
    assert relative_error(probs, np.asarray(jax.nn.softmax(own["logits"], axis=-1))) < 1e-5
    feats = make_forward(model, "features")
    assert feats.out_dim == 512 and relative_error(np.asarray(feats(x)), own["features"]) < 1e-5
    stages = jax.tree.map(np.asarray, make_forward(model, "stages")(x))
    assert set(stages) == set(own)
    assert max(relative_error(stages[k], own[k]) for k in own) < 1e-5


def test_max_pooling_reduces_layer4_over_space_then_time(model, x, own):
    got = np.asarray(make_forward(model, "features", pool_spatial="max", pool_temporal="mean")(x))
    layer4 = own["layer4"]
    assert layer4.shape[1:4] == (2, 2, 2)
    want = layer4.max(axis=(2, 3)).mean(axis=1)
    assert relative_error(got, want) < 1e-5
    assert relative_error(want, own["features"]) > 1e-3  # mean pooling would not pass
    assert relative_error(want, layer4.mean(axis=1).max(axis=(1, 2))) > 1e-3  # nor time first


def test_user_callable_gets_the_merged_module(model, x, own):
    def layer3_energy(net, v):
        return {"energy": jnp.sum(net.stage_outputs(v)["layer3"] ** 2, axis=(1, 2, 3, 4))}

    fwd = make_forward(model, layer3_energy)
    assert fwd.output == "layer3_energy" and fwd.out_dim is None
    got = np.asarray(fwd(x)["energy"])
    assert relative_error(got, (own["layer3"] ** 2).sum(axis=(1, 2, 3, 4))) < 1e-5


def test_forward_is_pure_eval_and_leaves_the_model_alone(model, x, own):
    model.train()
    try:
        fwd = make_forward(model, "logits")
        assert relative_error(np.asarray(fwd(x)), own["logits"]) < 1e-5  # running statistics used
        assert model.stem.spatial.bn.use_running_average is False  # the caller's model untouched
        assert model.stem.spatial.conv_impl == "auto"
    finally:
        model.eval()
    again = make_forward(model, "logits")
    assert again.fn is fwd.fn  # one function per structure: jit caches carry over
    state = jax.tree.map(lambda a: a * 0 if a.dtype == jnp.float32 else a, again.state)
    zeroed = np.asarray(again.jit()(state, x))  # compiled above already: same function, same shapes
    assert np.abs(zeroed).max() == 0 and np.abs(own["logits"]).max() > 0  # the weights come in as state


def _group_counts(fwd, x):
    text = str(jax.make_jaxpr(fwd.fn)(fwd.state, x))
    return {int(n) for n in re.findall(r"feature_group_count=(\d+)", text)}, len(re.findall(r"\bmul\b", text))


def _lax_convs(fwd, x):
    return len(re.findall(r"conv_general_dilated", str(jax.make_jaxpr(fwd.fn)(fwd.state, x))))


def test_platform_picks_the_convolution_forms(monkeypatch):
    """"auto" is resolved for the target platform, not for the backend that traces: a CUDA forward
    traced on CPU has the lax convolutions cuDNN runs (all but the depthwise ones, AUTO_IMPL's CUDA
    row), not the CPU rewrites (dots for the 1x1x1 convolutions)."""
    csn = build("ir_csn_26", 5, rngs=nnx.Rngs(0))
    v = jnp.zeros((1, 4, 16, 16, 3), jnp.float32)
    cuda = make_forward(csn, "logits", platform="cuda")
    cpu = make_forward(csn, "logits", platform="cpu")
    assert (cuda.conv_impl, cuda.platform, cpu.conv_impl) == ("auto:cuda", "cuda", "auto:cpu")
    (cuda_groups, cuda_muls), cpu_groups = _group_counts(cuda, v), _group_counts(cpu, v)[0]
    assert cuda_groups == cpu_groups == {1}  # depthwise: multiply-adds on both
    assert _lax_convs(cuda, v) > _lax_convs(cpu, v) + 8  # 1x1x1: cuDNN convolutions vs dots
    forced = make_forward(csn, "logits", conv_impl="reference", platform="cpu")
    assert forced.conv_impl == "reference" and max(_group_counts(forced, v)[0]) > 1
    # one entry of the table switches one form, nothing else
    monkeypatch.setitem(C.AUTO_IMPL, "cuda", {**C.AUTO_IMPL["cuda"], "depthwise": "reference"})
    jax.clear_caches()  # the table is read when tracing: functions traced before keep their forms
    switched = make_forward(csn, "logits", platform="cuda")
    assert max(_group_counts(switched, v)[0]) > 1  # depthwise: feature_group_count = channels
    assert _group_counts(switched, v)[1] < cuda_muls - 27  # 27 multiply-adds fewer per layer
    assert resolve_conv_impl("auto", "tpu") == "auto:tpu" and resolve_conv_impl("fast", "cuda") == "fast"


def test_bad_requests_are_one_line_errors(model):
    c3d = nnx.eval_shape(lambda: build("c3d", 5, rngs=nnx.Rngs(0)))
    with pytest.raises(VMZError, match="fc7 activations: there is nothing to pool"):
        make_forward(c3d, "features", pool_temporal="max")
    with pytest.raises(VMZError, match="to the 'features' output only"):
        make_forward(model, "logits", pool_spatial="max")
    with pytest.raises(VMZError, match="unknown output 'pooled'"):
        make_forward(model, "pooled")
    with pytest.raises(VMZError, match="unknown platform 'metal'"):
        make_forward(model, platform="metal")
    with pytest.raises(VMZError, match="unknown conv implementation"):
        make_forward(model, conv_impl="winograd")


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.bfloat16])
def test_batchnorm_folded_once_equals_folding_on_every_call(dtype, bfloat16_cpu):
    """make_forward folds each BatchNorm into its kernel once (scanned stacks included): the same
    logits as the per-call fold, the model's own kernels untouched, and the copy refuses to train."""
    _, model = make_pair("ir_csn_26", seed=3, num_classes=5, dtype=dtype)  # stages of 2: a scanned stack
    before = jax.tree.map(np.array, nnx.state(model, nnx.Param))
    x = jnp.asarray(np.random.default_rng(4).standard_normal((2, 4, 32, 32, 3)), jnp.float32)
    folded, per_call = make_forward(model, "logits"), make_forward(model, "logits", fold_batchnorm=False)
    got, want = np.asarray(folded(x), np.float64), np.asarray(per_call(x), np.float64)
    assert np.abs(want).max() > 0.1
    bound = 1e-13 if dtype == jnp.float64 else 1e-6
    assert relative_error(got, want) < bound
    after = jax.tree.map(np.array, nnx.state(model, nnx.Param))
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after),
                                                    strict=True))
    copy = nnx.merge(folded.graphdef, folded.state)
    stem, stacked = copy.stem.conv, copy.layer1.rest.conv2
    assert stem.batchnorm_folded and stacked.batchnorm_folded
    assert stem.kernel[...].dtype == dtype
    # a bfloat16 stack is held as its bits (XLA's CPU backend has no bfloat16 dynamic slice)
    assert stacked.kernel[...].dtype == (jnp.uint16 if dtype == jnp.bfloat16 else dtype)
    unfolded_stem = model.stem.conv
    scale = unfolded_stem.bn.scale[...] / np.sqrt(unfolded_stem.bn.var[...] + 1e-3)
    np.testing.assert_allclose(np.asarray(stem.kernel[...], np.float64),
                               np.asarray(unfolded_stem.kernel[...] * scale, np.float64), rtol=1e-2)
    # the model's weights change (a training step, loaded weights): the folded forward follows them
    source = model.layer1.rest.conv2
    source.kernel.set_raw_value(source.kernel[...] * 2)
    source.bn.var.set_raw_value(source.bn.var[...] + 0.5)
    changed = np.asarray(per_call(x), np.float64)
    assert relative_error(changed, want) > 1e-3
    assert relative_error(np.asarray(folded(x), np.float64), changed) < bound
    copy.train()
    with pytest.raises(VMZError, match="folded into its kernels for inference"):
        copy(x)
