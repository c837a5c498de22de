"""Fine-tuning: a `TrainConfig`, the optimizer it describes, compiled train/eval steps, `fit`.

Your own loop::

    model = vmz_jax.load("r2plus1d_34", "ig65m_8frms", num_classes=101, new_head=True)
    model.train()
    optimizer = nnx.Optimizer(model, optax.sgd(1e-3, momentum=0.9), wrt=nnx.Param)
    for clips, labels in batches:
        metrics = train_step(model, optimizer, clips, labels)

or with the recipe of a `TrainConfig` (per-group learning rates, schedule, weight-decay mask,
freezing, clipping, accumulation): `apply_train_mode(model, config)` and
`make_optimizer(model, config, steps_per_epoch)`.
"""

from vmz_jax.train.config import TrainConfig
from vmz_jax.train.data import ArrayDataset, Dataset, Position
from vmz_jax.train.fit import FitResult, fit
from vmz_jax.train.optim import apply_train_mode, learning_rate, make_optimizer, make_schedule, param_groups
from vmz_jax.train.step import data_mesh, eval_step, loss_fn, replicate, shard_batch, train_step

__all__ = [
    "ArrayDataset",
    "Dataset",
    "FitResult",
    "Position",
    "TrainConfig",
    "apply_train_mode",
    "data_mesh",
    "eval_step",
    "fit",
    "learning_rate",
    "loss_fn",
    "make_optimizer",
    "make_schedule",
    "param_groups",
    "replicate",
    "shard_batch",
    "train_step",
]
