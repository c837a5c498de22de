"""C3D (Caffe2 `c2/lib/models/c3d_model.py`): eight 3x3x3 conv+BN+ReLU layers, five max-pools, and
three fully connected layers. Unlike the ResNets it is not fully convolutional: fc6 expects pool5 to be
512 x 1 x 3 x 3, i.e. 16 x 112 x 112 clips. `features` is the 4096-d fc7 output after its ReLU.

Rematerialization (`vmz_jax.models.remat`): each group of convolutions with the max-pool after it runs
under `jax.checkpoint` when `remat` says so (`set_remat`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vmz_jax.models.conv import max_pool3d
from vmz_jax.models.layers import ConvBN, stat_dtype
from vmz_jax.models.remat import checkpointed

# (name, output channels) of each conv, grouped by the pool that follows the group.
C3D_GROUPS = (("conv1a",), ("conv2a",), ("conv3a", "conv3b"), ("conv4a", "conv4b"),
              ("conv5a", "conv5b"))
C3D_WIDTHS = {"conv1a": 64, "conv2a": 128, "conv3a": 256, "conv3b": 256, "conv4a": 512,
              "conv4b": 512, "conv5a": 512, "conv5b": 512}
POOL5_SHAPE = (1, 3, 3, 512)
FC_WIDTH = 4096
DROPOUT_RATE = 0.5


class C3D(nnx.Module):
    def __init__(self, num_classes: int = 400, *, dtype: jnp.dtype = jnp.float32,
                 param_dtype: jnp.dtype = jnp.float32, conv_impl: str = "auto",
                 rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, conv_impl=conv_impl, rngs=rngs)
        in_channels = 3
        for name, width in C3D_WIDTHS.items():
            setattr(self, name, ConvBN(in_channels, width, (3, 3, 3), (1, 1, 1), (1, 1, 1), **kw))
            in_channels = width
        init = nnx.initializers.normal(0.005)
        self.fc6 = nnx.Linear(512 * 3 * 3, FC_WIDTH, kernel_init=init, param_dtype=param_dtype,
                              rngs=rngs)
        self.fc7 = nnx.Linear(FC_WIDTH, FC_WIDTH, kernel_init=init, param_dtype=param_dtype,
                              rngs=rngs)
        self.fc = nnx.Linear(FC_WIDTH, num_classes, kernel_init=nnx.initializers.normal(0.01),
                             param_dtype=param_dtype, rngs=rngs)
        self.dropout6 = nnx.Dropout(DROPOUT_RATE, rngs=rngs)
        self.dropout7 = nnx.Dropout(DROPOUT_RATE, rngs=rngs)
        self.num_classes = num_classes
        self.clip_length = 16
        # See VideoResNet: set by `vmz_jax.load`, written back by `vmz_jax.save`.
        self.labels: tuple[str, ...] | None = None
        self.provenance: tuple[tuple[str, object], ...] | None = None
        self.remat = "none"  # vmz_jax.models.remat.set_remat

    @property
    def arch(self) -> str:
        return "c3d"

    def stage_outputs(self, x: jax.Array) -> dict[str, jax.Array]:
        """pool1..pool5 activations (N, T, H, W, C), fc7 features and logits."""
        if x.ndim != 5 or x.shape[-1] != 3:
            raise ValueError(f"expected clips (N, T, H, W, 3), got shape {x.shape}")
        # pool1 halves H and W, pool2..pool5 halve T, H and W (floor): pool5 = (T//16, H//32, W//32).
        pool5 = (x.shape[1] // 16, x.shape[2] // 32, x.shape[3] // 32, 512)
        if pool5 != POOL5_SHAPE:
            raise ValueError(f"C3D needs 16x112x112 clips (pool5 must be 1x3x3x512, got "
                             f"{'x'.join(map(str, pool5))} from input {x.shape[1:4]})")
        out = {}
        h = x
        for i, group in enumerate(C3D_GROUPS, start=1):
            window = (1, 2, 2) if i == 1 else (2, 2, 2)
            h = self._conv_group([getattr(self, name) for name in group], h, window)
            out[f"pool{i}"] = h
        # Caffe2 flattens pool5 in (C, T, H, W) order.
        flat = jnp.transpose(h.astype(stat_dtype(h.dtype)), (0, 4, 1, 2, 3)).reshape(h.shape[0], -1)
        h = self.dropout6(jax.nn.relu(self.fc6(flat)))
        out["features"] = jax.nn.relu(self.fc7(h))
        out["logits"] = self.fc(self.dropout7(out["features"]))
        return out

    def _conv_group(self, convs: list[ConvBN], h: jax.Array, window: tuple[int, int, int]) -> jax.Array:
        """conv + BN + ReLU for each of `convs`, then the max-pool, checkpointed as one block."""
        splits = [nnx.split(conv) for conv in convs]

        def run(states: tuple[nnx.State, ...], h: jax.Array) -> tuple[jax.Array, list[nnx.State]]:
            merged = [nnx.merge(graphdef, state) for (graphdef, _), state in zip(splits, states, strict=True)]
            for conv in merged:
                h = conv(h, relu=True)
            return max_pool3d(h, window, window), [nnx.state(conv) for conv in merged]

        h, states = checkpointed(self.remat, run)(tuple(state for _, state in splits), h)
        for conv, state in zip(convs, states, strict=True):
            nnx.update(conv, state)
        return h

    def features(self, x: jax.Array) -> jax.Array:
        """The fc7 activations (N, 4096), float32."""
        return self.stage_outputs(x)["features"]

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.stage_outputs(x)["logits"]
