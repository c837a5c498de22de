"""One training step and one evaluation step, compiled; and data parallelism over local devices.

`train_step(model, optimizer, clips, labels)` differentiates the mean cross-entropy with respect to
the `nnx.Param`s, applies the optimizer's update to the model in place (BatchNorm running averages
included) and returns {"loss", "accuracy"} as device scalars. An audio-visual model takes the pair
``(clips, logmels)`` in place of the clips, and with `blend_weights` (w_a, w_v, w_av) learns from
Gradient-Blending's loss over its three heads (`vmz_jax.train.blend`); its accuracy is the av head's.

Donation: the step donates the model's and the optimizer's arrays to the compiled computation, which
writes their new values into the same device buffers, so a step holds one copy of the weights and
optimizer state, not two. The model and optimizer objects (and anything sharing their variables, such
as a `make_forward` built from the model, or `nnx.merge` of its split) see the new values as before;
an array taken out of them before the step (`model.fc.kernel[...]`, `jax.tree.leaves(nnx.state(m))`)
is deleted by it and raises if used: copy it (`np.array(x)`), or pass `donate=False`. An array
whose host memory is also referenced elsewhere (a NumPy view, a checkpoint being written) is copied
instead of donated, and a model and optimizer that share an array are stepped without donation (XLA
cannot donate one buffer twice). It works with `make_optimizer`'s
optimizer or any `nnx.Optimizer(model, optax_transform, wrt=nnx.Param)`; the model must be in
training mode (`model.train()` or `apply_train_mode`) for batch statistics. `eval_step` runs the model
as it is (call `model.eval()` first) and returns the loss, accuracy and the logits.

Data parallel: `data_mesh()` is a 1-D `jax.sharding.Mesh` named "data" over every device;
`replicate(mesh, model, optimizer)` places the model and optimizer state on all of them and
`shard_batch(mesh, clips, labels)` splits the batch along its first axis. The same compiled step then
runs on every device (XLA partitions it from the input shardings) and the gradients are averaged by the
compiler. BatchNorm statistics are over the *global* batch: the mean under jit of an array sharded
along the batch axis is the mean of every shard together (an all-reduce), which is what one device
with the whole batch would compute -- results do not depend on the device count, unlike PyTorch's
DistributedDataParallel with per-GPU BatchNorm.

Several hosts: call `jax.distributed.initialize()` in every process first (it reads the coordinator
from the environment on most clusters, or pass `coordinator_address`, `num_processes`,
`process_id`); `data_mesh()` then spans every process's devices and `shard_batch` takes each process's
own part of the global batch (`jax.make_array_from_process_local_data`), so each host loads
`batch_size / jax.process_count()` clips. `fit` does all of this itself.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vmz_jax.models.conv import compiler_options
from vmz_jax.models.remat import REMAT_COMPILER_OPTIONS, rematerializes
from vmz_jax.train.blend import BlendWeights, blended_loss

__all__ = ["compiled_train_step", "data_mesh", "eval_step", "local_rows", "loss_fn", "lower_train_step",
           "replicate", "shard_batch", "spans_processes", "train_step"]


def loss_fn(model: nnx.Module, clips: Any, labels: jax.Array, label_smoothing: float = 0.0,
            blend_weights: BlendWeights | None = None) -> tuple[jax.Array, jax.Array]:
    """(mean cross-entropy, logits): logits in float32 whatever the computation dtype; with
    `label_smoothing` the targets are (1 - s) * one_hot + s / num_classes. `clips` may be the pair
    (clips, logmels) of an audio-visual model: the loss and logits of its av head, or with
    `blend_weights` the Gradient-Blending loss of its heads (`blended_loss`) and the av head's logits."""
    inputs = clips if isinstance(clips, tuple) else (clips,)
    dtype = jnp.promote_types(inputs[0].dtype, jnp.float32)
    labels = labels.astype(jnp.int32)
    if blend_weights is not None:
        if label_smoothing:
            raise ValueError("label smoothing and the Gradient-Blending loss do not go together")
        heads = model.heads(*inputs)
        loss, _ = blended_loss(heads, labels, blend_weights)
        return loss, heads["av"].astype(dtype)
    logits = model(*inputs).astype(dtype)
    if label_smoothing:
        targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype),
                                      label_smoothing)
        losses = optax.softmax_cross_entropy(logits, targets)
    else:
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return jnp.mean(losses), logits


def _accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(logits.dtype))


