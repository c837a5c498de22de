"""What every subcommand shares: the usage error and argument checks."""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from vmz_jax.errors import VMZError

if TYPE_CHECKING:
    from vmz_jax.models.registry import ModelEntry


class UsageError(VMZError):
    """A command-line argument that cannot work."""


def shape_arg(text: str) -> tuple[int, ...]:
    parts = text.lower().split("x")
    if not all(p.isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"expected NxTxHxW such as 2x8x112x112, got {text!r}")
    shape = tuple(int(p) for p in parts)
    if len(shape) != 4 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected NxTxHxW such as 2x8x112x112, got {text!r}")
    return shape


def check_arch(arch: str) -> ModelEntry:
    """The registry entry of `--arch`; an unknown name raises the registry's one-line error (a
    VMZError: `main` prints it and exits with 2), the same message every entry point gives."""
    from vmz_jax.models import registry

    return registry.get(arch)


def add_model_arguments(group: Any) -> None:
    """--arch, --pretraining, --checkpoint and --dtype: how the commands that run a model name it."""
    group.add_argument("--arch", required=True, help="architecture, e.g. r2plus1d_34 (see `vmz-jax list`)")
    group.add_argument("--pretraining", help="released weights by name (default: the arch's Kinetics "
                       "fine-tuned weights, downloaded and cached on first use)")
    group.add_argument("--checkpoint", metavar="PATH", help="local weights: an Orbax directory (e.g. a "
                       "fine-tuned model), .pth or .pkl (with --pretraining, a local copy of that "
                       "released file)")
    group.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="compute dtype")


def load_model(args: argparse.Namespace, arch: ModelEntry, **options: Any) -> Any:
    """The model `add_model_arguments` named (default: the arch's default released weights), in eval
    mode; offline, the download error says to add --checkpoint. `options` go to `vmz_jax.load`
    (`num_classes`, `new_head`, `seed`)."""
    import jax.numpy as jnp

    from vmz_jax.errors import DownloadError
    from vmz_jax.weights import pretrained as registry
    from vmz_jax.weights.loading import load

    pretraining = args.pretraining
    if pretraining is None and args.checkpoint is None:
        pretraining = registry.default_pretraining(arch.name)
        if pretraining is None:
            raise UsageError(f"{arch.name} has no released Kinetics weights; pass --pretraining NAME "
                             "or --checkpoint PATH (see `vmz-jax list`)")
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
    try:
        return load(arch.name, pretraining, checkpoint=args.checkpoint, dtype=dtype,
                    progress=not args.quiet, **options)
    except DownloadError as exc:
        from vmz_jax.weights.download import OFFLINE_HINT

        reason = str(exc).replace(f"; {OFFLINE_HINT}", "")
        raise DownloadError(f"{reason}; offline, download that file elsewhere and add "
                            "--checkpoint FILE") from None


def refuse_existing(dst: str, overwrite: bool) -> None:
    if os.path.lexists(dst) and not overwrite:
        raise UsageError(f"{dst}: already exists (pass --overwrite to replace it)")


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def number(low: float, high: float = math.inf, *, low_open: bool = False, high_open: bool = True,
           percent: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite float in [low, high) (open or closed ends as given); with `percent`,
    "5%" reads as 0.05."""
    left, right = "(" if low_open else "[", ")" if high_open else "]"

    def parse(text: str) -> float:
        value = text.strip()
        try:
            result = float(value[:-1]) / 100 if percent and value.endswith("%") else float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        above = result > low if low_open else result >= low
        below = result < high if high_open else result <= high
        if not (math.isfinite(result) and above and below):
            raise argparse.ArgumentTypeError(f"expected a number in {left}{low:g}, {high:g}{right}, "
                                             f"got {text!r}")
        return result

    return parse


def process_share(args: argparse.Namespace) -> tuple[int, int]:
    """(this process, processes) from --distributed/--coordinator/--num-processes/--process-id,
    initialising jax.distributed when any is given; (0, 1) otherwise."""
    if not (args.distributed or args.coordinator or args.num_processes):
        return 0, 1
    import jax

    kwargs: dict[str, Any] = {}
    if args.coordinator:
        kwargs["coordinator_address"] = args.coordinator
    if args.num_processes is not None:
        kwargs["num_processes"] = args.num_processes
    if args.process_id is not None:
        kwargs["process_id"] = args.process_id
    if "JAX_CPU_COLLECTIVES_IMPLEMENTATION" not in os.environ:
        # CPU processes that compute together (finetune) need a collectives backend; the default
        # has none. It concerns the CPU backend only, so GPU and TPU jobs are unaffected.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(**kwargs)
    except (RuntimeError, ValueError) as exc:
        raise UsageError(f"jax.distributed.initialize failed: {str(exc).splitlines()[0]}") from None
    return jax.process_index(), jax.process_count()
