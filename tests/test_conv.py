"""Every fast convolution form equals the plain lax 3-D convolution, in value and in gradient.

Gradients are taken under `jax.jit`, as training takes them: the fast forms' reverse-mode rules
(custom VJPs in `conv.conv2d`) must agree with the autodiff of the plain convolution.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vmz_jax.models import conv as C

CASES = [
    # (name, cin, cout, kernel, stride, padding, groups)
    ("pointwise", 6, 10, (1, 1, 1), (1, 1, 1), (0, 0, 0), 1),
    ("pointwise-strided", 6, 10, (1, 1, 1), (2, 2, 2), (0, 0, 0), 1),
    ("spatial", 5, 7, (1, 3, 3), (1, 1, 1), (0, 1, 1), 1),
    ("spatial-strided", 5, 7, (1, 3, 3), (1, 2, 2), (0, 1, 1), 1),
    ("spatial-7x7-stem", 3, 8, (1, 7, 7), (1, 2, 2), (0, 3, 3), 1),
    ("temporal", 5, 7, (3, 1, 1), (1, 1, 1), (1, 0, 0), 1),
    ("temporal-strided", 5, 7, (3, 1, 1), (2, 1, 1), (1, 0, 0), 1),
    ("depthwise", 8, 8, (3, 3, 3), (1, 1, 1), (1, 1, 1), 8),
    ("depthwise-strided", 8, 8, (3, 3, 3), (2, 2, 2), (1, 1, 1), 8),
    ("depthwise-spatial-stride", 8, 8, (3, 3, 3), (1, 2, 2), (1, 1, 1), 8),
    ("dense", 4, 6, (3, 3, 3), (2, 2, 2), (1, 1, 1), 1),
    ("grouped", 8, 12, (3, 3, 3), (1, 1, 1), (1, 1, 1), 4),
    ("full-time-stem", 3, 6, (4, 7, 7), (1, 2, 2), (0, 3, 3), 1),
    ("dense-wide-strided", 40, 6, (3, 3, 3), (2, 2, 2), (1, 1, 1), 1),
    ("csn-stem", 3, 8, (3, 7, 7), (1, 2, 2), (1, 3, 3), 1),
    ("spatial-small-frame", 64, 8, (1, 3, 3), (1, 1, 1), (0, 1, 1), 1),
    ("spatial-small-frame-strided", 64, 8, (1, 3, 3), (1, 2, 2), (0, 1, 1), 1),
]
# (T, H, W) per case where the default clip would not reach a code path.
SIZES = {"temporal-short": (1, 5, 5), "temporal-short-strided": (3, 5, 5),
         "temporal-strided-two": (4, 5, 5)}
CASES += [
    ("temporal-short", 6, 9, (3, 1, 1), (1, 1, 1), (1, 0, 0), 1),
    ("temporal-short-strided", 6, 9, (3, 1, 1), (2, 1, 1), (1, 0, 0), 1),
    ("temporal-strided-two", 6, 9, (3, 1, 1), (2, 1, 1), (1, 0, 0), 1),
    # padding wider than the kernel reach: the stride-1 input gradient pads negatively
    ("pointwise-padded", 4, 5, (1, 1, 1), (1, 1, 1), (0, 1, 1), 1),
    ("temporal-wide-pad", 5, 7, (3, 1, 1), (1, 1, 1), (2, 0, 0), 1),
    ("spatial-strided-wide-pad", 5, 7, (1, 3, 3), (1, 2, 2), (0, 2, 2), 1),
    ("dense-wide", 40, 6, (3, 3, 3), (1, 1, 1), (1, 1, 1), 1),
    ("depthwise-uneven", 6, 6, (3, 1, 3), (2, 1, 1), (0, 0, 1), 6),
    ("depthwise-wide-pad", 6, 6, (1, 3, 3), (1, 2, 1), (1, 1, 1), 6),
]


def _random(shape, seed, dtype):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 5e-5), (jnp.float64, 1e-12)])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_fast_equals_reference(case, dtype, tol):
    name, cin, cout, kernel, stride, padding, groups = case
    # odd, non-cubic sizes exercise the padding
    x = _random((2, *SIZES.get(name, (7, 9, 11)), cin), 0, dtype)
    w = _random((*kernel, cin // groups, cout), 1, dtype)

    @jax.jit
    def both(x, w):
        def loss(impl):
            def f(x, w):
                y = C.conv3d(x, w, stride, padding, groups, impl)
                return jnp.sum(jnp.sin(y)), y
            return jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(x, w)
        return loss("reference"), loss("fast")

    ((_, y_ref), (gx_ref, gw_ref)), ((_, y_fast), (gx_fast, gw_fast)) = both(x, w)
    assert y_fast.shape == y_ref.shape and y_fast.dtype == y_ref.dtype
    for got, want in [(y_fast, y_ref), (gx_fast, gx_ref), (gw_fast, gw_ref)]:
        err = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
        assert err < tol, err


def test_depthwise_bfloat16_accumulates_in_float32():
    x = _random((1, 4, 6, 6, 16), 0, jnp.float32)
    w = _random((3, 3, 3, 1, 16), 1, jnp.float32)
    want = C.reference_conv3d(x, w, (1, 1, 1), (1, 1, 1), 16)
    got = C.depthwise_conv3d(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), (1, 1, 1), (1, 1, 1))
    assert got.dtype == jnp.bfloat16
    assert float(jnp.max(jnp.abs(got.astype(jnp.float32) - want)) / jnp.max(jnp.abs(want))) < 2e-2


def test_auto_resolves_per_platform_and_form(monkeypatch):
    row = {**C.AUTO_IMPL[jax.default_backend()], "depthwise": "reference"}
    monkeypatch.setitem(C.AUTO_IMPL, jax.default_backend(), row)
    assert C.resolve_impl("auto", "depthwise") == "reference"
    assert C.resolve_impl("auto", "pointwise") == row["pointwise"]
    assert [C.resolve_impl("auto:cuda", f) for f in ("depthwise", "pointwise", "dense")] == [
        "fast", "reference", "reference"]
    assert C.resolve_impl("fast", "dense") == "fast" and C.resolve_impl("auto:metal", "dense") == "reference"
    with pytest.raises(ValueError, match="unknown conv implementation"):
        C.resolve_impl("winograd", "dense")
    # the switch reaches conv3d: a depthwise layer is one grouped lax convolution, or none
    x, w = jnp.zeros((1, 4, 6, 6, 8)), jnp.zeros((3, 3, 3, 1, 8))
    grouped = str(jax.make_jaxpr(lambda a, b: C.conv3d(a, b, (1, 1, 1), (1, 1, 1), 8))(x, w))
    assert "feature_group_count=8" in grouped
    row["depthwise"] = "fast"
    shifted = str(jax.make_jaxpr(lambda a, b: C.conv3d(a, b, (1, 1, 1), (1, 1, 1), 8))(x, w))
    assert "conv_general_dilated" not in shifted


@pytest.mark.parametrize("kernel, padding, groups, cin, form", [
    ((1, 1, 1, 8, 16), (0, 0, 0), 1, 8, "pointwise"), ((1, 3, 3, 8, 16), (0, 1, 1), 1, 8, "spatial"),
    ((3, 1, 1, 8, 16), (1, 0, 0), 1, 8, "temporal"), ((3, 3, 3, 1, 8), (1, 1, 1), 8, 8, "depthwise"),
    ((3, 3, 3, 2, 8), (1, 1, 1), 4, 8, "grouped"), ((3, 3, 3, 8, 16), (1, 1, 1), 1, 8, "dense"),
    ((1, 1, 1, 8, 16), (0, 1, 1), 1, 8, "spatial"), ((3, 7, 7, 3, 64), (1, 3, 3), 1, 3, "dense")])
def test_conv_form(kernel, padding, groups, cin, form):
    assert C.conv_form(cin, kernel, padding, groups) == form


def test_max_pool_pads_with_minus_infinity():
    x = -jnp.abs(_random((1, 1, 4, 4, 2), 0, jnp.float32)) - 1.0
    y = C.max_pool3d(x, (1, 3, 3), (1, 2, 2), (0, 1, 1))
    assert y.shape == (1, 1, 2, 2, 2)
    assert float(y.max()) < 0  # zero padding would have produced zeros


@pytest.mark.parametrize("patch_bytes", [None, 1], ids=["one-block", "image-blocks"])
@pytest.mark.parametrize("stride", [(1, 1), (2, 2), (2, 1)])
def test_conv2d_gradient_against_autodiff_of_the_plain_conv(stride, patch_bytes, monkeypatch):
    """The weight gradient (patches x cotangent, at once or summed over blocks of images) and both
    input-gradient forms (flipped-kernel convolution, strided fold-back) against autodiff of the
    plain 2-D convolution, in float64."""
    if patch_bytes is not None:
        monkeypatch.setattr(C, "PATCH_BYTES", patch_bytes)
    x = _random((3, 9, 8, 5), 0, jnp.float64)
    w = _random((3, 2, 5, 4), 1, jnp.float64)
    padding = (1, 0)

    @jax.jit
    def grads(x, w):
        def f(conv):
            return lambda x, w: jnp.sum(jnp.cos(conv(x, w, stride, padding)) * jnp.arange(4.0))
        return (jax.grad(f(C._conv2d_lax), (0, 1))(x, w), jax.grad(f(C.conv2d), (0, 1))(x, w))

    want, got = grads(x, w)
    for g, r in zip(got, want, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-12, atol=1e-12)


def test_conv2d_bfloat16_gradients_within_one_rounding():
    # bfloat16-exact inputs and cotangent: what is left is the rounding of the gradients' sums
    x = _random((4, 12, 12, 16), 0, jnp.bfloat16)
    w = _random((3, 3, 16, 8), 1, jnp.bfloat16)
    r = _random((4, 12, 12, 8), 2, jnp.bfloat16)

    def grads(x, w):
        # the output is the float32 accumulator for bfloat16 inputs too
        return jax.vjp(lambda x, w: C.conv2d(x, w, (1, 1), (1, 1)), x, w)[1](r.astype(jnp.float32))

    want = jax.jit(grads)(x.astype(jnp.float32), w.astype(jnp.float32))
    got = jax.jit(grads)(x, w)
    for g, ref in zip(got, want, strict=True):
        assert g.dtype == jnp.bfloat16
        # about one final rounding to bfloat16 (2^-8 relative): the sums run in float32
        assert float(jnp.max(jnp.abs(g.astype(jnp.float32) - ref) / (jnp.abs(ref) + 1.0))) < 8e-3


def _max_pool_numpy(x, kernel, stride, padding):
    """Max-pool and its gradient by explicit argmax (torch's rule: the first maximum takes it)."""
    n, t, h, w, c = x.shape
    xp = np.pad(x, ((0, 0), *((p, p) for p in padding), (0, 0)), constant_values=-np.inf)
    out_shape = [C.out_size(*args) for args in zip((t, h, w), kernel, stride, padding, strict=True)]
    y = np.empty((n, *out_shape, c))
    grad = np.zeros_like(xp)
    for i in np.ndindex(*out_shape):
        lo = [a * s for a, s in zip(i, stride, strict=True)]
        win = xp[:, lo[0]:lo[0] + kernel[0], lo[1]:lo[1] + kernel[1], lo[2]:lo[2] + kernel[2]]
        flat = win.reshape(n, -1, c)
        y[:, i[0], i[1], i[2]] = flat.max(1)
        arg = flat.argmax(1)
        for b in range(n):
            for ch in range(c):
                dt, dh, dw = np.unravel_index(arg[b, ch], kernel)
                grad[b, lo[0] + dt, lo[1] + dh, lo[2] + dw, ch] += 1.0
    pt, ph, pw = padding
    return y, grad[:, pt:pt + t, ph:ph + h, pw:pw + w]


@pytest.mark.parametrize("kernel,stride,padding", [((1, 3, 3), (1, 2, 2), (0, 1, 1)),
                                                   ((3, 3, 3), (2, 2, 2), (1, 1, 1)),
                                                   ((2, 3, 1), (1, 2, 1), (0, 1, 0))])
def test_max_pool_value_and_gradient_under_jit(kernel, stride, padding):
    # distinct values: the argmax is unique, so every correct rule gives the same gradient
    x = np.random.default_rng(0).permutation(2 * 5 * 7 * 6 * 3).reshape(2, 5, 7, 6, 3) / 7.0 - 20.0
    want_y, want_grad = _max_pool_numpy(x, kernel, stride, padding)
    y, grad = jax.jit(lambda x: (C.max_pool3d(x, kernel, stride, padding),
                                 jax.grad(lambda x: C.max_pool3d(x, kernel, stride, padding).sum())(x)))(
        jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(y), want_y)
    np.testing.assert_array_equal(np.asarray(grad), want_grad)


@pytest.mark.slow  # 2-3 minutes per model on the loaded 2-core VM (two whole-model compiles)
@pytest.mark.parametrize("arch", ["r2plus1d_10", "ir_csn_26", "r3d_10"])
def test_model_gradients_fast_equal_reference(arch):
    """Whole train-mode models in float64: every fast form's rule, inside scanned blocks, the stem
    pool and the strided stages, gives the gradients of the plain 3-D convolutions."""
    import optax
    from flax import nnx

    from vmz_jax.models import build

    x = _random((2, 4, 20, 20, 3), 0, jnp.float64)
    labels = jnp.array([1, 3])
    grads = {}
    for impl in ("reference", "fast"):
        model = build(arch, 5, dtype=jnp.float64, param_dtype=jnp.float64, conv_impl=impl,
                      clip_length=4)
        model.train()
        params = nnx.state(model, nnx.Param)
        rng = np.random.default_rng(7)  # non-trivial BN scales and biases, the same for both
        nnx.update(model, jax.tree.map(
            lambda p, rng=rng: p + 0.3 * jnp.asarray(rng.standard_normal(p.shape)) * (jnp.std(p) + 0.5),
            params))

        def loss(m):
            return optax.softmax_cross_entropy_with_integer_labels(m(x), labels).mean()

        grads[impl] = jax.tree.leaves(nnx.jit(nnx.grad(loss))(model))
    assert len(grads["fast"]) == len(grads["reference"])
    for got, want in zip(grads["fast"], grads["reference"], strict=True):
        scale = float(jnp.max(jnp.abs(want))) or 1.0
        assert float(jnp.max(jnp.abs(got - want))) / scale < 1e-9


def _ynn_convolutions(hlo_text: str) -> int:
    """YNNPACK fusions made from a convolution, in an optimized HLO module's text."""
    return sum(1 for line in hlo_text.splitlines()
               if "__ynn_fusion" in line and 'conv_general_dilated"' in line)


def test_compiler_options_follow_the_cpu_kind(monkeypatch):
    monkeypatch.setattr(C, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    assert C.cpu_kind() == "other" and C.compiler_options("cpu") == {}
    monkeypatch.setattr(C, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    assert C.cpu_kind() == "avx512_bf16" and C.compiler_options("cpu") == {}
    monkeypatch.setattr(C, "cpu_flags", lambda: frozenset({"avx512_bf16", "amx_bf16", "amx_tile"}))
    assert C.cpu_kind() == "amx"
    assert C.compiler_options("cuda") == {}  # another platform's function: not this CPU's kernels
    with jax.enable_x64(False):  # the suite enables float64; without it Eigen takes the convolutions
        options = C.compiler_options("cpu")
    if C._xla_takes(tuple(C._EIGEN_CONVOLUTIONS.items())):
        assert options == C._EIGEN_CONVOLUTIONS
    else:  # a jaxlib without YNNPACK options compiles as it always did
        assert options == {}
    with jax.enable_x64(True):  # float64 possible: Eigen's float64 convolutions are far slower
        assert C.compiler_options("cpu") == {}
    monkeypatch.setitem(C.CPU_CONVOLUTIONS, "amx", "ynnpack")
    with jax.enable_x64(False):
        assert C.compiler_options("cpu") == {}
        monkeypatch.setitem(C.CPU_CONVOLUTIONS, "amx", "onednn")
        with pytest.raises(ValueError, match="'eigen' or 'ynnpack'"):
            C.compiler_options("cpu")


def test_forward_and_step_compile_with_the_chosen_convolution_kernels(monkeypatch):
    """On an "eigen" CPU, `make_forward` and the training step leave XLA's convolutions to Eigen (none
    is a YNNPACK fusion) with the same logits as XLA's default kernels; elsewhere nothing changes."""
    import optax
    from flax import nnx

    from tests.parity import make_pair
    from vmz_jax.models.forward import make_forward
    from vmz_jax.train.step import lower_train_step

    if not C._xla_takes(tuple(C._EIGEN_CONVOLUTIONS.items())):
        pytest.skip("this jaxlib has no YNNPACK fusion options")
    # random weights and BatchNorm statistics; its 3-channel stem stays a lax convolution
    _, model = make_pair("r2plus1d_10", seed=2, num_classes=5)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 4, 32, 32, 3)), jnp.float32)
    texts, logits = {}, {}
    monkeypatch.setattr(C, "_float64_possible", lambda: False)  # the suite enables float64
    for kind, flags in (("other", {"avx2"}), ("amx", {"amx_bf16"})):
        monkeypatch.setattr(C, "cpu_flags", lambda flags=flags: frozenset(flags))
        forward = make_forward(model, "logits")
        texts[kind] = forward.lower(x).compile().as_text()
        logits[kind] = np.asarray(forward(x), np.float64)
    assert _ynn_convolutions(texts["amx"]) == 0
    assert texts["amx"].count(" convolution(") >= 2  # the stem's two (2+1)D halves, at least
    default_uses_ynn = _ynn_convolutions(jax.jit(lambda x, w: C._conv2d_lax(x, w, (1, 1), (1, 1))).lower(
        jnp.ones((1, 8, 8, 32)), jnp.ones((3, 3, 32, 32))).compile().as_text()) > 0
    assert (_ynn_convolutions(texts["other"]) > 0) == default_uses_ynn
    scale = np.abs(logits["other"]).max()
    assert scale > 0.1 and np.abs(logits["amx"] - logits["other"]).max() < 1e-5 * scale
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
    model.train()
    step = lower_train_step(model, optimizer, x, jnp.zeros((2,), jnp.int32)).compile().as_text()
    assert _ynn_convolutions(step) == 0 and " convolution(" in step