def _train_step(model: nnx.Module, optimizer: nnx.Optimizer, clips: Any, labels: jax.Array,
                label_smoothing: float, blend_weights: BlendWeights | None = None) -> dict[str, jax.Array]:
    grad_fn = nnx.value_and_grad(loss_fn, has_aux=True)
    (loss, logits), grads = grad_fn(model, clips, labels, label_smoothing, blend_weights)
    optimizer.update(model, grads)
    return {"loss": loss, "accuracy": _accuracy(logits, labels)}


def _pure_train_step(graphdef: nnx.GraphDef[Any], state: nnx.State, clips: Any, labels: jax.Array,
                     label_smoothing: float, blend_weights: BlendWeights | None
                     ) -> tuple[dict[str, jax.Array], nnx.State]:
    model, optimizer = nnx.merge(graphdef, state)
    metrics = _train_step(model, optimizer, clips, labels, label_smoothing, blend_weights)
    return metrics, nnx.state((model, optimizer))


def compiled_train_step(platform: str, donate: bool = True, remat: bool = False) -> Any:
    """The jitted step for `platform` ("cpu", "cuda", ...), as a pure function of (graphdef, state,
    clips, labels, label_smoothing, blend_weights) of the split (model, optimizer), returning (metrics,
    new state); with `donate` the state's buffers hold the new state (see the module docstring).
    Compiled with the convolution kernels `conv.compiler_options` picks for `platform`, and with
    `REMAT_COMPILER_OPTIONS` too when `remat` (the model rematerializes)."""
    options = {**compiler_options(platform), **(REMAT_COMPILER_OPTIONS.get(platform, {}) if remat else {})}
    return _jitted_step(donate, tuple(sorted(options.items())))


@functools.cache
def _jitted_step(donate: bool, options: tuple[tuple[str, Any], ...]) -> Any:
    return jax.jit(_pure_train_step, static_argnums=(0, 4, 5), donate_argnums=(1,) if donate else (),
                   compiler_options=dict(options) or None)


#: Whether the model of a (model, optimizer) graphdef rematerializes: the remat modes are static
#: attributes, part of the graphdef, so one walk of the model per structure, not per step.
_REMATERIALIZES: dict[nnx.GraphDef[Any], bool] = {}


def _step_and_arguments(model: nnx.Module, optimizer: nnx.Optimizer, label_smoothing: float,
                        blend_weights: BlendWeights | None, donate: bool) -> tuple[Any, tuple[Any, ...]]:
    graphdef, state = nnx.split((model, optimizer))
    ids = [id(x) for x in jax.tree.leaves(state)]
    donate = donate and len(ids) == len(set(ids))  # XLA cannot donate one buffer twice
    if graphdef not in _REMATERIALIZES:
        _REMATERIALIZES[graphdef] = rematerializes(model)
    remat = _REMATERIALIZES[graphdef]
    bw = None if blend_weights is None else tuple(map(float, blend_weights))
    step = compiled_train_step(jax.default_backend(), donate, remat)
    return step, (graphdef, state, float(label_smoothing), bw)


def lower_train_step(model: nnx.Module, optimizer: nnx.Optimizer, clips: Any, labels: Any, *,
                     label_smoothing: float = 0.0, blend_weights: BlendWeights | None = None,
                     donate: bool = True) -> jax.stages.Lowered:
    """`train_step`'s computation lowered for these arguments (arrays or `jax.ShapeDtypeStruct`s, an
    abstract model from `nnx.eval_shape` too), for the default backend: `.compile()` builds what
    `train_step` runs, with its compiler options, for `memory_analysis()` and the like."""
    step, (graphdef, state, smoothing, bw) = _step_and_arguments(model, optimizer, label_smoothing,
                                                                 blend_weights, donate)
    return step.lower(graphdef, state, clips, labels, smoothing, bw)


def train_step(model: nnx.Module, optimizer: nnx.Optimizer, clips: Any, labels: jax.Array, *,
               label_smoothing: float = 0.0, donate: bool = True,
               blend_weights: BlendWeights | None = None) -> dict[str, jax.Array]:
    """One optimizer step on a batch: clips float (N, T, H, W, 3) (an audio-visual model: the pair
    (clips, logmels (N, F, 40)); `blend_weights` (w_a, w_v, w_av): the Gradient-Blending loss), labels
    int (N,) class indices.
    Updates `model` and `optimizer` in place; returns {"loss", "accuracy"} of the batch (before the
    update). Compiled once per input shape and model structure. With `donate` (the default) the old
    arrays' buffers hold the new values: arrays taken out of the model or optimizer before the step
    are deleted by it (see the module docstring)."""
    _check_batch(clips, labels)
    step, (graphdef, state, smoothing, bw) = _step_and_arguments(model, optimizer, label_smoothing,
                                                                 blend_weights, donate)
    metrics, state = step(graphdef, state, clips, labels, smoothing, bw)
    nnx.update((model, optimizer), state)
    return metrics


