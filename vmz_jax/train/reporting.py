"""What a training run reports: metrics.jsonl (`read_metrics`, `truncate_metrics`), curves.png
(`draw_curves`) and the progress bar (`progress_bar`: tqdm on a terminal, epoch lines in a log)."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vmz_jax.files import atomic_file

__all__ = ["METRICS_FILE", "draw_curves", "progress_bar", "read_metrics", "truncate_metrics"]

StrPath = str | os.PathLike[str]

METRICS_FILE = "metrics.jsonl"


def read_metrics(run_dir: StrPath) -> list[dict[str, Any]]:
    """The records of `run_dir/metrics.jsonl` (a torn last line, from a killed run, is skipped)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                records.append(record)
    return records


def truncate_metrics(path: Path, step: int, rewrite: bool = True) -> list[dict[str, Any]]:
    """The records up to `step` (those the restored checkpoint has seen); with `rewrite`, the file
    is cut to them, atomically."""
    records = [r for r in read_metrics(path.parent) if int(r.get("step", 0)) <= step]
    if rewrite and path.exists():
        with atomic_file(path, "w") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")
    return records


def draw_curves(history: Sequence[dict[str, Any]], path: Path) -> None:
    """Loss and accuracy against the step, training (per step, with a running mean) and validation."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    train = [r for r in history if "loss" in r]
    val = [r for r in history if "val_loss" in r]
    fig = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(fig)
    for ax, key, title in ((fig.add_subplot(1, 2, 1), "loss", "loss"),
                           (fig.add_subplot(1, 2, 2), "accuracy", "accuracy")):
        if train:
            steps = np.array([r["step"] for r in train])
            values = np.array([r[key] for r in train], np.float64)
            ax.plot(steps, values, color="tab:blue", alpha=0.3, linewidth=0.8)
            window = max(1, len(values) // 50)
            smooth = np.convolve(values, np.ones(window) / window, mode="valid")
            ax.plot(steps[window - 1:], smooth, color="tab:blue", label="train")
        if val:
            ax.plot([r["step"] for r in val], [r[f"val_{key}"] for r in val], "o-", color="tab:orange",
                    label="validation")
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if train or val:
            ax.legend()
    fig.tight_layout()
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png")


class _NoBar:
    def update(self, loss: float, clips_per_s: float) -> None:
        pass

    def write(self, text: str) -> None:
        pass


class _LineBar(_NoBar):
    """Not a terminal (a log file): one line per epoch-end message, no redrawn bar."""

    def write(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)


class _TqdmBar:
    def __init__(self, total: int, initial: int):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, leave=True)

    def update(self, loss: float, clips_per_s: float) -> None:
        self.bar.set_postfix_str(f"loss {loss:.4f}, {clips_per_s:.1f} clips/s", refresh=False)
        self.bar.update(1)

    def write(self, text: str) -> None:
        self.bar.write(text, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()


@contextlib.contextmanager
def progress_bar(enabled: bool, total: int, initial: int) -> Iterator[Any]:
    if not enabled:
        yield _NoBar()
        return
    if not sys.stderr.isatty():
        yield _LineBar()
        return
    bar = _TqdmBar(total, initial)
    try:
        yield bar
    finally:
        bar.close()
