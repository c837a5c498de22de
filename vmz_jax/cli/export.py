"""`vmz-jax export`: weights as VMZ-named .pth/.npz or Caffe2-named .pkl."""

from __future__ import annotations

import argparse
import os
from typing import Any

from vmz_jax.cli.common import UsageError, check_arch, refuse_existing

_EXPORT_SUFFIXES = {".pth": "pth", ".pt": "pth", ".npz": "npz", ".pkl": "pkl"}


def cmd_export(args: argparse.Namespace) -> int:
    from porting.convert import export_params
    from vmz_jax.weights.loading import read_local

    arch = check_arch(args.arch)
    fmt = args.format or _EXPORT_SUFFIXES.get(os.path.splitext(args.dst)[1].lower())
    if fmt is None:
        raise UsageError(f"{args.dst}: cannot tell the format from the name; pass --format pth|npz|pkl")
    if os.path.isdir(args.dst):
        raise UsageError(f"{args.dst}: is a directory")
    refuse_existing(args.dst, args.overwrite)
    params, meta = read_local(arch, args.src, args.num_classes)
    export_params(params, arch, args.dst, fmt)
    naming = "Caffe2 blob names" if fmt == "pkl" else "VMZ PyTorch names"
    print(f"{args.src} -> {args.dst} ({fmt}, {naming}, {meta['num_classes']} classes)")
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser("export", help="write weights (any supported file or an Orbax directory) as a "
                       "VMZ-named .pth / .npz or a Caffe2-named .pkl")
    p.add_argument("src", help="weights file or Orbax checkpoint directory")
    p.add_argument("dst", help="file to write")
    p.add_argument("--arch", required=True, help="architecture, e.g. ir_csn_152")
    p.add_argument("--format", choices=["pth", "npz", "pkl"],
                   help="output format (default: from DST's suffix)")
    p.add_argument("--num-classes", type=int, help="expected class count (checked against SRC)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    p.set_defaults(run=cmd_export)
