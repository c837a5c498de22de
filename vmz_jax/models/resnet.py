"""The generic video ResNet: a stem, four stages of residual blocks, global pooling and a classifier.

Every R(2+1)D, R3D, R2D, fR2D, MCx, rMCx, ir-CSN and ip-CSN model is this module with a different
`ResNetSpec`. Inputs are float32 clips (N, T, H, W, 3), normalized; any T, H, W that survives the
strides works (the network is fully convolutional up to the global pool).

Blocks 1..n-1 of a stage have identical shapes, so they are stored stacked along a leading axis and
run with `lax.scan`: the compiler sees one block per stage instead of up to 35, which keeps jit
compile time of the 152-layer models low.

Rematerialization (`vmz_jax.models.remat`): the stem, each stage's first block and the scan body (one
block) run under `jax.checkpoint` when the modules' `remat` attribute says so (`set_remat`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from vmz_jax.models.conv import max_pool3d
from vmz_jax.models.layers import ConvBN, residual_conv, stat_dtype
from vmz_jax.models.remat import call_checkpointed, checkpointed
from vmz_jax.models.specs import ResNetSpec

STAGES = ("layer1", "layer2", "layer3", "layer4")


class Stem(nnx.Module):
    """conv(s) + BN + ReLU at stride (1, 2, 2), and CSN's max-pool."""

    def __init__(self, kind: str, pool: bool, clip_length: int, **kw: Any):
        if kind == "2plus1d":
            self.spatial = ConvBN(3, 45, (1, 7, 7), (1, 2, 2), (0, 3, 3), **kw)
            self.temporal = ConvBN(45, 64, (3, 1, 1), (1, 1, 1), (1, 0, 0), **kw)
        elif kind == "3d":
            self.conv = ConvBN(3, 64, (3, 7, 7), (1, 2, 2), (1, 3, 3), **kw)
        elif kind == "2d":
            self.conv = ConvBN(3, 64, (1, 7, 7), (1, 2, 2), (0, 3, 3), **kw)
        elif kind == "full_time":  # R2D: the kernel spans the whole clip, time collapses to 1
            self.conv = ConvBN(3, 64, (clip_length, 7, 7), (1, 2, 2), (0, 3, 3), **kw)
        else:
            raise ValueError(f"unknown stem {kind!r}")
        self.kind = kind
        self.pool = pool
        self.remat = "none"  # vmz_jax.models.remat.set_remat

    def __call__(self, x: jax.Array) -> jax.Array:
        return call_checkpointed(self.remat, self, x, method="_layers")

    def _layers(self, x: jax.Array) -> jax.Array:
        if self.kind == "2plus1d":
            x = self.temporal(self.spatial(x, relu=True), relu=True)
        else:
            x = self.conv(x, relu=True)
        if self.pool:
            x = max_pool3d(x, (1, 3, 3), (1, 2, 2), (0, 1, 1))
        return x


def _shortcut(in_channels: int, out_channels: int, stride: tuple[int, int, int],
              **kw: Any) -> ConvBN | None:
    if in_channels == out_channels and stride == (1, 1, 1):
        return None
    return ConvBN(in_channels, out_channels, (1, 1, 1), stride, **kw)


class BasicBlock(nnx.Module):
    def __init__(self, in_channels: int, out_channels: int, inner: int, kind: str,
                 stride: tuple[int, int, int], **kw: Any):
        del inner
        self.conv1 = residual_conv(kind, in_channels, out_channels, stride, **kw)
        self.conv2 = residual_conv(kind, out_channels, out_channels, (1, 1, 1), **kw)
        self.downsample = _shortcut(in_channels, out_channels, stride, **kw)

    def __call__(self, x: jax.Array, temporal_stride: int | None = None) -> jax.Array:
        shortcut = x if self.downsample is None else self.downsample(
            x, temporal_stride=temporal_stride)
        y = self.conv1(x, relu=True, temporal_stride=temporal_stride)
        return self.conv2(y, relu=True, residual=shortcut)


