"""End-to-end `vmz_jax.pipeline.run` throughput against model-only and decode-only throughput.

    python benchmarks/bench_extract.py                    # r2plus1d_34 and ir_csn_152, 8x112x112, CPU
    python benchmarks/bench_extract.py --arch r2plus1d_34 --clip-len 32 --frame-size 128 --crop none \
        --video-size 640x480 --videos 32 --video-frames 128 --batch-size 16 --workers 2 4 8 16

Synthetic h264 videos (ffmpeg's testsrc2, `tests/videos.py`) are made once; models have random
weights. Per architecture, after a warm-up on the exact shapes, each round times, interleaved:

* model-only: `Engine(model, "extract", options)` on a preassembled float32 batch, as many batches
  as the end-to-end run dispatches, one in flight while the next is dispatched (as the pipeline does);
* end-to-end: `list(pipeline.run(model, videos, "extract", options))`, for each `--workers` value;
* decode-only: probe + decode + `Preprocess` + `clips.assemble` + `clips.stack` of every video in a
  pool of `workers` threads, no model: the headroom of the input side.

`run()` builds a new `Engine` on every call; in one process JAX reuses the first one's compiled
executable, so after the warm-up no compile is timed (the first compile is reported on its own).
Prints medians over `--repeats` rounds as a markdown table; `--json` writes the rows.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

import vmz_jax.models
from vmz_jax.video import clips, pipeline
from vmz_jax.video import decode as video
from vmz_jax.video.preprocess import Preprocess

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # for tests.videos


def make_videos(directory: Path, n: int, frames: int, size: tuple[int, int], fps: int) -> list[str]:
    from tests.videos import make_video

    return [str(make_video(directory, f"v{i:03d}", frames=frames, size=size, fps=fps)) for i in range(n)]


def decode_only(paths: list[str], options: pipeline.Options, workers: int) -> int:
    """What the pipeline's decode workers do, without the model; returns the number of clips."""
    pre, sampling = options.preprocess, options.sampling

    def one(path: str) -> int:
        info = video.probe(path)
        total = video.count_frames(path, options.fps, options.ffmpeg_threads) if sampling.num_clips else None
        frames = video.decode(info, fps=options.fps, size=pre.ffmpeg_size(info.height, info.width),
                              threads=options.ffmpeg_threads, strict=options.strict)
        count = 0
        for clip in clips.assemble(map(pre, frames), sampling, total):
            clips.stack(clip)
            count += 1
        return count

    with ThreadPoolExecutor(workers) as pool:
        return sum(pool.map(one, paths))


def model_only(engine: pipeline.Engine, batch: np.ndarray, batches: int) -> None:
    """`batches` batches back to back, one in flight while the next is dispatched, as `run` does."""
    previous = None
    for _ in range(batches):
        current = engine(batch)
        if previous is not None:
            np.asarray(previous)
        previous = current
    np.asarray(previous)


def end_to_end(model: nnx.Module, paths: list[str], options: pipeline.Options) -> int:
    results = list(pipeline.run(model, paths, "extract", options))
    errors = [r.error for r in results if r.error]
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(results)} videos failed, first: {errors[0]}")
    return sum(len(r.clips) for r in results)


