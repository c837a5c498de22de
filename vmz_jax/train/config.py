"""`TrainConfig`: every knob of a fine-tuning run, as one frozen, JSON-round-trippable record.

The defaults follow VMZ's Caffe2 fine-tuning recipe where it has one (SGD, momentum 0.9, Nesterov,
BatchNorm trained, no dropout, weight decay 1e-4 on convolution and classifier kernels only) and
mmaction2's CSN recipe for the extras it adds (dropout 0.5 before the head, gradient-norm clip 40):
set those two explicitly to follow it. `fit` writes `to_dict()` into its run directory's config.json
and refuses to resume a run whose config differs.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from vmz_jax.errors import VMZError
from vmz_jax.models.remat import REMAT_MODES

__all__ = ["OPTIMIZERS", "SCHEDULES", "TrainConfig"]

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "step")
BN_MODES = ("train", "frozen")
DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class TrainConfig:
    """How to fine-tune; see the module docstring for where the defaults come from.

    optimizer: "sgd" (with `momentum`, `nesterov`) or "adamw".
    lr: peak learning rate of the backbone (after warm-up); the head gets `lr * head_lr_mult`.
    weight_decay: L2 on kernels only (never on BatchNorm scale/bias or on biases). With SGD it is
        added to the gradient before momentum (torch.optim.SGD's convention); with AdamW decoupled.
    schedule: "cosine" (to 0 at the end of training) or "step" (x `gamma` at each epoch in
        `step_epochs`); both after a linear warm-up of `warmup_steps` + `warmup_epochs` epochs.
    freeze: stage names whose parameters stay bitwise unchanged (their BatchNorms use the running
        statistics): "stem", "layer1".."layer4", "fc" for the ResNets, "conv1a".."conv5b", "fc6",
        "fc7", "fc" for C3D, or "backbone" for everything but the classifier `fc`.
    bn: "train" (batch statistics, running averages updated) or "frozen" (every BatchNorm uses its
        running statistics and its scale/bias are not trained: for small batches).
    dropout: rate before the ResNets' classifier (0 = none; C3D has its own fixed 0.5 dropouts).
    clip_grad_norm: clip the global gradient norm of the trained parameters to this (None = off).
    accumulate: average the gradients of this many batches per optimizer update (optax.MultiSteps);
        the schedule counts updates, so the effective batch is `batch_size * accumulate`.
    label_smoothing: mix the one-hot targets with the uniform distribution by this much.
    dtype: computation dtype of the convolutions; master weights, BatchNorm and the loss stay
        float32.
    remat: "none", "blocks" or "full": recompute each residual block's activations in the backward
        pass instead of keeping them (`vmz_jax.models.remat`): less memory, more time, the same
        numbers.
    blend_weights: (audio, visual, av) weights of Gradient-Blending's loss for an audio-visual model
        (`vmz_jax.train.blend`; `BLEND_WEIGHTS` holds the published ones); None: the model's own
        logits (an audio-visual model's av head) with the plain cross-entropy.
    epochs, batch_size, seed: the data loop (`fit`); checkpoint_every: steps between resumable
        checkpoints; keep: how many of them to keep; eval_every: epochs between validations.
    """

    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    schedule: str = "cosine"
    step_epochs: tuple[int, ...] = ()
    gamma: float = 0.1
    warmup_steps: int = 0
    warmup_epochs: int = 0
    head_lr_mult: float = 1.0
    freeze: tuple[str, ...] = ()
    bn: str = "train"
    dropout: float = 0.0
    clip_grad_norm: float | None = None
    accumulate: int = 1
    label_smoothing: float = 0.0
    dtype: str = "float32"
    remat: str = "none"
    blend_weights: tuple[float, float, float] | None = None
    epochs: int = 10
    batch_size: int = 8
    seed: int = 0
    checkpoint_every: int = 500
    keep: int = 3
    eval_every: int = 1

    def __post_init__(self) -> None:
        # Lists from JSON (or a user) become tuples, so the config stays hashable and comparable.
        for name in ("step_epochs", "freeze"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = (value,)
            object.__setattr__(self, name, tuple(value))
        if self.blend_weights is not None and not isinstance(self.blend_weights, str):
            object.__setattr__(self, "blend_weights", tuple(self.blend_weights))
        self._check()

    def _check(self) -> None:
        def bad(name: str, why: str) -> VMZError:
            return VMZError(f"TrainConfig.{name}={getattr(self, name)!r}: {why}")

        choices = {"optimizer": OPTIMIZERS, "schedule": SCHEDULES, "bn": BN_MODES, "dtype": DTYPES,
                   "remat": REMAT_MODES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise bad(name, f"expected one of {', '.join(allowed)}")
        for name in ("lr", "momentum", "weight_decay", "gamma", "head_lr_mult", "dropout",
                     "label_smoothing"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
                    or value < 0:
                raise bad(name, "expected a finite number >= 0")
        if not 0 <= self.dropout < 1:
            raise bad("dropout", "expected a rate in [0, 1)")
        if not 0 <= self.label_smoothing < 1:
            raise bad("label_smoothing", "expected a value in [0, 1)")
        if self.clip_grad_norm is not None and (isinstance(self.clip_grad_norm, bool) or not isinstance(
                self.clip_grad_norm, int | float) or not self.clip_grad_norm > 0):
            raise bad("clip_grad_norm", "expected a number > 0, or None (no clipping)")
        for name, low in (("warmup_steps", 0), ("warmup_epochs", 0), ("accumulate", 1), ("epochs", 1),
                          ("batch_size", 1), ("seed", 0), ("checkpoint_every", 1), ("keep", 1),
                          ("eval_every", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise bad(name, f"expected an integer >= {low}")
        if not all(isinstance(e, int) and not isinstance(e, bool) and e > 0 for e in self.step_epochs) \
                or list(self.step_epochs) != sorted(set(self.step_epochs)):
            raise bad("step_epochs", "expected increasing epoch numbers > 0")
        if not all(isinstance(s, str) and s for s in self.freeze):
            raise bad("freeze", "expected stage names")
        if self.blend_weights is not None:
            weights = self.blend_weights
            if not isinstance(weights, tuple) or len(weights) != 3 or not all(
                    isinstance(w, int | float) and not isinstance(w, bool) and math.isfinite(w) and w >= 0
                    for w in weights) or not sum(weights) > 0:
                raise bad("blend_weights", "expected three finite weights >= 0 (audio, visual, av), "
                          "not all 0")
            if self.label_smoothing:
                raise bad("blend_weights", "the Gradient-Blending loss takes no label smoothing")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (tuples as lists) that `from_dict` turns back into this config."""
        out = dataclasses.asdict(self)
        if self.remat == "none":  # absent: as in runs (config.json) made before the option existed
            del out["remat"]
        if self.blend_weights is None:  # the same: absent unless a blended loss is trained
            del out["blend_weights"]
        else:
            out["blend_weights"] = list(self.blend_weights)
        out["step_epochs"] = list(self.step_epochs)
        out["freeze"] = list(self.freeze)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """The inverse of `to_dict`; unknown keys are an error (a typo would be silently ignored)."""
        if not isinstance(data, dict):
            raise VMZError(f"TrainConfig.from_dict: expected a dict, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise VMZError(f"TrainConfig: unknown field(s) {', '.join(unknown)}; "
                           f"known: {', '.join(sorted(known))}")
        return cls(**data)

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with `changes` applied (and checked)."""
        return dataclasses.replace(self, **changes)
