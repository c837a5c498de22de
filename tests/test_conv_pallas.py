"""The Pallas depthwise kernel (`vmz_jax.models.conv_pallas`), run by Pallas' interpreter on CPU: forward
and both gradients equal the plain `lax` convolution in float64."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vmz_jax.models.conv import conv3d, reference_conv3d, resolve_impl


def rel(a, b) -> float:
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


@pytest.mark.parametrize(("shape", "kernel", "stride", "padding"), [
    ((2, 3, 5, 6, 5), (3, 3, 3), (1, 1, 1), (1, 1, 1)),    # channels and frame not whole tiles
    ((1, 4, 9, 10, 40), (3, 3, 3), (2, 2, 2), (1, 1, 1)),  # strided, channels over one block
    ((1, 3, 4, 4, 8), (3, 1, 3), (1, 1, 1), (1, 0, 0)),    # another kernel, unpadded axes
])
def test_pallas_depthwise_equals_reference_in_float64(shape, kernel, stride, padding):
    rng = np.random.default_rng(sum(shape))
    c = shape[-1]
    x = jnp.asarray(rng.standard_normal(shape), jnp.float64)
    w = jnp.asarray(rng.standard_normal((*kernel, 1, c)), jnp.float64)

    def ours(x, w):
        return conv3d(x, w, stride, padding, c, impl="pallas")

    def reference(x, w):
        return reference_conv3d(x, w, stride, padding, c)

    y, y_ref = ours(x, w), reference(x, w)
    assert y.dtype == jnp.float64 and y.shape == y_ref.shape
    assert rel(y, y_ref) < 1e-12
    g = jnp.asarray(rng.standard_normal(y_ref.shape), jnp.float64)
    gx, gw = jax.vjp(ours, x, w)[1](g)
    rx, rw = jax.vjp(reference, x, w)[1](g)
    assert rel(gx, rx) < 1e-12 and rel(gw, rw) < 1e-12


def test_kernel_names_resolve_per_form():
    assert resolve_impl("pallas", "depthwise") == "pallas"
    assert resolve_impl("pallas", "pointwise") == "reference"  # no kernel for that form


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_pallas_depthwise_lowers_to_triton_for_cuda(monkeypatch, dtype):
    """Without a GPU: the forward and both gradients lower, for CUDA, to Triton kernels (the interpreter
    proves the arithmetic, this that the kernels are ones Triton's lowering accepts)."""
    from vmz_jax.models import conv_pallas

    monkeypatch.setattr(conv_pallas.jax, "default_backend", lambda: "gpu")  # pick Triton, not the interpreter
    x = jax.ShapeDtypeStruct((2, 8, 28, 28, 128), dtype)
    w = jax.ShapeDtypeStruct((3, 3, 3, 1, 128), dtype)

    def step(x, w):
        y, vjp = jax.vjp(lambda x, w: conv_pallas.depthwise_conv3d_pallas(x, w, (2, 2, 2), (1, 1, 1)), x, w)
        return y, vjp(jnp.ones(y.shape, y.dtype))

    text = jax.jit(step).trace(x, w).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 3  # forward, input gradient, weight gradient


def test_a_cuda_row_naming_pallas_puts_the_kernel_in_every_depthwise_layer(monkeypatch):
    """An `AUTO_IMPL` row with depthwise "pallas": the whole training step of an ir-CSN, lowered for CUDA
    from this CPU host, runs the three kernels at every depthwise site (first and scanned blocks of the
    four stages) and nothing else through them."""
    import optax
    from flax import nnx

    from vmz_jax.models import build, conv, conv_pallas
    from vmz_jax.train import train_step

    monkeypatch.setattr(conv_pallas.jax, "default_backend", lambda: "gpu")
    monkeypatch.setitem(conv.AUTO_IMPL, "gpu", {**conv.AUTO_IMPL["gpu"], "depthwise": "pallas"})
    model = build("ir_csn_26", 400, conv_impl="auto:gpu", clip_length=4)
    model.train()
    optimizer = nnx.Optimizer(model, optax.sgd(1e-3, momentum=0.9), wrt=nnx.Param)
    step = nnx.jit(lambda m, o, c, y: train_step(m, o, c, y))
    clips = jax.ShapeDtypeStruct((2, 4, 32, 32, 3), jnp.float32)
    labels = jax.ShapeDtypeStruct((2,), jnp.int32)
    text = step.trace(model, optimizer, clips, labels).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 8 * 3  # 4 stages x (first + scanned) x 3 kernels
    assert set(re.findall(r"feature_group_count = (\d+)", text)) == {"1"}  # no grouped convolution left