class Bottleneck(nnx.Module):
    def __init__(self, in_channels: int, out_channels: int, inner: int, kind: str,
                 stride: tuple[int, int, int], **kw: Any):
        self.conv1 = ConvBN(in_channels, inner, (1, 1, 1), **kw)
        self.conv2 = residual_conv(kind, inner, inner, stride, **kw)
        self.conv3 = ConvBN(inner, out_channels, (1, 1, 1), **kw)
        self.downsample = _shortcut(in_channels, out_channels, stride, **kw)

    def __call__(self, x: jax.Array, temporal_stride: int | None = None) -> jax.Array:
        shortcut = x if self.downsample is None else self.downsample(
            x, temporal_stride=temporal_stride)
        y = self.conv1(x, relu=True)
        y = self.conv2(y, relu=True, temporal_stride=temporal_stride)
        return self.conv3(y, relu=True, residual=shortcut)


def stack_modules(modules: list[nnx.Module]) -> nnx.Module:
    """One module whose every variable is the stack of the given identical modules' variables."""
    graphdef, _ = nnx.split(modules[0])
    states = [nnx.split(m)[1] for m in modules]
    return nnx.merge(graphdef, jax.tree.map(lambda *xs: jnp.stack(xs), *states))


class Stage(nnx.Module):
    """Block 0 (which may stride and widen) and the stacked, scanned blocks 1..n-1."""

    def __init__(self, num_blocks: int, in_channels: int, out_channels: int, inner: int,
                 kind: str, downsample: bool, bottleneck: bool, **kw: Any):
        block = Bottleneck if bottleneck else BasicBlock
        stride = (1, 1, 1)
        if downsample:
            stride = (1, 2, 2) if kind == "2d" else (2, 2, 2)
        self.first = block(in_channels, out_channels, inner, kind, stride, **kw)
        rest = [block(out_channels, out_channels, inner, kind, (1, 1, 1), **kw)
                for _ in range(num_blocks - 1)]
        self.rest = stack_modules(rest) if rest else None
        self.strides_time = stride[0] > 1
        self.remat = "none"  # vmz_jax.models.remat.set_remat

    def __call__(self, x: jax.Array, temporal_stride: int | None = None) -> jax.Array:
        x = call_checkpointed(self.remat, self.first, x, temporal_stride=temporal_stride)
        if self.rest is None:
            return x
        graphdef, state = nnx.split(self.rest)

        def body(h: jax.Array, block_state: nnx.State) -> tuple[jax.Array, nnx.State]:
            block = nnx.merge(graphdef, block_state)
            h = block(h)
            return h, nnx.state(block)

        body = checkpointed(self.remat, body, in_scan=True)
        if x.dtype == jnp.bfloat16:
            body = residuals_as_bits(body)
        x, new_state = jax.lax.scan(body, x, state)
        nnx.update(self.rest, new_state)
        return x


def residuals_as_bits(body: Callable[..., Any]) -> Callable[..., Any]:
    """A `lax.scan` body with the same values and gradients, whose residuals (what the backward pass
    keeps, stacked by the forward loop) are held as their bits where they are bfloat16.

    XLA's CPU backend has no bfloat16 dynamic-update-slice: it converted the whole stack to float32
    and back on every iteration (ir_csn_152's bfloat16 training step at 2x8x112x112: 190 of 750 ms,
    more than its whole difference from float32). As uint16 the update is in place, as float32's
    are. Residuals that are the body's scanned inputs themselves (the blocks' kernels) are returned
    as they are, so that JAX passes them through instead of stacking copies."""
    layout: dict[str, Any] = {}

    @jax.custom_vjp
    def wrapped(carry: Any, xs: Any) -> Any:
        return body(carry, xs)

    def forward(carry: Any, xs: Any) -> tuple[Any, list[jax.Array]]:
        out, pullback = jax.vjp(body, carry, xs)
        leaves, layout["tree"] = jax.tree.flatten(pullback)
        scanned = {id(leaf) for leaf in jax.tree.leaves(xs)}
        layout["bits"] = [leaf.dtype == jnp.bfloat16 and id(leaf) not in scanned for leaf in leaves]
        return out, [jax.lax.bitcast_convert_type(leaf, jnp.uint16) if bits else leaf
                     for leaf, bits in zip(leaves, layout["bits"], strict=True)]

    def backward(residuals: list[jax.Array], cotangent: Any) -> Any:
        leaves = [jax.lax.bitcast_convert_type(leaf, jnp.bfloat16) if bits else leaf
                  for leaf, bits in zip(residuals, layout["bits"], strict=True)]
        return jax.tree.unflatten(layout["tree"], leaves)(cotangent)

    wrapped.defvjp(forward, backward)
    return wrapped


