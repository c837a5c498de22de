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


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _load_for_videos(args: argparse.Namespace) -> Any:
    import jax.numpy as jnp

    from vmz_jax import registry
    from vmz_jax.api import load
    from vmz_jax.errors import DownloadError

    pretraining = args.pretraining
    if pretraining is None and args.checkpoint is None:
        pretraining = registry.default_pretraining(args.arch)
        if pretraining is None:
            raise UsageError(f"{args.arch} has no released Kinetics weights; pass --pretraining NAME "
                             "or --checkpoint PATH (see `vmz-jax list`)")
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
    try:
        return load(args.arch, pretraining, checkpoint=args.checkpoint, dtype=dtype,
                    progress=not args.quiet)
    except DownloadError as exc:
        from vmz_jax.download import OFFLINE_HINT

        reason = str(exc).replace(f"; {OFFLINE_HINT}", "")
        raise DownloadError(f"{reason}; offline, download that file elsewhere and add "
                            "--checkpoint FILE") from None



def _parallel_share(args: argparse.Namespace) -> tuple[int, int]:
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
    try:
        jax.distributed.initialize(**kwargs)
    except (RuntimeError, ValueError) as exc:
        raise UsageError(f"jax.distributed.initialize failed: {str(exc).splitlines()[0]}") from None
    return jax.process_index(), jax.process_count()


