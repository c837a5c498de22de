"""Kinetics-400 classes of a video, per clip and for the whole video (mean of the clip softmaxes).

    python examples/classify_video.py vmz_jax/data/sample.mp4
    python examples/classify_video.py my.mp4 --arch ip_csn_152 --checkpoint ipcsn152/ --num-clips 10

Like `vmz-jax classify my.mp4 --out DIR`, without the files.
"""

import argparse

import vmz_jax
from vmz_jax.video import labels, pipeline
from vmz_jax.video.clips import ClipSampling
from vmz_jax.video.preprocess import Preprocess

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
parser.add_argument("video")
parser.add_argument("--arch", default="r2plus1d_34")
parser.add_argument("--pretraining", default="ig_ft_kinetics_32frms")
parser.add_argument("--checkpoint", help="local weights (Orbax dir, .pth, .pkl) instead of a download")
parser.add_argument("--num-clips", type=int, help="uniformly spaced clips instead of back-to-back ones")
args = parser.parse_args()

model = vmz_jax.load(args.arch, None if args.checkpoint else args.pretraining, checkpoint=args.checkpoint)
defaults = pipeline.default_options(args.arch)
options = pipeline.Options(sampling=ClipSampling(clip_len=defaults["clip_len"], num_clips=args.num_clips),
                           preprocess=Preprocess(short_side=defaults["frame_size"]))
names, _ = labels.for_head(pipeline.num_classes(model))

(result,) = pipeline.run(model, [args.video], "classify", options)
if result.error:
    raise SystemExit(result.error)
for clip, probs in zip(result.clips, result.outputs, strict=True):
    best = probs.argmax()
    print(f"clip {clip.index} ({clip.start_s:.2f}-{clip.end_s:.2f} s): {names[best]} {probs[best]:.3f}")
video_probs = result.outputs.mean(axis=0)
for k in video_probs.argsort()[::-1][:5]:
    print(f"video: {video_probs[k]:.3f}  {names[k]}")
