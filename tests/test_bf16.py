"""bfloat16 convolution forms: float32 accumulation, gradients, the CPU fallback, model accuracy.

Inputs are bfloat16-exact (drawn, rounded to bfloat16, then widened), so every product is exact in
float32 and what is left against a float64 convolution of the same values is float32 summation:
well under 1e-5 of the output's scale. A product accumulated in bfloat16 misses by ~1e-3, so these
bounds tell the two apart.
"""

import importlib.util
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vmz_jax.models import conv as C

BF16 = jnp.bfloat16
_HOST_HAS_BFLOAT16 = C.cpu_has_bfloat16  # before any test pretends otherwise


@pytest.fixture(autouse=True)
def _bfloat16_path(bfloat16_cpu, monkeypatch):
    """Every test here checks the bfloat16 path, as a CPU with bfloat16 instructions traces it; those
    of the float32 fallback say so themselves. The forms are those of an AVX512-BF16 CPU (the tests of
    what an AMX CPU takes instead say so), whatever this host is."""
    monkeypatch.setattr(C, "cpu_kind", lambda: "avx512_bf16")
# (name, cin, cout, kernel, stride, padding, groups, (T, H, W)): one per form the bfloat16 path takes
FORMS = [
    ("pointwise", 24, 40, (1, 1, 1), (1, 1, 1), (0, 0, 0), 1, (3, 5, 6)),
    ("pointwise-strided", 24, 40, (1, 1, 1), (2, 2, 2), (0, 0, 0), 1, (3, 5, 6)),
    ("spatial-conv2d", 8, 12, (1, 3, 3), (1, 1, 1), (0, 1, 1), 1, (2, 16, 16)),
    ("spatial-conv2d-strided", 8, 12, (1, 3, 3), (1, 2, 2), (0, 1, 1), 1, (2, 16, 16)),
    ("spatial-patches", 64, 16, (1, 3, 3), (1, 1, 1), (0, 1, 1), 1, (2, 6, 7)),
    ("spatial-patches-strided", 64, 16, (1, 3, 3), (1, 2, 2), (0, 1, 1), 1, (2, 6, 7)),
    ("spatial-rows", 64, 16, (1, 3, 3), (1, 1, 1), (0, 1, 1), 1, (2, 16, 17)),
    ("spatial-rows-strided", 64, 16, (1, 3, 3), (1, 2, 2), (0, 1, 1), 1, (2, 32, 31)),
    ("spatial-rows-frame-loop", 64, 16, (1, 3, 3), (1, 1, 1), (0, 1, 1), 1, (2, 29, 30)),
    ("spatial-rows-frame-loop-strided", 64, 16, (1, 3, 3), (1, 2, 2), (0, 1, 1), 1, (1, 58, 59)),
    ("temporal-conv2d", 12, 10, (3, 1, 1), (1, 1, 1), (1, 0, 0), 1, (5, 30, 30)),
    ("temporal-taps", 12, 10, (3, 1, 1), (1, 1, 1), (1, 0, 0), 1, (5, 6, 7)),
    ("temporal-taps-two-frames", 12, 10, (3, 1, 1), (1, 1, 1), (1, 0, 0), 1, (2, 4, 5)),
    ("temporal-taps-strided", 12, 10, (3, 1, 1), (2, 1, 1), (1, 0, 0), 1, (3, 4, 5)),
    ("dense", 8, 6, (3, 3, 3), (1, 2, 2), (1, 1, 1), 1, (4, 9, 9)),
    ("stem-folded-time", 3, 8, (3, 7, 7), (1, 2, 2), (1, 3, 3), 1, (4, 12, 12)),
]


def _exact(shape, seed, scale=1.0):
    """float32 values that bfloat16 represents exactly."""
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * scale
    return jnp.asarray(x, BF16).astype(jnp.float32)


