"""The files of an evaluation directory, written atomically from the finished videos.

``DIR/``:

* ``report.json``: the metrics (clip@1, video@1, video@5, mean class@1), the number of videos, the
  failures (listed, excluded from every metric), the exact protocol (for the models that take
  log-mels: the head scored, ``model_head``, and the log-mel alignment), the weights' provenance and
  digest, the dataset (source, videos, digest); for those models, ``audio``: how many videos had
  their audio, and which had a short or no audio track (scored all the same: VMZ's zeros, or the
  track stretched over the video);
* ``predictions.jsonl``: one line per evaluated video, in dataset order: index, path, true label,
  top-5 (class, score), whether top-1 was right, views scored;
* ``scores.npy``: float32 (videos, classes), the averaged video scores (softmaxes or logits, as the
  protocol says), row i = line i of predictions.jsonl, column j = ``classes.json``[j];
* ``classes.json``: the model's class names (score columns);
* ``per_class.csv``: per true class: videos, top-1 correct, top-1 and top-5 accuracy, the class it is
  most often mistaken for;
* ``confusion.png``: the row-normalised confusion matrix (classes sorted by name) and the most
  confused pairs;
* ``run.json`` and ``progress.jsonl``: the pinned run record and the finished videos (for resuming).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vmz_jax.evaluation.metrics import Metrics, most_confused, ranking
from vmz_jax.evaluation.store import Entry
from vmz_jax.files import atomic_write

__all__ = ["audio_summary", "summary_table", "write_all"]


def _number(x: float) -> float | None:
    return None if isinstance(x, float) and math.isnan(x) else x


def write_all(out: Path, entries: Sequence[Entry], classes: Sequence[str], metrics: Metrics,
              header: dict[str, Any], failures: Sequence[Entry]) -> None:
    """Write every file but run.json/progress.jsonl. `entries` are the evaluated videos in dataset
    order, `header` the run record (protocol, weights, dataset)."""
    classes = list(classes)
    scores = (np.stack([e.scores for e in entries]).astype(np.float32) if entries  # type: ignore[misc]
              else np.zeros((0, len(classes)), np.float32))
    atomic_write(out / "scores.npy", lambda f: np.save(f, scores, allow_pickle=False))
    atomic_write(out / "classes.json", json.dumps(classes, indent=0) + "\n", "w")
    top = ranking(scores, metrics.top5_k) if entries else np.zeros((0, metrics.top5_k), np.int64)
    lines = []
    for e, row, ranked in zip(entries, scores, top, strict=True):
        lines.append(json.dumps({
            "index": e.index, "path": e.path, "label": classes[e.label], "label_index": e.label,
            "correct": bool(ranked[0] == e.label), "views": e.views, "clip_correct": e.clip_correct,
            f"top{metrics.top5_k}": [[classes[j], float(row[j])] for j in ranked],
            **({"audio": e.audio} if e.audio is not None else {}),
            **({"warnings": e.warnings} if e.warnings else {})}))
    atomic_write(out / "predictions.jsonl", "".join(line + "\n" for line in lines), "w")
    text = io.StringIO()
    fields = ["class", "index", "videos", "top1_correct", "top1", f"top{metrics.top5_k}",
              "most_confused_with", "confused_count"]
    writer = csv.DictWriter(text, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in sorted(metrics.per_class, key=lambda r: str(r["class"])):
        writer.writerow(row)
    atomic_write(out / "per_class.csv", text.getvalue(), "w")
    report = {
        "metrics": {k: _number(v) for k, v in metrics.as_dict().items()},  # type: ignore[arg-type]
        "videos": metrics.videos,
        "failed": len(failures),
        "failures": [{"index": f.index, "path": f.path, "error": f.error} for f in failures],
        **header,
        "files": {"scores.npy": "float32 (videos, classes): row i is line i of predictions.jsonl "
                                "(the evaluated videos in dataset order, failures left out), column j "
                                "is classes.json[j]"},
        "most_confused": [list(p) for p in most_confused(metrics.confusion, classes, 20)],
        **audio_summary(entries),
    }
    atomic_write(out / "report.json", json.dumps(report, indent=1) + "\n", "w")
    plot_confusion(out / "confusion.png", metrics, classes)


def audio_summary(entries: Sequence[Entry]) -> dict[str, Any]:
    """{"audio": {"present": n, "short": [paths], "missing": [paths]}} for evaluations with audio,
    else {}."""
    if all(e.audio is None for e in entries):
        return {}
    return {"audio": {"present": sum(e.audio == "present" for e in entries),
                      "short": [e.path for e in entries if e.audio == "short"],
                      "missing": [e.path for e in entries if e.audio == "missing"]}}


def plot_confusion(path: Path, metrics: Metrics, classes: Sequence[str], pairs: int = 25) -> None:
    """The row-normalised confusion matrix over the classes that occur (as truth or prediction),
    sorted by name, with the `pairs` most confused pairs listed beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    confusion = metrics.confusion
    used = sorted({i for i in range(len(classes)) if confusion[i].any() or confusion[:, i].any()},
                  key=lambda i: classes[i])
    n = max(len(used), 1)
    matrix = confusion[np.ix_(used, used)].astype(np.float64) if used else np.zeros((1, 1))
    rows = matrix.sum(axis=1, keepdims=True)
    matrix = np.divide(matrix, rows, out=np.zeros_like(matrix), where=rows > 0)
    side = min(max(6.0, n * 0.035 + 4), 24.0)
    fig, (ax, text_ax) = plt.subplots(1, 2, figsize=(side + 7, side),
                                      gridspec_kw={"width_ratios": [side, 7]})
    image = ax.imshow(matrix, cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02, label="fraction of the true class")
    names = [classes[i] for i in used]
    step = max(1, math.ceil(n / 80))  # at most ~80 labelled ticks per axis, in a readable size
    font = 8 if n <= 30 else 5
    ticks = list(range(0, n, step))
    ax.set_xticks(ticks, [names[i] for i in ticks] if used else [], rotation=90, fontsize=font)
    ax.set_yticks(ticks, [names[i] for i in ticks] if used else [], fontsize=font)
    ax.set_xlabel("predicted class (top-1)")
    ax.set_ylabel("true class")
    ax.set_title(f"video@1 {_percent(metrics.video_top1)}, {metrics.videos} videos, {n} classes"
                 + (f" (every {step}th labelled)" if step > 1 else ""))
    text_ax.axis("off")
    lines = [f"{count:>4}  {true} -> {pred}"
             for true, pred, count in most_confused(confusion, list(classes), pairs)]
    text_ax.text(0, 1, "most confused (true -> predicted)\n\n" + ("\n".join(lines) or "none"),
                 va="top", ha="left", family="monospace", fontsize=8, transform=text_ax.transAxes)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write(path, buffer.getvalue())


