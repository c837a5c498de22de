"""The `vmz-jax` command line. Each subcommand lives in a `_cmd_<name>` function; errors that are the
user's (bad file, unknown name) print one line and exit with status 2."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

from vmz_jax.errors import VMZError


class UsageError(VMZError):
    """A command-line argument that cannot work."""


def _shape(text: str) -> tuple[int, ...]:
    parts = text.lower().split("x")
    if not all(p.isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"expected NxTxHxW such as 2x8x112x112, got {text!r}")
    shape = tuple(int(p) for p in parts)
    if len(shape) != 4 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected NxTxHxW such as 2x8x112x112, got {text!r}")
    return shape


def _cmd_bench(args: argparse.Namespace) -> int:
    from vmz_jax import bench
    from vmz_jax.models import ARCHS

    unknown = [a for a in args.arch if a not in ARCHS]
    if unknown:
        raise UsageError(f"unknown architecture(s) {', '.join(unknown)}; see `vmz-jax list`")
    variants = () if args.no_torch else tuple(args.torch_variants)
    results = []
    for arch in args.arch:
        results.append(bench.run(arch, (*args.shape, 3), repeats=args.repeats,
                                 torch_variants=variants, conv_impl=args.conv_impl))
        print(bench.format_table(results[-1:]).splitlines()[-1], flush=True)
    print(bench.format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.row() for r in results], f, indent=1)
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from vmz_jax.models import ARCHS

    for arch in ARCHS:
        print(arch)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vmz-jax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("bench", help="forward speed of vmz_jax against the PyTorch reference")
    p.add_argument("arch", nargs="+", help="architectures, e.g. ir_csn_152 r2plus1d_34")
    p.add_argument("--shape", type=_shape, default=(2, 8, 112, 112), help="NxTxHxW input")
    p.add_argument("--repeats", type=int, default=5, help="timed runs (median reported)")
    p.add_argument("--conv-impl", default="auto", choices=["auto", "reference", "fast"])
    p.add_argument("--torch-variants", nargs="+", default=["eager", "channels_last_3d"],
                   choices=["eager", "channels_last_3d"])
    p.add_argument("--no-torch", action="store_true", help="time JAX only")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.set_defaults(run=_cmd_bench)

    p = sub.add_parser("list", help="architectures")
    p.set_defaults(run=_cmd_list)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except VMZError as e:
        print(f"vmz-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
