"""bfloat16 inference accuracy, ours vs PyTorch's bfloat16 autocast, against a float64 truth.

The same random non-symmetric weights and BatchNorm statistics (`vmz_torch.randomize_`) go into the
PyTorch reference and our model (eval mode). The truth is our forward in float64 (equal to the
reference's float64 forward to ~1e-12: tests/test_parity.py). For every family we report, on one random
clip batch, the worst relative error of the logits (max |logits - truth| / max |truth|) and the top-5
agreement (the fraction of clips whose five highest classes are the truth's, as a set) of:

* ours in bfloat16 (`make_forward`, the function `vmz-jax predict` runs; `conv_impl` auto),
* torch bfloat16 autocast, and the same with channels_last_3d.

    python benchmarks/bf16_accuracy.py --shape 2,8,112,112 [--arch r2plus1d_34 ir_csn_152 ...]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from porting.torch_names import torch_to_params
from vmz_jax.models import build
from vmz_jax.models.forward import make_forward
from vmz_jax.models.variables import set_variables, variable_shapes
from vmz_jax.reference import vmz_torch

#: One architecture per video family at the depth the speed table uses.
FAMILY_ARCHS = ("r2plus1d_34", "r3d_18", "r2d_18", "mc3_18", "rmc3_18", "ir_csn_152", "ip_csn_152", "c3d")
NUM_CLASSES = 400


@dataclass
class AccuracyRow:
    arch: str
    shape: tuple[int, ...]
    ours_error: float
    ours_top5: float
    torch_error: float
    torch_top5: float
    torch_cl3d_error: float
    torch_cl3d_top5: float

    @property
    def error_ratio(self) -> float:
        """Our worst relative error over torch autocast's (the issue asks for <= 1.5)."""
        return self.ours_error / max(self.torch_error, 1e-30)


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.max(np.abs(got - want)) / max(float(np.max(np.abs(want))), 1e-30))


def top5_agreement(got: np.ndarray, want: np.ndarray) -> float:
    k = min(5, want.shape[-1])
    tops = [set(np.argsort(-row)[:k]) for row in (got, want) for row in row]
    n = want.shape[0]
    return float(np.mean([tops[i] == tops[n + i] for i in range(n)]))


def _our_logits(arch: str, state: dict[str, np.ndarray], x: np.ndarray, dtype: jnp.dtype,
                clip_length: int) -> np.ndarray:
    model = nnx.eval_shape(lambda: build(arch, NUM_CLASSES, clip_length=clip_length, dtype=dtype,
                                         rngs=nnx.Rngs(0)))
    set_variables(model, torch_to_params(state, variable_shapes(model), source=arch), source=arch)
    model.eval()
    logits = make_forward(model, "logits", platform=jax.default_backend())(jnp.asarray(x))
    return np.asarray(logits, np.float64)


def _torch_logits(ref: torch.nn.Module, x: np.ndarray, channels_last: bool) -> np.ndarray:
    clips = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 4, 1, 2, 3)))
    model = ref
    if channels_last:
        model = ref.to(memory_format=torch.channels_last_3d)
        clips = clips.contiguous(memory_format=torch.channels_last_3d)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(clips)
    return out.float().double().numpy()


def measure(arch: str, shape: tuple[int, int, int, int], seed: int = 0) -> AccuracyRow:
    """One family's row: ours and torch's bfloat16 logits against our float64 logits."""
    clip_length = min(shape[1], 8) if arch != "c3d" else 16
    ref = vmz_torch.build(arch, num_classes=NUM_CLASSES, clip_length=clip_length)
    vmz_torch.randomize_(ref, seed)
    ref.eval()
    state = {k: v.detach().numpy().astype(np.float32) if v.is_floating_point() else v.detach().numpy()
             for k, v in ref.state_dict().items()}
    x = np.random.default_rng(seed + 1).standard_normal((*shape, 3)).astype(np.float32)
    truth = _our_logits(arch, state, x.astype(np.float64), jnp.float64, clip_length)
    ours = _our_logits(arch, state, x, jnp.bfloat16, clip_length)
    plain = _torch_logits(ref, x, channels_last=False)
    cl3d = _torch_logits(ref, x, channels_last=True)
    return AccuracyRow(arch, tuple(shape), relative_error(ours, truth), top5_agreement(ours, truth),
                       relative_error(plain, truth), top5_agreement(plain, truth),
                       relative_error(cl3d, truth), top5_agreement(cl3d, truth))


def format_table(rows: list[AccuracyRow]) -> str:
    lines = ["| arch | input | ours bf16 error | torch autocast error | torch autocast + CL3D error "
             "| ours / torch | top-5 agreement ours / torch / CL3D |", "|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r.arch} | {'x'.join(map(str, r.shape))} | {r.ours_error:.2e} | {r.torch_error:.2e} "
                     f"| {r.torch_cl3d_error:.2e} | {r.error_ratio:.2f} | {r.ours_top5:.2f} / "
                     f"{r.torch_top5:.2f} / {r.torch_cl3d_top5:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", nargs="+", default=list(FAMILY_ARCHS))
    parser.add_argument("--shape", default="2,8,112,112",
                        help="N,T,H,W (C3D always takes its 16x112x112 clips)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()
    jax.config.update("jax_enable_x64", True)
    n, t, h, w = (int(v) for v in args.shape.split(","))
    rows = []
    for arch in args.arch:
        rows.append(measure(arch, (n, 16, 112, 112) if arch == "c3d" else (n, t, h, w), args.seed))
        print(format_table(rows[-1:]).splitlines()[-1], flush=True)
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{**asdict(r), "error_ratio": r.error_ratio} for r in rows], f, indent=1)


if __name__ == "__main__":
    main()
