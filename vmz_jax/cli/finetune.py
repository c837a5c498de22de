"""`vmz-jax finetune`: fine-tune a model on a labelled video dataset, into one run directory.

Defaults come from the published recipe of the model's family (`vmz_jax.train.recipes`); every flag
given on the command line overrides its value. The run directory holds::

    finetune.json     what the command trained on and with (dataset, clips, weights): resuming with
                      other data is refused
    labels.json       the class names, in the order of the new head
    config.json, checkpoints/, metrics.jsonl, curves.png, best/, model/   (`vmz_jax.train.fit`)
    failures.jsonl    videos that could not be read, one line each, logged once (with several
                      processes, process i of n logs in failures.<i>-of-<n>.jsonl)

A video that cannot be read (damaged, truncated, empty) is logged once in failures.jsonl and
replaced in its batch by another video of the same set, picked from (seed, epoch, index) alone:
batch shapes do not change (no recompile) and a resumed run draws the same substitutes. More than
`--max-failures` of a set unreadable stops the run with a one-line error. Ctrl-C or SIGTERM stops
after the current step with a checkpoint; `--resume` continues bit for bit.

Audio-visual models (`av_*`): each clip comes with its log-mels (`VideoClipDataset(audio=True)`),
the recipe is that of the visual trunk's family, and the loss is Gradient-Blending's
`w_a*L_a + w_v*L_v + w_av*L_av` (`--blend-weights A,V,AV`; default: the row of
`c2/tutorials/gradient_blending.md` for the architecture and pre-training, `published_weights`),
recorded in config.json; validation scores the fusion head (av), as VMZ's test does.

Several hosts: run the same command in every process with `--distributed` (or `--coordinator`,
`--num-processes`, `--process-id`) and one shared `--out`; they train together (`fit`), each
decoding its own part of every batch, and process 0 prints and writes the run's files.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np

from vmz_jax.cli.common import UsageError, check_arch, load_model, number, positive, process_share
from vmz_jax.errors import VMZError, one_line

FINETUNE_FILE = "finetune.json"
LABELS_FILE = "labels.json"
FAILURES_FILE = "failures.jsonl"
EVAL_DIR = "evaluation"
#: Files that make a directory a run directory of this command (or of `fit`).
RUN_FILES = (FINETUNE_FILE, LABELS_FILE, "config.json", "checkpoints")


# ------------------------------------------------------------------------------------------------
# unreadable videos


class FailureLog:
    """RUN_DIR/failures.jsonl: each unreadable video once (also across resumed runs), and the count
    per set that `--max-failures` limits. Rewritten atomically at each new entry (they are rare)."""

    def __init__(self, path: Path, others: list[Path] | None = None):
        """`others`: the logs of the other processes of a run, counted but not written."""
        self.path = path
        self.lock = threading.Lock()
        self.entries = _read_entries(path)
        self.seen = {(e.get("set"), e["path"]) for e in self.entries}
        for other in others or []:
            self.seen |= {(e.get("set"), e["path"]) for e in _read_entries(other)}

    def count(self, role: str) -> int:
        return sum(1 for r, _ in self.seen if r == role)

    def record(self, role: str, path: str, error: str) -> int:
        """Log `path` (if new) and return how many videos of `role` have failed."""
        from vmz_jax.files import atomic_write

        with self.lock:
            if (role, path) not in self.seen:
                self.seen.add((role, path))
                self.entries.append({"set": role, "path": path, "error": one_line(error)})
                atomic_write(self.path, "".join(json.dumps(e) + "\n" for e in self.entries), "w")
            return self.count(role)


def _read_entries(path: Path) -> list[dict[str, Any]]:
    entries = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(entry, dict) and "path" in entry:
                entries.append(entry)
    return entries


def failure_log_path(run_dir: Path, index: int, count: int) -> Path:
    """Where process `index` of `count` logs its unreadable videos."""
    return run_dir / (FAILURES_FILE if index == 0 else f"failures.{index}-of-{count}.jsonl")


class SkipUnreadable:
    """A `VideoClipDataset` whose unreadable videos are replaced, deterministically.

    `load(index, epoch, seed)` returns the clip of `index`, or, if that video raises `VideoError`,
    the clip of the first readable video in a permutation drawn from (seed, epoch, index): a function
    of the arguments and of which files are bad (a fixed property of the data), so resume stays exact.
    """

    def __init__(self, dataset: Any, log: FailureLog, role: str, max_failures: float):
        self.dataset = dataset
        self.log = log
        self.role = role
        self.limit = max_failures * len(dataset)

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def class_names(self) -> list[str]:
        return self.dataset.class_names

    def _failed(self, index: int, exc: Exception) -> None:
        path = self.dataset.videos[index].path
        count = self.log.record(self.role, path, str(exc))
        if count > self.limit:
            share = count / len(self.dataset)
            raise VMZError(f"{count} of the {len(self.dataset)} {self.role} videos ({share:.1%}) cannot "
                           f"be read, more than --max-failures {self.limit / len(self.dataset):.1%}; "
                           f"they are listed in {self.log.path}")

    def load(self, index: int, epoch: int, seed: int) -> tuple[np.ndarray, int]:
        from vmz_jax.video.decode import VideoError

        try:
            return self.dataset.load(index, epoch, seed)
        except VideoError as exc:
            self._failed(index, exc)
        rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), int(index), 0xBAD])
        for candidate in rng.permutation(len(self.dataset)):
            if candidate == index:
                continue
            try:
                return self.dataset.load(int(candidate), epoch, seed)
            except VideoError as exc:
                self._failed(int(candidate), exc)
        raise VMZError(f"none of the {self.role} videos can be read (see {self.log.path})")


# ------------------------------------------------------------------------------------------------
# the command


def _blend_weights(text: str) -> tuple[float, float, float]:
    parts = text.split(",")
    try:
        weights = tuple(float(x) for x in parts)
    except ValueError:
        weights = ()
    if len(weights) != 3 or not all(w >= 0 and w < float("inf") for w in weights) or not sum(weights) > 0:
        raise argparse.ArgumentTypeError(f"expected three weights >= 0 (audio, visual, av) such as "
                                         f"0.07,0.485,0.445, got {text!r}")
    return weights  # type: ignore[return-value]


def _audio_visual(args: argparse.Namespace, arch: Any) -> tuple[str, tuple[float, float, float] | None,
                                                                    str | None]:
    """(the recipe's family, the blend weights, where they came from) of `arch`."""
    from vmz_jax.models import registry
    from vmz_jax.train.blend import BLEND_WEIGHTS, published_weights

    if arch.family != "audio_visual":
        if args.blend_weights is not None:
            raise UsageError(f"--blend-weights: {arch.name} is not an audio-visual model (Gradient-Blending "
                             "weighs the audio, visual and av heads of the av_* models)")
        return arch.family, None, None
    trunk = registry.get(arch.spec.name).family
    if args.blend_weights is not None:
        return trunk, args.blend_weights, "--blend-weights"
    found = published_weights(arch.name, None if args.from_scratch or args.checkpoint else args.pretraining)
    if found is None:
        rows = "; ".join(f"{a} {p} ({d}): {','.join(map(str, w))}" for (d, p, a), w in BLEND_WEIGHTS.items())
        raise UsageError(f"gradient_blending.md gives no weights for {arch.name} from "
                         f"{args.pretraining or 'these weights'}: pass --blend-weights A,V,AV "
                         f"(its rows: {rows})")
    return trunk, found[0], found[1]


def _frame_size(text: str) -> tuple[int, ...]:
    parts = text.split(",")
    if len(parts) > 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"expected MIN or MIN,MAX short sides such as 128,160, got {text!r}")
    sizes = tuple(int(p) for p in parts)
    if len(sizes) == 2 and sizes[0] > sizes[1]:
        raise argparse.ArgumentTypeError(f"MIN,MAX with MIN <= MAX, got {text!r}")
    return sizes