def _cmd_videos(args: argparse.Namespace) -> int:
    from vmz_jax import inputs, labels, pipeline
    from vmz_jax.clips import ClipSampling
    from vmz_jax.preprocess import Preprocess

    _check_arch(args.arch)
    task = args.command
    if not args.videos and not args.list:
        raise UsageError("no videos given (pass files, directories, glob patterns or --list FILE)")
    defaults = pipeline.default_options(args.arch)
    frame_size = defaults["frame_size"] if args.frame_size is None else args.frame_size
    crop = args.crop or defaults["crop"]
    crop_size = args.crop_size if args.crop_size is not None else (
        defaults["crop_size"] if crop == defaults["crop"] else None)
    sampling = ClipSampling(clip_len=args.clip_len or defaults["clip_len"], sampling_rate=args.sampling_rate,
                            stride=args.stride, num_clips=args.num_clips, short=args.short)
    preprocess = Preprocess(short_side=frame_size or None, crop=crop, crop_size=crop_size,
                            resize=args.resize)
    options = pipeline.Options(sampling=sampling, preprocess=preprocess, fps=args.fps,
                               pool_spatial=args.pool_spatial, pool_temporal=args.pool_temporal,
                               batch_size=args.batch_size, workers=args.workers,
                               ffmpeg_threads=args.ffmpeg_threads, strict=not args.keep_truncated)
    jobs = inputs.collect(args.videos, args.list)
    part = _parallel_share(args)
    jobs = inputs.share(jobs, *part)
    model = _load_for_videos(args)
    names = None
    if task == "classify":
        names, source = labels.for_head(pipeline.num_classes(model), args.labels)
        if not args.quiet:
            print(f"vmz-jax classify: labels: {source}", file=sys.stderr)
    from vmz_jax.runtime import enable_compilation_cache

    enable_compilation_cache()
    summary = pipeline.write(model, jobs, args.out, task, options, labels=names,
                             top_k=args.top_k, overwrite=args.overwrite,
                             progress=not args.quiet, part=part)
    written = f"{summary.done} written to {args.out}"
    skipped = (f", {summary.skipped} skipped (output exists; --overwrite redoes them)"
               if summary.skipped else "")
    if summary.failed:
        print(f"vmz-jax {task}: {summary.failed} of {summary.total} videos failed (listed in "
              f"{summary.failures_file}); {written}{skipped}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(f"vmz-jax {task}: {summary.total} videos: {written}{skipped}", file=sys.stderr)
    return 0


def _add_video_arguments(p: argparse.ArgumentParser, task: str) -> None:
    p.add_argument("videos", nargs="*", help="video files, directories (searched recursively) or glob "
                   "patterns (quote them)")
    p.add_argument("--list", action="append", default=[], metavar="FILE",
                   help="a text file with one video path per line (repeatable)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output directory: DIR/<video name>" + (".npy" if task == "extract" else ".jsonl")
                   + ", DIR/index.jsonl, DIR/failures.jsonl")
    g = p.add_argument_group("model")
    g.add_argument("--arch", required=True, help="architecture, e.g. r2plus1d_34 (see `vmz-jax list`)")
    g.add_argument("--pretraining", help="released weights by name (default: the arch's Kinetics "
                   "fine-tuned weights, downloaded and cached on first use)")
    g.add_argument("--checkpoint", metavar="PATH", help="local weights: an Orbax directory, .pth or .pkl "
                   "(with --pretraining, a local copy of that released file)")
    g.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="compute dtype")
    g = p.add_argument_group("clips (defaults: ig65m-pytorch's extract)")
    g.add_argument("--clip-len", type=_positive, help="frames per clip (default 32; 16 for c3d)")
    g.add_argument("--sampling-rate", type=_positive, default=1,
                   help="take every n-th frame within a clip (CSN's evaluation uses 2)")
    g.add_argument("--stride", type=_positive, help="frames between clip starts (default: clip-len x "
                   "sampling-rate, back to back; the remainder is dropped)")
    g.add_argument("--num-clips", type=_positive, help="instead, this many uniformly spaced clips "
                   "(VMZ's test protocol, e.g. 10)")
    g.add_argument("--short", choices=["pad", "skip"], default="pad", help="a video shorter than one "
                   "clip: pad it to one clip with its last frame (default), or give it no clips")
    g.add_argument("--fps", type=float, help="resample to this frame rate first (default: native)")
    g = p.add_argument_group("frames")
    g.add_argument("--frame-size", type=int, help="resize the short side to this (default 128; 256 for "
                   "CSN; 0 keeps the decoded size)")
    g.add_argument("--crop", choices=["none", "center", "three"], help="centre crop, or three crops "
                   "along the long side (default none; center for c3d)")
    g.add_argument("--crop-size", type=_positive, help="crop side (default: the frame size; 112 for c3d)")
    g.add_argument("--resize", choices=["exact", "ffmpeg"], default="exact", help="exact: PyTorch's "
                   "bilinear interpolate, bit-faithful to ig65m (default); ffmpeg: scale in the decoder, "
                   "faster on large videos, slightly different pixels")
    if task == "extract":
        g = p.add_argument_group("features")
        g.add_argument("--pool-spatial", choices=["mean", "max"], default="mean")
        g.add_argument("--pool-temporal", choices=["mean", "max"], default="mean")
        p.set_defaults(labels=None, top_k=5)
    else:
        g = p.add_argument_group("predictions")
        g.add_argument("--labels", metavar="FILE.json", help="JSON list of class names (default: "
                       "Kinetics-400 names for 400-class heads)")
        g.add_argument("--top-k", type=_positive, default=5)
        p.set_defaults(pool_spatial="mean", pool_temporal="mean")
    g = p.add_argument_group("running")
    g.add_argument("--batch-size", type=_positive, default=4, help="clips (views) per batch, split over "
                   "the local devices (rounded up to a multiple of their number)")
    g.add_argument("--workers", type=_positive, default=2, help="videos decoded in parallel")
    g.add_argument("--ffmpeg-threads", type=_positive, default=1, help="decoder threads per video")
    g.add_argument("--keep-truncated", action="store_true", help="use the frames of truncated or "
                   "damaged files (with a warning) instead of failing them")
    g.add_argument("--overwrite", action="store_true", help="redo videos whose output exists")
    g.add_argument("--quiet", action="store_true", help="no progress line or summary")
    g = p.add_argument_group("several hosts (each process takes every n-th video)")
    g.add_argument("--distributed", action="store_true", help="call jax.distributed.initialize() "
                   "(cluster auto-detection)")
    g.add_argument("--coordinator", metavar="HOST:PORT", help="coordinator address")
    g.add_argument("--num-processes", type=_positive)
    g.add_argument("--process-id", type=int)
    p.set_defaults(run=_cmd_videos)


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

    p = sub.add_parser("extract", help="pooled clip features of videos, one .npy per video")
    _add_video_arguments(p, "extract")
    p = sub.add_parser("classify", help="top-k classes per clip and per video, JSON lines per video")
    _add_video_arguments(p, "classify")
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