def _rel(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def _case(name):
    case = next(c for c in FORMS if c[0] == name)
    _, cin, cout, kernel, stride, padding, groups, size = case
    x = _exact((2, *size, cin), 0)
    w = _exact((*kernel, cin // groups, cout), 1, 0.2)
    return x, w, stride, padding, groups


@pytest.mark.parametrize("name", [c[0] for c in FORMS])
def test_bfloat16_form_accumulates_in_float32(name):
    x, w, stride, padding, groups = _case(name)
    want = C.reference_conv3d(x.astype(jnp.float64), w.astype(jnp.float64), stride, padding, groups)
    fast = jax.jit(lambda a, b: C.conv3d(a, b, stride, padding, groups, "fast"))
    got = fast(x.astype(BF16), w.astype(BF16))
    assert got.dtype == jnp.float32  # the accumulator itself, for the epilogue to round once
    assert got.shape == want.shape
    assert _rel(got, want) < 1e-5, _rel(got, want)


@pytest.mark.parametrize("name", ["pointwise-strided", "spatial-conv2d-strided", "spatial-patches",
                                  "spatial-rows-strided", "spatial-rows-frame-loop",
                                  "spatial-rows-frame-loop-strided", "temporal-taps", "temporal-conv2d",
                                  "dense"])
def test_bfloat16_gradients_against_float32_autodiff_of_the_reference(name):
    x, w, stride, padding, groups = _case(name)
    shape = jax.eval_shape(lambda a, b: C.reference_conv3d(a, b, stride, padding, groups), x, w).shape
    r = _exact(shape, 2)  # a bfloat16-exact cotangent

    def grads(impl, dtype):
        def loss(a, b):
            return jnp.sum(C.conv3d(a, b, stride, padding, groups, impl).astype(jnp.float32) * r)
        return jax.jit(jax.grad(loss, argnums=(0, 1)))(x.astype(dtype), w.astype(dtype))

    for got, want in zip(grads("fast", BF16), grads("reference", jnp.float32), strict=True):
        assert got.dtype == BF16
        # exact products summed in float32, then one rounding to bfloat16 (2^-8 relative)
        assert _rel(got, want) < 8e-3, _rel(got, want)


def _dots(jaxpr):
    """Every dot_general of a jaxpr, inside custom rules and jitted calls too."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            yield eqn
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", param)
            if hasattr(inner, "eqns"):
                yield from _dots(inner)


@pytest.mark.parametrize("name", ["pointwise", "spatial-patches", "spatial-rows", "temporal-taps"])
def test_bfloat16_forward_and_backward_products_are_float32_accumulating_bfloat16_dots(name):
    x, w, stride, padding, groups = _case(name)

    def loss(a, b):
        return jnp.sum(C.conv3d(a, b, stride, padding, groups, "fast"))

    jaxpr = jax.make_jaxpr(jax.value_and_grad(loss, argnums=(0, 1)))(x.astype(BF16), w.astype(BF16))
    dots = list(_dots(jaxpr.jaxpr))
    assert len(dots) >= 3  # forward, input gradient, weight gradient
    for eqn in dots:
        assert [v.aval.dtype for v in eqn.invars] == [BF16, BF16], eqn
        assert eqn.params["preferred_element_type"] == jnp.float32, eqn


def test_cpu_without_bfloat16_instructions_computes_in_float32(monkeypatch):
    x, w, stride, padding, groups = _case("pointwise")
    monkeypatch.setattr(C, "cpu_has_bfloat16", lambda: False)
    jaxpr = str(jax.make_jaxpr(lambda a, b: C.conv3d(a, b, stride, padding, groups, "auto:cpu"))(
        x.astype(BF16), w.astype(BF16)))
    assert "bf16[2,3,5,6,24] = convert" not in jaxpr and "f32[2,3,5,6,24] = convert_element_type" in jaxpr
    # a CUDA target keeps bfloat16 whatever this host's CPU is
    cuda = str(jax.make_jaxpr(lambda a, b: C.conv3d(a, b, stride, padding, groups, "auto:cuda"))(
        x.astype(BF16), w.astype(BF16)))
    assert "f32[2,3,5,6,24] = convert_element_type" not in cuda
    monkeypatch.setattr(C, "cpu_has_bfloat16", lambda: True)
    native = str(jax.make_jaxpr(lambda a, b: C.conv3d(a, b, stride, padding, groups, "auto:cpu"))(
        x.astype(BF16), w.astype(BF16)))
    assert "f32[2,3,5,6,24] = convert_element_type" not in native


def test_cpu_flags_are_read_from_proc_cpuinfo():
    flags = Path("/proc/cpuinfo")
    if not flags.exists():
        assert _HOST_HAS_BFLOAT16() is False
        return
    words = set(next(line for line in flags.read_text().splitlines() if line.startswith("flags")).split())
    assert _HOST_HAS_BFLOAT16() == bool(words & set(C.BF16_CPU_FLAGS))


def test_bfloat16_model_on_a_cpu_without_bfloat16_instructions_is_the_float32_model(monkeypatch):
    """There every product runs in float32 anyway: the whole model computes in float32, so its
    stage outputs, logits and training gradients are bit for bit the float32 model's, and nothing
    in the step is bfloat16. An export still traces bfloat16 (`traced_for_any_cpu`)."""
    from flax import nnx

    from vmz_jax.models import build

    monkeypatch.setattr(C, "cpu_has_bfloat16", lambda: False)
    x = jnp.asarray(np.random.default_rng(5).standard_normal((2, 4, 16, 16, 3)), jnp.float32)
    # ir_csn_26: ConvBN (where the dtype is chosen) in every position, a scanned stage, the max pool
    low, full = (build("ir_csn_26", 5, dtype=d, rngs=nnx.Rngs(3)) for d in (BF16, jnp.float32))
    from vmz_jax.models.forward import make_forward

    for model in (low, full):
        model.eval()
    got, want = make_forward(low, "stages")(x), make_forward(full, "stages")(x)
    assert set(got) == set(want) and np.abs(np.asarray(want["logits"])).max() > 0
    for name in want:
        assert got[name].dtype == jnp.float32, name
        np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(want[name]), err_msg=name)

    def loss(model):
        logits = model(x)
        return jnp.mean(jax.nn.log_softmax(logits)[:, 1] * logits[:, 2])

    def step(model):
        model.train()
        graphdef, state = nnx.split(model)
        return lambda state: nnx.value_and_grad(loss)(nnx.merge(graphdef, state)), state

    fn, state = step(low)
    assert "bf16" not in str(jax.make_jaxpr(fn)(state))
    for a, b in zip(jax.tree.leaves(jax.jit(fn)(state)), jax.tree.leaves(jax.jit(step(full)[0])(state)),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with C.traced_for_any_cpu():
        assert C.compute_dtype(BF16, "auto:cpu") == BF16
        assert "bf16" in str(jax.make_jaxpr(lambda s: fn(s))(state))  # a new function: not jit's cached trace
    assert C.compute_dtype(BF16, "auto:cpu") == jnp.float32 and C.compute_dtype(BF16, "auto:cuda") == BF16


def _accuracy_module():
    path = Path(__file__).parent.parent / "benchmarks" / "bf16_accuracy.py"
    spec = importlib.util.spec_from_file_location("bf16_accuracy", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass resolves annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("arch", ["r2plus1d_10", "ir_csn_26"])
def test_bfloat16_logits_no_worse_than_torch_autocast(arch):
    row = _accuracy_module().measure(arch, (2, 4, 32, 32))
    assert 0 < row.ours_error < 0.05, row
    assert row.ours_error <= 1.5 * row.torch_error, row
    assert row.ours_top5 >= row.torch_top5 - 0.5, row


def test_bench_bfloat16_times_torch_autocast_and_our_float32(tmp_path, capsys):
    import json

    from vmz_jax.cli import main

    out = tmp_path / "bench.json"
    assert main(["bench", "r2plus1d_10", "--shape", "1x4x32x32", "--repeats", "1", "--dtype", "bfloat16",
                 "--torch-variants", "autocast", "autocast_channels_last_3d", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "bfloat16 dot peak" in printed and "| r2plus1d_10 | 1x4x32x32x3 | bfloat16 |" in printed
    (row,) = json.loads(out.read_text())
    assert row["dtype"] == "bfloat16" and row["jax_float32_s"] > 0
    assert set(row["torch_s"]) == {"autocast", "autocast_channels_last_3d"}


def test_data_movement_as_bits_is_bitwise_the_move_and_its_gradient_the_transpose():
    """Patches built on uint16 bits: bit for bit what moving the bfloat16 values gives (zeros, signed
    zeros, infinities, NaN kept), and the gradient is the move's own transpose."""
    x = jnp.asarray(np.random.default_rng(7).standard_normal((2, 3, 9, 8, 5)), BF16)
    x = x.at[0, 0, 0, 0, :3].set(jnp.asarray([-0.0, jnp.inf, jnp.nan], BF16))
    patches = C.spatial_patches(x, 3, 3, 2, 1, 1, 1)
    plain = jnp.concatenate([jnp.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1), (0, 0)))[
        :, :, b:b + 2 * 4 + 1:2, d:d + 8, :] for b in range(3) for d in range(3)], axis=-1)
    assert patches.dtype == BF16 and patches.shape == plain.shape == (2, 3, 5, 8, 45)
    np.testing.assert_array_equal(np.asarray(jax.lax.bitcast_convert_type(patches, jnp.uint16)),
                                  np.asarray(jax.lax.bitcast_convert_type(plain, jnp.uint16)))
    x = jnp.asarray(np.random.default_rng(8).standard_normal((2, 3, 9, 8, 5)), BF16)
    ours = jax.vjp(lambda v: C.row_patches(v, 3, 2, 1, 1), x)
    move = jax.vjp(lambda v: C.row_patches(v.astype(jnp.float32), 3, 2, 1, 1), x)  # float32: no bits
    g = jnp.asarray(np.random.default_rng(9).standard_normal(ours[0].shape), BF16)
    np.testing.assert_array_equal(np.asarray(ours[0], np.float32), np.asarray(move[0]))
    np.testing.assert_allclose(np.asarray(ours[1](g)[0], np.float32),
                               np.asarray(move[1](g.astype(jnp.float32))[0], np.float32),
                               rtol=1e-2, atol=1e-2)


