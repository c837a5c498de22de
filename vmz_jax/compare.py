"""Stage-by-stage comparison of our model with a second implementation or a second set of weights.

`compare(weights, arch)` builds our model from a weights file (any format `vmz_jax.load` reads, or an
Orbax directory) and the independent PyTorch reference (`vmz_jax.reference.vmz_torch`) carrying the
same weights under VMZ's `state_dict` names, runs both in eval mode on one input and reports, for
every stage (stem, layer1-4, features, logits; C3D: pool1-pool5, features, logits), the largest
absolute and relative difference. `compare(weights, arch, against=OTHER)` instead runs our model
twice, once per weights file: the Caffe2 `.pkl` and the `.pth` of one release must agree exactly.

Why per stage: a port that is wrong in one place (a transposed kernel, a BatchNorm field swapped)
shows first at the stage that holds it, while the logits alone only say that something is wrong.

Relative difference of a stage = max |ours - reference| / max |reference| over the whole tensor:
one number per stage that does not blow up on the near-zero entries that ReLUs produce. A stage is
within tolerance when it is at most `tol` (default 1e-5 in float32, 1e-10 in float64).

Note: `vmz_jax.compare` is this function (exported from the package), which shadows the module of
the same name as a package attribute; reach the module itself with
``importlib.import_module("vmz_jax.compare")``.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from vmz_jax.errors import CheckpointError, VMZError, one_line

__all__ = ["DEFAULT_TOL", "Comparison", "StageDiff", "compare", "format_table", "load_input"]

DType = Literal["float32", "float64"]
StrPath = str | os.PathLike[str]
ParamPath = tuple[str, ...]

#: Relative tolerance per computation dtype: float32 rounding over ~50 layers stays well under 1e-5
#: (the parity tests' bound); float64 leaves ~1e-13 on the same models.
DEFAULT_TOL: dict[str, float] = {"float32": 1e-5, "float64": 1e-10}
#: The stages compared, in network order (jit returns dicts with sorted keys).
RESNET_STAGES = ("stem", "layer1", "layer2", "layer3", "layer4", "features", "logits")
C3D_STAGES = ("pool1", "pool2", "pool3", "pool4", "pool5", "features", "logits")
#: The audio ResNet's outputs, and the audio-visual models' features and heads (against the Caffe2-builder
#: reference `vmz_jax.reference.av_torch`, whose weights are the Caffe2 blobs).
AUDIO_STAGES = ("features", "logits")
AUDIO_VISUAL_STAGES = ("audio_features", "visual_features", "joint_features", "audio_logits",
                       "visual_logits", "av_logits")
#: Random log-mels (N, frames, mel bins) of the audio archs: Caffe2's 100 x 40 per clip.
LOGMEL_SHAPE = (100, 40)
#: Random input (N, T, H, W) when none is given; C3D and r2d_18 override T (and C3D H, W).
DEFAULT_SHAPE = (1, 8, 112, 112)


@dataclass(frozen=True)
class StageDiff:
    """One stage: its shape (ours, NTHWC or (N, D)), max |a - b|, max |a - b| / max |b|, verdict."""

    stage: str
    shape: tuple[int, ...]
    max_abs: float
    max_rel: float
    within: bool


@dataclass(frozen=True)
class Comparison:
    """The result of `compare`: a row per stage in network order, the first stage over `tol`, and
    the first stage whose outputs differ at all. Against a second weights file both sides are this
    implementation, so the stages before a changed weight are exactly equal and `first_difference`
    names where the weights part, even when the change stays under `tol` at that stage (one
    relative tolerance per stage measures against the stage's largest value)."""

    arch: str
    weights: str
    against: str  # "torch" or the second weights file
    dtype: str
    tol: float
    input: str  # where the input came from, in words
    input_shape: tuple[int, ...]
    rows: list[StageDiff]
    first_failure: str | None
    first_difference: str | None = None

    @property
    def ok(self) -> bool:
        return self.first_failure is None

    def to_json(self) -> dict[str, Any]:
        """A JSON-safe dict (non-finite differences become null)."""
        out = asdict(self)
        out["ok"] = self.ok
        for row in out["rows"]:
            for key in ("max_abs", "max_rel"):
                row[key] = row[key] if math.isfinite(row[key]) else None
        return out


def _diff(stage: str, ours: np.ndarray, reference: np.ndarray, tol: float) -> StageDiff:
    if ours.shape != reference.shape:
        raise VMZError(f"stage {stage}: our output has shape {ours.shape}, the reference's "
                       f"{reference.shape}")
    a = ours.astype(np.float64)
    b = reference.astype(np.float64)
    max_abs = float(np.max(np.abs(a - b))) if a.size else 0.0
    scale = float(np.max(np.abs(b))) if b.size else 0.0
    if scale > 0:
        max_rel = max_abs / scale
    else:
        max_rel = 0.0 if max_abs == 0 else math.inf
    # NaN compares False: a stage with NaNs (in either) is never within tolerance
    return StageDiff(stage, tuple(ours.shape), max_abs, max_rel, bool(max_rel <= tol))


def format_table(result: Comparison) -> str:
    """The comparison as an aligned text table plus a verdict line."""
    header = ("stage", "shape", "max abs", "max rel", f"<= {result.tol:g}")
    lines = [(r.stage, "x".join(map(str, r.shape)), f"{r.max_abs:.3e}", f"{r.max_rel:.3e}",
              "yes" if r.within else "NO") for r in result.rows]
    widths = [max(len(row[i]) for row in (header, *lines)) for i in range(len(header))]
    text = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
            for row in (header, *lines)]
    against = "the PyTorch reference" if result.against == "torch" else result.against
    text.insert(0, f"{result.arch}: {result.weights} against {against}, {result.dtype}, input "
                   f"{'x'.join(map(str, result.input_shape))} ({result.input})")
    if result.ok:
        text.append(f"every stage within {result.tol:g} (relative: max|ours - reference| / max|reference|)")
    else:
        text.append(f"first stage over {result.tol:g}: {result.first_failure}")
    if result.against != "torch":  # same implementation on both sides: equal stages are exactly equal
        text.append(f"first stage that differs at all: {result.first_difference}"
                    if result.first_difference else "every stage identical")
    return "\n".join(text)


