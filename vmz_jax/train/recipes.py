"""Published fine-tuning recipes, one row per model family, each value with where it comes from.

`vmz-jax finetune` starts from the row of the model's family and applies the user's flags on top.
Two sources (see shared/spec/FINETUNING.md for the facts and the files they were read from):

* **VMZ Caffe2** (``c2/tools/train_net.py`` with ``c2/scripts/finetune_ucf101.sh`` /
  ``finetune_hmdb51.sh``): R(2+1)D-34 from Kinetics weights, 4 clips per GPU on 8 GPUs, base lr
  0.0001 (UCF101) multiplied by the GPU count, momentum SGD 0.9 with Nesterov, weight decay 0.005, lr
  x0.1 every 2 of 8 epochs, no warm-up, no dropout (``--use_dropout=0``), BatchNorm trained, random
  short edge from ``--jitter_scales 128,160`` (Caffe2 picks one of the listed values), random 112
  crop, random mirror. Used for every family VMZ trained the Caffe2 way (R(2+1)D, R3D, R2D, MCx, rMCx)
  and for C3D (fixed to 16 frames of 112x112).
* **mmaction2** (``configs/recognition/csn/ircsn_ig65m-pretrained-r152-bnfrozen_8xb12-32x2x1-58e_
  kinetics400-rgb.py`` and its ip-CSN sibling): SGD lr 5e-4 at batch 96 (8 GPUs x 12), momentum 0.9
  (no Nesterov), weight decay 1e-4, gradient-norm clip 40, linear warm-up over 16 of 58 epochs, lr x0.1
  at epochs 32 and 48, BatchNorm frozen (``norm_eval=True, bn_frozen=True``), dropout 0.5 before the
  head, 32-frame clips taking every 2nd frame, 224 crops. mmaction2 crops with RandomResizedCrop
  from a 256 short side; here the short side is jittered over 256-320 (PySlowFast's default range for
  224 crops) and a 224 square cropped, which is what `VideoClipDataset` implements.

Two adaptations, both stated where they happen: the learning rate is per clip of the published
batch, so another `--batch-size` scales it linearly (VMZ itself multiplies the base rate by the GPU
count, i.e. by the batch); and schedule milestones are fractions of the run (VMZ's steps at 2, 4, 6
of 8 epochs; mmaction2's warm-up to 16 and steps at 32, 48 of 58), so `--epochs` keeps the shape.
VMZ's Caffe2 "epoch" is a clip count (``epoch_size`` 100000 for UCF101, about 10 passes over split
1); an epoch here is one pass over the training videos.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from vmz_jax.errors import VMZError
from vmz_jax.train.config import TrainConfig

__all__ = ["RECIPES", "Recipe", "recipe_for"]


@dataclass(frozen=True)
class Recipe:
    """A published fine-tuning recipe: the optimizer side (`train_config`) and the data side.

    `lr` belongs to `batch_size` clips per update; `step_at`/`warmup` are fractions of the epochs.
    `clip_len` None means the clip length the weights were trained with (the loaded model's).
    `sources` maps each field to where its value comes from.
    """

    name: str
    optimizer: str
    lr: float
    batch_size: int
    momentum: float
    nesterov: bool
    weight_decay: float
    schedule: str
    step_at: tuple[float, ...]
    gamma: float
    warmup: float
    epochs: int
    bn: str
    dropout: float
    clip_grad_norm: float | None
    head_lr_mult: float
    clip_len: int | None
    sampling_rate: int
    frame_size: tuple[int, int]
    jitter: str
    crop_size: int
    flip: bool
    sources: dict[str, str]

    def scaled_lr(self, batch_size: int) -> float:
        """The recipe's rate for `batch_size` clips per update (the linear scaling VMZ applies by
        multiplying its per-GPU base rate by the GPU count)."""
        return self.lr * batch_size / self.batch_size

    def train_config(self, *, epochs: int | None = None, batch_size: int | None = None,
                     accumulate: int = 1, **overrides: Any) -> TrainConfig:
        """The `TrainConfig` of this recipe for `epochs` and `batch_size` (default: the recipe's),
        milestones placed at the recipe's fractions of the run; `overrides` replace fields last
        (an explicit `lr` is used as given, not scaled)."""
        epochs = self.epochs if epochs is None else int(epochs)
        batch_size = self.batch_size if batch_size is None else int(batch_size)
        steps = sorted({e for e in (round(f * epochs) for f in self.step_at) if 0 < e < epochs})
        values: dict[str, Any] = dict(
            optimizer=self.optimizer, lr=self.scaled_lr(batch_size * accumulate), momentum=self.momentum,
            nesterov=self.nesterov, weight_decay=self.weight_decay, schedule=self.schedule,
            step_epochs=tuple(steps), gamma=self.gamma, warmup_epochs=int(round(self.warmup * epochs)),
            head_lr_mult=self.head_lr_mult, bn=self.bn, dropout=self.dropout,
            clip_grad_norm=self.clip_grad_norm, accumulate=accumulate, epochs=epochs,
            batch_size=batch_size)
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(TrainConfig)})
        if unknown:
            raise VMZError(f"recipe {self.name}: unknown TrainConfig field(s) {', '.join(unknown)}")
        values.update({k: v for k, v in overrides.items() if v is not None})
        return TrainConfig(**values)


_VMZ_SRC = "VMZ c2/scripts/finetune_ucf101.sh + c2/tools/train_net.py"
_MMA_SRC = ("mmaction2 configs/recognition/csn/ircsn_ig65m-pretrained-r152-bnfrozen_8xb12-32x2x1-58e_"
            "kinetics400-rgb.py")

VMZ_CAFFE2 = Recipe(
    name="vmz_caffe2", optimizer="sgd", lr=0.0008, batch_size=32, momentum=0.9, nesterov=True,
    weight_decay=0.005, schedule="step", step_at=(0.25, 0.5, 0.75), gamma=0.1, warmup=0.0, epochs=8,
    bn="train", dropout=0.0, clip_grad_norm=None, head_lr_mult=1.0, clip_len=None, sampling_rate=1,
    frame_size=(128, 160), jitter="choice", crop_size=112, flip=True,
    sources={
        "lr": f"{_VMZ_SRC}: base_learning_rate 0.0001 per GPU x 8 GPUs (UCF101; HMDB51 uses 0.0002)",
        "batch_size": f"{_VMZ_SRC}: batch_size 4 per GPU x 8 GPUs",
        "momentum": f"{_VMZ_SRC}: MomentumSGDUpdate momentum 0.9, nesterov=1",
        "nesterov": f"{_VMZ_SRC}: nesterov=1",
        "weight_decay": f"{_VMZ_SRC}: weight_decay 0.005",
        "schedule": f"{_VMZ_SRC}: step policy, stepsize 2 epochs, gamma 0.1, 8 epochs",
        "warmup": f"{_VMZ_SRC}: none",
        "bn": f"{_VMZ_SRC}: use_full_ft, SpatialBN trained (momentum 0.9, eps 1e-3)",
        "dropout": f"{_VMZ_SRC}: --use_dropout=0",
        "clip_grad_norm": f"{_VMZ_SRC}: none",
        "clip_len": "the clip length of the pretrained weights (VMZ fine-tunes 32-frame models on 32 frames)",
        "frame_size": f"{_VMZ_SRC}: --jitter_scales 128,160 (one of the listed values per clip)",
        "crop_size": f"{_VMZ_SRC}: --crop_size 112",
        "flip": f"{_VMZ_SRC}: random mirror",
    })

MMACTION2_CSN = Recipe(
    name="mmaction2_csn", optimizer="sgd", lr=5e-4, batch_size=96, momentum=0.9, nesterov=False,
    weight_decay=1e-4, schedule="step", step_at=(32 / 58, 48 / 58), gamma=0.1, warmup=16 / 58,
    epochs=58, bn="frozen", dropout=0.5, clip_grad_norm=40.0, head_lr_mult=1.0, clip_len=32,
    sampling_rate=2, frame_size=(256, 320), jitter="range", crop_size=224, flip=True,
    sources={
        "lr": f"{_MMA_SRC}: optimizer lr 5e-4 for 8 GPUs x 12 videos",
        "batch_size": f"{_MMA_SRC}: 8xb12",
        "momentum": f"{_MMA_SRC}: SGD momentum 0.9 (torch SGD, no Nesterov)",
        "nesterov": f"{_MMA_SRC}: not set",
        "weight_decay": f"{_MMA_SRC}: weight_decay 1e-4",
        "schedule": f"{_MMA_SRC}: MultiStepLR milestones [32, 48] of 58 epochs, gamma 0.1",
        "warmup": f"{_MMA_SRC}: LinearLR over 16 epochs (start factor 0.1; linear from 0 here)",
        "bn": f"{_MMA_SRC}: norm_eval=True, bn_frozen=True",
        "dropout": f"{_MMA_SRC}: cls_head dropout_ratio 0.5",
        "clip_grad_norm": f"{_MMA_SRC}: clip_grad max_norm 40",
        "clip_len": f"{_MMA_SRC}: SampleFrames clip_len 32, frame_interval 2",
        "frame_size": "mmaction2 RandomResizedCrop from a 256 short side; here short side 256-320 "
                      "(PySlowFast TRAIN_JITTER_SCALES for 224 crops) and a random 224 crop",
        "crop_size": f"{_MMA_SRC}: Resize to 224x224 after the crop",
        "flip": f"{_MMA_SRC}: Flip flip_ratio 0.5",
    })

#: family -> recipe (vmz_jax.models.registry.FAMILIES).
RECIPES: dict[str, Recipe] = {
    "r2plus1d": VMZ_CAFFE2, "r3d": VMZ_CAFFE2, "r2d": VMZ_CAFFE2, "mc": VMZ_CAFFE2, "rmc": VMZ_CAFFE2,
    "c3d": dataclasses.replace(VMZ_CAFFE2, name="vmz_caffe2_c3d", clip_len=16),
    "ir_csn": MMACTION2_CSN, "ip_csn": MMACTION2_CSN,
}


def recipe_for(family: str) -> Recipe:
    """The recipe of a model family (`ModelEntry.family`)."""
    try:
        return RECIPES[family]
    except KeyError:
        raise VMZError(f"no fine-tuning recipe for model family {family!r}; known: "
                       f"{', '.join(sorted(RECIPES))}") from None
