"""Every fast convolution form equals the plain lax 3-D convolution, in value and in gradient."""

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

    def loss(impl):
        def f(x, w):
            y = C.conv3d(x, w, stride, padding, groups, impl)
            return jnp.sum(jnp.sin(y)), y
        return jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(x, w)

    (_, y_ref), (gx_ref, gw_ref) = loss("reference")
    (_, y_fast), (gx_fast, gw_fast) = loss("fast")
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


def test_auto_resolves_per_backend(monkeypatch):
    monkeypatch.setitem(C.AUTO_IMPL, jax.default_backend(), "fast")
    assert C.resolve_impl("auto") == "fast"
    monkeypatch.setitem(C.AUTO_IMPL, jax.default_backend(), "reference")
    assert C.resolve_impl("auto") == "reference"
    with pytest.raises(ValueError, match="unknown conv implementation"):
        C.resolve_impl("winograd")


def test_max_pool_pads_with_minus_infinity():
    x = -jnp.abs(_random((1, 1, 4, 4, 2), 0, jnp.float32)) - 1.0
    y = C.max_pool3d(x, (1, 3, 3), (1, 2, 2), (0, 1, 1))
    assert y.shape == (1, 1, 2, 2, 2)
    assert float(y.max()) < 0  # zero padding would have produced zeros