def _percent(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{100 * x:.2f}%"


def summary_table(metrics: Metrics, header: dict[str, Any], failed: int, out: str | os.PathLike[str] | None,
                  audio: dict[str, Any] | None = None) -> str:
    """The text summary: what was evaluated, how, and the four accuracies (and, with `audio`, an
    `audio_summary`, how many videos had their sound)."""
    weights = header.get("weights", {})
    origin = weights.get("pretraining") or weights.get("source") or "in-memory weights"
    rows = [("model", f"{weights.get('arch')} ({origin})"),
            ("data", f"{header.get('dataset', {}).get('source')}"),
            ("protocol", header.get("protocol_text", "")),
            ("videos", f"{metrics.videos} evaluated" + (f", {failed} failed (excluded)" if failed else "")),
            ("views", str(metrics.views)),
            *([("audio", f"{audio['present']} with audio, {len(audio['short'])} short, "
                         f"{len(audio['missing'])} without (all-zero log-mels)")] if audio else []),
            ("clip@1", _percent(metrics.clip_top1)),
            ("video@1", _percent(metrics.video_top1)),
            (f"video@{metrics.top5_k}", _percent(metrics.video_top5)),
            ("mean class@1", _percent(metrics.mean_class_top1))]
    if out is not None:
        rows.append(("reports", os.fspath(out)))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
