"""`vmz-jax evaluate`: accuracy of a classifier on labelled videos under VMZ's test protocol."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from vmz_jax.cli.common import UsageError, add_model_arguments, check_arch, load_model, positive

#: Protocol fields a flag can set, flag dest -> Protocol field.
_OVERRIDES = {"clips": "clips", "crops": "crops", "frame_size": "frame_size", "crop_size": "crop_size",
              "clip_len": "clip_len", "sampling_rate": "sampling_rate",
              "average": "average", "conv_window": "conv_window"}
#: --head values: how the classifier is applied (Protocol.head) or which classifier of a model that
#: takes log-mels scores (Protocol.model_head).
_CLASSIFIER_FORMS = ("pool", "conv", "conv-joint")
_MODEL_HEADS = ("av", "audio", "visual")


def _heads(given: list[str] | None) -> dict[str, str]:
    """The Protocol fields the --head flags set: at most one form and one model head."""
    forms = [h for h in given or () if h in _CLASSIFIER_FORMS]
    heads = [h for h in given or () if h in _MODEL_HEADS]
    if len(forms) > 1 or len(heads) > 1:
        raise UsageError("--head takes one of pool/conv/conv-joint and one of av/audio/visual, "
                         f"not {' '.join(forms if len(forms) > 1 else heads)}")
    return {**({"head": forms[0]} if forms else {}), **({"model_head": heads[0]} if heads else {})}


def cmd_evaluate(args: argparse.Namespace) -> int:
    from vmz_jax.evaluation import default_protocol, evaluate
    from vmz_jax.models.registry import AUDIO_FAMILIES
    from vmz_jax.runtime import enable_compilation_cache

    arch = check_arch(args.arch)
    heads = _heads(args.head)
    if arch.family == "c3d" and heads.get("head", "pool") != "pool":
        raise UsageError("c3d has no convolutional head (its classifier follows fc6/fc7): use --head pool")
    if "model_head" in heads and arch.family not in AUDIO_FAMILIES:
        raise UsageError(f"--head {heads['model_head']}: {arch.name} is a visual model (the av, audio and "
                         "visual heads belong to the audio-visual models)")
    if arch.family == "audio" and heads.get("model_head", "audio") != "audio":
        raise UsageError(f"--head {heads['model_head']}: {arch.name} has only the audio head")
    model = load_model(args, arch)
    protocol = default_protocol(model)
    changes = {field: getattr(args, dest) for dest, field in _OVERRIDES.items()
               if getattr(args, dest) is not None}
    changes.update(heads)
    if changes.get("crop_size", protocol.crop_size) > changes.get("frame_size", protocol.frame_size):
        if "crop_size" not in changes:
            changes["crop_size"] = changes["frame_size"]  # a smaller frame size takes the crop along
    if args.resize is not None:
        changes["resize"] = args.resize
    if changes:
        protocol = protocol.replace(**changes)
    enable_compilation_cache()
    stream = sys.stderr
    result = evaluate(model, args.data, args.out, protocol, labels=args.labels, root=args.root,
                      split=args.split, subset=args.subset, dataset_classes=args.classes,
                      batch_size=args.batch_size, workers=args.workers, ffmpeg_threads=args.ffmpeg_threads,
                      overwrite=args.overwrite, progress=not args.quiet, stream=stream)
    print(result.table())
    if result.failures:
        print(f"vmz-jax evaluate: {len(result.failures)} video(s) could not be read and are excluded "
              f"(listed in {args.out}/report.json), e.g. {result.failures[0][1]}", file=sys.stderr)
    silent = result.audio.get("missing", []) if result.audio else []
    if silent:
        print(f"vmz-jax evaluate: {len(silent)} video(s) have no audio track and were scored with "
              f"all-zero log-mels, as VMZ's AVInput gives (listed in {args.out}/report.json), "
              f"e.g. {silent[0]}", file=sys.stderr)
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser("evaluate", help="accuracy on labelled videos under VMZ's published test protocol",
                       description="Video and clip accuracy of a classifier on labelled videos, with VMZ's "
                       "test protocol (10 uniformly spaced clips; 112 centre crops of 128 frames, or 3 "
                       "crops of 256 with the convolutional head for CSN; the audio-visual models with "
                       "each clip's log-mels, scored by their fusion head) or an explicit one. Reports in "
                       "DIR: report.json, predictions.jsonl, scores.npy, per_class.csv, confusion.png. "
                       "Rerunning the same command continues where it stopped.")
    p.add_argument("data", help="labelled videos: a folder per class, a list file (path,label), UCF101 "
                   "or HMDB51 split files, or a Kinetics CSV (with --root)")
    p.add_argument("--out", required=True, metavar="DIR", help="report directory (resumed if it holds "
                   "the same evaluation)")
    g = p.add_argument_group("data")
    g.add_argument("--root", help="folder of the videos of split files and Kinetics CSVs")
    g.add_argument("--split", type=int, default=1, help="UCF101/HMDB51 split (default 1)")
    g.add_argument("--subset", default="test", help="train or test (default test)")
    g.add_argument("--classes", metavar="FILE", help="class list of a list file or Kinetics CSV")
    g = p.add_argument_group("model")
    add_model_arguments(g)
    g.add_argument("--labels", metavar="FILE.json", help="the model's class names (default: saved with "
                   "the weights, or Kinetics-400 for 400 classes); dataset classes are matched by name")
    g = p.add_argument_group("protocol (default: --protocol vmz; each flag replaces one value of it)")
    g.add_argument("--protocol", choices=["vmz"], default="vmz", help="VMZ's test_net.py (112 models) / "
                   "test_net_large.py (CSN: 3 crops of 256, sampling rate 2, convolutional head)")
    g.add_argument("--clips", type=positive, help="uniformly spaced clips per video (vmz: 10)")
    g.add_argument("--crops", type=int, choices=[1, 3], help="1 centre crop or 3 along the long side")
    g.add_argument("--frame-size", type=positive, help="short side the frames are resized to (vmz: 128; "
                   "256 for CSN)")
    g.add_argument("--crop-size", type=positive, help="crop side (vmz: 112; 256 for CSN)")
    g.add_argument("--clip-len", type=positive, help="frames per clip (vmz: the weights' clip length)")
    g.add_argument("--sampling-rate", type=positive, help="take every n-th frame (vmz: 1; 2 for CSN)")
    g.add_argument("--head", action="append", choices=[*_CLASSIFIER_FORMS, *_MODEL_HEADS],
                   help="how the classifier is applied: pool: global average pool + FC; conv: FC at "
                   "every position of a stride-1 window-pooled layer4 map, softmax per position, mean; "
                   "conv-joint: that map with Caffe2's one softmax over classes x positions (VMZ's "
                   "test_net_large.py; vmz for CSN). And, for audio-visual models, which classifier "
                   "scores: av (the fusion head, vmz), audio or visual. Give both as two --head flags")
    g.add_argument("--conv-window", type=positive, help="spatial kernel of the convolutional head's "
                   "average pool (vmz: 7; 14 for 256 crops of networks without pool1)")
    g.add_argument("--average", choices=["softmax", "logits"], help="the video score is the mean of the "
                   "views' softmaxes (vmz) or of their logits")
    g = p.add_argument_group("running")
    g.add_argument("--batch-size", type=positive, default=4, help="views per batch, split over the local "
                   "devices")
    g.add_argument("--workers", type=positive, default=2, help="videos decoded in parallel")
    g.add_argument("--ffmpeg-threads", type=positive, default=1, help="decoder threads per video")
    g.add_argument("--resize", choices=["exact", "ffmpeg"], help="exact: ig65m's torch interpolate "
                   "(default); ffmpeg: scale in the decoder (faster, slightly different pixels)")
    g.add_argument("--overwrite", action="store_true", help="replace a different evaluation in DIR")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=cmd_evaluate)