# --- the input --------------------------------------------------------------------------------

def _default_shape(arch: str, clip_length: int | None) -> tuple[int, int, int, int]:
    from vmz_jax.models import registry

    given = registry.get(arch).input
    if given.crop_size is not None:  # C3D: the one input size its fc6 takes
        return (1, given.clip_length, given.crop_size, given.crop_size)
    n, t, h, w = DEFAULT_SHAPE
    return (n, max(t, clip_length or 0), h, w)


def _read_npy(path: str) -> np.ndarray:
    try:
        x = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else one_line(exc)
        raise VMZError(f"{path}: cannot read the clip ({reason})") from None
    if not isinstance(x, np.ndarray) or x.ndim != 5 or x.shape[-1] != 3 or min(x.shape) < 1:
        raise VMZError(f"{path}: expected a clip array (N, T, H, W, 3), got shape {np.shape(x)}")
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise VMZError(f"{path}: expected a real-valued clip array, got dtype {x.dtype}")
    if not np.isfinite(x).all():
        raise VMZError(f"{path}: the clip holds NaN or infinite values")
    return x


def _first_video_clip(arch: str, path: str) -> tuple[np.ndarray, str]:
    """The first clip of a video, decoded and preprocessed as `vmz-jax extract` does for `arch`."""
    from vmz_jax.video import decode, pipeline
    from vmz_jax.video.clips import ClipSampling, assemble, stack
    from vmz_jax.video.preprocess import Preprocess

    options = pipeline.default_options(arch)
    preprocess = Preprocess(short_side=options["frame_size"], crop=options["crop"],
                            crop_size=options["crop_size"])
    sampling = ClipSampling(clip_len=options["clip_len"], sampling_rate=options["sampling_rate"])
    info = decode.probe(path)
    preprocess.view_shape(info.height, info.width)  # a crop that does not fit fails here
    frames = decode.decode(info, size=preprocess.ffmpeg_size(info.height, info.width), strict=False)
    with contextlib.closing(frames):  # stop ffmpeg once the first clip is complete
        clip = next(assemble((preprocess(f) for f in frames), sampling), None)
    if clip is None:
        raise VMZError(f"{path}: no frames could be decoded")
    padded = f", {clip.padded} padded" if clip.padded else ""
    crop = "" if options["crop"] == "none" else f", {options['crop']} crop {options['crop_size']}"
    how = (f"first {sampling.clip_len}-frame clip of {path}{padded}, short side "
           f"{options['frame_size']}{crop}")
    return stack(clip)[:1], how