_share = number(0, 1, percent=True)
_fraction = number(0, 1, low_open=True)
_non_negative = number(0)


def _check_run_dir(run_dir: Path, resume: bool) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"{run_dir}: exists and is not a directory (--out)")
    ours = [name for name in RUN_FILES if (run_dir / name).exists()]
    if ours and not resume:
        raise UsageError(f"{run_dir}: holds a run already ({', '.join(ours)}); pass --resume to continue "
                         "it, or choose a new --out")
    if resume and "config.json" not in ours:
        raise UsageError(f"{run_dir}: no run to resume there (no config.json)")


def _claim(run_dir: Path, name: str, content: Any, what: str) -> None:
    """Write RUN_DIR/name, or check that the one there matches (a resumed run must be the same run)."""
    from vmz_jax.files import pin_json

    try:
        differences = pin_json(run_dir / name, content)
    except ValueError as exc:
        raise UsageError(one_line(exc)) from None
    if differences:
        raise UsageError(one_line(f"{run_dir}: holds a run with other {what} (differs in "
                                  f"{', '.join(differences)}); use a new --out, or the same arguments "
                                  "to resume"))


def _open_sets(args: argparse.Namespace) -> tuple[Any, Any]:
    from vmz_jax.video import datasets

    train = datasets.open_dataset(args.train, root=args.root, split=args.split, subset="train")
    val = None
    if args.val:
        val = datasets.open_dataset(args.val, root=args.root, split=args.split, subset="test")
    return datasets.train_val(train, val, val_fraction=args.val_fraction, seed=args.seed)


