"""`vmz-jax list`: architectures, released weights, cache state."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from vmz_jax.cli.common import check_arch


def _cache_state(arch: str, entry: Any) -> str:
    from vmz_jax.weights import checkpoint
    from vmz_jax.weights import loading as api

    if checkpoint.is_checkpoint(api.orbax_cache_dir(arch, entry.name)):
        return "yes"
    if api.download_path(entry).is_file():
        return "downloaded"
    return "no"


def cmd_list(args: argparse.Namespace) -> int:
    from vmz_jax.models import registry as models
    from vmz_jax.weights import download
    from vmz_jax.weights import pretrained as registry

    archs = [check_arch(arch).name for arch in args.arch] or list(models.names())
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


def add_parser(sub: Any) -> None:
    p = sub.add_parser("list", help="architectures, their released weights and what is cached")
    p.add_argument("arch", nargs="*", help="only these architectures")
    p.set_defaults(run=cmd_list)