def seconds(fn: Any, *args: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def bench_arch(arch: str, paths: list[str], options: pipeline.Options, args: argparse.Namespace
               ) -> list[dict[str, Any]]:
    model = vmz_jax.models.build(arch, 400, rngs=nnx.Rngs(0), clip_length=options.sampling.clip_len)
    model.eval()
    width, height = args.video_size
    views = options.preprocess.num_views
    shape = (options.sampling.clip_len, *options.preprocess.view_shape(height, width), 3)
    expected = len(paths) * len(options.sampling.starts(args.video_frames))

    def first_engine() -> pipeline.Engine:
        engine = pipeline.Engine(model, "extract", options)
        np.asarray(engine(np.zeros((engine.batch_size, *shape), np.float32)))
        return engine

    compile_s, engine = seconds(first_engine)  # trace + compile + one batch
    batch = np.random.default_rng(0).standard_normal((engine.batch_size, *shape)).astype(np.float32)
    batches = -(-expected * views // engine.batch_size)
    times: dict[str, list[float]] = {"model": []} | {f"{k}{w}": [] for w in args.workers for k in "ed"}
    warmup_s, _ = seconds(end_to_end, model, paths[:1], options)  # a fresh Engine: no compile expected
    decode_only(paths[:1], options, 1)
    model_only(engine, batch, 1)
    for r in range(args.repeats):
        times["model"].append(seconds(model_only, engine, batch, batches)[0])
        for w in args.workers:
            opts = replace(options, workers=w)
            t, n = seconds(end_to_end, model, paths, opts)
            if n != expected:
                raise RuntimeError(f"end-to-end gave {n} clips, expected {expected}")
            times[f"e{w}"].append(t)
            times[f"d{w}"].append(seconds(decode_only, paths, opts, w)[0])
        print(f"{arch} round {r + 1}/{args.repeats}: model {times['model'][-1]:.2f} s, "
              + ", ".join(f"{w} workers: e2e {times[f'e{w}'][-1]:.2f} s decode {times[f'd{w}'][-1]:.2f} s"
                          for w in args.workers), file=sys.stderr)
    rate = {k: expected / statistics.median(v) for k, v in times.items()}
    return [{"arch": arch, "clip_shape": "x".join(map(str, shape[:3])), "views": views,
             "batch": engine.batch_size, "workers": w, "clips": expected, "batches": batches,
             "model_clips_s": rate["model"], "e2e_clips_s": rate[f"e{w}"], "decode_clips_s": rate[f"d{w}"],
             "ratio": rate[f"e{w}"] / rate["model"], "compile_s": compile_s, "warmup_run_s": warmup_s,
             "seconds": {"model": times["model"], "e2e": times[f"e{w}"], "decode": times[f"d{w}"]}}
            for w in args.workers]


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--arch", nargs="+", default=["r2plus1d_34", "ir_csn_152"])
    parser.add_argument("--clip-len", type=int, default=8)
    parser.add_argument("--frame-size", type=int, default=112, help="short side after the resize")
    parser.add_argument("--crop", choices=["none", "center", "three"], default="center")
    parser.add_argument("--resize", choices=["exact", "ffmpeg"], default="exact")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 2], help="decode workers to sweep")
    parser.add_argument("--videos", type=int, default=12)
    parser.add_argument("--video-frames", type=int, default=64)
    parser.add_argument("--video-size", type=lambda s: tuple(map(int, s.split("x"))), default=(320, 240),
                        metavar="WxH")
    parser.add_argument("--fps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, metavar="OUT", help="write the rows as JSON")
    args = parser.parse_args()

    options = pipeline.Options(
        sampling=clips.ClipSampling(clip_len=args.clip_len),
        preprocess=Preprocess(short_side=args.frame_size, crop=args.crop, resize=args.resize),
        batch_size=args.batch_size)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_videos(Path(tmp), args.videos, args.video_frames, args.video_size, args.fps)
        for arch in args.arch:
            rows += bench_arch(arch, paths, options, args)

    dev = jax.devices()[0]
    device = f"{dev.device_kind} ({dev.platform}) x{jax.local_device_count()}"
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    w, h = args.video_size
    print(f"\n### pipeline.run extract vs model-only: medians of {args.repeats} rounds\n\n"
          f"Device {device}; {os.cpu_count()} CPUs, load average {load}. {args.videos} h264 videos of "
          f"{args.video_frames} frames {w}x{h} @ {args.fps} fps; resize {args.resize}, crop {args.crop}.\n")
    print("| arch | clip shape | batch | workers | model-only clips/s | end-to-end clips/s | ratio "
          "| decode-only clips/s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['arch']} | {r['clip_shape']}{' x3 views' if r['views'] > 1 else ''} | {r['batch']} "
              f"| {r['workers']} | {r['model_clips_s']:.2f} | {r['e2e_clips_s']:.2f} | {r['ratio']:.0%} "
              f"| {r['decode_clips_s']:.2f} |")
    print("\nTarget: end-to-end >= 90% of model-only. Not timed: the first jit compile (+ one batch), "
          "and a warm-up run() over one video: " + ", ".join(
              f"{a} {r['compile_s']:.1f} s and {r['warmup_run_s']:.1f} s"
              for a, r in {r["arch"]: r for r in rows}.items()) + ".")
    if args.json:
        meta = {"device": device, "cpus": os.cpu_count(), "load": os.getloadavg(), "args": {
            k: list(v) if isinstance(v, tuple) else str(v) if isinstance(v, Path) else v
            for k, v in vars(args).items()}}
        args.json.write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
