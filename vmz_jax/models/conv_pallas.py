"""A Pallas depthwise 3-D convolution (NTHWC, any kT x kH x kW kernel), forward and both gradients.

`conv3d(..., impl="pallas")` (or an `AUTO_IMPL` row naming "pallas" for the depthwise form) runs it. Why it
exists: on CUDA, XLA's grouped convolution backward runs at dense cost (jax-ml/jax#13800) and the
shifted multiply-add form's weight gradient reads the activations once per tap (docs/benchmarks.md, "GPU
path"); here each gradient is one kernel:

* forward and input gradient: one program per output frame and (8 x 8 pixels x 32 channels) tile sums
  the kT*kH*kW shifted input tiles times their taps, accumulating in float32 or wider (the input gradient
  is the same correlation of the padded cotangent with the flipped taps);
* weight gradient: one program per output frame and 32-channel block loops over its tiles and keeps the
  taps' partial sums in registers, so the input and the cotangent are read once; the frames' partial sums
  are added by XLA.

Tiles are powers of two (what Triton needs); the arrays are zero-padded up to whole tiles, and a strided
convolution is the stride-1 one subsampled (the 3 strided depthwise layers of an ir-CSN-152 do 4-8x the
work they need). On CPU the kernels run in Pallas' interpreter: correct (the tests compare float64 at
1e-12 with `reference_conv3d`), not fast; the suite (`vmz-jax bench --suite accelerator`) A/Bs the kernel
on GPUs only.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

Triple = tuple[int, int, int]

TILE_H, TILE_W, TILE_C = 8, 8, 32


def _divmod(i: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
    """Quotient and remainder of a non-negative index (lax's truncating forms: jnp's floor division
    adds sign fix-ups that Triton's lowering rejects inside loops)."""
    d = jnp.asarray(n, i.dtype)
    return jax.lax.div(i, d), jax.lax.rem(i, d)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _backend() -> dict[str, Any]:
    """`pallas_call` arguments: Pallas' interpreter on CPU; elsewhere Triton, whose kernels read their
    tiles straight from global memory (Mosaic GPU, the default, would stage whole blocks in shared memory)."""
    if jax.default_backend() == "cpu":
        return {"interpret": True}
    return {"compiler_params": pl_triton.CompilerParams(num_warps=4)}


def _acc_dtype(dtype: jnp.dtype) -> jnp.dtype:
    return jnp.promote_types(dtype, jnp.float32)


def _tile_c(c: int) -> int:
    return min(TILE_C, 1 << max(c - 1, 0).bit_length())


def _layout(xp: jax.Array, kernel: Triple, out: Triple) -> tuple[jax.Array, int, int, int, int]:
    """`xp` (already padded by the convolution's padding) zero-padded so that every tile read of an
    output of `out` (T, H, W) rounded up to whole tiles stays inside; and (Hb, Wb, Cb, tile_c)."""
    _, _, hp, wp, c = xp.shape
    tc = _tile_c(c)
    hb, wb, cb = _round_up(out[1], TILE_H), _round_up(out[2], TILE_W), _round_up(c, tc)
    xp = jnp.pad(xp, ((0, 0), (0, 0), (0, hb + kernel[1] - 1 - hp), (0, wb + kernel[2] - 1 - wp),
                      (0, cb - c)))
    return xp, hb, wb, cb, tc


def correlate(xp: jax.Array, taps: jax.Array, out: Triple) -> jax.Array:
    """Stride-1 depthwise correlation: y[n, t, h, w, c] = sum over (a, b, d) of
    xp[n, t + a, h + b, w + d, c] * taps[a, b, d, c], for the (T, H, W) = `out` first outputs."""
    n, c = xp.shape[0], xp.shape[-1]
    kt, kh, kw = taps.shape[:3]
    to, ho, wo = out
    xp, hb, wb, cb, tc = _layout(xp, (kt, kh, kw), out)
    flat_taps = jnp.pad(taps.reshape(kt * kh * kw, c), ((0, 0), (0, cb - c)))
    acc_dtype = _acc_dtype(xp.dtype)
    w_tiles = wb // TILE_W

    def kernel(x_ref: pl.Ref, w_ref: pl.Ref, o_ref: pl.Ref) -> None:
        frame, tile, block = pl.program_id(0), pl.program_id(1), pl.program_id(2)
        clip, t = _divmod(frame, to)
        tile_h, tile_w = _divmod(tile, w_tiles)
        h0, w0, c0 = tile_h * TILE_H, tile_w * TILE_W, block * tc
        acc = jnp.zeros((TILE_H, TILE_W, tc), acc_dtype)
        for a in range(kt):
            for b in range(kh):
                for d in range(kw):
                    window = x_ref[clip, t + a, pl.ds(h0 + b, TILE_H), pl.ds(w0 + d, TILE_W), pl.ds(c0, tc)]
                    tap = w_ref[(a * kh + b) * kw + d, pl.ds(c0, tc)]
                    acc += window.astype(acc_dtype) * tap.astype(acc_dtype)
        o_ref[0, 0] = acc.astype(o_ref.dtype)

    y = pl.pallas_call(
        kernel, grid=(n * to, (hb // TILE_H) * w_tiles, cb // tc),
        in_specs=[pl.BlockSpec(xp.shape, lambda i, j, k: (0, 0, 0, 0, 0)),
                  pl.BlockSpec(flat_taps.shape, lambda i, j, k: (0, 0))],
        out_specs=pl.BlockSpec((1, 1, TILE_H, TILE_W, tc),
                               lambda i, j, k: (i // to, i % to, j // w_tiles, j % w_tiles, k)),
        out_shape=jax.ShapeDtypeStruct((n, to, hb, wb, cb), xp.dtype), **_backend(),
    )(xp, flat_taps)
    return y[:, :, :ho, :wo, :c]


def tap_gradient(xp: jax.Array, g: jax.Array, kernel: Triple) -> jax.Array:
    """(kT, kH, kW, C): for every tap (a, b, d), the sum over (n, t, h, w) of
    xp[n, t + a, h + b, w + d, c] * g[n, t, h, w, c]."""
    n, to, ho, wo, c = g.shape
    kt, kh, kw = kernel
    taps = kt * kh * kw
    xp, hb, wb, cb, tc = _layout(xp, kernel, (to, ho, wo))
    g = jnp.pad(g, ((0, 0), (0, 0), (0, hb - ho), (0, wb - wo), (0, cb - c)))  # zero rows add nothing
    acc_dtype = _acc_dtype(xp.dtype)
    rows = 1 << max(taps - 1, 0).bit_length()  # the taps' partial sums, padded to a power of two
    w_tiles, tiles = wb // TILE_W, (hb // TILE_H) * (wb // TILE_W)

    def kernel_fn(x_ref: pl.Ref, g_ref: pl.Ref, o_ref: pl.Ref) -> None:
        frame, block = pl.program_id(0), pl.program_id(1)
        clip, t = _divmod(frame, to)
        c0 = block * tc

        def add_tile(tile: jax.Array, sums: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
            tile_h, tile_w = _divmod(tile, w_tiles)
            h0, w0 = tile_h * TILE_H, tile_w * TILE_W
            cot = g_ref[clip, t, pl.ds(h0, TILE_H), pl.ds(w0, TILE_W), pl.ds(c0, tc)].astype(acc_dtype)
            out = []
            for i, (a, b, d) in enumerate((a, b, d) for a in range(kt) for b in range(kh) for d in range(kw)):
                window = x_ref[clip, t + a, pl.ds(h0 + b, TILE_H), pl.ds(w0 + d, TILE_W), pl.ds(c0, tc)]
                out.append(sums[i] + jnp.sum(window.astype(acc_dtype) * cot, axis=(0, 1)))
            return tuple(out)

        sums = jax.lax.fori_loop(0, tiles, add_tile, tuple(jnp.zeros((tc,), acc_dtype) for _ in range(taps)))
        for i in range(rows):  # row by row: Triton has no concatenation
            o_ref[0, i] = sums[i] if i < taps else jnp.zeros((tc,), acc_dtype)

    partial_sums = pl.pallas_call(
        kernel_fn, grid=(n * to, cb // tc),
        in_specs=[pl.BlockSpec(xp.shape, lambda i, k: (0, 0, 0, 0, 0)),
                  pl.BlockSpec(g.shape, lambda i, k: (0, 0, 0, 0, 0))],
        out_specs=pl.BlockSpec((1, rows, tc), lambda i, k: (i, 0, k)),
        out_shape=jax.ShapeDtypeStruct((n * to, rows, cb), acc_dtype), **_backend(),
    )(xp, g)
    return partial_sums.sum(axis=0)[:taps, :c].reshape(kt, kh, kw, c)


def _pad(x: jax.Array, padding: Triple) -> jax.Array:
    return jnp.pad(x, ((0, 0), *((p, p) for p in padding), (0, 0)))


def _out(x: jax.Array, kernel: Triple, padding: Triple) -> Triple:
    return tuple(n + 2 * p - k + 1 for n, k, p in  # type: ignore[return-value]
                 zip(x.shape[1:4], kernel, padding, strict=True))


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _depthwise_stride1(x: jax.Array, w: jax.Array, padding: Triple) -> jax.Array:
    return correlate(_pad(x, padding), w[:, :, :, 0, :], _out(x, w.shape[:3], padding))


def _fwd(x: jax.Array, w: jax.Array, padding: Triple) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return _depthwise_stride1(x, w, padding), (x, w)


def _bwd(padding: Triple, res: tuple[jax.Array, jax.Array], g: jax.Array) -> tuple[jax.Array, jax.Array]:
    x, w = res
    kernel = w.shape[:3]
    g = g.astype(x.dtype)
    # dx[j] = sum over a of g[j + p - a] w[a]: the correlation of g padded by k - 1 - p with flipped taps
    reach = tuple(k - 1 - p for k, p in zip(kernel, padding, strict=True))
    gx = correlate(_pad(g, reach), jnp.flip(w[:, :, :, 0, :], (0, 1, 2)), x.shape[1:4])
    gw = tap_gradient(_pad(x, padding), g, kernel)
    return gx, gw[:, :, :, None, :].astype(w.dtype)


_depthwise_stride1.defvjp(_fwd, _bwd)


def depthwise_conv3d_pallas(x: jax.Array, w: jax.Array, stride: Triple, padding: Triple) -> jax.Array:
    """Depthwise convolution of `x` (N, T, H, W, C) with `w` (kT, kH, kW, 1, C), as `conv3d` computes it."""
    y = _depthwise_stride1(x, w, tuple(padding))
    if tuple(stride) == (1, 1, 1):
        return y
    return y[:, ::stride[0], ::stride[1], ::stride[2]]