def _model(args: argparse.Namespace, arch: Any, num_classes: int, clip_len: int | None) -> Any:
    if args.from_scratch:
        import jax.numpy as jnp
        from flax import nnx

        from vmz_jax.models import build

        dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
        length = clip_len or arch.input.clip_length
        return build(arch, num_classes, rngs=nnx.Rngs(args.seed), dtype=dtype, clip_length=length)
    return load_model(args, arch, num_classes=num_classes, new_head=True, seed=args.seed)


def cmd_finetune(args: argparse.Namespace) -> int:
    from vmz_jax.runtime import reuse_host_memory
    from vmz_jax.train.recipes import recipe_for

    reuse_host_memory()  # before JAX starts: each step reuses the memory the last one freed

    arch = check_arch(args.arch)
    family, blend_weights, blend_source = _audio_visual(args, arch)
    recipe = recipe_for(family)
    run_dir = Path(args.out)
    if args.val and args.val_fraction:
        raise UsageError("give --val or --val-fraction, not both")
    index, count = process_share(args)
    if count > 1 and args.eval_protocol != "none":
        raise UsageError(f"--eval-protocol {args.eval_protocol} runs in one process; with {count} "
                         "processes run vmz-jax evaluate on the saved model afterwards")
    _check_run_dir(run_dir, args.resume)
    from vmz_jax.runtime import sync_processes

    sync_processes("vmz-jax finetune:checked", count)  # every process has looked before any writes
    train_videos, val_videos = _open_sets(args)
    classes = list(train_videos.classes)

    # The clip length: given, else the recipe's, else the one the weights were trained with.
    clip_len = args.clip_len or recipe.clip_len
    model = _model(args, arch, len(classes), clip_len)
    clip_len = clip_len or int(model.clip_length)
    batch_size = args.batch_size or recipe.batch_size
    freeze = tuple(s for s in (args.freeze or "").split(",") if s)
    config = recipe.train_config(
        epochs=args.epochs, batch_size=batch_size, accumulate=args.accumulate, lr=args.lr,
        head_lr_mult=args.head_lr_mult, optimizer=args.optimizer, schedule=args.schedule,
        weight_decay=args.weight_decay, freeze=freeze or None, bn=args.bn, dropout=args.dropout,
        dtype=args.dtype, seed=args.seed, clip_grad_norm=args.clip_grad_norm or None,
        label_smoothing=args.label_smoothing, checkpoint_every=args.checkpoint_every, remat=args.remat)
    if args.clip_grad_norm == 0:
        config = config.replace(clip_grad_norm=None)
    if blend_weights is not None:
        config = config.replace(blend_weights=blend_weights)
    if args.warmup is not None:
        config = config.replace(warmup_epochs=args.warmup, warmup_steps=0)
    if args.schedule == "cosine" and args.schedule != recipe.schedule:
        config = config.replace(step_epochs=())

    data = {
        "arch": arch.name, "recipe": recipe.name,
        "weights": ({"from_scratch": True} if args.from_scratch else
                    {"pretraining": args.pretraining,
                     "checkpoint": os.path.abspath(args.checkpoint) if args.checkpoint else None}),
        "train": {"spec": os.path.abspath(args.train), "videos": len(train_videos)},
        "val": ({"spec": os.path.abspath(args.val) if args.val else None, "fraction": args.val_fraction,
                 "videos": len(val_videos)} if val_videos is not None else None),
        "root": os.path.abspath(args.root) if args.root else None, "split": args.split,
        "clips": {"clip_len": clip_len, "sampling_rate": args.sampling_rate or recipe.sampling_rate,
                  "frame_size": list(args.frame_size or recipe.frame_size),
                  "jitter": "range" if args.frame_size else recipe.jitter,
                  "crop_size": args.crop_size or recipe.crop_size, "flip": args.flip and recipe.flip,
                  # (absent: exact, as in runs made before the option existed)
                  **({"resize": args.resize} if args.resize != "exact" else {})},
        "max_failures": args.max_failures,
        # (absent for the visual models, as in runs made before audio)
        **({"audio": {"log_mels": "aligned to each clip", "blend_weights_from": blend_source}}
           if blend_weights is not None else {}),
    }
    clips = data["clips"]
    if clips["crop_size"] > min(clips["frame_size"]):
        raise UsageError(f"--crop-size {clips['crop_size']} does not fit the short side "
                         f"{min(clips['frame_size'])} (--frame-size)")
    run_dir.mkdir(parents=True, exist_ok=True)
    _claim(run_dir, FINETUNE_FILE, data, "data or weights")
    _claim(run_dir, LABELS_FILE, classes, "classes")

    from vmz_jax.video.datasets import VideoClipDataset

    log = FailureLog(failure_log_path(run_dir, index, count),
                     [failure_log_path(run_dir, i, count) for i in range(count) if i != index])

    def clip_set(videos: Any, train: bool, role: str) -> SkipUnreadable:
        dataset = VideoClipDataset(
            videos, clip_len=clip_len, sampling_rate=clips["sampling_rate"],
            frame_size=tuple(clips["frame_size"]), crop_size=clips["crop_size"], train=train,
            jitter=clips["jitter"], flip=clips["flip"], resize=args.resize, threads=args.ffmpeg_threads,
            audio=arch.family == "audio_visual")
        return SkipUnreadable(dataset, log, role, args.max_failures)

    train_set = clip_set(train_videos, True, "train")
    val_set = clip_set(val_videos, False, "val") if val_videos is not None else None

    from vmz_jax.runtime import enable_compilation_cache
    from vmz_jax.train.fit import fit

    enable_compilation_cache()
    stopper = _MaxSteps(args.max_steps)
    result = fit(model, train_set, val_set, config, run_dir, progress=not args.quiet,
                 resume=True if args.resume else False, workers=args.workers, on_step=stopper)
    if index > 0:  # process 0 reports for the run
        return 130 if result.interrupted and not stopper.fired else 0
    if result.interrupted:
        if stopper.fired:
            print(f"vmz-jax finetune: stopped at step {result.step} (--max-steps); checkpoint in "
                  f"{run_dir / 'checkpoints'}; continue with the same command and --resume")
            return 0
        print(f"vmz-jax finetune: interrupted at step {result.step}; checkpoint in "
              f"{run_dir / 'checkpoints'}; continue with the same command and --resume", file=sys.stderr)
        return 130
    failed = len(log.entries)
    failures = f"; {failed} unreadable video(s) in {run_dir / FAILURES_FILE}" if failed else ""
    model_dir = result.model_dir
    protocol = eval_protocol(arch.name, clips)
    evaluate = (f"vmz-jax evaluate {args.val} --arch {arch.name} --checkpoint {model_dir}"
                + (f" --root {args.root}" if args.root else "")
                + (f" --split {args.split}" if args.split != 1 else "")
                if args.val else f"vmz-jax evaluate VAL_LIST --arch {arch.name} --checkpoint {model_dir}")
    evaluate += protocol_flags(protocol) + f" --out {run_dir / EVAL_DIR}"
    if result.best_val_accuracy is not None:
        head = (f"best validation accuracy {result.best_val_accuracy:.4f} (step {result.best_step}, "
                f"{len(val_videos)} videos, one centre clip each)")
    else:
        head = "no validation data (the final weights are kept)"
    if args.eval_protocol == "vmz" and val_videos is not None:
        from vmz_jax.evaluation import evaluate as run_evaluation

        evaluation = run_evaluation(model, val_videos, run_dir / EVAL_DIR, protocol, labels=classes,
                                    batch_size=batch_size, workers=args.workers or 2,
                                    ffmpeg_threads=args.ffmpeg_threads, progress=not args.quiet,
                                    stream=sys.stderr)
        m = evaluation.metrics
        print(f"vmz-jax finetune: {head}; {protocol.clips}x{protocol.crops}-view video accuracy "
              f"{m['video@1']:.4f} (clip {m['clip@1']:.4f}, mean class {m['mean_class@1']:.4f}, "
              f"{m['videos']} videos; {run_dir / EVAL_DIR / 'report.json'}); model: {model_dir}{failures}")
        return 0
    print(f"vmz-jax finetune: {head}; model: {model_dir}{failures}; next: {evaluate}")
    return 0


