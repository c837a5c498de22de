"""`vmz-jax extract` and `vmz-jax classify`: features or classes of many videos."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from vmz_jax.cli.common import (
    UsageError,
    add_model_arguments,
    check_arch,
    load_model,
    positive,
    process_share,
)


def cmd_videos(args: argparse.Namespace) -> int:
    from vmz_jax.models.registry import AUDIO_FAMILIES
    from vmz_jax.video import inputs, labels, pipeline
    from vmz_jax.video.clips import ClipSampling
    from vmz_jax.video.preprocess import Preprocess

    arch = check_arch(args.arch)
    task = args.command
    if not args.videos and not args.list:
        raise UsageError("no videos given (pass files, directories, glob patterns or --list FILE)")
    defaults = pipeline.default_options(arch)
    frame_size = defaults["frame_size"] if args.frame_size is None else args.frame_size
    crop = args.crop or defaults["crop"]
    crop_size = args.crop_size if args.crop_size is not None else (
        defaults["crop_size"] if crop == defaults["crop"] else None)
    sampling_rate = args.sampling_rate or defaults["sampling_rate"]
    sampling = ClipSampling(clip_len=args.clip_len or defaults["clip_len"], sampling_rate=sampling_rate,
                            stride=args.stride, num_clips=args.num_clips, short=args.short)
    preprocess = Preprocess(short_side=frame_size or None, crop=crop, crop_size=crop_size,
                            resize=args.resize)
    takes_audio = arch.family in AUDIO_FAMILIES
    if args.audio and not takes_audio:
        raise UsageError(f"--audio needs an audio or audio-visual model (a_resnet_*, av_*); {arch.name} "
                         "takes video only")
    if args.head != "av" and arch.family != "audio_visual":
        raise UsageError(f"--head chooses among an audio-visual model's heads; {arch.name} has one")
    options = pipeline.Options(sampling=sampling, preprocess=preprocess, fps=args.fps,
                               pool_spatial=args.pool_spatial, pool_temporal=args.pool_temporal,
                               batch_size=args.batch_size, workers=args.workers,
                               ffmpeg_threads=args.ffmpeg_threads, strict=not args.keep_truncated,
                               audio=takes_audio, head=args.head)
    jobs = inputs.collect(args.videos, args.list)
    part = process_share(args)
    jobs = inputs.share(jobs, *part)
    model = load_model(args, arch)
    names = None
    if task == "classify":
        saved = getattr(model, "labels", None)  # class names saved with a fine-tuned checkpoint
        if args.labels is None and saved:
            names, source = list(saved), f"saved with {args.checkpoint}"
        else:
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
    add_model_arguments(g)
    g = p.add_argument_group("clips (defaults: ig65m-pytorch's extract)")
    g.add_argument("--clip-len", type=positive, help="frames per clip (default 32; 16 for c3d)")
    g.add_argument("--sampling-rate", type=positive, help="take every n-th frame within a clip (default 1, "
                   "consecutive frames; CSN's evaluation uses 2)")
    g.add_argument("--stride", type=positive, help="frames between clip starts (default: clip-len x "
                   "sampling-rate, back to back; the remainder is dropped)")
    g.add_argument("--num-clips", type=positive, help="instead, this many uniformly spaced clips "
                   "(VMZ's test protocol, e.g. 10)")
    g.add_argument("--short", choices=["pad", "skip"], default="pad", help="a video shorter than one "
                   "clip: pad it to one clip with its last frame (default), or give it no clips")
    g.add_argument("--fps", type=float, help="resample to this frame rate first (default: native)")
    g = p.add_argument_group("frames")
    g.add_argument("--frame-size", type=int, help="resize the short side to this (default 128; 256 for "
                   "CSN; 0 keeps the decoded size)")
    g.add_argument("--crop", choices=["none", "center", "three"], help="centre crop, or three crops "
                   "along the long side (default none; center for c3d)")
    g.add_argument("--crop-size", type=positive, help="crop side (default: the frame size; 112 for c3d)")
    g.add_argument("--resize", choices=["exact", "ffmpeg"], default="exact", help="exact: PyTorch's "
                   "bilinear interpolate, bit-faithful to ig65m (default); ffmpeg: scale in the decoder, "
                   "faster on large videos, slightly different pixels")
    g = p.add_argument_group("audio (the audio and audio-visual models)")
    g.add_argument("--audio", action="store_true", help="give the model each clip's log-mels (100 x 40, "
                   "VMZ's AVInput) from the video's audio track; implied by the a_resnet_* and av_* archs, "
                   "refused for the others. A video without audio gets zeros (VMZ's behaviour), a short "
                   "track is stretched over the video; index.jsonl says which (audio: present/short/missing)")
    if task == "classify":
        g.add_argument("--head", choices=["av", "audio", "visual"], default="av", help="the head of an "
                       "audio-visual model whose classes are reported (default av, the fusion head)")
    else:
        p.set_defaults(head="av")
    if task == "extract":
        g = p.add_argument_group("features")
        g.add_argument("--pool-spatial", choices=["mean", "max"], default="mean")
        g.add_argument("--pool-temporal", choices=["mean", "max"], default="mean")
        p.set_defaults(labels=None, top_k=5)
    else:
        g = p.add_argument_group("predictions")
        g.add_argument("--labels", metavar="FILE.json", help="JSON list of class names (default: "
                       "Kinetics-400 names for 400-class heads)")
        g.add_argument("--top-k", type=positive, default=5)
        p.set_defaults(pool_spatial="mean", pool_temporal="mean")
    g = p.add_argument_group("running")
    g.add_argument("--batch-size", type=positive, default=4, help="clips (views) per batch, split over "
                   "the local devices (rounded up to a multiple of their number)")
    g.add_argument("--workers", type=positive, default=2, help="videos decoded in parallel")
    g.add_argument("--ffmpeg-threads", type=positive, default=1, help="decoder threads per video")
    g.add_argument("--keep-truncated", action="store_true", help="use the frames of truncated or "
                   "damaged files (with a warning) instead of failing them")
    g.add_argument("--overwrite", action="store_true", help="redo videos whose output exists")
    g.add_argument("--quiet", action="store_true", help="no progress line or summary")
    g = p.add_argument_group("several hosts (each process takes every n-th video)")
    g.add_argument("--distributed", action="store_true", help="call jax.distributed.initialize() "
                   "(cluster auto-detection)")
    g.add_argument("--coordinator", metavar="HOST:PORT", help="coordinator address")
    g.add_argument("--num-processes", type=positive)
    g.add_argument("--process-id", type=int)
    p.set_defaults(run=cmd_videos)


def add_parser(sub: Any) -> None:
    p = sub.add_parser("extract", help="pooled clip features of videos, one .npy per video")
    _add_video_arguments(p, "extract")
    p = sub.add_parser("classify", help="top-k classes per clip and per video, JSON lines per video")
    _add_video_arguments(p, "classify")