def load_input(arch: str, input: StrPath | None = None, *, shape: tuple[int, ...] | None = None,
               dtype: DType = "float32", seed: int = 0, clip_length: int | None = None
               ) -> tuple[np.ndarray, str]:
    """The (N, T, H, W, 3) input of a comparison and its description: standard normal with `seed`
    (of `shape` (N, T, H, W), by default 1x8x112x112, 1x16x112x112 for C3D), a `.npy` clip, or
    the first clip of a video file, preprocessed with the arch's `vmz-jax extract` defaults."""
    if input is None:
        shape = tuple(shape) if shape is not None else _default_shape(arch, clip_length)
        if len(shape) != 4 or min(shape) < 1:
            raise VMZError(f"the input shape must be N, T, H, W (positive), not {shape}")
        x = np.random.default_rng(seed).standard_normal((*shape, 3))
        return x.astype(dtype), f"standard normal, seed {seed}"
    if shape is not None:
        raise VMZError("a shape is for the random input; an input file has its own")
    path = os.fsdecode(input)
    if path.lower().endswith(".npy"):
        return _read_npy(path).astype(dtype), path
    x, how = _first_video_clip(arch, path)
    return x.astype(dtype), how


# --- the two implementations ------------------------------------------------------------------

def _torch_reference() -> Any:
    """`vmz_jax.reference.vmz_torch`; without torch, its TorchMissingError (a one-line VMZError)."""
    from vmz_jax.reference import vmz_torch

    return vmz_torch


def _torch_stages(arch: str, params: Mapping[ParamPath, np.ndarray], num_classes: int,
                  clip_length: int | None, x: np.ndarray, dtype: DType, source: str
                  ) -> dict[str, np.ndarray]:
    """The PyTorch reference's stage outputs (NTHWC like ours) with `params` loaded strictly."""
    from porting.torch_names import params_to_torch

    vmz_torch = _torch_reference()
    torch = vmz_torch.torch  # imported by the reference, so that a missing torch is its one-line error

    model = vmz_torch.build(arch, num_classes=num_classes, clip_length=clip_length or 8)
    # torch warns on read-only (memory-mapped) arrays although load_state_dict only copies from them
    state = {name: torch.from_numpy(value if value.flags.writeable else value.copy())
             for name, value in params_to_torch(params, arch).items()}
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith(".num_batches_tracked")]
    if missing or result.unexpected_keys:
        raise CheckpointError(one_line(f"{source}: the PyTorch reference does not take these weights "
                                       f"(missing {missing}, unexpected {result.unexpected_keys})"))
    model.eval()
    if dtype == "float64":
        model.double()
    with torch.no_grad():
        out = model.stage_outputs(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 4, 1, 2, 3))))
    return {k: v.numpy().transpose(0, 2, 3, 4, 1) if v.ndim == 5 else v.numpy() for k, v in out.items()}


