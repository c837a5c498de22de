"""`vmz-jax port`: a weights file to an Orbax checkpoint directory."""

from __future__ import annotations

import argparse
from typing import Any

from vmz_jax.cli.common import UsageError, check_arch, refuse_existing


def cmd_port(args: argparse.Namespace) -> int:
    from vmz_jax.weights import checkpoint
    from vmz_jax.weights import pretrained as registry
    from vmz_jax.weights.loading import read_local

    arch = check_arch(args.arch)
    refuse_existing(args.dst, args.overwrite)
    params, meta = read_local(arch, args.src, args.num_classes)
    if args.pretraining_name:
        meta["pretraining"] = args.pretraining_name
        if args.pretraining_name in registry.list_pretrainings(arch.name):
            entry = registry.get_pretraining(arch.name, args.pretraining_name)
            if entry.num_classes != meta["num_classes"]:
                raise UsageError(f"{args.src}: has {meta['num_classes']} classes, but {arch.name} "
                                 f"{entry.name} has {entry.num_classes}")
            meta.update(clip_length=meta.get("clip_length") or entry.clip_length,
                        crop_size=entry.crop_size, dataset=entry.dataset, url=entry.url)
    out = checkpoint.save(args.dst, params, meta, overwrite=args.overwrite)
    source = f"{meta.get('source_format', 'orbax')}, {meta.get('source_naming', 'vmz_jax')} names"
    print(f"{args.src} ({source}, {meta['num_classes']} classes) -> {out}")
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser("port", help="port a weights file (.pth, .pkl, .npz, .safetensors; format "
                       "read from the content) to an Orbax checkpoint directory")
    p.add_argument("src", help="weights file")
    p.add_argument("dst", help="Orbax checkpoint directory to create")
    p.add_argument("--arch", required=True, help="architecture, e.g. ir_csn_152 (see `vmz-jax list`)")
    p.add_argument("--num-classes", type=int, help="expected class count (checked against the file)")
    p.add_argument("--pretraining-name", help="name to record in the checkpoint's metadata")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    p.set_defaults(run=cmd_port)
