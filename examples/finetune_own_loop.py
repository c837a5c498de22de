"""Fine-tune with your own loop: a new head on pretrained weights, plain optax, train_step/eval_step.

    python examples/finetune_own_loop.py                                  # random weights, seconds
    python examples/finetune_own_loop.py --arch r2plus1d_34 --pretraining ig65m_8frms
    python examples/finetune_own_loop.py --arch ir_csn_152 --checkpoint irCSN_152_ig65m_from_scratch.pth

With --pretraining/--checkpoint every backbone weight is loaded and a fresh `--classes`-way head is
drawn (`vmz_jax.load(..., new_head=True)`); without, the network starts from random weights, so that
the example runs offline. The data here is random clips whose label is encoded in their mean colour
(so that a few steps visibly learn something); replace `batches` with your loader of normalized
float32 clips (N, T, H, W, 3) and int labels. The result is saved with its class names and reloads
with `vmz_jax.load(arch, checkpoint=OUT)` (and `vmz-jax classify --checkpoint OUT` prints the names).
"""

import argparse
import tempfile
from pathlib import Path

import numpy as np
import optax
from flax import nnx

import vmz_jax
from vmz_jax.runtime import reuse_host_memory
from vmz_jax.train import eval_step, train_step

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
parser.add_argument("--arch", default="r2plus1d_10")
parser.add_argument("--pretraining")
parser.add_argument("--checkpoint")
parser.add_argument("--classes", type=int, default=3)
parser.add_argument("--steps", type=int, default=8)
parser.add_argument("--batch", type=int, default=4)
parser.add_argument("--shape", default="4,32,32", help="T,H,W of the clips")
parser.add_argument("--out", help="where to save the fine-tuned checkpoint (default: a temp dir)")
args = parser.parse_args()
reuse_host_memory()  # CPU: each step reuses the memory the last one freed (before any JAX work)
frames, height, width = (int(v) for v in args.shape.split(","))

if args.pretraining or args.checkpoint:
    model = vmz_jax.load(args.arch, args.pretraining, checkpoint=args.checkpoint,
                         num_classes=args.classes, new_head=True, seed=0)
else:
    model = vmz_jax.models.build(args.arch, args.classes, rngs=nnx.Rngs(0))

# Plain optax: SGD with momentum and a cosine schedule. (For per-group learning rates, weight-decay
# masks, freezing and the rest, see vmz_jax.train.TrainConfig and make_optimizer.)
schedule = optax.cosine_decay_schedule(0.01, args.steps)
optimizer = nnx.Optimizer(model, optax.sgd(schedule, momentum=0.9, nesterov=True), wrt=nnx.Param)

rng = np.random.default_rng(0)


def batches(count: int):
    """Random clips, shifted by a per-class colour so that the task is learnable."""
    colours = rng.standard_normal((args.classes, 3)).astype(np.float32)
    for _ in range(count):
        labels = rng.integers(0, args.classes, args.batch)
        clips = rng.standard_normal((args.batch, frames, height, width, 3)).astype(np.float32)
        yield clips + colours[labels][:, None, None, None, :], labels


val_clips, val_labels = next(batches(1))
model.train()  # batch statistics in BatchNorm, dropout (if any) active
for step, (clips, labels) in enumerate(batches(args.steps), start=1):
    metrics = train_step(model, optimizer, clips, labels)
    print(f"step {step}: loss {float(metrics['loss']):.4f}, accuracy {float(metrics['accuracy']):.2f}")

model.eval()  # running statistics, no dropout
result = eval_step(model, val_clips, val_labels)
print(f"held-out batch: loss {float(result['loss']):.4f}, accuracy {float(result['accuracy']):.2f}")

out = Path(args.out) if args.out else Path(tempfile.mkdtemp()) / "finetuned"
names = [f"class_{i}" for i in range(args.classes)]
vmz_jax.save(model, out, labels=names, metadata={"example": "finetune_own_loop"}, overwrite=True)
again = vmz_jax.load(args.arch, checkpoint=out)
print(f"saved to {out}; reloaded with labels {list(again.labels)}")
