"""Float32 train-mode gradient accuracy, ours vs PyTorch's, against a float64 truth.

The same random non-symmetric weights (`vmz_torch.randomize_`) go into the PyTorch reference and our
model; the loss is the mean cross-entropy of a random batch in training mode (batch statistics). The
truth is the reference in float64. For every parameter tensor the error is
max |g - g_truth| / max |g_truth|; we report the median and the worst over tensors for our float32
gradients (jit, default XLA optimizations) and for torch's float32 gradients.

    python benchmarks/train_accuracy.py --arch mc3_18 --shape 2,8,56,56
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from flax import nnx

from porting.torch_names import params_to_torch, torch_to_params
from vmz_jax.models import build
from vmz_jax.models.variables import set_variables, variable_shapes
from vmz_jax.reference import vmz_torch


def torch_grads(ref: torch.nn.Module, x: np.ndarray, labels: np.ndarray, dtype: torch.dtype
                ) -> dict[str, np.ndarray]:
    model = ref.to(dtype).train()
    model.zero_grad()
    logits = model(torch.from_numpy(x.transpose(0, 4, 1, 2, 3)).to(dtype))
    torch.nn.functional.cross_entropy(logits, torch.from_numpy(labels)).backward()
    return {k: p.grad.detach().double().numpy() for k, p in model.named_parameters()}


def our_grads(arch: str, state: dict[str, np.ndarray], x: np.ndarray, labels: np.ndarray,
              num_classes: int, clip_length: int) -> dict[str, np.ndarray]:
    model = nnx.eval_shape(lambda: build(arch, num_classes, clip_length=clip_length, rngs=nnx.Rngs(0)))
    set_variables(model, torch_to_params(state, variable_shapes(model), source=arch), source=arch)
    model.train()

    @nnx.jit
    def grads(model: nnx.Module, x: jax.Array, y: jax.Array) -> nnx.State:
        def loss(m: nnx.Module) -> jax.Array:
            return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
        return nnx.grad(loss)(model)

    g = grads(model, jnp.asarray(x), jnp.asarray(labels))
    flat = {tuple(str(k) for k in p): np.asarray(v[...], np.float64) for p, v in nnx.to_flat_state(g)}
    full = {p: flat.get(p, np.zeros(s)) for p, s in variable_shapes(model).items()}
    names = params_to_torch(full)
    return {k: names[k] for k in state if k in names}


def errors(got: dict[str, np.ndarray], truth: dict[str, np.ndarray]) -> np.ndarray:
    return np.array([np.max(np.abs(got[k] - t)) / max(np.max(np.abs(t)), 1e-30)
                     for k, t in truth.items()])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="mc3_18")
    parser.add_argument("--shape", default="2,8,56,56", help="N,T,H,W")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    n, t, h, w = (int(v) for v in args.shape.split(","))
    classes = 11
    ref = vmz_torch.build(args.arch, num_classes=classes, clip_length=min(t, 8))
    vmz_torch.randomize_(ref, args.seed)
    state = {k: v.detach().float().numpy() for k, v in ref.state_dict().items()
             if not k.endswith("num_batches_tracked")}
    rng = np.random.default_rng(args.seed)
    x = rng.standard_normal((n, t, h, w, 3)).astype(np.float32)
    labels = rng.integers(0, classes, n)
    ref64 = vmz_torch.build(args.arch, num_classes=classes, clip_length=min(t, 8))
    ref64.load_state_dict(ref.state_dict())
    truth = torch_grads(ref64, x, labels, torch.float64)
    ref32 = vmz_torch.build(args.arch, num_classes=classes, clip_length=min(t, 8))
    ref32.load_state_dict(ref.state_dict())
    ours = errors(our_grads(args.arch, state, x, labels, classes, min(t, 8)), truth)
    theirs = errors(torch_grads(ref32, x, labels, torch.float32), truth)
    print(json.dumps({
        "arch": args.arch, "shape": [n, t, h, w], "tensors": len(truth),
        "ours_median": float(np.median(ours)), "ours_worst": float(ours.max()),
        "torch_median": float(np.median(theirs)), "torch_worst": float(theirs.max()),
    }))


if __name__ == "__main__":
    main()