class VideoResNet(nnx.Module):
    """A video ResNet of the VMZ family; see `vmz_jax.models.specs` for what varies."""

    def __init__(self, spec: ResNetSpec, num_classes: int = 400, *, clip_length: int = 8,
                 dtype: jnp.dtype = jnp.float32, param_dtype: jnp.dtype = jnp.float32,
                 conv_impl: str = "auto", rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, conv_impl=conv_impl, rngs=rngs)
        self.spec = spec
        self.num_classes = num_classes
        self.clip_length = clip_length
        # Set by `vmz_jax.load` from the weights' metadata, written back by `vmz_jax.save`: class
        # names (a tuple, so that it stays static in the graph) and where the weights came from.
        self.labels: tuple[str, ...] | None = None
        self.provenance: tuple[tuple[str, Any], ...] | None = None
        self.stem = Stem(spec.stem, spec.stem_pool, clip_length, **kw)
        in_channels = 64
        for i, (name, blocks, (out_channels, inner), kind) in enumerate(
                zip(STAGES, spec.blocks, spec.widths, spec.stage_convs, strict=True)):
            setattr(self, name, Stage(blocks, in_channels, out_channels, inner, kind,
                                      downsample=i > 0, bottleneck=spec.bottleneck, **kw))
            in_channels = out_channels
        self.fc = nnx.Linear(in_channels, num_classes, param_dtype=param_dtype, rngs=rngs,
                             kernel_init=nnx.initializers.normal(0.01))
        # Dropout on the pooled features, before the classifier (mmaction2's CSN heads use 0.5).
        # The rate is 0 (none) unless set for training (`vmz_jax.train.apply_train_mode`); it holds
        # no parameters and is off in eval mode, so checkpoints and inference do not see it.
        self.dropout = nnx.Dropout(0.0, rngs=rngs)

    @property
    def arch(self) -> str:
        """The architecture name (`vmz_jax.models.build(arch)`), recorded by `vmz_jax.save`."""
        return self.spec.name

    def _temporal_strides(self, clip_length: int) -> dict[str, int | None]:
        keep = {"layer3": clip_length < 4, "layer4": clip_length < 8}
        return {name: 1 if self.spec.short_clip_rule and keep.get(name, False) else None
                for name in STAGES}

    def stage_outputs(self, x: jax.Array) -> dict[str, jax.Array]:
        """Activations after the stem and each stage (N, T, H, W, C), the pooled features, logits."""
        if x.ndim != 5 or x.shape[-1] != 3:
            raise ValueError(f"expected clips (N, T, H, W, 3), got shape {x.shape}")
        if self.spec.stem == "full_time" and x.shape[1] < self.clip_length:
            raise ValueError(f"{self.spec.name} needs at least {self.clip_length} frames "
                             f"(its stem spans the clip), got {x.shape[1]}")
        strides = self._temporal_strides(x.shape[1])
        out = {"stem": self.stem(x)}
        h = out["stem"]
        for name in STAGES:
            h = getattr(self, name)(h, temporal_stride=strides[name])
            out[name] = h
        out["features"] = jnp.mean(h.astype(stat_dtype(h.dtype)), axis=(1, 2, 3))
        out["logits"] = self.fc(self.dropout(out["features"]))
        return out

    def features(self, x: jax.Array) -> jax.Array:
        """The globally pooled layer4 output, (N, 512) or (N, 2048), float32."""
        return self.stage_outputs(x)["features"]

    def __call__(self, x: jax.Array) -> jax.Array:
        """Logits (N, num_classes), float32."""
        return self.stage_outputs(x)["logits"]
