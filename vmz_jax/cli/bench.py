"""`vmz-jax bench`: forward (or, with --train, training-step) speed against the PyTorch reference."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from vmz_jax.cli.common import UsageError, check_arch, shape_arg


def busy_warning(load: float, cores: int) -> str | None:
    """A warning when other work is running: torch's OpenMP threads lose far more to a shared core
    than XLA's pool does, so ratios taken under load overstate JAX (measured: a 7x training-step
    "speed-up" under load 2-4 on 2 cores was 1.0x on the quiet machine)."""
    if load <= 0.5 * cores:
        return None
    return (f"vmz-jax bench: load average {load:.1f} on {cores} cores before the run: other work is "
            "running, and ratios measured now overstate JAX against torch; measure on a quiet machine")


def cmd_bench(args: argparse.Namespace) -> int:
    if args.suite:
        return cmd_suite(args)
    if not args.arch:
        raise UsageError("name at least one architecture, or --suite accelerator")
    if args.dtype != "float32":
        from vmz_jax.models.conv import compute_dtype

        if compute_dtype(args.dtype) != args.dtype:
            print(f"{args.dtype} computes in float32 on this CPU: it has no bfloat16 instructions "
                  "(AVX512-BF16 or AMX), where float32 is faster", flush=True)
    if args.memory or args.remat is not None:
        return cmd_memory(args)
    archs = [check_arch(arch).name for arch in args.arch]  # all before the first (slow) run
    warning = busy_warning(os.getloadavg()[0], os.cpu_count() or 1) if hasattr(os, "getloadavg") else None
    if warning:
        print(warning, file=sys.stderr, flush=True)
    if args.train:
        from vmz_jax import bench_train

        def run(arch: str) -> Any:
            return bench_train.run(arch, args.shape, repeats=args.repeats, torch=not args.no_torch,
                                   conv_impl=args.conv_impl, dtype=args.dtype)

        table = bench_train.format_table
    else:
        from vmz_jax import bench

        default = tuple(bench.TORCH_VARIANTS) if args.dtype != "float32" else ("eager", "channels_last_3d")
        variants = () if args.no_torch else tuple(args.torch_variants or default)
        if args.dtype != "float32":
            print(f"{args.dtype} dot peak (2048^3, float32 accumulation): "
                  f"{bench.dot_peak_gflops(args.dtype):.0f} GFLOP/s", flush=True)

        def run(arch: str) -> Any:
            return bench.run(arch, (*args.shape, 3), repeats=args.repeats, torch_variants=variants,
                             conv_impl=args.conv_impl, dtype=args.dtype)

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


def cmd_memory(args: argparse.Namespace) -> int:
    """`--train --memory`: XLA's memory analysis of the compiled training step, without running it."""
    if not (args.train and args.memory):
        raise UsageError("--memory analyses the training step: use --train --memory (--remat goes with them)")
    archs = [check_arch(arch).name for arch in args.arch]
    from vmz_jax.train import memory

    reports = []
    for arch in archs:
        reports.append(memory.train_memory(arch, args.shape, remat=args.remat or "none", dtype=args.dtype,
                                           conv_impl=args.conv_impl))
        print(memory.format_report(reports[-1]), flush=True)
    if args.json:
        from vmz_jax.files import atomic_write

        atomic_write(args.json, json.dumps([r.row() for r in reports], indent=1) + "\n", "w")
    return 0


def cmd_suite(args: argparse.Namespace) -> int:
    """`--suite accelerator`: the one-command GPU suite (`vmz_jax.bench_accelerator`)."""
    if args.arch:
        raise UsageError("vmz-jax bench --suite runs its own models: drop the architecture names")
    if not args.budget > 0:
        raise UsageError(f"--budget must be a positive number of seconds, got {args.budget}")
    from vmz_jax import bench_accelerator

    results = bench_accelerator.run_suite(args.out, budget_s=args.budget, tiny=args.tiny)
    print(bench_accelerator.format_markdown(results))
    print(f"wrote {os.path.join(args.out, 'accelerator.json')} and accelerator.md", file=sys.stderr)
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser("bench", help="forward speed of vmz_jax against the PyTorch reference")
    p.add_argument("arch", nargs="*", help="architectures, e.g. ir_csn_152 r2plus1d_34")
    p.add_argument("--shape", type=shape_arg, default=(2, 8, 112, 112), help="NxTxHxW input")
    p.add_argument("--repeats", type=int, default=5, help="timed runs (median reported)")
    p.add_argument("--conv-impl", default="auto", choices=["auto", "reference", "fast"])
    p.add_argument("--torch-variants", nargs="+",
                   choices=["eager", "channels_last_3d", "autocast", "autocast_channels_last_3d"],
                   help="default: eager channels_last_3d, and with --dtype bfloat16 also the two "
                        "under torch's bfloat16 autocast")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="JAX compute dtype; bfloat16 also times JAX float32 and torch bfloat16 autocast "
                        "(--train: torch's step under autocast)")
    p.add_argument("--no-torch", action="store_true", help="time JAX only")
    p.add_argument("--train", action="store_true",
                   help="time one training step (forward, backward, SGD momentum 0.9) instead of "
                        "the forward pass; also reports compile seconds and peak memory")
    p.add_argument("--memory", action="store_true",
                   help="with --train: compile the training step and the forward without running them "
                        "and print XLA's memory analysis (argument, output, aliased, temp bytes, peak) "
                        "for this machine's backend")
    p.add_argument("--remat", choices=["none", "blocks", "full"],
                   help="with --train --memory: the rematerialization mode (default none)")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--suite", choices=["accelerator"],
                   help="accelerator: every GPU number in one unattended run (forward and training step "
                        "against torch, float32 and bfloat16, each conv form A/B'd, the AUTO_IMPL row to "
                        "use); writes OUT/accelerator.json and OUT/accelerator.md")
    p.add_argument("--budget", type=float, default=480.0,
                   help="--suite: wall-clock seconds the whole run may take (default 480)")
    p.add_argument("--tiny", action="store_true", help="--suite: small models and inputs (CI; seconds)")
    p.add_argument("--out", default=".", help="--suite: directory for accelerator.json and .md")
    p.set_defaults(run=cmd_bench)