def eval_protocol(arch: str, clips: dict[str, Any]) -> Any:
    """VMZ's test protocol (10 clips; 1 centre crop, or 3 crops and the convolutional head for
    224-pixel training) at this run's clip geometry: its clip length and sampling rate, and for the
    pooled head its validation short side and crop."""
    from vmz_jax.evaluation import vmz_protocol

    protocol = vmz_protocol(arch, clip_len=clips["clip_len"], trained_crop=clips["crop_size"])
    changes: dict[str, Any] = {"sampling_rate": clips["sampling_rate"],
                               "resize": clips.get("resize", "exact")}
    if protocol.head == "pool":
        changes.update(frame_size=min(clips["frame_size"]), crop_size=clips["crop_size"])
    return protocol.replace(**changes, name="vmz")


def protocol_flags(protocol: Any) -> str:
    """The `vmz-jax evaluate` flags that select `protocol` explicitly."""
    return (f" --clips {protocol.clips} --crops {protocol.crops} --clip-len {protocol.clip_len}"
            f" --sampling-rate {protocol.sampling_rate} --frame-size {protocol.frame_size}"
            f" --crop-size {protocol.crop_size} --head {protocol.head}"
            + (f" --conv-window {protocol.conv_window}" if protocol.head != "pool" else "")
            + (f" --head {protocol.model_head}" if protocol.model_head is not None else ""))


