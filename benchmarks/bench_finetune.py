"""End-to-end fine-tuning throughput (`vmz-jax finetune`: decode + augment + train step + logging)
against the engine's model-only training throughput (the same step, same configuration, on one batch
already in memory), in interleaved rounds.

    python benchmarks/bench_finetune.py                       # r2plus1d_18, 8x112x112, batch 4, 3 rounds
    python benchmarks/bench_finetune.py --arch r3d_10 --batch-size 8 --steps 10 --videos 64

Videos are made with ffmpeg first (320x240 H.264, 64 frames, a moving test pattern, in 4 classes), so
decoding costs what a UCF101-sized file costs. Each round runs `vmz-jax finetune` in this process
(a new run directory; the first `--skip` steps are excluded: the first compiles) and then `--steps`
model-only steps of the configuration that run wrote to its config.json. The end-to-end figure is the median
`clips_per_s` of the round's metrics.jsonl (the wait for the loader plus the step); the model-only
figure is batch / median step time. The round's ratio says how much of the training step the input
pipeline costs (1.0: loading is fully hidden); the result is the median over rounds.

The timed steps lie inside the first epoch (there must be more videos than `(steps + 1) * batch`):
an epoch end adds validation, curves.png and a checkpoint, which are not input-pipeline costs and are
paid once per epoch (or per `checkpoint_every` steps). The first epoch is also the one in which every
video is probed once, so the figure includes that cost.
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

    extra = ["--workers", str(args.workers)] if args.workers else []
    extra += ["--resize", args.resize] if args.resize else []
    code = main(["finetune", str(data), "--arch", args.arch, "--from-scratch", "--out", str(out),
                 "--clip-len", str(args.clip_len), "--crop-size", "112", "--frame-size", "128,160",
                 "--batch-size", str(args.batch_size), "--epochs", "1",
                 "--max-steps", str(args.steps + args.skip), "--quiet"] + extra)
    if code != 0:
        raise SystemExit(f"finetune exited with {code}")
    speeds = [r["clips_per_s"] for r in read_metrics(out) if "loss" in r]
    print("  end-to-end clips/s per step:", speeds, file=sys.stderr)
    return statistics.median(speeds[args.skip:])


class ModelOnly:
    """The run's own configuration (config.json), one in-memory batch, compiled once."""

    def __init__(self, args: argparse.Namespace, run: Path):
        import jax.numpy as jnp
        import numpy as np
        from flax import nnx

        from vmz_jax.models import build
        from vmz_jax.train import TrainConfig, apply_train_mode, make_optimizer, train_step

        identity = json.loads((run / "config.json").read_text())
        config = TrainConfig.from_dict(identity["config"])
        model_info = identity["model"]
        self.model = build(model_info["arch"], model_info["num_classes"], rngs=nnx.Rngs(0),
                           clip_length=model_info["clip_length"])
        apply_train_mode(self.model, config)
        per_epoch = max(1, identity["data"]["train"] // config.batch_size)
        self.optimizer = make_optimizer(self.model, config, per_epoch)
        rng = np.random.default_rng(0)
        self.clips = jnp.asarray(rng.normal(size=(config.batch_size, args.clip_len, 112, 112, 3))
                                 .astype(np.float32))
        self.labels = jnp.asarray(np.arange(config.batch_size) % model_info["num_classes"], jnp.int32)
        self.batch_size = config.batch_size
        self.step = train_step
        self.time_steps(1)  # compile

    def time_steps(self, steps: int) -> float:
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            float(self.step(self.model, self.optimizer, self.clips, self.labels)["loss"])
            times.append(time.perf_counter() - start)
        return self.batch_size / statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="r2plus1d_18")
    p.add_argument("--clip-len", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=5, help="timed steps per side and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--skip", type=int, default=2, help="first steps of each run left out (the first "
                   "compiles, the next ones still grow the process's memory)")
    p.add_argument("--videos", type=int, default=40)
    p.add_argument("--workers", type=int)
    p.add_argument("--resize", choices=["exact", "ffmpeg"])
    args = p.parse_args()
    if args.skip < 1 or args.videos < (args.steps + args.skip) * args.batch_size:
        p.error("--skip must be at least 1 and --videos must cover (steps + skip) * batch-size clips: "
                "the timed steps stay in epoch 1")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "videos"
        start = time.perf_counter()
        make_videos(data, args.videos)
        made = time.perf_counter() - start
        alone: ModelOnly | None = None
        for r in range(args.rounds):
            run = Path(tmp) / f"run{r}"
            e2e = end_to_end(args, data, run)
            if alone is None:
                alone = ModelOnly(args, run)
            model = alone.time_steps(args.steps)
            rows.append((e2e, model))
            print(f"round {r + 1}: end-to-end {e2e:.3f}, model-only {model:.3f} clips/s, "
                  f"ratio {e2e / model:.3f}", file=sys.stderr, flush=True)
    print(json.dumps({"arch": args.arch, "clip": f"{args.clip_len}x112x112", "batch": args.batch_size,
                      "steps": args.steps, "rounds": args.rounds, "videos": args.videos,
                      "resize": args.resize or "default", "make_videos_s": round(made, 1),
                      "end_to_end_clips_per_s": round(statistics.median(e for e, _ in rows), 3),
                      "model_only_clips_per_s": round(statistics.median(m for _, m in rows), 3),
                      "ratio": round(statistics.median(e / m for e, m in rows), 3),
                      "ratios": [round(e / m, 3) for e, m in rows]}))


if __name__ == "__main__":
    main()