@nnx.jit
def _eval_step(model: nnx.Module, clips: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
    loss, logits = loss_fn(model, clips, labels)
    return {"loss": loss, "accuracy": _accuracy(logits, labels), "logits": logits}


def eval_step(model: nnx.Module, clips: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
    """Loss, accuracy and logits (N, num_classes) of a batch, without updating anything but what the
    model's mode updates: put it in eval mode first (`model.eval()`) for the running statistics."""
    _check_batch(clips, labels)
    return _eval_step(model, clips, labels)


def _check_batch(clips: Any, labels: Any) -> None:
    if isinstance(clips, tuple):
        if len(clips) != 2 or np.ndim(clips[1]) != 3 or np.shape(clips[1])[:1] != np.shape(clips[0])[:1]:
            shapes = [np.shape(x) for x in clips]
            raise ValueError(f"expected (clips, logmels (N, F, 40)), got shapes {shapes}")
        clips = clips[0]
    shape, lshape = np.shape(clips), np.shape(labels)
    if len(shape) != 5 or shape[-1] != 3:
        raise ValueError(f"expected clips (N, T, H, W, 3), got shape {shape}")
    if lshape != shape[:1]:
        raise ValueError(f"expected labels ({shape[0]},) (one class index per clip), got shape {lshape}")
    if not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
        raise ValueError(f"labels must be integer class indices, got {jnp.result_type(labels)}")


# --------------------------------------------------------------------------------------------------
# data parallelism


def data_mesh(devices: Any = None) -> Mesh:
    """A 1-D mesh named "data" over `devices` (default: every device of every process)."""
    devices = np.asarray(jax.devices() if devices is None else devices)
    return Mesh(devices.reshape(-1), ("data",))


def spans_processes(mesh: Mesh) -> bool:
    """Whether `mesh` holds devices of several processes (hosts)."""
    return len({d.process_index for d in mesh.devices.flat}) > 1


def replicate(mesh: Mesh, *objects: nnx.Module | nnx.Optimizer) -> None:
    """Place every variable of `objects` (a model, its optimizer) on all devices of `mesh`, in place.
    Across processes each must hold the same values (built from the same seed or checkpoint)."""
    replicated = NamedSharding(mesh, PartitionSpec())
    for obj in objects:
        state = nnx.state(obj)
        if spans_processes(mesh):
            # a process-local jax array cannot be placed on other processes' devices; its host copy can
            state = jax.tree.map(lambda x: _put_host_copy(x, replicated), state)
        else:
            state = jax.device_put(state, replicated)
        nnx.update(obj, state)


def _put_host_copy(x: jax.Array, sharding: NamedSharding) -> jax.Array:
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return jax.random.wrap_key_data(jax.device_put(np.asarray(jax.random.key_data(x)), sharding),
                                        impl=jax.random.key_impl(x))
    return jax.device_put(np.asarray(x), sharding)


def shard_batch(mesh: Mesh, clips: Any, labels: Any) -> tuple[Any, jax.Array]:
    """Split a batch along its first axis over `mesh` ("data"); `clips` may be a tuple of arrays
    (clips, logmels), each split alike. With a mesh over several processes, each passes its own part
    of the global batch (the global batch is their concatenation in process order)."""
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    if spans_processes(mesh):
        def local(x: Any) -> jax.Array:
            return jax.make_array_from_process_local_data(sharding, np.asarray(x))

        return jax.tree.map(local, clips), local(labels)
    count = mesh.devices.size
    rows = np.shape(jax.tree.leaves(clips)[0])[0]
    if rows % count:
        raise ValueError(f"a batch of {rows} clips does not split over {count} devices; "
                         f"use a batch size divisible by {count}")
    return jax.device_put(clips, sharding), jax.device_put(labels, sharding)


def local_rows(x: jax.Array) -> np.ndarray:
    """This process's rows of an array split along its first axis (all of them in one process)."""
    if x.is_fully_addressable:
        return np.asarray(x)
    shards = {s.index[0].start or 0: s for s in x.addressable_shards}  # replicas share a start
    return np.concatenate([np.asarray(shards[start].data) for start in sorted(shards)])