def _random_logmels(n: int, seed: int, dtype: DType) -> np.ndarray:
    """Standard normal log-mels (N, 100, 40), drawn after the clip from the same seed's stream."""
    return np.random.default_rng([seed, 1]).standard_normal((n, *LOGMEL_SHAPE)).astype(dtype)


def _audio_outputs(model: Any, clips: Any, logmels: Any) -> dict[str, Any]:
    """Our audio (`clips` None) or audio-visual model's outputs under the names of the stages."""
    if clips is None:
        out = model.stage_outputs(logmels)
        return {"features": out["features"], "logits": out["logits"]}
    return {**{f"{k}_features": v for k, v in model.features(clips, logmels).items()},
            **{f"{k}_logits": v for k, v in model.heads(clips, logmels).items()}}


def _av_torch_stages(arch: str, params: Mapping[ParamPath, np.ndarray], num_classes: int, x: np.ndarray,
                     logmels: np.ndarray, dtype: DType, source: str) -> dict[str, np.ndarray]:
    """The Caffe2-builder reference's outputs with `params` as Caffe2 blobs, loaded strictly."""
    from porting.caffe2_names import params_to_caffe2
    from vmz_jax.reference import av_torch

    torch = av_torch.torch
    audio_only = arch.startswith("a_resnet_")
    net = av_torch.build(arch, num_classes, clip_length=x.shape[1])
    try:
        net.load_blobs({k: torch.from_numpy(v if v.flags.writeable else v.copy())
                        for k, v in params_to_caffe2(params, arch).items()})
    except ValueError as exc:
        raise CheckpointError(one_line(f"{source}: the PyTorch reference does not take these weights "
                                       f"({exc})")) from None
    net.eval()
    if dtype == "float64":
        net.double()
    with torch.no_grad():
        clips = None if audio_only else torch.from_numpy(np.ascontiguousarray(x.transpose(0, 4, 1, 2, 3)))
        out = av_torch.run(net, arch, num_classes, torch.from_numpy(logmels), clips)
    renamed = {}
    for key, value in out.items():
        kind, _, what = key.partition("_")  # logits_av -> av_logits
        renamed[kind if audio_only else f"{what}_{kind}"] = value.numpy()
    return renamed


_forward: Any = None
_audio_forward: Any = None


def _jax_stages(arch: str, params: Mapping[ParamPath, np.ndarray], meta: Mapping[str, Any],
                x: np.ndarray, dtype: DType, conv_impl: str, logmels: np.ndarray | None = None
                ) -> dict[str, np.ndarray]:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from vmz_jax.models.variables import abstract_model, set_variables

    global _forward, _audio_forward
    if _forward is None:
        _forward = nnx.jit(lambda model, clips: model.stage_outputs(clips))
        _audio_forward = nnx.jit(_audio_outputs)
    model = abstract_model(arch, meta["num_classes"], meta.get("clip_length"), dtype=dtype,
                           conv_impl=conv_impl)
    set_variables(model, params, source=f"{arch} weights")
    model.eval()
    try:
        # full float32 (no TF32 / bf16 passes on GPU): a port is checked, not the fastest setting
        with jax.default_matmul_precision("highest"):
            if logmels is None:
                out = _forward(model, jnp.asarray(x))
            else:
                clips = None if arch.startswith("a_resnet_") else jnp.asarray(x)
                out = _audio_forward(model, clips, jnp.asarray(logmels))
    except (ValueError, TypeError) as exc:
        raise VMZError(f"input {'x'.join(map(str, x.shape))} does not fit {arch}: {one_line(exc)}") from None
    return {k: np.asarray(v) for k, v in out.items()}


