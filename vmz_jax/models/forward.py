"""One forward function for every caller: a model as a pure function `forward(state, x)`.

The video pipeline, the benchmark, the examples and the parity tests all need "the model as a jittable
function of its weights and a batch", with an output chosen by name. `make_forward` writes it once::

    fwd = make_forward(model, "features", pool_spatial="max")
    y = fwd(x)                                   # jitted, with the model's own weights
    y = fwd.jit()(fwd.state, x)                  # the same, explicitly
    jax.jit(fwd.fn, in_shardings=...)(fwd.state, x)  # the pure function (for sharding, jax.export)

Outputs:

* "logits": `model(x)`, float32; "probabilities": its softmax;
* "features": ResNets: layer4 reduced over space (H, W), then over time, each by mean or max (mean,
  mean is exactly `model.features`); C3D: its fc7 activations (`model.features`), which have no
  spatial or temporal axes left, so any other pooling is a VMZError;
* "stages": `model.stage_outputs(x)` (a dict);
* "conv_head" (ResNets): Caffe2's convolutional prediction (VMZ ``--use_convolutional_pred``):
  layer4 average-pooled at stride 1 by a (kt, `conv_window`, `conv_window`) window, kt Caffe2's
  ``final_temporal_kernel`` (``T // 8`` for T >= 8 input frames, else 1: the whole time axis when T
  is a multiple of 8), the classifier applied at every pooled position (the FC as a 1x1x1
  convolution), then per `conv_softmax`: "position" a softmax over the classes at each position,
  mean over positions; "joint" what Caffe2's ``Softmax`` (axis 1) does to that (N, classes, T', H',
  W') blob, one softmax over classes x positions, summed over positions (Caffe2's mean over
  positions times their number, so that the row sums to 1; the ranking is the same); "logits" the
  mean of the per-position logits. Where the pooled map is 1x1x1, "position" and "joint" equal
  "probabilities" and "logits" equals "logits";
* a callable `(module, x) -> array or pytree`, called with the merged module.

The forward is always an inference forward: it runs a copy of the model in eval mode (running BN
statistics, no dropout), whatever the mode of the model handed in, which is not modified. The copy's
BatchNorms are folded into its convolution kernels once (`vmz_jax.models.layers.BatchNormFolding`),
not on every call, and again only when the model's weights change: its state holds those folded
kernels (new arrays, one more copy of the convolution weights in the compute dtype) and shares every
other variable with the model. `fold_batchnorm=False` keeps the model's own kernels in the state
(no second copy; each call then folds again).

Convolution forms and the target platform. `conv_impl="auto"` (the default of every model) means: for
each kind of convolution, the form its platform's row of `vmz_jax.models.conv.AUTO_IMPL` names (on CPU
every fast rewrite of `vmz_jax.models.conv`; on CUDA the plain `lax` convolutions but for the depthwise
multiply-adds). Left as "auto", the choice is made when the function is traced, for the default
backend of that process, which is wrong when the function is traced on one machine and run on
another (`jax.export` for CUDA from a CPU host would carry CPU rewrites: dots instead of cuDNN's 1x1x1
convolutions). So `make_forward` resolves "auto" itself, for `platform` (default: the current
default backend), and writes the concrete choice into the copy's modules: the traced function is the
same wherever it is traced ("auto:cuda", say). `conv_impl` ("reference", "fast" or "auto"), when given,
replaces every module's own setting first.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import nnx

from vmz_jax.errors import VMZError
from vmz_jax.models import layers
from vmz_jax.models.conv import AUTO_IMPL, compiler_options

__all__ = ["CONV_SOFTMAX", "OUTPUTS", "PLATFORMS", "Forward", "audio_conv_head", "conv_head", "conv_pool",
           "conv_scores", "make_forward", "resolve_conv_impl"]

Output = Literal["logits", "probabilities", "features", "stages", "conv_head"]
Pool = Literal["mean", "max"]
ConvSoftmax = Literal["position", "joint", "logits"]

#: The named outputs.
OUTPUTS: tuple[str, ...] = ("logits", "probabilities", "features", "stages", "conv_head")
#: How "conv_head" turns per-position logits into one row (see the module docstring).
CONV_SOFTMAX: tuple[str, ...] = ("position", "joint", "logits")
#: Platforms `make_forward` can resolve "auto" for: the names JAX uses for backends and platforms.
PLATFORMS: tuple[str, ...] = tuple(AUTO_IMPL)
_POOLS = ("mean", "max")
_IMPLS = ("auto", "reference", "fast")


def resolve_conv_impl(conv_impl: str, platform: str | None = None) -> str:
    """What `conv_impl` means on `platform`, fixed so that it no longer depends on the backend that
    traces: "reference" and "fast" as they are, "auto" as "auto:<platform>" (each convolution form
    then takes that platform's row of `vmz_jax.models.conv.AUTO_IMPL`)."""
    if conv_impl not in _IMPLS and not (conv_impl.startswith("auto:") and conv_impl[5:] in AUTO_IMPL):
        raise VMZError(f"unknown conv implementation {conv_impl!r}: use {', '.join(_IMPLS)}")
    if conv_impl != "auto":
        return conv_impl
    platform = platform or jax.default_backend()
    if platform not in AUTO_IMPL:
        raise VMZError(f"unknown platform {platform!r}: use one of {', '.join(PLATFORMS)}")
    return f"auto:{platform}"


class Forward:
    """A model as a pure function: `fn(state, x)` computes `output` with the weights in `state`.

    `graphdef`/`state` are the split eval-mode copy: its variables are the model's, so it sees the
    model's current weights (after training steps too), but for the BatchNorm-folded kernels, which
    `state` refolds whenever the model's weights have changed since (`layers.BatchNormFolding`);
    `conv_impl` is the concrete convolution form written into it and `platform` the one it was
    resolved for; `out_dim` is the width of a named output other than "stages" (None otherwise), so
    that callers can size empty results without running the model. Pass `fn` this `state` (or
    arrays of its structure from it), not the model's own state: its kernels are folded ones."""

    def __init__(self, fn: Callable[[nnx.State, jax.Array], Any], graphdef: nnx.GraphDef[Any],
                 state: nnx.State, output: str, platform: str, conv_impl: str, out_dim: int | None = None,
                 folding: layers.BatchNormFolding | None = None):
        self.fn, self.graphdef, self._state = fn, graphdef, state
        self.output, self.platform, self.conv_impl, self.out_dim = output, platform, conv_impl, out_dim
        self._folding = folding

    @property
    def state(self) -> nnx.State:
        """The weights `fn` takes, current with the model's."""
        if self._folding is not None:
            self._folding.refresh()
        return self._state

    def jit(self, **jit_kwargs: Any) -> Callable[[nnx.State, jax.Array], Any]:
        """`jax.jit(fn, **jit_kwargs)`, one per distinct keyword set and shared by every Forward of the
        same structure and output, so that building the forward again reuses compiled executables.
        Compiled with `conv.compiler_options` for the platform, under any `compiler_options` given."""
        options = {**compiler_options(self.platform), **(jit_kwargs.get("compiler_options") or {})}
        jit_kwargs = {**jit_kwargs, "compiler_options": tuple(sorted(options.items())) or None}
        key = tuple(sorted(jit_kwargs.items()))
        try:
            hash(key)
        except TypeError:  # e.g. a list for donate_argnums: correct, just not shared
            return _jit.__wrapped__(self.fn, key)
        return _jit(self.fn, key)

    def __call__(self, x: jax.Array) -> Any:
        """Run the jitted function on the model's own weights."""
        return self.jit()(self.state, x)

    def lower(self, x: jax.Array | jax.ShapeDtypeStruct, **jit_kwargs: Any) -> Any:
        """The jitted function lowered for input `x` (for `.compile()`, `.as_text()`, cost analysis)."""
        return self.jit(**jit_kwargs).lower(self.state, x)


def make_forward(model: nnx.Module, output: Output | Callable[[nnx.Module, jax.Array], Any] = "logits", *,
                 pool_spatial: Pool = "mean", pool_temporal: Pool = "mean", conv_impl: str | None = None,
                 platform: str | None = None, conv_window: int = 7,
                 conv_softmax: ConvSoftmax = "position", fold_batchnorm: bool = True) -> Forward:
    """`model` as a pure forward function of (state, x); see the module docstring for the outputs and
    for how `conv_impl` and `platform` decide the convolution forms. Pooling applies to "features"
    only; asking another output for non-mean pooling is a VMZError rather than silently ignored.
    `conv_window`/`conv_softmax` shape the "conv_head" output only."""
    from vmz_jax.models.resnet import VideoResNet

    named = isinstance(output, str)
    if named and output not in OUTPUTS:
        raise VMZError(f"unknown output {output!r}: use one of {', '.join(OUTPUTS)} or a function")
    if not named and not callable(output):
        raise VMZError(f"output must be one of {', '.join(OUTPUTS)} or a function, not {output!r}")
    if pool_spatial not in _POOLS or pool_temporal not in _POOLS:
        raise VMZError(f"pooling must be mean or max, not {pool_spatial!r}/{pool_temporal!r}")
    pooled = (pool_spatial, pool_temporal) != ("mean", "mean")
    is_resnet = isinstance(model, VideoResNet)
    if pooled and output != "features":
        raise VMZError("pooling applies to the 'features' output only")
    if pooled and not is_resnet:
        raise VMZError(f"{type(model).__name__}'s features are its fc7 activations: there is nothing to "
                       "pool (use mean pooling)")
    if output == "conv_head":
        if not is_resnet:
            raise VMZError(f"{type(model).__name__} has no convolutional head (its classifier follows "
                           "fully connected layers): use logits or probabilities")
        if conv_softmax not in CONV_SOFTMAX:
            raise VMZError(f"conv_softmax must be one of {', '.join(CONV_SOFTMAX)}, not {conv_softmax!r}")
        if isinstance(conv_window, bool) or not isinstance(conv_window, int) or conv_window < 1:
            raise VMZError(f"conv_window must be a positive int, not {conv_window!r}")
    if conv_impl is not None and conv_impl not in _IMPLS:
        raise VMZError(f"unknown conv implementation {conv_impl!r}: use {', '.join(_IMPLS)}")
    target = platform or jax.default_backend()
    if target not in AUTO_IMPL:
        raise VMZError(f"unknown platform {target!r}: use one of {', '.join(PLATFORMS)}")

    graphdef, state = nnx.split(model)
    copy = nnx.merge(graphdef, state)  # new module objects, the same arrays
    copy.eval()
    impls = set()
    for _, module in nnx.iter_modules(copy):
        if hasattr(module, "conv_impl"):
            module.conv_impl = resolve_conv_impl(conv_impl or module.conv_impl, target)
            impls.add(module.conv_impl)
    folding = layers.BatchNormFolding(copy) if fold_batchnorm else None
    graphdef, state = nnx.split(copy)
    head = (conv_window, conv_softmax) if output == "conv_head" else None
    fn = _pure(graphdef, output, pool_spatial, pool_temporal, is_resnet, head)
    return Forward(fn, graphdef, state, output if named else getattr(output, "__name__", "custom"),
                   target, "+".join(sorted(impls)) or "none", _out_dim(model, output), folding)


def _out_dim(model: nnx.Module, output: Any) -> int | None:
    fc = getattr(model, "fc", None)
    if output in ("logits", "probabilities", "conv_head") and fc is not None:
        return int(fc.out_features)
    if output == "features" and fc is not None:
        return int(fc.in_features)
    return None


def _reduce(x: jax.Array, how: str, axes: tuple[int, ...]) -> jax.Array:
    return jnp.max(x, axis=axes) if how == "max" else jnp.mean(x, axis=axes)


def conv_pool(layer4: jax.Array, input_shape: tuple[int, ...], window: int = 7) -> jax.Array:
    """Caffe2's ``final_avg`` of the convolutional prediction: `layer4` (N, T, H, W, C) of clips of
    `input_shape` (N, T, H, W, 3) average-pooled at stride 1 by a (kt, `window`, `window`) window, kt
    Caffe2's ``final_temporal_kernel``; float32 (N, T', H', W', C). A map smaller than the window is a
    VMZError naming both."""
    h = layer4.astype(jnp.float32)
    frames = input_shape[1]
    kt = min(frames // 8 if frames >= 8 else 1, h.shape[1])  # Caffe2's final_temporal_kernel
    if h.shape[2] < window or h.shape[3] < window:
        raise VMZError(f"the convolutional head's {window}x{window} pooling window does not fit the "
                       f"{h.shape[2]}x{h.shape[3]} layer4 map of {input_shape[2]}x{input_shape[3]} input "
                       "(use larger frames or a smaller window)")
    return jax.lax.reduce_window(h, 0.0, jax.lax.add, (1, kt, window, window, 1), (1, 1, 1, 1, 1),
                                 "VALID") / float(kt * window * window)


def conv_scores(logits: jax.Array, softmax: str = "position") -> jax.Array:
    """Per-position logits (N, T', H', W', classes) -> (N, classes) as `conv_softmax` says (see the
    module docstring: "position", "joint" or "logits")."""
    logits = logits.astype(jnp.float32)
    n, classes = logits.shape[0], logits.shape[-1]
    if softmax == "logits":
        return jnp.mean(logits, axis=(1, 2, 3))
    if softmax == "position":
        return jnp.mean(jax.nn.softmax(logits, axis=-1), axis=(1, 2, 3))
    joint = jax.nn.softmax(logits.reshape(n, -1), axis=-1).reshape(logits.shape)
    return jnp.sum(joint, axis=(1, 2, 3)).reshape(n, classes)


def conv_head(net: nnx.Module, x: jax.Array, window: int = 7, softmax: str = "position") -> jax.Array:
    """The "conv_head" output of a VideoResNet `net` for clips `x` (N, T, H, W, 3): (N, classes),
    float32. A pooled map smaller than the window is a VMZError naming both."""
    pooled = conv_pool(net.stage_outputs(x)["layer4"], x.shape, window)
    return conv_scores(net.fc(pooled), softmax)  # the FC at each position: a 1x1x1 convolution


def audio_conv_head(net: nnx.Module, clips: jax.Array, logmels: jax.Array, window: int = 7,
                    softmax: str = "position", head: str = "av") -> jax.Array:
    """`conv_head` for the models that take log-mels: (N, classes), float32. An audio-visual model's
    "av" head as ``create_av_resnet`` builds it with ``use_convolutional_pred``: the audio features
    (max-pooled to one position) tiled over the positions of the pooled visual map, concatenated
    after the visual ones, and ``av_fc1``, ``av_fc2``, ``last_out`` at every position (1x1x1
    convolutions); its "visual" head at every position, as the visual models'; the "audio" head, and
    an audio-only model, have one position."""
    if head == "visual":
        return conv_head(net.visual, clips, window, softmax)
    if head == "audio" or not hasattr(net, "fusion_logits"):
        tower = net.audio if hasattr(net, "fusion_logits") else net
        return conv_scores(tower(logmels)[:, None, None, None, :], softmax)
    visual = conv_pool(net.visual.stage_outputs(clips)["layer4"], clips.shape, window)
    audio = net.audio.features(logmels).astype(jnp.float32)
    tiled = jnp.broadcast_to(audio[:, None, None, None, :], (*visual.shape[:-1], audio.shape[-1]))
    return conv_scores(net.fusion_logits(visual, tiled), softmax)


@functools.lru_cache(maxsize=64)
def _pure(graphdef: nnx.GraphDef[Any], output: Any, pool_spatial: str, pool_temporal: str,
          is_resnet: bool, head: tuple[int, str] | None = None) -> Callable[[nnx.State, jax.Array], Any]:
    """One function object per (structure, output, pooling), so that jit caches hit across calls
    of `make_forward` on the same model (or another model with the same structure)."""

    def forward(state: nnx.State, x: jax.Array) -> Any:
        net = nnx.merge(graphdef, state)
        if callable(output):
            return output(net, x)
        if output == "logits":
            return net(x).astype(jnp.float32)
        if output == "probabilities":
            return jax.nn.softmax(net(x).astype(jnp.float32), axis=-1)
        if output == "stages":
            return net.stage_outputs(x)
        if output == "conv_head":
            assert head is not None
            return conv_head(net, x, *head)
        if is_resnet and (pool_spatial, pool_temporal) != ("mean", "mean"):
            h = net.stage_outputs(x)["layer4"].astype(jnp.float32)
            return _reduce(_reduce(h, pool_spatial, (2, 3)), pool_temporal, (1,))
        return net.features(x).astype(jnp.float32)

    return forward


@functools.lru_cache(maxsize=64)
def _jit(fn: Callable[..., Any], jit_kwargs: tuple[tuple[str, Any], ...]) -> Any:
    kwargs = dict(jit_kwargs)
    kwargs["compiler_options"] = dict(kwargs["compiler_options"] or {}) or None
    return jax.jit(fn, **kwargs)
