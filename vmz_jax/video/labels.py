"""Class names for classifier heads: Kinetics-400 ships with the package; others come from a file."""

from __future__ import annotations

import json
import os
from importlib import resources

from vmz_jax.errors import VMZError


def kinetics400() -> list[str]:
    """The 400 Kinetics class names in the order of the 400-way heads (alphabetical)."""
    text = resources.files("vmz_jax").joinpath("data/kinetics400_classes.json").read_text("utf-8")
    return json.loads(text)


def read(path: str | os.PathLike[str], num_classes: int) -> list[str]:
    """A JSON list of `num_classes` strings (class index -> name)."""
    name = os.fsdecode(path)
    try:
        with open(name, encoding="utf-8") as f:
            labels = json.load(f)
    except OSError as exc:
        raise VMZError(f"{name}: cannot read the labels ({exc.strerror or exc})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise VMZError(f"{name}: not a JSON file ({exc})") from None
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        raise VMZError(f"{name}: expected a JSON list of label strings")
    if len(labels) != num_classes:
        raise VMZError(f"{name}: {len(labels)} labels, but the model has {num_classes} classes")
    return labels


def for_head(num_classes: int, path: str | os.PathLike[str] | None = None) -> tuple[list[str], str]:
    """Labels for a head of `num_classes` and where they came from: `path` if given, Kinetics-400
    for 400 classes, otherwise the class indices as strings."""
    if path is not None:
        return read(path, num_classes), os.fsdecode(path)
    if num_classes == 400:
        return kinetics400(), "Kinetics-400"
    return [str(i) for i in range(num_classes)], "class indices (pass --labels FILE.json for names)"
