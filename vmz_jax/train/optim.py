"""The optimizer a `TrainConfig` describes, and putting a model into its training mode.

`make_optimizer` returns an `nnx.Optimizer` over the model's `nnx.Param`s whose optax transform is

    zero the frozen parameters' gradients -> clip the global norm (optional)
    -> per group: backbone at lr(step), head at lr(step) * head_lr_mult, frozen: zero updates
    (SGD: L2 on kernels added before momentum, torch.optim.SGD's order; AdamW: decoupled decay)
    -> optax.MultiSteps when accumulating.

Frozen parameters get exact zero updates, so they stay bitwise unchanged; their BatchNorms use the
running statistics (`apply_train_mode`), so those do not move either. `train_step` works with this
optimizer and equally with any `nnx.Optimizer(model, optax_transform, wrt=nnx.Param)` of your own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from vmz_jax.errors import VMZError
from vmz_jax.models.layers import BatchNorm, ConvBN
from vmz_jax.models.remat import set_remat
from vmz_jax.train.config import TrainConfig

__all__ = ["apply_train_mode", "learning_rate", "make_optimizer", "make_schedule", "param_groups",
           "stage_names"]

HEAD = "fc"
Path = tuple[str, ...]


def stage_names(model: nnx.Module) -> tuple[str, ...]:
    """The top-level parts of `model` that `TrainConfig.freeze` may name (in order)."""
    names = []
    for name, value in vars(model).items():
        if isinstance(value, nnx.Module) and any(True for _ in _params_under(value)):
            names.append(name)
    return tuple(names)


def _params_under(module: nnx.Module) -> Iterator[Any]:
    for _, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
        yield var


def frozen_stages(model: nnx.Module, config: TrainConfig) -> frozenset[str]:
    """The stages `config.freeze` names, checked against the model ("backbone" = all but `fc`)."""
    available = stage_names(model)
    out = set()
    for name in config.freeze:
        if name == "backbone":
            out.update(n for n in available if n != HEAD)
        elif name in available:
            out.add(name)
        else:
            raise VMZError(f"TrainConfig.freeze: no stage {name!r} in {type(model).__name__}; "
                           f"available: backbone, {', '.join(available)}")
    return frozenset(out)


def _label(path: Path, frozen: frozenset[str], bn_frozen: bool) -> str:
    if path[0] in frozen or (bn_frozen and _is_bn(path)):
        return "frozen"
    return "head" if path[0] == HEAD else "backbone"


def _is_bn(path: Path) -> bool:
    return len(path) >= 2 and path[-2] == "bn"


def _decays(path: Path) -> bool:
    """Weight decay applies to convolution and dense kernels, never to BatchNorm or biases."""
    return path[-1] == "kernel"


def _keys(path: tuple[Any, ...]) -> Path:
    """A pytree path of the parameter state -> our dotted-path keys. optax sees the state both with
    `nnx.Variable` leaves (at init: their `.value` adds a trailing attribute key, dropped here) and
    with bare arrays (at update), and the labels must be the same for both."""
    out = []
    for key in path:
        if isinstance(key, jax.tree_util.GetAttrKey):
            continue
        if isinstance(key, jax.tree_util.DictKey):
            out.append(str(key.key))
        elif isinstance(key, jax.tree_util.SequenceKey):
            out.append(str(key.idx))
        else:
            out.append(str(getattr(key, "key", key)))
    return tuple(out)


def _tree_of(fn: Callable[[Path], Any]) -> Callable[[Any], Any]:
    """A function of the parameter pytree (as optax passes it) -> the same tree of fn(path)."""
    def labels(params: Any) -> Any:
        return jax.tree_util.tree_map_with_path(lambda p, _: fn(_keys(p)), params)
    return labels


def param_groups(model: nnx.Module, config: TrainConfig) -> dict[str, list[str]]:
    """Which parameters (dotted paths) land in which group: "backbone", "head", "frozen"."""
    frozen = frozen_stages(model, config)
    groups: dict[str, list[str]] = {"backbone": [], "head": [], "frozen": []}
    for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        keys = tuple(str(k) for k in path)
        groups[_label(keys, frozen, config.bn == "frozen")].append(".".join(keys))
    return groups


def make_schedule(config: TrainConfig, steps_per_epoch: int) -> optax.Schedule:
    """Learning rate per optimizer update (after accumulation): linear warm-up from 0, then cosine
    to 0 at the last update, or constant with x `gamma` at each of `step_epochs`."""
    if isinstance(steps_per_epoch, bool) or not isinstance(steps_per_epoch, int) or steps_per_epoch < 1:
        raise VMZError(f"make_optimizer: steps_per_epoch must be a positive int, got {steps_per_epoch!r}")
    per_epoch = steps_per_epoch / config.accumulate
    total = max(1, int(per_epoch * config.epochs))
    warmup = min(total, config.warmup_steps + int(round(config.warmup_epochs * per_epoch)))
    if config.schedule == "cosine":
        after: optax.Schedule = optax.cosine_decay_schedule(config.lr, max(1, total - warmup))
    else:
        boundaries = {max(1, int(round(e * per_epoch)) - warmup): config.gamma for e in config.step_epochs
                      if int(round(e * per_epoch)) > warmup}
        after = optax.piecewise_constant_schedule(config.lr, boundaries)
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, config.lr, warmup), after], [warmup])


def _group_transform(config: TrainConfig, schedule: optax.Schedule, decay_mask: Any
                     ) -> optax.GradientTransformation:
    if config.optimizer == "sgd":
        parts = []
        if config.weight_decay:
            parts.append(optax.add_decayed_weights(config.weight_decay, decay_mask))
        parts.append(optax.sgd(schedule, momentum=config.momentum or None, nesterov=config.nesterov))
        return optax.chain(*parts)
    return optax.adamw(schedule, weight_decay=config.weight_decay, mask=decay_mask)


def make_optimizer(model: nnx.Module, config: TrainConfig, steps_per_epoch: int) -> nnx.Optimizer:
    """The `nnx.Optimizer` (wrt=nnx.Param) for fine-tuning `model` as `config` says; the schedule
    counts updates over `config.epochs` epochs of `steps_per_epoch` batches."""
    frozen = frozen_stages(model, config)
    bn_frozen = config.bn == "frozen"
    labels = _tree_of(lambda p: _label(p, frozen, bn_frozen))
    decay_mask = _tree_of(_decays)
    schedule = make_schedule(config, steps_per_epoch)
    mult = config.head_lr_mult

    def head_schedule(count: Any) -> Any:
        return schedule(count) * mult

    steps = [optax.multi_transform({"frozen": optax.set_to_zero(), "backbone": optax.identity(),
                                    "head": optax.identity()}, labels)]
    if config.clip_grad_norm is not None:
        steps.append(optax.clip_by_global_norm(config.clip_grad_norm))
    steps.append(optax.multi_transform({
        "backbone": _group_transform(config, schedule, decay_mask),
        "head": _group_transform(config, head_schedule, decay_mask),
        "frozen": optax.set_to_zero(),
    }, labels))
    tx: optax.GradientTransformation = optax.chain(*steps)
    if config.accumulate > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=config.accumulate)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    optimizer.lr_schedule = schedule  # for `learning_rate` (static: a function)
    optimizer.accumulate = config.accumulate
    return optimizer


def learning_rate(optimizer: nnx.Optimizer, step: int | None = None) -> float | None:
    """The backbone learning rate of the next update of an optimizer from `make_optimizer`; None for
    an optimizer built otherwise (its schedule is not known here). `step`: the number of steps taken
    so far, when the caller counts them (saves reading the optimizer's counter off the device)."""
    schedule = getattr(optimizer, "lr_schedule", None)
    if schedule is None:
        return None
    taken = int(optimizer.step[...]) if step is None else step
    updates = taken // int(getattr(optimizer, "accumulate", 1))
    return float(schedule(updates))


def apply_train_mode(model: nnx.Module, config: TrainConfig) -> nnx.Module:
    """Put `model` into training mode as `config` says, in place (returns it).

    Train mode (batch-statistics BatchNorm, dropout active), then: every BatchNorm frozen when
    `bn="frozen"`, and those of frozen stages in any case (so nothing of a frozen stage moves);
    the head dropout rate; the convolutions' computation dtype; the remat mode. Parameters stay
    float32. Call it again after `model.eval()` to resume training; it does not touch the weights
    or random state.
    """
    frozen = frozen_stages(model, config)
    model.train()
    for path, module in nnx.iter_modules(model):
        keys = tuple(str(k) for k in path)
        if isinstance(module, BatchNorm):
            module.frozen = config.bn == "frozen" or bool(keys and keys[0] in frozen)
        elif isinstance(module, ConvBN):
            module.dtype = jnp.dtype(config.dtype)
    dropout = getattr(model, "dropout", None)
    if isinstance(dropout, nnx.Dropout):
        dropout.rate = float(config.dropout)
    set_remat(model, config.remat)
    return model
