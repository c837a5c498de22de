"""`vmz-jax compare`: our model against the PyTorch reference (or a second weights file), stage by
stage. Exit 0 when every stage is within the tolerance, 1 when one is not (the first is named), 2
for a usage or file error."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from vmz_jax.cli.common import UsageError, check_arch, shape_arg


def _shape(text: str) -> tuple[int, ...]:
    return shape_arg(text.replace(",", "x"))


def _tolerance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number such as 1e-5, got {text!r}") from None
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be a non-negative number, got {text!r}")
    return value


def cmd_compare(args: argparse.Namespace) -> int:
    from vmz_jax.compare import compare, format_table

    check_arch(args.arch)
    if args.shape is not None and args.input is not None:
        raise UsageError("--shape sets the random input; --input brings its own shape")
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        raise UsageError(f"{args.json}: no such directory to write the report in")  # before the work
    result = compare(args.weights, args.arch, args.against, input=args.input, shape=args.shape,
                     dtype=args.dtype, tol=args.tol, seed=args.seed, conv_impl=args.conv_impl)
    print(format_table(result), flush=True)
    if args.json:
        from vmz_jax.files import atomic_write

        try:
            atomic_write(args.json, json.dumps(result.to_json(), indent=1) + "\n", "w")
        except OSError as exc:
            raise UsageError(f"{args.json}: cannot write ({exc.strerror or exc})") from None
    if result.ok:
        return 0
    row = next(r for r in result.rows if r.stage == result.first_failure)
    earlier = (f"; the outputs differ from {result.first_difference} on" if result.against != "torch"
               and result.first_difference not in (None, row.stage) else "")
    print(f"vmz-jax compare: {row.stage} is the first stage over the tolerance "
          f"(max rel {row.max_rel:.3e} > {result.tol:g}){earlier}", file=sys.stderr)
    return 1


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "compare", help="our model against the PyTorch reference or other weights, stage by stage",
        description="Run our model with WEIGHTS and the PyTorch reference with the same weights "
                    "(or our model with OTHER_WEIGHTS) on one input; print the max absolute and "
                    "relative difference (max|ours - reference| / max|reference|) of every stage. "
                    "Exit 0 within --tol, 1 beyond it, 2 on a usage or file error.")
    p.add_argument("weights", help="an Orbax checkpoint directory, or a .pth, .pkl, .npz or "
                   ".safetensors file")
    p.add_argument("--arch", required=True, help="architecture, e.g. r2plus1d_34 (see `vmz-jax list`)")
    p.add_argument("--against", default="torch", metavar="torch|OTHER_WEIGHTS",
                   help="torch (default): the PyTorch reference with the same weights (needs "
                   "pip install 'vmz-jax[torch]'); or a second weights file run through our model")
    p.add_argument("--input", metavar="CLIP.npy|VIDEO",
                   help="a (N, T, H, W, 3) float clip, or a video whose first clip is preprocessed as "
                   "`vmz-jax extract` does (default: random normal, see --shape and --seed)")
    p.add_argument("--shape", type=_shape, metavar="N,T,H,W",
                   help="random input shape (default 1,8,112,112; C3D 1,16,112,112)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random input")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                   help="computation dtype of both sides")
    p.add_argument("--tol", type=_tolerance, help="relative tolerance per stage (default 1e-5 "
                   "float32, 1e-10 float64)")
    p.add_argument("--conv-impl", default="auto", choices=["auto", "reference", "fast"])
    p.add_argument("--json", metavar="FILE", help="also write the table to this JSON file")
    p.set_defaults(run=cmd_compare)
