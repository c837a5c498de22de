"""Accuracy from video scores: top-k, mean class accuracy, per-class rows, confusion counts.

Everything here is a pure function of numpy arrays, so a saved ``scores.npy`` (with the labels of
``predictions.jsonl``) recomputes the report exactly. Ranking ties are broken by the lower class
index (a stable sort of the negated scores), the same rule everywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["Metrics", "compute", "most_confused", "ranking"]


def ranking(scores: np.ndarray, k: int) -> np.ndarray:
    """The indices of the `k` highest scores of each row, best first, ties to the lower index."""
    k = min(k, scores.shape[-1])
    return np.argsort(-np.asarray(scores), axis=-1, kind="stable")[..., :k]


@dataclass
class Metrics:
    """What a report states. Accuracies are fractions in [0, 1]; `clip_top1` counts every view
    (clip x crop) as ``test_net.py``'s clip accuracy does; `mean_class_top1` averages the top-1
    accuracy of the classes that have at least one evaluated video."""

    videos: int
    views: int
    clip_top1: float
    video_top1: float
    video_top5: float
    mean_class_top1: float
    top5_k: int
    per_class: list[dict[str, object]]
    confusion: np.ndarray  # (classes, classes) counts, rows the true class, columns the prediction

    def as_dict(self) -> dict[str, object]:
        return {"videos": self.videos, "views": self.views, "clip@1": self.clip_top1,
                "video@1": self.video_top1, f"video@{self.top5_k}": self.video_top5,
                "mean_class@1": self.mean_class_top1}


def compute(scores: np.ndarray, labels: np.ndarray, clip_correct: np.ndarray, views: np.ndarray,
            classes: list[str]) -> Metrics:
    """Metrics of videos with `scores` (videos, classes) and true `labels` (indices into
    `classes`); `clip_correct`/`views` per video: views whose own top-1 was right, views scored."""
    scores = np.asarray(scores)
    labels = np.asarray(labels, np.int64)
    n, num_classes = len(labels), len(classes)
    k5 = min(5, num_classes)
    top = ranking(scores, k5) if n else np.zeros((0, k5), np.int64)
    top1 = top[:, 0] if n else np.zeros(0, np.int64)
    hit1 = top1 == labels
    hit5 = (top == labels[:, None]).any(axis=1) if n else np.zeros(0, bool)
    confusion = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(confusion, (labels, top1), 1)
    per_class: list[dict[str, object]] = []
    accuracies = []
    for c in np.unique(labels):
        members = labels == c
        count = int(members.sum())
        errors = confusion[c].copy()
        errors[c] = 0
        confused = int(np.argmax(errors)) if errors.any() else None
        acc1 = int(hit1[members].sum()) / count
        accuracies.append(acc1)
        per_class.append({"class": classes[c], "index": int(c), "videos": count,
                          "top1_correct": int(hit1[members].sum()), "top1": acc1,
                          f"top{k5}": int(hit5[members].sum()) / count,
                          "most_confused_with": classes[confused] if confused is not None else "",
                          "confused_count": int(errors[confused]) if confused is not None else 0})
    total_views = int(np.sum(views))
    return Metrics(
        videos=n, views=total_views,
        clip_top1=int(np.sum(clip_correct)) / total_views if total_views else float("nan"),
        video_top1=int(hit1.sum()) / n if n else float("nan"),
        video_top5=int(hit5.sum()) / n if n else float("nan"),
        mean_class_top1=math.fsum(accuracies) / len(accuracies) if accuracies else float("nan"),
        top5_k=k5, per_class=per_class, confusion=confusion)


def most_confused(confusion: np.ndarray, classes: list[str], n: int = 20) -> list[tuple[str, str, int]]:
    """The `n` largest off-diagonal counts as (true class, predicted class, count), largest first
    (ties: by true class, then predicted class index)."""
    off = np.array(confusion, copy=True)
    np.fill_diagonal(off, 0)
    flat = np.argsort(-off, axis=None, kind="stable")[:n]
    pairs = []
    for index in flat:
        i, j = divmod(int(index), off.shape[1])
        if off[i, j] <= 0:
            break
        pairs.append((classes[i], classes[j], int(off[i, j])))
    return pairs
