"""End-to-end `vmz_jax.evaluate` throughput against the same compiled forward on preassembled batches.

    python benchmarks/bench_evaluate.py                       # r2plus1d_34, VMZ's 10x1 protocol, 32x112x112
    python benchmarks/bench_evaluate.py --clip-len 8 --videos 8 --repeats 5 --json out.json

Synthetic h264 videos (ffmpeg's testsrc2, `tests/videos.py`) are made once, in two class folders named
after Kinetics-400 classes; the model has random weights and Kinetics-400 class names. The protocol
is VMZ's for the architecture (`vmz_protocol`: for r2plus1d_34 10 uniformly spaced clips, short side
128, one 112 centre crop, softmax averaged) with `--clip-len` frames. After a warm-up (the first
compile is reported on its own), each round times, interleaved:

* model-only: the evaluation's forward (`vmz_jax.evaluation.run.view_forward`) in a `batcher.Engine`
  of the same batch size on a preassembled float32 batch, as many batches as the evaluation
  dispatches for all views, one in flight while the next is dispatched;
* end-to-end: `vmz_jax.evaluate(model, videos, fresh_dir, protocol)`: decoding, resizing, cropping,
  batching, the forward, per-video averaging, the progress file and every report file.

Prints medians over `--repeats` rounds as a markdown table (the ratio: the median of the rounds'
end-to-end / model-only ratios; the two sides alternate which runs first), with the load average.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # for tests.videos

import vmz_jax  # noqa: E402
from vmz_jax.evaluation import run as evaluation  # noqa: E402
from vmz_jax.evaluation import vmz_protocol  # noqa: E402
from vmz_jax.video import labels  # noqa: E402
from vmz_jax.video.batcher import Engine  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_extract import model_only  # noqa: E402  (the same back-to-back dispatch extract's bench times)


def make_dataset(directory: Path, n: int, frames: int, size: tuple[int, int]) -> Path:
    from tests.videos import make_video

    root = directory / "data"
    for i in range(n):
        folder = root / ("abseiling" if i % 2 == 0 else "air drumming")
        folder.mkdir(parents=True, exist_ok=True)
        make_video(folder, f"v{i:03d}", frames=frames, size=size)
    return root


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--arch", default="r2plus1d_34")
    parser.add_argument("--clip-len", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--videos", type=int, default=4)
    parser.add_argument("--video-frames", type=int, default=64)
    parser.add_argument("--video-size", type=lambda s: tuple(map(int, s.split("x"))), default=(320, 240),
                        metavar="WxH")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, metavar="OUT", help="write the measurements as JSON")
    args = parser.parse_args()

    model = vmz_jax.models.build(args.arch, 400, rngs=nnx.Rngs(0), clip_length=args.clip_len)
    model.eval()
    classes = labels.kinetics400()
    protocol = vmz_protocol(args.arch, clip_len=args.clip_len)
    views = args.videos * protocol.views
    shape = (protocol.clip_len, protocol.crop_size, protocol.crop_size, 3)
    times: dict[str, list[float]] = {"model": [], "e2e": []}
    with tempfile.TemporaryDirectory() as tmp:
        data = make_dataset(Path(tmp), args.videos, args.video_frames, args.video_size)
        start = time.perf_counter()
        engine = Engine(evaluation.view_forward(model, protocol), args.batch_size)
        batch = np.random.default_rng(0).standard_normal((engine.batch_size, *shape)).astype(np.float32)
        np.asarray(engine(batch))
        compile_s = time.perf_counter() - start
        batches = math.ceil(views / engine.batch_size)
        warm = time.perf_counter()
        vmz_jax.evaluate(model, data, Path(tmp) / "warmup", protocol, labels=classes, progress=False,
                         batch_size=args.batch_size, workers=args.workers)
        warmup_s = time.perf_counter() - warm
        for r in range(args.repeats):
            # alternate which side goes first, so a load that changes during a round favours neither
            for side in (("model", "e2e") if r % 2 == 0 else ("e2e", "model")):
                t = time.perf_counter()
                if side == "model":
                    model_only(engine, batch, batches)
                else:
                    result = vmz_jax.evaluate(model, data, Path(tmp) / f"round{r}", protocol,
                                              labels=classes, progress=False, batch_size=args.batch_size,
                                              workers=args.workers)
                    if result.metrics["views"] != views or result.failures:
                        raise RuntimeError(f"evaluated {result.metrics['views']} views, expected "
                                           f"{views}; failures: {result.failures}")
                times[side].append(time.perf_counter() - t)
            print(f"round {r + 1}/{args.repeats}: model-only {times['model'][-1]:.2f} s, end-to-end "
                  f"{times['e2e'][-1]:.2f} s", file=sys.stderr)
    rate = {k: views / statistics.median(v) for k, v in times.items()}
    ratios = [m / e for m, e in zip(times["model"], times["e2e"], strict=True)]  # per round
    dev = jax.devices()[0]
    device = f"{dev.device_kind} ({dev.platform}) x{jax.local_device_count()}"
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    w, h = args.video_size
    print(f"\n### vmz_jax.evaluate vs model-only: medians of {args.repeats} interleaved rounds\n\n"
          f"Device {device}; {os.cpu_count()} CPUs, load average {load} (after the run). {args.videos} "
          f"h264 videos of {args.video_frames} frames {w}x{h}; protocol {protocol.describe()}; batch "
          f"{engine.batch_size}, {args.workers} decode workers.\n")
    print("| arch | views | model-only clips/s | end-to-end clips/s | ratio (median of rounds) | rounds |")
    print("|---|---:|---:|---:|---:|---|")
    print(f"| {args.arch} | {views} ({args.videos} videos x {protocol.views}) | {rate['model']:.2f} "
          f"| {rate['e2e']:.2f} | {statistics.median(ratios):.1%} | "
          f"{', '.join(f'{x:.1%}' for x in ratios)} |")
    print(f"\nNot timed: the first compile + one batch ({compile_s:.1f} s) and a warm-up evaluation "
          f"({warmup_s:.1f} s). Goal: end-to-end >= 90% of model-only.")
    if args.json:
        record = {"device": device, "load": os.getloadavg(), "views": views, "protocol": protocol.record(),
                  "seconds": times, "rate": rate, "ratios": ratios, "compile_s": compile_s,
                  "warmup_s": warmup_s,
                  "args": {k: str(v) for k, v in vars(args).items()}}
        args.json.write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