def compare(weights: StrPath, arch: str, against: StrPath = "torch", *, input: StrPath | None = None,
            shape: tuple[int, ...] | None = None, dtype: DType = "float32", tol: float | None = None,
            seed: int = 0, conv_impl: str = "auto") -> Comparison:
    """Compare our `arch` with `weights` against the PyTorch reference with the same weights
    (`against="torch"`) or against our `arch` with a second weights file, stage by stage.

    `input`: a `.npy` clip (N, T, H, W, 3) or a video (its first clip, preprocessed with the arch's
    `vmz-jax extract` defaults); by default a standard normal clip of `shape` (N, T, H, W) drawn with
    `seed`. `dtype` float64 runs both sides in float64 (and turns on `jax_enable_x64`, process-wide).
    `tol` bounds the relative difference (default `DEFAULT_TOL[dtype]`). Our side runs with
    `jax.default_matmul_precision("highest")`, so that GPUs do not trade float32 for TF32.
    Raises VMZError (one line) for unreadable or unfitting weights and inputs; a difference over
    `tol` is not an error: see `Comparison.first_failure`.
    """
    from vmz_jax.models import registry
    from vmz_jax.weights.loading import read_local

    entry = registry.get(arch)  # an unknown name: the registry's one-line error
    if dtype not in DEFAULT_TOL:
        raise VMZError(f"dtype must be float32 or float64, not {dtype!r}")
    tol = DEFAULT_TOL[dtype] if tol is None else float(tol)
    if not tol >= 0:
        raise VMZError(f"the tolerance must be a non-negative number, not {tol}")
    if dtype == "float64":
        import jax

        jax.config.update("jax_enable_x64", True)  # before any float64 model or array is built
    against_torch = os.fsdecode(against) == "torch"
    audio = entry.family in registry.AUDIO_FAMILIES
    if audio and input is not None:
        raise VMZError(f"{arch}: compare runs the audio archs on random clips and log-mels only; "
                       "leave out the input")
    if against_torch:
        _torch_reference()  # a missing torch fails before the work, not after
    name = os.fsdecode(weights)
    params, meta = read_local(arch, name)
    x, how = load_input(arch, input, shape=shape, dtype=dtype, seed=seed,
                        clip_length=meta.get("clip_length"))
    logmels = None
    if audio:
        logmels = _random_logmels(x.shape[0], seed, dtype)
        how += f"; log-mels {x.shape[0]}x{LOGMEL_SHAPE[0]}x{LOGMEL_SHAPE[1]} standard normal"
    other_name = "torch" if against_torch else os.fsdecode(against)
    if not against_torch:  # read before any computing: a bad file fails fast
        other, other_meta = read_local(arch, other_name)
        # The clip length is part of the weights only where the stem spans the clip (r2d_18).
        keys = ("num_classes", "clip_length") if entry.spans_clip else ("num_classes",)
        for key in keys:
            if meta.get(key) != other_meta.get(key):
                raise CheckpointError(f"{other_name}: {key} is {other_meta.get(key)}, but "
                                      f"{meta.get(key)} in {name}")
    ours = _jax_stages(arch, params, meta, x, dtype, conv_impl, logmels)
    if against_torch and audio:
        assert logmels is not None
        theirs = _av_torch_stages(arch, params, meta["num_classes"], x, logmels, dtype, name)
    elif against_torch:
        theirs = _torch_stages(arch, params, meta["num_classes"], meta.get("clip_length"), x, dtype, name)
    else:
        theirs = _jax_stages(arch, other, other_meta, x, dtype, conv_impl, logmels)
    stages = {"c3d": C3D_STAGES, "audio": AUDIO_STAGES, "audio_visual": AUDIO_VISUAL_STAGES}.get(
        entry.family, RESNET_STAGES)
    if set(ours) != set(stages) or set(theirs) != set(stages):
        raise VMZError(f"expected the stages {', '.join(stages)}; got {sorted(ours)} and {sorted(theirs)}")
    rows = [_diff(stage, ours[stage], theirs[stage], tol) for stage in stages]
    first = next((row.stage for row in rows if not row.within), None)
    differs = next((row.stage for row in rows if not row.max_abs == 0), None)  # NaN differs too
    return Comparison(arch, name, other_name, dtype, tol, how, tuple(x.shape), rows, first, differs)
