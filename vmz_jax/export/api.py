"""`vmz_jax.export(...)`: weights or a whole model as a file that runs without this package.

Formats:

* `pth`, `npz`, `safetensors` (VMZ PyTorch names), `pkl` (Caffe2 blob names): the weights only;
* `stablehlo`: the forward as a serialized `jax.export` module (symbolic batch, CPU and CUDA
  lowerings, weights embedded or taken as arguments), run with `jax.export.deserialize(...).call`;
* `onnx`: the forward as an ONNX graph (standard Conv/Relu/Add/MaxPool/ReduceMean/Gemm, BatchNorm
  folded, dynamic batch), run with onnxruntime.

Both model formats write `<out>.json` beside the artifact: input layout and sizes, normalization,
clip sampling, labels, output kind.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from vmz_jax.errors import VMZError, one_line
from vmz_jax.export.loader import metadata_path, weights_path
from vmz_jax.files import atomic_file, atomic_write
from vmz_jax.models import registry
from vmz_jax.models.registry import ModelEntry
from vmz_jax.version import __version__

__all__ = ["DTYPES", "FORMATS", "MODEL_FORMATS", "OUTPUTS", "SUFFIXES", "ExportResult", "export", "format_of"]

WEIGHT_FORMATS = ("pth", "npz", "pkl", "safetensors")
MODEL_FORMATS = ("stablehlo", "onnx")
FORMATS = WEIGHT_FORMATS + MODEL_FORMATS
SUFFIXES = {
    ".pth": "pth",
    ".pt": "pth",
    ".npz": "npz",
    ".pkl": "pkl",
    ".safetensors": "safetensors",
    ".stablehlo": "stablehlo",
    ".onnx": "onnx",
}
OUTPUTS = ("logits", "features", "probabilities")
DTYPES = ("float32", "bfloat16")
DYNAMIC = "dynamic"
#: The smallest frame size a symbolic H or W stands for (the networks' total spatial stride).
MIN_SIZE = 32

StrPath = str | os.PathLike[str]


@dataclass(frozen=True)
class ExportResult:
    """What `export` wrote: the artifact `path`, its `format`, every file written (`files`: the
    artifact, and for model formats its metadata and, with weights as arguments, the weights) and
    the metadata record (empty for weight formats)."""

    path: Path
    format: str
    files: tuple[Path, ...]
    metadata: dict[str, Any] = field(default_factory=dict)


def format_of(out: StrPath, fmt: str | None = None) -> str:
    """The export format: `fmt` if given, else from `out`'s suffix. VMZError if neither says."""
    if fmt is not None:
        if fmt not in FORMATS:
            raise VMZError(f"unknown export format {fmt!r}: use one of {', '.join(FORMATS)}")
        return fmt
    suffix = os.path.splitext(os.fspath(out))[1].lower()
    if suffix not in SUFFIXES:
        raise VMZError(
            f"{os.fspath(out)}: cannot tell the format from the name; pass format= "
            f"({'|'.join(FORMATS)}) or use a suffix {', '.join(SUFFIXES)}"
        )
    return SUFFIXES[suffix]


def _size_arg(value: Any, what: str, count: int) -> tuple[int | None, ...] | None:
    """None (default), DYNAMIC -> (None,)*count, an int -> (n,)*count, or a tuple of count ints."""
    if value is None:
        return None
    if value == DYNAMIC:
        return (None,) * count
    values = (value,) * count if isinstance(value, int | np.integer) else tuple(value)
    if len(values) != count or not all(
        v is None or (isinstance(v, int | np.integer) and not isinstance(v, bool) and v >= 1) for v in values
    ):
        raise VMZError(
            f"{what} must be a positive int{' or (height, width)' if count == 2 else ''} "
            f"or {DYNAMIC!r}, got {value!r}"
        )
    return tuple(None if v is None else int(v) for v in values)


def _model_in_dtype(model: nnx.Module, entry: ModelEntry, dtype: str) -> nnx.Module:
    """A fresh eval-mode copy of `model` computing in `dtype` (parameters stay float32)."""
    from vmz_jax.models.variables import abstract_model, get_variables, set_variables

    copy = abstract_model(entry, int(model.num_classes), int(model.clip_length), dtype=dtype)
    set_variables(copy, get_variables(model), source=f"{entry.name} model")
    copy.labels = getattr(model, "labels", None)
    copy.provenance = getattr(model, "provenance", None)
    copy.eval()
    return copy


def _check_input(model: nnx.Module, entry: ModelEntry, output: str, shape: tuple[int, int, int]) -> None:
    """Trace the network on concrete clips of `shape` (T, H, W): a size it cannot take (C3D's fixed
    size, a pooling window larger than its input, an empty convolution output) is a VMZError."""
    from vmz_jax.models.forward import make_forward

    fwd = make_forward(model, output, conv_impl="reference", platform="cpu")  # type: ignore[arg-type]
    try:
        jax.eval_shape(fwd.fn, fwd.state, jax.ShapeDtypeStruct((1, *shape, 3), jnp.float32))
    except (ValueError, TypeError) as e:
        raise VMZError(f"{entry.name} cannot take {'x'.join(map(str, shape))} clips: {one_line(e)}") from None


