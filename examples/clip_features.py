"""Pooled features and top-5 Kinetics classes for a clip, from released or local weights.

    python examples/clip_features.py --arch r2plus1d_34 --pretraining ig_ft_kinetics_32frms
    python examples/clip_features.py --arch ip_csn_152 \
        --checkpoint ipCSN_152_ft_kinetics_from_ig65m_f133090949.pth
    python examples/clip_features.py --arch r2plus1d_18 --random          # no weights needed

The clip is a .npy of uint8 RGB frames (T, H, W, 3), already resized (short side 112..128 for
R(2+1)D, 224..256 for CSN); without --clip a random one is used.
"""

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import vmz_jax
from vmz_jax.models.forward import make_forward

MEAN = np.array([110.201, 100.64, 95.9966], np.float32)  # Caffe2 VideoInputOp, RGB, 0-255
STD = np.array([58.1489, 56.4701, 55.3324], np.float32)
LABELS = Path(__file__).resolve().parent.parent / "vmz_jax" / "data" / "kinetics400_classes.json"

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
parser.add_argument("--arch", default="r2plus1d_34")
parser.add_argument("--pretraining")
parser.add_argument("--checkpoint")
parser.add_argument("--random", action="store_true", help="random weights (400 classes)")
parser.add_argument("--clip", help=".npy uint8 (T, H, W, 3)")
args = parser.parse_args()

if args.random:
    model = vmz_jax.models.build(args.arch, 400, rngs=nnx.Rngs(0))
    model.eval()
else:
    model = vmz_jax.load(args.arch, args.pretraining, checkpoint=args.checkpoint)

frames = (np.load(args.clip) if args.clip else
          np.random.default_rng(0).integers(0, 256, (8, 112, 112, 3), dtype=np.uint8))
clips = jnp.asarray((frames.astype(np.float32) - MEAN) / STD)[None]

# One jitted forward returning both; make_forward(model, "features") etc. return one output each.
outputs = make_forward(model, lambda net, x: (net.features(x), jax.nn.softmax(net(x), axis=-1)))(clips)
features, probs = outputs[0][0], outputs[1][0]
print(f"features: {features.shape}, mean {float(features.mean()):.4f}")
labels = json.loads(LABELS.read_text()) if probs.shape[0] == 400 and LABELS.exists() else None
for k in np.argsort(-np.asarray(probs))[:5]:
    print(f"{float(probs[k]):.3f}  {labels[k] if labels else k}")