def test_scanned_blocks_keep_bfloat16_residuals_as_bits_with_the_same_gradients(monkeypatch):
    """The bfloat16 scan body's residuals are stored as uint16 (XLA CPU's bfloat16 stack updates
    were whole-stack converts): the loss and every gradient are bit for bit those of the plain scan."""
    from flax import nnx

    from vmz_jax.models import build, resnet

    x = jnp.asarray(np.random.default_rng(5).standard_normal((2, 4, 16, 16, 3)), jnp.float32)

    def loss(model):
        logits = model(x).astype(jnp.float32)
        return jnp.mean(jax.nn.log_softmax(logits)[:, 1] * logits[:, 2])

    def run():
        model = build("ir_csn_26", 5, dtype=BF16, rngs=nnx.Rngs(3))  # stages of 2 blocks: one scanned
        model.train()
        value, grads = nnx.jit(nnx.value_and_grad(loss))(model)
        return [np.asarray(value)] + [np.asarray(g) for g in jax.tree.leaves(grads)]

    called = []
    wrap = resnet.residuals_as_bits
    monkeypatch.setattr(resnet, "residuals_as_bits", lambda body: called.append(1) or wrap(body))
    bits = run()
    monkeypatch.setattr(resnet, "residuals_as_bits", lambda body: body)
    plain = run()
    assert called and len(bits) == len(plain) > 20
    assert any(np.abs(g).max() > 0 for g in plain[1:])
    for a, b in zip(bits, plain, strict=True):
        np.testing.assert_array_equal(a, b)


