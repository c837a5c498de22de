"""Clip features of videos from Python: what `vmz-jax extract` does, in a few lines.

    python examples/extract_features.py vmz_jax/data/sample.mp4 --arch r2plus1d_34
    python examples/extract_features.py clips/*.mp4 --arch ir_csn_152 --checkpoint ircsn152/

Defaults follow ig65m-pytorch's `extract`: 32-frame back-to-back clips, short side 128 (256 for
CSN), no crop, layer4 averaged over space then time.
"""

import argparse

import numpy as np

import vmz_jax
from vmz_jax.video import pipeline
from vmz_jax.video.clips import ClipSampling
from vmz_jax.video.preprocess import Preprocess

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
parser.add_argument("videos", nargs="+")
parser.add_argument("--arch", default="r2plus1d_34")
parser.add_argument("--pretraining", default="ig_ft_kinetics_32frms")
parser.add_argument("--checkpoint", help="local weights (Orbax dir, .pth, .pkl) instead of a download")
args = parser.parse_args()

model = vmz_jax.load(args.arch, None if args.checkpoint else args.pretraining, checkpoint=args.checkpoint)
defaults = pipeline.default_options(args.arch)
options = pipeline.Options(sampling=ClipSampling(clip_len=defaults["clip_len"]),
                           preprocess=Preprocess(short_side=defaults["frame_size"]))

for result in pipeline.run(model, args.videos, "extract", options):
    if result.error:
        print(f"failed: {result.error}")
        continue
    np.save(f"{result.job.name}.npy", result.outputs, allow_pickle=False)
    times = ", ".join(f"{c.start_s:.2f}-{c.end_s:.2f}s" for c in result.clips[:3])
    print(f"{result.job.path}: {result.outputs.shape} -> {result.job.name}.npy (clips {times} ...)")
