"""End-to-end fine-tuning throughput (`vmz-jax finetune`: decode + augment + train step + logging)
against the engine's model-only training throughput (the same compiled step on an in-memory batch).

    python benchmarks/bench_finetune.py                       # r2plus1d_18, 8x112x112, batch 4
    python benchmarks/bench_finetune.py --arch r3d_10 --batch-size 8 --steps 10 --videos 32

Videos are made with ffmpeg first (320x240 H.264, 64 frames, a moving test pattern, in 4 classes), so
decoding costs what a UCF101-sized file costs. The end-to-end figure is the median `clips_per_s` of
metrics.jsonl (the wait for the loader plus the step, the first step excluded: it compiles); the
model-only figure is batch / median step time over `--steps` steps after a warm-up. The ratio says
how much of the training step the input pipeline costs (1.0: loading is fully hidden).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path


def make_videos(root: Path, count: int) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.videos import make_video

    for i in range(count):
        folder = root / f"class{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        make_video(folder, f"v{i:03d}", frames=64, size=(320, 240))


def end_to_end(args: argparse.Namespace, data: Path, out: Path) -> float:
    from vmz_jax.cli import main
    from vmz_jax.train.fit import read_metrics

    code = main(["finetune", str(data), "--arch", args.arch, "--from-scratch", "--out", str(out),
                 "--clip-len", str(args.clip_len), "--crop-size", "112", "--frame-size", "128,160",
                 "--batch-size", str(args.batch_size), "--epochs", "100", "--max-steps", str(args.steps + 1),
                 "--quiet"] + (["--workers", str(args.workers)] if args.workers else []))
    if code != 0:
        raise SystemExit(f"finetune exited with {code}")
    speeds = [r["clips_per_s"] for r in read_metrics(out) if "loss" in r][1:]
    return statistics.median(speeds)


def model_only(args: argparse.Namespace) -> float:
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from vmz_jax.models import build
    from vmz_jax.train import TrainConfig, apply_train_mode, make_optimizer, train_step

    model = build(args.arch, 4, rngs=nnx.Rngs(0), clip_length=args.clip_len)
    config = TrainConfig(batch_size=args.batch_size)
    apply_train_mode(model, config)
    optimizer = make_optimizer(model, config, 100)
    rng = np.random.default_rng(0)
    clips = jnp.asarray(rng.normal(size=(args.batch_size, args.clip_len, 112, 112, 3)).astype(np.float32))
    labels = jnp.asarray(np.arange(args.batch_size) % 4, jnp.int32)
    float(train_step(model, optimizer, clips, labels)["loss"])  # compile
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        float(train_step(model, optimizer, clips, labels)["loss"])
        times.append(time.perf_counter() - start)
    return args.batch_size / statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="r2plus1d_18")
    p.add_argument("--clip-len", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=5, help="timed steps per side")
    p.add_argument("--videos", type=int, default=16)
    p.add_argument("--workers", type=int)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "videos"
        start = time.perf_counter()
        make_videos(data, args.videos)
        made = time.perf_counter() - start
        e2e = end_to_end(args, data, Path(tmp) / "run")
    alone = model_only(args)
    print(json.dumps({"arch": args.arch, "clip": f"{args.clip_len}x112x112", "batch": args.batch_size,
                      "steps": args.steps, "videos": args.videos, "make_videos_s": round(made, 1),
                      "end_to_end_clips_per_s": round(e2e, 3), "model_only_clips_per_s": round(alone, 3),
                      "ratio": round(e2e / alone, 3)}))


if __name__ == "__main__":
    main()
