"""Building blocks: a convolution followed by its BatchNorm, and the convolution kinds of the family.

Every convolution in VMZ has no bias and is followed by exactly one BatchNorm, so `ConvBN` is the unit
everything is made of. In eval mode (`use_running_average=True`) the BatchNorm is folded into the
convolution weights, so inference makes one pass over memory per convolution: conv, then one fused
elementwise loop for bias, residual and ReLU. A model in eval mode folds on every call (its weights
are arguments of the compiled function); `BatchNormFolding` folds once, for the inference copies
that `vmz_jax.models.forward.make_forward` runs.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from vmz_jax.errors import VMZError
from vmz_jax.models.conv import Triple, compute_dtype, conv3d

BN_EPSILON = 1e-3
# Flax convention: running = momentum * running + (1 - momentum) * batch, which is Caffe2's 0.9.
BN_MOMENTUM = 0.9
# The names of the convolution outputs under jax.checkpoint (`vmz_jax.models.remat`'s policies).
CONV_OUTPUT = "conv_output"
WIDENING_CONV_OUTPUT = "widening_conv_output"


def _he_normal_fan_out(key: jax.Array, shape: Sequence[int], dtype: jnp.dtype) -> jax.Array:
    """MSRA init (Caffe2's MSRAFill and torchvision's video ResNets use fan-out)."""
    kt, kh, kw, _, cout = shape
    std = (2.0 / (cout * kt * kh * kw)) ** 0.5
    if isinstance(key, jax.core.Tracer):  # abstract construction (nnx.eval_shape, jit)
        return std * jax.random.normal(key, shape, dtype)
    # Eagerly, drawing on the host from the same key stream avoids compiling one random-number
    # kernel per distinct weight shape, which made building a 152-layer model take ~10 s.
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel())
    return jnp.asarray(std * rng.standard_normal(tuple(shape), np.float32), dtype)


def stat_dtype(dtype: jnp.dtype) -> jnp.dtype:
    """BatchNorm arithmetic runs in float32 for low-precision activations, float64 for float64."""
    return jnp.promote_types(dtype, jnp.float32)


def channel_sum(x: jax.Array) -> jax.Array:
    """Sum over every axis but the channel axis.

    One reduction over all of them: XLA's CPU reduction of the ~200k float32 values a channel can
    have in a training batch is within ~1.5e-7 relative of the float64 sum (measured on 8x8x56x56x64
    with mean 3: the same as reducing W, H, T, N one after another, which we tried), so no
    compensated or blocked summation is needed for BatchNorm statistics or their gradients
    (benchmarks/train_accuracy.py: float32 gradients of mc3_18 are closer to the float64 truth than
    torch's)."""
    return jnp.sum(x, axis=tuple(range(x.ndim - 1)))


@jax.custom_vjp
def _normalize(y: jax.Array, scale: jax.Array, bias: jax.Array
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
    out, mean, var, _ = _normalize_fwd_impl(y, scale, bias)
    return out, mean, var


def _normalize_fwd_impl(y: jax.Array, scale: jax.Array, bias: jax.Array
                        ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    n = y.size // y.shape[-1]
    mean = channel_sum(y) / n
    centred = y - mean
    var = channel_sum(jnp.square(centred)) / n  # two passes: no cancellation as in E[y^2] - E[y]^2
    rstd = jax.lax.rsqrt(var + BN_EPSILON)
    return centred * (scale * rstd) + bias, mean, var, rstd


def _normalize_fwd(y: jax.Array, scale: jax.Array, bias: jax.Array) -> tuple[Any, Any]:
    out, mean, var, rstd = _normalize_fwd_impl(y, scale, bias)
    return (out, mean, var), (y, mean, rstd, scale)


def _normalize_bwd(res: Any, cotangents: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The textbook BatchNorm backward: two per-channel sums and one elementwise pass, from the
    saved input and two per-channel vectors (autodiff of the forward keeps its centred copy too)."""
    y, mean, rstd, scale = res
    g, g_mean, g_var = cotangents
    n = y.size // y.shape[-1]
    xhat = (y - mean) * rstd
    d_bias = channel_sum(g)
    d_scale = channel_sum(g * xhat)
    dy = (scale * rstd) * (g - (d_bias + xhat * d_scale) / n)
    # The batch mean and variance are outputs too (they feed the running averages, which are not
    # differentiated, so these cotangents are zeros in training; kept for a correct VJP).
    dy = dy + g_mean / n + g_var * (2.0 / n) * (xhat / rstd)
    return dy, d_scale, d_bias


_normalize.defvjp(_normalize_fwd, _normalize_bwd)


class BatchNorm(nnx.Module):
    """BatchNorm over the channel axis, computed in float32 (or wider) whatever the activation.

    Modes: training (`use_running_average=False`, set by `model.train()`): batch statistics,
    running averages updated; eval (`model.eval()`): the running statistics, folded into the
    preceding convolution by `ConvBN`; frozen (`frozen=True`, kept across train()/eval()): the
    running statistics and the affine parameters are constants (no gradient flows into them and the
    averages are not updated) even in training -- fine-tuning with small batches.

    The running variance is updated with the unbiased batch variance (n / (n - 1)), as PyTorch does
    (and so the PyTorch reference and the VMZ .pth models); the batch itself is normalized with the
    biased one, like everyone.
    """

    def __init__(self, channels: int, *, param_dtype: jnp.dtype = jnp.float32):
        self.scale = nnx.Param(jnp.ones((channels,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((channels,), param_dtype))
        self.mean = nnx.BatchStat(jnp.zeros((channels,), stat_dtype(param_dtype)))
        self.var = nnx.BatchStat(jnp.ones((channels,), stat_dtype(param_dtype)))
        self.use_running_average = False
        self.frozen = False

    @property
    def uses_running_statistics(self) -> bool:
        return self.use_running_average or self.frozen

    def folded(self, dtype: jnp.dtype = jnp.float32) -> tuple[jax.Array, jax.Array]:
        """The affine map the running statistics define: y = x * scale + shift."""
        scale, bias, mean, var = (v[...].astype(dtype)
                                  for v in (self.scale, self.bias, self.mean, self.var))
        scale = scale * jax.lax.rsqrt(var + BN_EPSILON)
        shift = bias - mean * scale
        if self.frozen:
            scale, shift = jax.lax.stop_gradient(scale), jax.lax.stop_gradient(shift)
        return scale, shift

    def __call__(self, y: jax.Array) -> jax.Array:
        dtype = stat_dtype(y.dtype)
        y = y.astype(dtype)
        if self.uses_running_statistics:
            scale, shift = self.folded(dtype)
            return y * scale + shift
        out, mean, var = _normalize(y, self.scale[...].astype(dtype), self.bias[...].astype(dtype))
        n = y.size // y.shape[-1]
        unbiased = var * (n / max(n - 1, 1))
        mean, unbiased = jax.lax.stop_gradient(mean), jax.lax.stop_gradient(unbiased)
        stat = self.mean[...].dtype
        self.mean[...] = (BN_MOMENTUM * self.mean[...] + (1 - BN_MOMENTUM) * mean).astype(stat)
        self.var[...] = (BN_MOMENTUM * self.var[...] + (1 - BN_MOMENTUM) * unbiased).astype(stat)
        return out


class ConvBN(nnx.Module):
    """Bias-free 3-D convolution + BatchNorm, with optional residual add and ReLU fused after it."""

    def __init__(self, in_channels: int, out_channels: int, kernel: Triple,
                 stride: Triple = (1, 1, 1), padding: Triple = (0, 0, 0), *, groups: int = 1,
                 dtype: jnp.dtype = jnp.float32, param_dtype: jnp.dtype = jnp.float32,
                 conv_impl: str = "auto", rngs: nnx.Rngs):
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"channels {in_channels}->{out_channels} not divisible by {groups}")
        shape = (*kernel, in_channels // groups, out_channels)
        self.kernel = nnx.Param(_he_normal_fan_out(rngs.params(), shape, param_dtype))
        self.bn = BatchNorm(out_channels, param_dtype=param_dtype)
        self.stride = tuple(stride)
        self.padding = tuple(padding)
        self.groups = groups
        self.dtype = dtype
        self.conv_impl = conv_impl
        self.fold_bn = True
        #: Set by `BatchNormFolding` on inference copies: `kernel` holds the BatchNorm-folded kernel
        #: and `bn.bias` the shift, computed once instead of on every call.
        self.batchnorm_folded = False

    def __call__(self, x: jax.Array, *, relu: bool = False, residual: jax.Array | None = None,
                 temporal_stride: int | None = None) -> jax.Array:
        stride = self.stride if temporal_stride is None else (temporal_stride, *self.stride[1:])
        kernel = self.kernel[...]
        dtype = compute_dtype(self.dtype, self.conv_impl)
        x = x.astype(dtype)
        acc = stat_dtype(dtype)
        if self.batchnorm_folded:
            if not self.bn.uses_running_statistics:
                raise VMZError("this module's BatchNorms were folded into its kernels for inference "
                               "(make_forward's copy): it cannot run in train mode; train the model it "
                               "was made from")
            if kernel.dtype == jnp.uint16:  # a scanned stage's bfloat16 stack, as bits: see _folded_kernel
                kernel = jax.lax.bitcast_convert_type(kernel, jnp.bfloat16)
            shift = self.bn.bias[...]
            if residual is None:
                # the shift, ReLU and cast as the convolution's epilogue: frame loops apply it inside
                # (inference only: a frozen-BatchNorm training step keeps the forms' reverse-mode rules)
                def epilogue(y: jax.Array) -> jax.Array:
                    y = y.astype(acc) + shift
                    return (jax.nn.relu(y) if relu else y).astype(dtype)

                return conv3d(x, kernel.astype(dtype), stride, self.padding, self.groups, self.conv_impl,
                              epilogue)
            y = conv3d(x, kernel.astype(dtype), stride, self.padding, self.groups, self.conv_impl)
            y = y.astype(acc) + shift
        elif self.bn.uses_running_statistics and self.fold_bn:
            scale, shift = self.bn.folded(acc)
            y = conv3d(x, (kernel.astype(acc) * scale).astype(dtype), stride,
                       self.padding, self.groups, self.conv_impl)
            y = y.astype(acc) + shift
        else:
            y = conv3d(x, kernel.astype(dtype), stride, self.padding, self.groups, self.conv_impl)
            # named for rematerialization (vmz_jax.models.remat): "blocks" keeps the outputs of the
            # convolutions that do not widen, and recomputes the widening ones
            widens = kernel.shape[-1] > kernel.shape[-2] * self.groups
            y = self.bn(checkpoint_name(y, WIDENING_CONV_OUTPUT if widens else CONV_OUTPUT))
        if residual is not None:
            y = y + residual.astype(acc)
        if relu:
            y = jax.nn.relu(y)
        return y.astype(dtype)


@partial(jax.jit, static_argnames="dtype")
def _folded_kernel(kernel: jax.Array, scale: jax.Array, bias: jax.Array, mean: jax.Array, var: jax.Array,
                   dtype: jnp.dtype) -> tuple[jax.Array, jax.Array]:
    """`ConvBN`'s eval-mode fold, as its call computes it, in `dtype`; for kernels stacked on leading
    axes too (the scanned blocks': `scale` etc. (..., O) against `kernel` (..., kT, kH, kW, I, O)),
    whose bfloat16 result is held as its bits (uint16)."""
    acc = stat_dtype(dtype)
    scale, bias, mean, var = (v.astype(acc) for v in (scale, bias, mean, var))
    scale = scale * jax.lax.rsqrt(var + BN_EPSILON)
    shift = bias - mean * scale
    per_output = scale.reshape(*scale.shape[:-1], *(1,) * (kernel.ndim - scale.ndim), scale.shape[-1])
    folded = kernel.astype(acc) * per_output
    folded = folded.astype(dtype)
    if kernel.ndim > 5 and folded.dtype == jnp.bfloat16:
        # A scanned stage's bfloat16 stack is held as its bits: XLA's CPU backend has no bfloat16
        # dynamic slice, and converted a bfloat16 stack to float32 as a whole before the loop and each
        # slice back inside (ir_csn_152 bfloat16 forward at 2x8x112x112: 0.096 s against 0.067); a
        # float32 stack cast per block inside the loop still cost 6 ms of the 59 (AMX Xeon).
        return jax.lax.bitcast_convert_type(folded, jnp.uint16), shift
    return folded, shift


class BatchNormFolding:
    """The eval-mode BatchNorms of an inference copy folded into its kernels once, kept current with
    the weights they came from.

    Built on a copy that shares its variables with a model (`nnx.merge` of the model's split, as
    `make_forward` makes): each eval-mode `ConvBN` of the copy (`fold_bn` on) gets a kernel variable
    of its own, the BatchNorm-folded kernel in the compute dtype (a scanned stage's bfloat16 stacks
    as their bits, see `_folded_kernel`), and a BatchNorm bias of its own, the shift; the model's
    variables are untouched. A forward pass of the copy then no longer recomputes the fold (one pass
    over every weight) on every call: folding all of ir_csn_152's kernels takes 11 ms in bfloat16 and
    20 ms in float32 on a 2-core CPU, against forwards of 80 and 134 ms at 2x8x112x112.

    `refresh()` folds again when any of the model's variables it folds holds a new array (a training
    step, `nnx.update`, loading weights), so the copy never computes with stale weights. The copy must
    not be trained itself (its kernels are no longer the parameters): in train mode it raises."""

    def __init__(self, copy: nnx.Module):
        self.pairs: list[tuple[ConvBN, tuple[nnx.Variable[Any], ...]]] = []
        for _, module in nnx.iter_modules(copy):
            if (isinstance(module, ConvBN) and not module.batchnorm_folded and module.fold_bn
                    and module.bn.uses_running_statistics):
                bn = module.bn
                self.pairs.append((module, (module.kernel, bn.scale, bn.bias, bn.mean, bn.var)))
        for module, sources in self.pairs:
            kernel, shift = self._fold(module, sources)
            module.kernel = nnx.Param(kernel)
            module.bn.bias = nnx.Param(shift)
            module.batchnorm_folded = True
        self._seen: list[Any] = self._references()

    @staticmethod
    def _fold(module: ConvBN, sources: tuple[nnx.Variable[Any], ...]) -> tuple[Any, Any]:
        values = [v.get_raw_value() for v in sources]
        dtype = compute_dtype(module.dtype, module.conv_impl)
        if any(isinstance(v, jax.ShapeDtypeStruct) for v in values):  # an abstract model (eval_shape)
            return jax.eval_shape(partial(_folded_kernel, dtype=dtype), *values)
        return _folded_kernel(*values, dtype=dtype)

    def _references(self) -> list[Any]:
        refs = []
        for _, sources in self.pairs:
            for v in sources:
                value = v.get_raw_value()
                try:
                    refs.append(weakref.ref(value))
                except TypeError:  # not weakly referenceable (abstract values): held
                    refs.append(lambda value=value: value)
        return refs

    def refresh(self) -> None:
        """Fold again if the model's variables hold other arrays than those last folded."""
        current = [v.get_raw_value() for _, sources in self.pairs for v in sources]
        if all(ref() is value for ref, value in zip(self._seen, current, strict=True)):
            return
        for module, sources in self.pairs:
            kernel, shift = self._fold(module, sources)
            module.kernel.set_raw_value(kernel)
            module.bn.bias.set_raw_value(shift)
        self._seen = self._references()


def middle_width(in_channels: int, out_channels: int) -> int:
    """Caffe2's (2+1)D width: the spatial-then-temporal pair has as many weights as a 3x3x3 conv."""
    return (27 * in_channels * out_channels) // (9 * in_channels + 3 * out_channels)


class Conv2Plus1dBN(nnx.Module):
    """(2+1)D convolution: 1x3x3 spatial conv + BN + ReLU, then 3x1x1 temporal conv + BN."""

    def __init__(self, in_channels: int, out_channels: int, stride: Triple, **kw):
        mid = middle_width(in_channels, out_channels)
        self.spatial = ConvBN(in_channels, mid, (1, 3, 3), (1, *stride[1:]), (0, 1, 1), **kw)
        self.temporal = ConvBN(mid, out_channels, (3, 1, 1), (stride[0], 1, 1), (1, 0, 0), **kw)

    def __call__(self, x: jax.Array, *, relu: bool = False, residual: jax.Array | None = None,
                 temporal_stride: int | None = None) -> jax.Array:
        return self.temporal(self.spatial(x, relu=True), relu=relu, residual=residual,
                             temporal_stride=temporal_stride)


class InteractionPreservedBN(nnx.Module):
    """ip-CSN's middle conv: 1x1x1 conv + BN (no ReLU), then 3x3x3 depthwise conv + BN."""

    def __init__(self, in_channels: int, out_channels: int, stride: Triple, **kw):
        self.pointwise = ConvBN(in_channels, out_channels, (1, 1, 1), **kw)
        self.depthwise = ConvBN(out_channels, out_channels, (3, 3, 3), stride, (1, 1, 1),
                                groups=out_channels, **kw)

    def __call__(self, x: jax.Array, *, relu: bool = False, residual: jax.Array | None = None,
                 temporal_stride: int | None = None) -> jax.Array:
        return self.depthwise(self.pointwise(x), relu=relu, residual=residual,
                              temporal_stride=temporal_stride)


# The residual convolution of each family: a 3x3x3 conv, a 1x3x3 conv, a (2+1)D pair, a depthwise
# conv (ir-CSN) or a 1x1x1 + depthwise pair (ip-CSN).
CONV_KINDS = ("3d", "2d", "2plus1d", "ir", "ip")


def residual_conv(kind: str, in_channels: int, out_channels: int, stride: Triple,
                  **kw) -> nnx.Module:
    """Build the convolution (with its trailing BN) of one residual-block position."""
    if kind == "3d":
        return ConvBN(in_channels, out_channels, (3, 3, 3), stride, (1, 1, 1), **kw)
    if kind == "2d":
        return ConvBN(in_channels, out_channels, (1, 3, 3), stride, (0, 1, 1), **kw)
    if kind == "2plus1d":
        return Conv2Plus1dBN(in_channels, out_channels, stride, **kw)
    if kind == "ir":
        if in_channels != out_channels:
            raise ValueError("a depthwise conv keeps its width")
        return ConvBN(in_channels, out_channels, (3, 3, 3), stride, (1, 1, 1),
                      groups=in_channels, **kw)
    if kind == "ip":
        return InteractionPreservedBN(in_channels, out_channels, stride, **kw)
    raise ValueError(f"unknown conv kind {kind!r}; expected one of {CONV_KINDS}")
