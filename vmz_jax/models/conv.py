"""3-D convolutions on NTHWC video tensors, each shape mapped to the fastest primitive per backend.

Every function here computes the same thing as `reference_conv3d`, the plain `lax` 3-D convolution;
tests check values and gradients. The fast forms exist because XLA's CPU backend runs 3-D and grouped
convolutions far below its 2-D convolution and dot speed (see docs/benchmarks.md):

* 1x1x1        -> a strided slice and one dot over channels;
* 1xkxk        -> a 2-D convolution over the N*T frames;
* kx1x1        -> a 2-D convolution over (T, H*W);
* depthwise    -> k^3 shifted multiply-adds that XLA fuses into one loop;
* dense kxkxk  -> the plain 3-D convolution.

`ConvImpl` is the one switch: "reference" always uses the plain convolution, "fast" the forms above,
"auto" picks per backend at trace time (see `AUTO_IMPL`).
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax

Triple = tuple[int, int, int]
ConvImpl = Literal["auto", "reference", "fast"]

# What "auto" means on each backend. On GPU cuDNN's grouped and 3-D convolutions are the fast path.
AUTO_IMPL: dict[str, str] = {"cpu": "fast", "gpu": "reference", "cuda": "reference",
                             "rocm": "reference", "tpu": "reference"}

_DIMS_3D = ("NDHWC", "DHWIO", "NDHWC")
_DIMS_2D = ("NHWC", "HWIO", "NHWC")


def resolve_impl(impl: str) -> str:
    """Turn "auto" into the concrete implementation for the default backend."""
    if impl == "auto":
        return AUTO_IMPL.get(jax.default_backend(), "reference")
    if impl not in ("reference", "fast"):
        raise ValueError(f"unknown conv implementation {impl!r}: use 'auto', 'reference' or 'fast'")
    return impl


def out_size(n: int, k: int, s: int, p: int) -> int:
    return (n + 2 * p - k) // s + 1


def reference_conv3d(x: jax.Array, w: jax.Array, stride: Triple, padding: Triple,
                     groups: int = 1) -> jax.Array:
    """Plain `lax` 3-D convolution with explicit symmetric padding (never 'SAME')."""
    return lax.conv_general_dilated(
        x, w, window_strides=stride, padding=[(p, p) for p in padding],
        dimension_numbers=_DIMS_3D, feature_group_count=groups)


def conv3d(x: jax.Array, w: jax.Array, stride: Triple, padding: Triple, groups: int = 1,
           impl: str = "auto") -> jax.Array:
    """Convolve `x` (N, T, H, W, Cin) with `w` (kT, kH, kW, Cin/groups, Cout)."""
    impl = resolve_impl(impl)
    kt, kh, kw, _, cout = w.shape
    if impl == "reference":
        return reference_conv3d(x, w, stride, padding, groups)
    if groups > 1:
        if groups == x.shape[-1] == cout and w.shape[3] == 1:
            return depthwise_conv3d(x, w, stride, padding)
        return reference_conv3d(x, w, stride, padding, groups)
    if (kt, kh, kw) == (1, 1, 1) and padding == (0, 0, 0):
        return pointwise_conv3d(x, w, stride)
    if kt == 1 and padding[0] == 0:
        return spatial_conv3d(x, w, stride, padding)
    if kh == kw == 1 and padding[1] == padding[2] == 0:
        return temporal_conv3d(x, w, stride, padding)
    return reference_conv3d(x, w, stride, padding)


def _subsample(x: jax.Array, st: int, sh: int, sw: int) -> jax.Array:
    if (st, sh, sw) == (1, 1, 1):
        return x
    return x[:, ::st, ::sh, ::sw, :]


def pointwise_conv3d(x: jax.Array, w: jax.Array, stride: Triple) -> jax.Array:
    x = _subsample(x, *stride)
    return jnp.einsum("nthwc,co->nthwo", x, w[0, 0, 0])


def spatial_conv3d(x: jax.Array, w: jax.Array, stride: Triple, padding: Triple) -> jax.Array:
    """A 1 x kH x kW convolution as a 2-D convolution over all N*T frames."""
    x = _subsample(x, stride[0], 1, 1)
    n, t, h, wd, c = x.shape
    y = lax.conv_general_dilated(
        x.reshape(n * t, h, wd, c), w[0], window_strides=stride[1:],
        padding=[(padding[1], padding[1]), (padding[2], padding[2])], dimension_numbers=_DIMS_2D)
    return y.reshape(n, t, *y.shape[1:])


def temporal_conv3d(x: jax.Array, w: jax.Array, stride: Triple, padding: Triple) -> jax.Array:
    """A kT x 1 x 1 convolution as a 2-D convolution over (T, H*W)."""
    x = _subsample(x, 1, stride[1], stride[2])
    n, t, h, wd, c = x.shape
    y = lax.conv_general_dilated(
        x.reshape(n, t, h * wd, c), w[:, 0], window_strides=(stride[0], 1),
        padding=[(padding[0], padding[0]), (0, 0)], dimension_numbers=_DIMS_2D)
    return y.reshape(n, y.shape[1], h, wd, y.shape[-1])


def depthwise_conv3d(x: jax.Array, w: jax.Array, stride: Triple, padding: Triple) -> jax.Array:
    """Depthwise convolution as kT*kH*kW shifted multiply-adds (one fused loop under jit).

    Low-precision inputs accumulate in float32: the products are summed in registers, so the wider
    accumulator costs no memory traffic.
    """
    n, t, h, wd, c = x.shape
    kt, kh, kw = w.shape[:3]
    st, sh, sw = stride
    to, ho, wo = (out_size(t, kt, st, padding[0]), out_size(h, kh, sh, padding[1]),
                  out_size(wd, kw, sw, padding[2]))
    acc_dtype = jnp.promote_types(x.dtype, jnp.float32)
    xp = jnp.pad(x, ((0, 0), *((p, p) for p in padding), (0, 0)))
    taps = w[:, :, :, 0, :].astype(acc_dtype)
    acc = None
    for a in range(kt):
        for b in range(kh):
            for d in range(kw):
                window = lax.slice(
                    xp, (0, a, b, d, 0),
                    (n, a + st * (to - 1) + 1, b + sh * (ho - 1) + 1, d + sw * (wo - 1) + 1, c),
                    (1, st, sh, sw, 1))
                term = window.astype(acc_dtype) * taps[a, b, d]
                acc = term if acc is None else acc + term
    assert acc is not None
    return acc.astype(x.dtype)


def max_pool3d(x: jax.Array, kernel: Triple, stride: Triple, padding: Triple = (0, 0, 0)
               ) -> jax.Array:
    """Max-pool with explicit padding by -inf (PyTorch/Caffe2 semantics, floor mode)."""
    return lax.reduce_window(
        x, jnp.array(-jnp.inf, x.dtype), lax.max, (1, *kernel, 1), (1, *stride, 1),
        [(0, 0), *((p, p) for p in padding), (0, 0)])