def export(
    weights: StrPath | nnx.Module,
    out: StrPath,
    *,
    arch: str | None = None,
    format: str | None = None,
    output: str = "logits",
    frames: int | str | None = None,
    size: int | tuple[int | None, int | None] | str | None = None,
    dtype: str = "float32",
    platforms: tuple[str, ...] = ("cpu", "cuda"),
    embed_weights: bool = True,
    num_classes: int | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> ExportResult:
    """Export `weights` (a file `vmz_jax.load` reads, an Orbax directory from `vmz_jax.save` or
    fine-tuning, or a loaded model) of architecture `arch` to `out` in `format` (default: from the
    suffix of `out`; see the module docstring).

    Model formats: `output` is "logits", "features" or "probabilities"; the input is NTHWC clips of
    `frames` x `size` (defaults: the architecture's input defaults, `vmz_jax.models.registry`), each
    an int (size: or (height, width)) or "dynamic" for a symbolic dimension; the batch is always
    symbolic. `dtype` "bfloat16" computes in bfloat16 (StableHLO only). StableHLO: `platforms` to
    lower for, `embed_weights=False` takes the weights as a first argument (written to
    `<out>.weights.npz`). Every file is written atomically; an existing `out` is refused unless
    `overwrite`. Errors are VMZErrors with a one-line message.
    """
    fmt = format_of(out, format)
    name = os.fspath(out)
    if os.path.isdir(name):
        raise VMZError(f"{name}: is a directory")
    parent = os.path.dirname(os.path.abspath(name))
    if not os.path.isdir(parent):
        raise VMZError(f"{name}: the directory {parent} does not exist")
    if os.path.exists(name) and not overwrite:
        raise VMZError(f"{name}: exists (pass overwrite=True / --overwrite to replace it)")
    if output not in OUTPUTS:
        raise VMZError(f"unknown output {output!r}: use one of {', '.join(OUTPUTS)}")
    if dtype not in DTYPES:
        raise VMZError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    if isinstance(weights, nnx.Module):
        entry = registry.entry_of(weights)
        if arch is not None and registry.get(arch).name != entry.name:
            raise VMZError(f"the model is a {entry.name}, not arch={arch!r}")
    else:
        if arch is None:
            raise VMZError(f"{os.fspath(weights)}: pass arch= (the architecture of the weights)")
        entry = registry.get(arch)

    if fmt in WEIGHT_FORMATS:
        return _export_weights(weights, entry, name, fmt, num_classes)
    if entry.family in registry.AUDIO_FAMILIES:
        raise VMZError(f"{entry.name}: {fmt} export takes clip-only models; the audio and audio-visual "
                       "archs export their weights (pth, npz, pkl, safetensors)")
    if fmt == "onnx" and not embed_weights:
        raise VMZError("ONNX files always hold their weights; weights as arguments are a StableHLO option")
    if fmt == "onnx" and dtype != "float32":
        raise VMZError(
            "ONNX export is float32 only (onnxruntime's CPU kernels have no bfloat16 "
            "convolutions); use format='stablehlo' for bfloat16"
        )

    # disable=None: a bar on terminals only; leave=False: an error line is not preceded by a stale bar
    bar = tqdm(
        total=4,
        desc=f"export {entry.name} -> {fmt}",
        disable=None if progress else True,
        unit="step",
        leave=False,
    )
    try:
        return _export_model(
            weights, entry, name, fmt, output, frames, size, dtype, platforms, embed_weights, num_classes, bar
        )
    finally:
        bar.close()


def _export_model(
    weights: StrPath | nnx.Module,
    entry: ModelEntry,
    name: str,
    fmt: str,
    output: str,
    frames: int | str | None,
    size: Any,
    dtype: str,
    platforms: tuple[str, ...],
    embed_weights: bool,
    num_classes: int | None,
    bar: Any,
) -> ExportResult:
    if isinstance(weights, nnx.Module):
        if num_classes is not None and num_classes != int(weights.num_classes):
            raise VMZError(f"the model has {weights.num_classes} classes, not num_classes={num_classes}")
        model = _model_in_dtype(weights, entry, dtype)
    else:
        from vmz_jax.weights.loading import load

        model = load(entry.name, checkpoint=weights, num_classes=num_classes, dtype=jnp.dtype(dtype))
    bar.update()

    defaults = entry.input
    t_size = _size_arg(frames, "frames", 1)
    hw = _size_arg(size, "size", 2)
    default_frames = int(model.clip_length) if entry.spans_clip else defaults.clip_length
    default_size = defaults.crop_size or defaults.short_side
    t = t_size[0] if t_size is not None else default_frames
    h, w = hw if hw is not None else (default_size, default_size)
    if entry.family == "c3d" and None in (t, h, w):
        raise VMZError(
            "c3d cannot take symbolic sizes: its fc6 fixes the clip at 16-31 frames of "
            "96-127 pixels (16x112x112 as trained); pass frames and size"
        )
    # A symbolic length is exported for clips of at least 8 frames (and at least the clip an R2D stem
    # spans), where Caffe2's short-clip rule (no temporal stride in stage 3/4 under 4/8 frames) does not
    # apply; symbolic frame sizes for at least MIN_SIZE pixels. A fixed length is just that.
    min_frames = t if t is not None else max(8, int(model.clip_length) if entry.spans_clip else 8)
    _check_input(model, entry, output, (min_frames, h or MIN_SIZE, w or MIN_SIZE))
    bar.update()

    meta = _metadata(model, entry, fmt, output, (t, h, w), min_frames, dtype)
    files = [Path(os.path.abspath(name))]
    if fmt == "stablehlo":
        blob, arg_weights = _stablehlo(model, entry, output, (t, h, w), min_frames, platforms, embed_weights)
        bar.update()
        meta.update(platforms=list(platforms), weights="embedded" if embed_weights else "arguments")
        atomic_write(name, blob)
        if arg_weights is not None:
            with atomic_file(weights_path(name)) as f:
                np.savez(f, **{f"w{i:04d}": a for i, a in enumerate(arg_weights)})
            files.append(Path(os.path.abspath(weights_path(name))))
    else:
        from vmz_jax.export.onnx_graph import OPSET, build_onnx

        meta.update(
            opset=OPSET,
            onnx_input="clips",
            onnx_output=output,
            internal_layout="NCDHW (the NTHWC input is transposed once at the start)",
        )
        proto = build_onnx(
            model,
            output,
            t,
            h,
            w,
            doc=f"vmz-jax {__version__}: {entry.name} {output}",
            metadata={"vmz_jax": json.dumps(meta)},
        )
        bar.update()
        atomic_write(name, proto.SerializeToString())
    atomic_write(metadata_path(name), json.dumps(meta, indent=1) + "\n", mode="w")
    files.append(Path(os.path.abspath(metadata_path(name))))
    bar.update()
    return ExportResult(files[0], fmt, tuple(files), meta)


def _export_weights(
    weights: StrPath | nnx.Module, entry: ModelEntry, name: str, fmt: str, num_classes: int | None
) -> ExportResult:
    from porting.convert import export_params
    from vmz_jax.models.variables import get_variables
    from vmz_jax.weights.loading import read_local

    if isinstance(weights, nnx.Module):
        params = get_variables(weights)
    else:
        params, _ = read_local(entry, weights, num_classes)
    export_params(params, entry, name, fmt)
    return ExportResult(Path(os.path.abspath(name)), fmt, (Path(os.path.abspath(name)),))


def _metadata(
    model: nnx.Module,
    entry: ModelEntry,
    fmt: str,
    output: str,
    sizes: tuple[int | None, int | None, int | None],
    min_frames: int,
    dtype: str,
) -> dict[str, Any]:
    t, h, w = sizes
    fc = model.fc
    inp = entry.input
    labels = getattr(model, "labels", None)
    return {
        "format": fmt,
        "producer": f"vmz-jax {__version__}",
        "arch": entry.name,
        "family": entry.family,
        "output": output,
        "output_shape": ["batch", int(fc.in_features if output == "features" else fc.out_features)],
        "num_classes": int(model.num_classes),
        "labels": list(labels) if labels else None,
        "dtype": dtype,
        "input_layout": "NTHWC",
        "input_dtype": "float32",
        "input_shape": [
            "batch",
            t if t is not None else "t",
            h if h is not None else "h",
            w if w is not None else "w",
            3,
        ],
        "min_frames": min_frames,
        "min_size": MIN_SIZE if h is None or w is None else None,
        "normalization": "RGB frames with values 0-255, then (x - mean) / std per channel",
        "mean": list(inp.mean),
        "std": list(inp.std),
        "clip": {
            "frames": t,
            "sampling_rate": inp.sampling_rate,
            "short_side": inp.short_side,
            "crop": inp.crop,
            "crop_size": inp.crop_size,
        },
        "provenance": dict(getattr(model, "provenance", None) or ()),
    }


def _stablehlo(
    model: nnx.Module,
    entry: ModelEntry,
    output: str,
    sizes: tuple[int | None, int | None, int | None],
    min_frames: int,
    platforms: tuple[str, ...],
    embed_weights: bool,
) -> tuple[bytes, list[np.ndarray] | None]:
    from jax.errors import InconclusiveDimensionOperation

    from vmz_jax.export.stablehlo import export_stablehlo, input_spec

    t, h, w = sizes
    spec = input_spec(t, h, w, min_frames, MIN_SIZE)
    symbolic = None in (t, h, w)
    try:
        exported, arg_weights = export_stablehlo(
            model,
            output,
            spec,
            platforms,
            embed_weights=embed_weights,
            cpu_conv_impl="reference" if symbolic else None,
        )
    except InconclusiveDimensionOperation as e:
        raise VMZError(
            f"{entry.name} cannot be exported with these symbolic sizes "
            f"({one_line(str(e).splitlines()[0])}); fix frames or size"
        ) from None
    except (ValueError, TypeError) as e:
        raise VMZError(f"{entry.name}: {one_line(e)}") from None
    return bytes(exported.serialize()), arg_weights
