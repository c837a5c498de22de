"""Run an exported artifact: needs jax and numpy (StableHLO) or onnxruntime (ONNX), no model code.

Nothing here imports the rest of vmz_jax's models or weights: an artifact is self-contained. The
StableHLO route is what a user without this package writes in five lines (docs/export.md)::

    import json, numpy as np, jax
    exported = jax.export.deserialize(open("model.stablehlo", "rb").read())
    meta = json.load(open("model.stablehlo.json"))
    clips = (rgb_0_255 - np.array(meta["mean"])) / np.array(meta["std"])     # (N, T, H, W, 3)
    logits = exported.call(clips.astype(np.float32))
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from vmz_jax.errors import VMZError

__all__ = ["ExportedModel", "load", "metadata_path", "weights_path"]


def metadata_path(path: str | os.PathLike[str]) -> str:
    """The metadata file written beside an artifact: `<artifact>.json`."""
    return os.fspath(path) + ".json"


def weights_path(path: str | os.PathLike[str]) -> str:
    """The weights of an artifact exported with `embed_weights=False`: `<artifact>.weights.npz`."""
    return os.fspath(path) + ".weights.npz"


class ExportedModel:
    """A loaded artifact: `model(clips)` (or `model.call(clips)`) on float32 NTHWC normalized clips.

    `metadata` is the artifact's JSON record (arch, output, input layout and sizes, normalization,
    labels); `exported` the `jax.export.Exported` (StableHLO) or the onnxruntime session (ONNX)."""

    def __init__(
        self,
        path: str,
        kind: str,
        exported: Any,
        metadata: dict[str, Any],
        weights: list[np.ndarray] | None = None,
    ):
        self.path = path
        self.kind = kind
        self.exported = exported
        self.metadata = metadata
        self.weights = weights
        self._call: Any = None

    @property
    def labels(self) -> list[str] | None:
        return self.metadata.get("labels")

    def call(self, clips: Any) -> np.ndarray:
        """The artifact's output for `clips` (N, T, H, W, 3), as a numpy array."""
        if self.kind == "onnx":
            name = self.exported.get_inputs()[0].name
            return self.exported.run(None, {name: np.asarray(clips, np.float32)})[0]
        if self._call is None:
            import jax

            self._call = jax.jit(self.exported.call)  # compiled once per input shape
        args = (self.weights, clips) if self.weights is not None else (clips,)
        return np.asarray(self._call(*args))

    __call__ = call

    def __repr__(self) -> str:
        meta = self.metadata
        return (
            f"ExportedModel({self.path!r}, {self.kind}, arch={meta.get('arch')}, "
            f"output={meta.get('output')}, input={meta.get('input_shape')})"
        )


def _read_metadata(path: str) -> dict[str, Any]:
    meta_file = metadata_path(path)
    if not os.path.exists(meta_file):
        return {}
    try:
        with open(meta_file, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise VMZError(f"{meta_file}: unreadable metadata ({e})") from None
    if not isinstance(meta, dict):
        raise VMZError(f"{meta_file}: the metadata is not a JSON object")
    return meta


def load(path: str | os.PathLike[str]) -> ExportedModel:
    """Load an artifact written by `vmz_jax.export` (`.stablehlo` or `.onnx`) with its metadata
    (`<path>.json`, optional) and, for StableHLO exported with weights as arguments, its weights
    (`<path>.weights.npz`). VMZError (one line, naming the file) for anything unreadable."""
    name = os.fspath(path)
    if not os.path.isfile(name):
        raise VMZError(f"{name}: no such file")
    meta = _read_metadata(name)
    with open(name, "rb") as f:
        head = f.read(8)
    if name.endswith(".onnx") or meta.get("format") == "onnx":
        try:
            import onnxruntime
        except ImportError:
            raise VMZError(f"{name}: running ONNX needs onnxruntime (pip install 'vmz-jax[onnx]')") from None
        try:
            session = onnxruntime.InferenceSession(name, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types
            raise VMZError(f"{name}: onnxruntime cannot load it ({str(e).splitlines()[0]})") from None
        return ExportedModel(name, "onnx", session, meta)
    import jax

    with open(name, "rb") as f:
        data = f.read()
    try:
        exported = jax.export.deserialize(bytearray(data))
    except Exception as e:  # flatbuffers / version errors have no common type
        raise VMZError(
            f"{name}: not a serialized jax.export artifact ({type(e).__name__}; starts with {head!r})"
        ) from None
    weights = None
    if meta.get("weights") == "arguments":
        wfile = weights_path(name)
        try:
            with np.load(wfile, allow_pickle=False) as z:
                weights = [z[f"w{i:04d}"] for i in range(len(z.files))]
        except (OSError, KeyError, ValueError) as e:
            raise VMZError(
                f"{wfile}: cannot read the weights this artifact takes as arguments ({e})"
            ) from None
    return ExportedModel(name, "stablehlo", exported, meta, weights)
