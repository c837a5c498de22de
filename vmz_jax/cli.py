"""The `vmz-jax` command line. Each subcommand lives in a `_cmd_<name>` function; errors that are the
user's (bad file, unknown name) print one line and exit with status 2."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

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


def _check_arch(arch: str) -> None:
    from vmz_jax.models import ARCHS

    if arch not in ARCHS:
        raise UsageError(f"unknown architecture {arch!r}; see `vmz-jax list`")


def _refuse_existing(dst: str, overwrite: bool) -> None:
    if os.path.lexists(dst) and not overwrite:
        raise UsageError(f"{dst}: already exists (pass --overwrite to replace it)")


def _cmd_port(args: argparse.Namespace) -> int:
    from vmz_jax import checkpoint, registry
    from vmz_jax.api import read_local

    _check_arch(args.arch)
    _refuse_existing(args.dst, args.overwrite)
    params, meta = read_local(args.arch, args.src, args.num_classes)
    if args.pretraining_name:
        meta["pretraining"] = args.pretraining_name
        if args.pretraining_name in registry.list_pretrainings(args.arch):
            entry = registry.get_pretraining(args.arch, args.pretraining_name)
            if entry.num_classes != meta["num_classes"]:
                raise UsageError(f"{args.src}: has {meta['num_classes']} classes, but {args.arch} "
                                 f"{entry.name} has {entry.num_classes}")
            meta.update(clip_length=meta.get("clip_length") or entry.clip_length,
                        crop_size=entry.crop_size, dataset=entry.dataset, url=entry.url)
    out = checkpoint.save(args.dst, params, meta, overwrite=args.overwrite)
    source = f"{meta.get('source_format', 'orbax')}, {meta.get('source_naming', 'vmz_jax')} names"
    print(f"{args.src} ({source}, {meta['num_classes']} classes) -> {out}")
    return 0


_EXPORT_SUFFIXES = {".pth": "pth", ".pt": "pth", ".npz": "npz", ".pkl": "pkl"}


def _cmd_export(args: argparse.Namespace) -> int:
    from porting.convert import export_params
    from vmz_jax.api import read_local

    _check_arch(args.arch)
    fmt = args.format or _EXPORT_SUFFIXES.get(os.path.splitext(args.dst)[1].lower())
    if fmt is None:
        raise UsageError(f"{args.dst}: cannot tell the format from the name; pass --format pth|npz|pkl")
    if os.path.isdir(args.dst):
        raise UsageError(f"{args.dst}: is a directory")
    _refuse_existing(args.dst, args.overwrite)
    params, meta = read_local(args.arch, args.src, args.num_classes)
    export_params(params, args.arch, args.dst, fmt)
    naming = "Caffe2 blob names" if fmt == "pkl" else "VMZ PyTorch names"
    print(f"{args.src} -> {args.dst} ({fmt}, {naming}, {meta['num_classes']} classes)")
    return 0


def _cache_state(arch: str, entry: Any) -> str:
    from vmz_jax import api, checkpoint

    if checkpoint.is_checkpoint(api.orbax_cache_dir(arch, entry.name)):
        return "yes"
    if api.download_path(entry).is_file():
        return "downloaded"
    return "no"


def _cmd_list(args: argparse.Namespace) -> int:
    from vmz_jax import download, registry
    from vmz_jax.models import ARCHS

    archs = args.arch or list(ARCHS)
    for arch in archs:
        _check_arch(arch)
    rows = [("arch", "pretraining", "classes", "frames", "crop", "format", "cached")]
    for arch in archs:
        names = registry.list_pretrainings(arch)
        if not names:
            rows.append((arch, "-", "", "", "", "", ""))
        default = registry.default_pretraining(arch)
        for name in names:
            entry = registry.get_pretraining(arch, name)
            rows.append((arch, name + (" (default)" if name == default else ""), str(entry.num_classes),
                         str(entry.clip_length), str(entry.crop_size), entry.fmt,
                         _cache_state(arch, entry)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
             for row in rows]
    lines += ["", f"cache: {download.cache_dir()} (set {download.HOME_ENV} to move it); load with "
              "vmz_jax.load(arch, pretraining), or port a local file with `vmz-jax port`"]
    try:
        print("\n".join(lines), flush=True)
    except BrokenPipeError:  # `vmz-jax list | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
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

    p = sub.add_parser("list", help="architectures, their released weights and what is cached")
    p.add_argument("arch", nargs="*", help="only these architectures")
    p.set_defaults(run=_cmd_list)

    p = sub.add_parser("port", help="port a weights file (.pth, .pkl, .npz, .safetensors; format "
                       "read from the content) to an Orbax checkpoint directory")
    p.add_argument("src", help="weights file")
    p.add_argument("dst", help="Orbax checkpoint directory to create")
    p.add_argument("--arch", required=True, help="architecture, e.g. ir_csn_152 (see `vmz-jax list`)")
    p.add_argument("--num-classes", type=int, help="expected class count (checked against the file)")
    p.add_argument("--pretraining-name", help="name to record in the checkpoint's metadata")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    p.set_defaults(run=_cmd_port)

    p = sub.add_parser("export", help="write weights (any supported file or an Orbax directory) as a "
                       "VMZ-named .pth / .npz or a Caffe2-named .pkl")
    p.add_argument("src", help="weights file or Orbax checkpoint directory")
    p.add_argument("dst", help="file to write")
    p.add_argument("--arch", required=True, help="architecture, e.g. ir_csn_152")
    p.add_argument("--format", choices=["pth", "npz", "pkl"],
                   help="output format (default: from DST's suffix)")
    p.add_argument("--num-classes", type=int, help="expected class count (checked against SRC)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    p.set_defaults(run=_cmd_export)
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
