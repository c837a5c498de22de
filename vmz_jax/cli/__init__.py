"""The `vmz-jax` command line: one module per subcommand (`add_parser` + `cmd_<name>`); errors that
are the user's (bad file, unknown name) print one line and exit with status 2."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from vmz_jax.cli import bench, compare, evaluate, export, finetune, listing, port, videos
from vmz_jax.cli.common import UsageError
from vmz_jax.errors import VMZError

SUBCOMMANDS = (bench, listing, port, export, videos, compare, finetune, evaluate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vmz-jax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for module in SUBCOMMANDS:
        module.add_parser(sub)
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


__all__ = ["UsageError", "build_parser", "main"]
