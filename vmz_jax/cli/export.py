"""`vmz-jax export`: weights as VMZ-named .pth/.npz/.safetensors or Caffe2-named .pkl, or the whole
forward as a StableHLO (`jax.export`) or ONNX artifact that runs without vmz_jax (docs/export.md)."""

from __future__ import annotations

import argparse
import os
from typing import Any

from vmz_jax.cli.common import UsageError, check_arch, positive, refuse_existing

_DYNAMIC = "dynamic"


def _frames(text: str) -> int | str:
    return _DYNAMIC if text == _DYNAMIC else positive(text)


def _size(text: str) -> int | tuple[int, int] | str:
    if text == _DYNAMIC:
        return _DYNAMIC
    parts = text.lower().split("x")
    if len(parts) not in (1, 2) or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(
            f"expected SIZE, HxW (e.g. 112 or 128x171) or {_DYNAMIC}, got {text!r}"
        )
    sizes = tuple(int(p) for p in parts)
    return sizes[0] if len(sizes) == 1 else (sizes[0], sizes[1])


def cmd_export(args: argparse.Namespace) -> int:
    from vmz_jax.export import FORMATS, SUFFIXES, export, format_of

    arch = check_arch(args.arch)
    if args.format is None and os.path.splitext(args.dst)[1].lower() not in SUFFIXES:
        raise UsageError(
            f"{args.dst}: cannot tell the format from the name; pass --format {'|'.join(FORMATS)}"
        )
    fmt = format_of(args.dst, args.format)
    if os.path.isdir(args.dst):
        raise UsageError(f"{args.dst}: is a directory")
    refuse_existing(args.dst, args.overwrite)
    platforms = tuple(p for p in args.platforms.split(",") if p)
    result = export(
        args.src,
        args.dst,
        arch=arch.name,
        format=fmt,
        output=args.output,
        frames=args.frames,
        size=args.size,
        dtype=args.dtype,
        platforms=platforms,
        embed_weights=not args.weights_as_arguments,
        num_classes=args.num_classes,
        overwrite=args.overwrite,
        progress=True,
    )
    if fmt in ("stablehlo", "onnx"):
        meta = result.metadata
        shape = "x".join(str(d) for d in meta["input_shape"])
        extra = f", {'+'.join(meta['platforms'])}, weights {meta['weights']}" if fmt == "stablehlo" else ""
        print(
            f"{args.src} -> {args.dst} ({fmt}, {meta['output']} of {shape} {meta['input_layout']} clips, "
            f"{meta['dtype']}{extra}); metadata {os.path.basename(str(result.files[-1]))}"
        )
    else:
        naming = "Caffe2 blob names" if fmt == "pkl" else "VMZ PyTorch names"
        print(f"{args.src} -> {args.dst} ({fmt}, {naming})")
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "export",
        help="write weights as .pth/.npz/.safetensors/.pkl, or the model as a "
        "StableHLO or ONNX artifact that runs without vmz_jax",
    )
    p.add_argument("src", help="weights file or Orbax checkpoint directory (vmz-jax port, fine-tuning)")
    p.add_argument("dst", help="file to write (.pth .npz .safetensors .pkl .stablehlo .onnx)")
    p.add_argument("--arch", required=True, help="architecture, e.g. ir_csn_152")
    p.add_argument(
        "--format",
        choices=["pth", "npz", "pkl", "safetensors", "stablehlo", "onnx"],
        help="output format (default: from DST's suffix)",
    )
    p.add_argument(
        "--output",
        choices=["logits", "features", "probabilities"],
        default="logits",
        help="what a model artifact computes (default logits)",
    )
    p.add_argument(
        "--frames",
        type=_frames,
        help="clip length of a model artifact, or 'dynamic' (default: the architecture's, e.g. 32; C3D 16)",
    )
    p.add_argument(
        "--size",
        type=_size,
        help="frame size SIZE or HxW, or 'dynamic' "
        "(default: the architecture's crop or short side, e.g. 128; CSN 256; C3D 112)",
    )
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="computation dtype of a StableHLO artifact (ONNX: float32)",
    )
    p.add_argument("--platforms", default="cpu,cuda", help="StableHLO lowerings (default cpu,cuda)")
    p.add_argument(
        "--weights-as-arguments",
        action="store_true",
        help="StableHLO: do not embed the "
        "weights; the function takes them first (written to DST.weights.npz)",
    )
    p.add_argument("--num-classes", type=int, help="expected class count (checked against SRC)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    p.set_defaults(run=cmd_export)
