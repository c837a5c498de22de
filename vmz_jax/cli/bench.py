"""`vmz-jax bench`: forward (or, with --train, training-step) speed against the PyTorch reference."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from vmz_jax.cli.common import check_arch, shape_arg


def busy_warning(load: float, cores: int) -> str | None:
    """A warning when other work is running: torch's OpenMP threads lose far more to a shared core
    than XLA's pool does, so ratios taken under load overstate JAX (measured: a 7x training-step
    "speed-up" under load 2-4 on 2 cores was 1.0x on the quiet machine)."""
    if load <= 0.5 * cores:
        return None
    return (f"vmz-jax bench: load average {load:.1f} on {cores} cores before the run: other work is "
            "running, and ratios measured now overstate JAX against torch; measure on a quiet machine")


def cmd_bench(args: argparse.Namespace) -> int:
    archs = [check_arch(arch).name for arch in args.arch]  # all before the first (slow) run
    warning = busy_warning(os.getloadavg()[0], os.cpu_count() or 1) if hasattr(os, "getloadavg") else None
    if warning:
        print(warning, file=sys.stderr, flush=True)
    if args.train:
        from vmz_jax import bench_train

        def run(arch: str) -> Any:
            return bench_train.run(arch, args.shape, repeats=args.repeats, torch=not args.no_torch,
                                   conv_impl=args.conv_impl)

        table = bench_train.format_table
    else:
        from vmz_jax import bench

        variants = () if args.no_torch else tuple(args.torch_variants)

        def run(arch: str) -> Any:
            return bench.run(arch, (*args.shape, 3), repeats=args.repeats, torch_variants=variants,
                             conv_impl=args.conv_impl)

        table = bench.format_table
    results = []
    for arch in archs:
        results.append(run(arch))
        print(table(results[-1:]).splitlines()[-1], flush=True)
    print(table(results))
    if args.json:
        from vmz_jax.files import atomic_write

        atomic_write(args.json, json.dumps([r.row() for r in results], indent=1) + "\n", "w")
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser("bench", help="forward speed of vmz_jax against the PyTorch reference")
    p.add_argument("arch", nargs="+", help="architectures, e.g. ir_csn_152 r2plus1d_34")
    p.add_argument("--shape", type=shape_arg, default=(2, 8, 112, 112), help="NxTxHxW input")
    p.add_argument("--repeats", type=int, default=5, help="timed runs (median reported)")
    p.add_argument("--conv-impl", default="auto", choices=["auto", "reference", "fast"])
    p.add_argument("--torch-variants", nargs="+", default=["eager", "channels_last_3d"],
                   choices=["eager", "channels_last_3d"])
    p.add_argument("--no-torch", action="store_true", help="time JAX only")
    p.add_argument("--train", action="store_true",
                   help="time one training step (forward, backward, SGD momentum 0.9) instead of "
                        "the forward pass; also reports compile seconds and peak memory")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.set_defaults(run=cmd_bench)