class _MaxSteps:
    """`on_step` callback for --max-steps: after that step, stop as Ctrl-C does (a checkpoint to
    resume from), by sending this process the SIGINT that `fit` handles."""

    def __init__(self, max_steps: int | None):
        self.max_steps = max_steps
        self.fired = False

    def __call__(self, record: dict[str, Any]) -> None:
        if self.max_steps and not self.fired and "loss" in record and record["step"] >= self.max_steps:
            self.fired = True
            signal.raise_signal(signal.SIGINT)


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "finetune", help="fine-tune a model on labelled videos (checkpoints, resume, curves)",
        description="Fine-tune ARCH on the labelled videos TRAIN names: a folder per class, a list file "
        "(path,label), a UCF101 annotation folder (classInd.txt + trainlist0N.txt), HMDB51 split files or "
        "a Kinetics CSV. Defaults follow the published recipe of the family: VMZ's Caffe2 fine-tuning "
        "for R(2+1)D/R3D/R2D/MC/C3D (Nesterov SGD, step schedule, 112 crops of a 128-160 short side), "
        "mmaction2's for ir/ip-CSN (frozen BatchNorm, warm-up, gradient clip 40, dropout 0.5, 224 "
        "crops); see vmz_jax/train/recipes.py for each value's source.")
    p.add_argument("train", help="the training videos (see above)")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="the run directory (checkpoints, "
                   "config.json, labels.json, metrics.jsonl, curves.png, failures.jsonl, model/)")
    g = p.add_argument_group("data")
    g.add_argument("--root", help="the folder of the videos of split/list files (UCF101, HMDB51, "
                   "Kinetics)")
    g.add_argument("--split", type=int, default=1, choices=[1, 2, 3], help="official split (UCF101, "
                   "HMDB51; default 1)")
    g.add_argument("--val", metavar="LIST", help="validation videos: a list, or the same UCF101/HMDB51 "
                   "annotations (their test part is used)")
    g.add_argument("--val-fraction", type=_fraction, help="instead, hold out this fraction of each "
                   "training class")
    g.add_argument("--max-failures", type=_share, default=0.05, metavar="SHARE", help="stop if more than "
                   "this share of a set cannot be read (default 5%%); fewer are logged and replaced")
    g = p.add_argument_group("model")
    g.add_argument("--arch", required=True, help="architecture, e.g. r2plus1d_34 (see `vmz-jax list`)")
    w = g.add_mutually_exclusive_group(required=True)
    w.add_argument("--pretraining", help="released weights by name (downloaded and cached)")
    w.add_argument("--checkpoint", metavar="PATH", help="local weights: Orbax directory, .pth or .pkl")
    w.add_argument("--from-scratch", action="store_true", help="random initialisation")
    g.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="compute dtype (weights and BatchNorm stay float32)")
    g.add_argument("--remat", choices=["none", "blocks", "full"], default="none",
                   help="recompute activations in the backward pass instead of keeping them, per residual "
                        "block: blocks keeps the outputs of the convolutions that do not widen, full only "
                        "each block's input; same results, less memory, more time (docs/benchmarks.md)")
    g = p.add_argument_group("optimization (defaults: the family's recipe)")
    g.add_argument("--epochs", type=positive, help="passes over the training videos")
    g.add_argument("--batch-size", type=positive, help="clips per step (the recipe's lr scales with it "
                   "unless --lr is given)")
    g.add_argument("--accumulate", type=positive, default=1, help="average the gradients of this many "
                   "batches per update")
    g.add_argument("--lr", type=_non_negative, help="peak learning rate of the backbone")
    g.add_argument("--head-lr-mult", type=_non_negative, help="the new head's lr multiplier")
    g.add_argument("--optimizer", choices=["sgd", "adamw"])
    g.add_argument("--schedule", choices=["cosine", "step"])
    g.add_argument("--warmup", type=int, metavar="EPOCHS", help="linear warm-up epochs")
    g.add_argument("--weight-decay", type=_non_negative)
    g.add_argument("--freeze", metavar="STAGES", help="comma-separated stages to keep fixed: stem, "
                   "layer1..layer4, or backbone (all but the head)")
    g.add_argument("--bn", choices=["train", "frozen"], help="BatchNorm: batch statistics, or frozen")
    g.add_argument("--dropout", type=_non_negative, help="dropout rate before the head")
    g.add_argument("--clip-grad-norm", type=_non_negative, help="clip the global gradient norm to this "
                   "(0 = off; default: none, 40 for CSN)")
    g.add_argument("--label-smoothing", type=_non_negative)
    g.add_argument("--blend-weights", type=_blend_weights, metavar="A,V,AV", help="audio-visual models: "
                   "the Gradient-Blending loss weights of the audio, visual and av heads (default: "
                   "gradient_blending.md's row for the arch and pre-training, e.g. 0.07,0.485,0.445 for "
                   "av_ip_csn_152 from IG-65M)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--checkpoint-every", type=positive, help="steps between checkpoints (default 500)")
    g = p.add_argument_group("clips (defaults: the family's recipe)")
    g.add_argument("--clip-len", type=positive, help="frames per clip (default: the weights' clip length; "
                   "32 for CSN)")
    g.add_argument("--sampling-rate", type=positive, help="take every n-th frame (default 1; 2 for CSN)")
    g.add_argument("--frame-size", type=_frame_size, metavar="MIN[,MAX]", help="short side, jittered in "
                   "[MIN, MAX] in training (default 128,160; 256,320 for CSN)")
    g.add_argument("--crop-size", type=positive, help="square crop side (default 112; 224 for CSN)")
    g.add_argument("--no-flip", dest="flip", action="store_false", help="no random mirror (for classes "
                   "told apart by left/right direction)")
    g = p.add_argument_group("running")
    g.add_argument("--workers", type=positive, help="clips decoded in parallel (default: cores, at most 8)")
    g.add_argument("--ffmpeg-threads", type=positive, default=1, help="decoder threads per clip (default 1)")
    g.add_argument("--resize", choices=["exact", "ffmpeg"], default="exact", help="exact: NumPy, "
                   "PyTorch's bilinear grid, as extract and evaluate; ffmpeg: scaled by the decoder "
                   "(faster for large videos, a different filter)")
    g.add_argument("--resume", action="store_true", help="continue the run in RUN_DIR from its newest "
                   "checkpoint (same arguments)")
    g.add_argument("--max-steps", type=positive, help="stop after this many steps with a checkpoint "
                   "(a smoke test; --resume continues)")
    g.add_argument("--eval-protocol", choices=["none", "vmz"], default="none", help="vmz: at the end, "
                   "evaluate the validation videos with VMZ's test protocol at this run's clip size (10 "
                   "clips; 3 crops and the convolutional head for 224 crops) into RUN_DIR/evaluation, "
                   "as `vmz-jax evaluate` does (default: none; the last line prints that command)")
    g.add_argument("--quiet", action="store_true", help="no progress output")
    g = p.add_argument_group("several hosts")
    g.add_argument("--distributed", action="store_true", help="call jax.distributed.initialize()")
    g.add_argument("--coordinator", metavar="HOST:PORT", help="coordinator address")
    g.add_argument("--num-processes", type=positive)
    g.add_argument("--process-id", type=int)
    p.set_defaults(run=cmd_finetune)