def _loop_outputs(jaxpr):
    """The output dtypes of every loop (scan, the frame loops' lax.map) of a jaxpr, nested ones too."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan":
            yield [v.aval.dtype for v in eqn.outvars]
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", param)
            if hasattr(inner, "eqns"):
                yield from _loop_outputs(inner)


@pytest.mark.parametrize("name", ["spatial-rows-frame-loop", "spatial-rows-frame-loop-strided",
                                  "spatial-rows", "pointwise", "temporal-taps", "dense"])
def test_bfloat16_epilogue_is_applied_inside_the_frame_loop(name):
    """`conv3d(epilogue=)`: the result is the epilogue of the convolution (float32 accumulation, one
    rounding to bfloat16), and where the form loops over frames the loop itself stacks the epilogue's
    bfloat16 output, not the float32 accumulator."""
    x, w, stride, padding, groups = _case(name)
    cout = w.shape[-1]
    shift = np.linspace(-1.0, 1.0, cout)

    def epilogue(y):
        return jax.nn.relu(y.astype(jnp.float32) + shift.astype(np.float32)).astype(BF16)

    want = np.maximum(np.asarray(C.reference_conv3d(x.astype(jnp.float64), w.astype(jnp.float64), stride,
                                                    padding, groups)) + shift, 0)
    fn = jax.jit(lambda a, b: C.conv3d(a, b, stride, padding, groups, "fast", epilogue))
    got = fn(x.astype(BF16), w.astype(BF16))
    assert got.dtype == BF16 and got.shape == want.shape
    assert 0 < (np.asarray(got, np.float32) == 0).mean() < 0.9  # the ReLU did cut, not everything
    assert _rel(got, want) < 8e-3, _rel(got, want)
    loops = list(_loop_outputs(jax.make_jaxpr(fn)(x.astype(BF16), w.astype(BF16)).jaxpr))
    if "frame-loop" in name:
        assert loops and all(dtypes == [BF16] for dtypes in loops), loops
    else:
        assert not loops


def test_frame_loop_takes_frames_in_steps_or_one_by_one(monkeypatch):
    """`frames_by_rows` runs `FRAMES_PER_STEP[cpu_kind]` frames per iteration (AMX: 2), or one where
    that does not divide the frame count or the CPU has no entry; the same values either way, and its
    gradients follow the reference's."""
    x = _exact((3, 30, 31, 64), 4)
    w = _exact((3, 3, 64, 8), 5, 0.2)
    want = C.reference_conv3d(x[:, None].astype(jnp.float64), w[None].astype(jnp.float64), (1, 1, 1),
                              (0, 1, 1))[:, 0]

    def loop(a, b):
        return C.frames_by_rows(a, b, (1, 1), (1, 1))

    iterations = {}
    for kind in ("amx", "avx512_bf16"):
        monkeypatch.setattr(C, "cpu_kind", lambda kind=kind: kind)
        for frames in (x[:2], x):
            args = (frames.astype(BF16), w.astype(BF16))
            traced = jax.make_jaxpr(lambda a, b: loop(a, b))(*args)  # a new function: traced anew
            (scan,) = [e for e in traced.jaxpr.eqns if e.primitive.name == "scan"]
            iterations[kind, len(frames)] = scan.params["length"]
            got = jax.jit(lambda a, b: loop(a, b))(*args)
            assert got.dtype == jnp.float32 and _rel(got, want[:len(frames)]) < 1e-5
    assert iterations == {("amx", 2): 1, ("amx", 3): 3, ("avx512_bf16", 2): 2, ("avx512_bf16", 3): 3}
    r = _exact(want.shape, 6)

    def grads(fn, dtype):
        return jax.jit(jax.grad(lambda a, b: jnp.sum(fn(a, b).astype(jnp.float32) * r), argnums=(0, 1)))(
            x.astype(dtype), w.astype(dtype))

    ref = grads(lambda a, b: C.reference_conv3d(a[:, None], b[None], (1, 1, 1), (0, 1, 1))[:, 0], jnp.float32)
    for got, want_g in zip(grads(loop, BF16), ref, strict=True):
        assert _rel(got, want_g) < 8e-3, _rel(got, want_g)


