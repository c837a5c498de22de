"""`vmz-jax bench`: forward speed against the PyTorch reference."""

from __future__ import annotations

import argparse
import json
from typing import Any

from vmz_jax.cli.common import check_arch, shape_arg


def cmd_bench(args: argparse.Namespace) -> int:
    from vmz_jax import bench

    entries = [check_arch(arch) for arch in args.arch]  # all before the first (slow) run
    if args.train:
        return _bench_train(args, [entry.name for entry in entries])
    variants = () if args.no_torch else tuple(args.torch_variants)
    results = []
    for entry in entries:
        results.append(bench.run(entry.name, (*args.shape, 3), repeats=args.repeats,
                                 torch_variants=variants, conv_impl=args.conv_impl))
        print(bench.format_table(results[-1:]).splitlines()[-1], flush=True)
    print(bench.format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.row() for r in results], f, indent=1)
    return 0


def _bench_train(args: argparse.Namespace, archs: list[str]) -> int:
    from vmz_jax import bench_train

    results = []
    for arch in archs:
        results.append(bench_train.run(arch, args.shape, repeats=args.repeats,
                                       torch=not args.no_torch, conv_impl=args.conv_impl))
        print(bench_train.format_table(results[-1:]).splitlines()[-1], flush=True)
    print(bench_train.format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.row() for r in results], f, indent=1)
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