def test_amx_cpu_takes_one_dot_per_temporal_tap_on_larger_frames(monkeypatch):
    """On an AMX CPU bfloat16 temporal convolutions on frames up to `BF16_TEMPORAL_DOT_FRAME["amx"]`
    are float32-accumulating dots, one per tap, where other CPUs take XLA's convolution."""
    x, w, stride, padding, groups = _case("temporal-conv2d")  # 30x30 frames: above BF16_DOT_FRAME
    assert x.shape[2] * x.shape[3] > C.BF16_DOT_FRAME
    want = C.reference_conv3d(x.astype(jnp.float64), w.astype(jnp.float64), stride, padding, groups)
    kinds = {}
    for kind in ("avx512_bf16", "amx"):
        monkeypatch.setattr(C, "cpu_kind", lambda kind=kind: kind)
        fn = jax.jit(lambda a, b: C.conv3d(a, b, stride, padding, groups, "fast"))
        jaxpr = jax.make_jaxpr(fn)(x.astype(BF16), w.astype(BF16))
        kinds[kind] = (len(list(_dots(jaxpr.jaxpr))), "conv_general_dilated" in str(jaxpr))
        assert _rel(fn(x.astype(BF16), w.astype(BF16)), want) < 1e-5
    assert kinds == {"avx512_bf16": (0, True), "amx": (3, False)}, kinds
    with C.traced_for_any_cpu():  # an export runs on other CPUs: the general choice, not this host's
        jaxpr = jax.make_jaxpr(lambda a, b: C.conv3d(a, b, stride, padding, groups, "fast"))(
            x.astype(BF16), w.astype(BF16))
    assert "conv_general_dilated" in str(jaxpr) and not list(_dots(jaxpr.jaxpr))


def test_folded_forward_with_frame_loop_epilogues_equals_the_per_call_fold(monkeypatch):
    """make_forward's folded copy passes its BatchNorm shift and ReLU into the frame loops (R(2+1)D's
    spatial convolutions): the same bfloat16 logits as the model folding on every call, which applies
    them after the convolution."""
    from tests.parity import make_pair
    from vmz_jax.models.forward import make_forward

    monkeypatch.setattr(C, "BF16_DOT_FRAME", 8 * 8)  # layer1's 16x16 frames take the frame loop
    called = []
    loop = C.frames_by_rows
    def counted(*args):
        called.append(len(args) > 4 and args[4] is not None)  # given an epilogue
        return loop(*args)

    monkeypatch.setattr(C, "frames_by_rows", counted)
    _, model = make_pair("r2plus1d_10", seed=4, num_classes=5, dtype=BF16)
    x = jnp.asarray(np.random.default_rng(5).standard_normal((2, 4, 32, 32, 3)), jnp.float32)
    folded = np.asarray(make_forward(model, "logits")(x), np.float64)
    assert called and all(called)  # every spatial layer of layer1, with its epilogue
    called.clear()
    per_call = np.asarray(make_forward(model, "logits", fold_batchnorm=False)(x), np.float64)
    assert called and not any(called)
    assert np.abs(per_call).max() > 0.1
    assert _rel(folded, per_call) < 1e-6
