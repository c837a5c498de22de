"""`vmz_jax.load`: an architecture with released or local weights, in eval mode.

Released weights (`load(arch, pretraining)`) are downloaded once into ``$VMZ_JAX_HOME/downloads/``
(resumable, checksum-verified, `vmz_jax.weights.download`), ported once into an Orbax checkpoint at
``$VMZ_JAX_HOME/orbax/<arch>/<pretraining>/`` under an inter-process file lock, and from then on read
from there only: no request is made. Local weights (`load(arch, checkpoint=PATH)`) are an Orbax
directory (read without importing torch or unpickling anything) or a `.pth`, `.pkl`, `.npz` or
`.safetensors` file (ported in memory, not cached).

The model is built abstractly (`nnx.eval_shape`, traced once per process and architecture) and its
variables set from the weights, so no random initialisation is paid for.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from vmz_jax.errors import CheckpointError, DownloadError, VMZError
from vmz_jax.models import ARCHS
from vmz_jax.models import registry as model_registry
from vmz_jax.models.registry import ModelEntry
from vmz_jax.models.variables import abstract_model, set_variables
from vmz_jax.weights import checkpoint as ckpt
from vmz_jax.weights import download as dl
from vmz_jax.weights import pretrained as registry

__all__ = ["checkpoint_labels", "download_path", "list_pretrainings", "load", "orbax_cache_dir", "save"]

StrPath = str | os.PathLike[str]
ParamPath = tuple[str, ...]

#: Per-request timeout and number of retries of a checkpoint download (see `vmz_jax.weights.download`).
DOWNLOAD_TIMEOUT_S: float = 30.0
DOWNLOAD_RETRIES: int = 3
LOCAL_FORMATS = "an Orbax checkpoint directory, or a .pth, .pkl, .npz or .safetensors file"


def _check_arch(arch: str | ModelEntry) -> ModelEntry:
    """The registry entry of `arch`; UnknownArchitectureError (a VMZError) lists the known names."""
    return model_registry.get(arch)


def list_pretrainings(arch: str) -> list[str]:
    """The released weights of `arch` by name (for `load(arch, name)`); [] if there are none."""
    _check_arch(arch)
    return registry.list_pretrainings(arch)


def orbax_cache_dir(arch: str, pretraining: str) -> Path:
    """Where the ported released weights `arch`/`pretraining` are cached (canonical name)."""
    return dl.cache_dir() / "orbax" / arch / pretraining


def download_path(entry: registry.Pretraining) -> Path:
    """Where the released file of `entry` is downloaded to."""
    return dl.cache_dir() / "downloads" / entry.filename


def load(arch: str, pretraining: str | None = None, *, checkpoint: StrPath | None = None,
         num_classes: int | None = None, new_head: bool = False, seed: int = 0,
         dtype: Any = jnp.float32, conv_impl: str = "auto", progress: bool = True) -> nnx.Module:
    """`arch` with weights, in eval mode.

    * `load(arch, pretraining)`: released weights by name (`list_pretrainings(arch)`); downloaded,
      ported and cached on the first call, read from the cache afterwards (works offline then).
    * `load(arch, checkpoint=PATH)`: weights from PATH, an Orbax checkpoint directory (read without
      importing torch or unpickling anything) or a .pth, .pkl, .npz or .safetensors file (ported in
      memory, not cached).
    * `load(arch, pretraining, checkpoint=PATH)`: PATH is a local copy of the released file (for
      machines without network): it is checked against the registry's checksum where one is known,
      ported and cached like a download. An existing cache entry is used as is.

    `num_classes`, when given, must equal the class count of the weights (read from the file),
    unless `new_head=True`: then every backbone weight is loaded strictly and the classifier (`fc`;
    for C3D only the last one, fc6/fc7 are kept; an audio-visual model's three heads) is replaced by
    a fresh `num_classes`-way head with VMZ's initialisation (normal, std 0.01; zero bias) drawn from
    `seed`, for fine-tuning.
    The model carries `model.labels` (class names saved with `vmz_jax.save`, or None) and
    `model.provenance` (where the weights came from), which `vmz_jax.save` records.
    `dtype` is the computation dtype (parameters stay float32); `conv_impl` as in
    `vmz_jax.models.build`. Errors are `VMZError`s with a one-line message: `CheckpointError` for
    weights that are unreadable or do not fit `arch`, `DownloadError` for a failed download.
    """
    model_entry = _check_arch(arch)
    if pretraining is None and checkpoint is None:
        names = registry.list_pretrainings(arch)
        available = (f"released weights for {arch}: {', '.join(names)}" if names
                     else f"{arch} has no released weights")
        raise VMZError(f"load({arch!r}) needs pretraining=NAME or checkpoint=PATH ({LOCAL_FORMATS}); "
                       f"{available}")
    if new_head and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                     or num_classes < 1):
        raise VMZError(f"load({arch!r}, new_head=True) needs num_classes=N (a positive int) for the "
                       f"new classifier, got {num_classes!r}")
    if pretraining is not None:
        entry = registry.get_pretraining(arch, pretraining)
        if not new_head and num_classes is not None and num_classes != entry.num_classes:
            raise CheckpointError(f"{arch} {entry.name} has {entry.num_classes} classes, "
                                  f"not num_classes={num_classes} (pass new_head=True to replace "
                                  "the classifier)")
        params, meta = _released(entry, checkpoint, progress)
    else:
        assert checkpoint is not None
        params, meta = read_local(model_entry, checkpoint, None if new_head else num_classes)
    if new_head:
        assert num_classes is not None
        params = _with_new_head(params, arch, num_classes, meta.get("clip_length"), seed,
                                f"{arch} weights")
        meta = {**meta, "num_classes": num_classes, "labels": None, "new_head": True}
    model = abstract_model(model_entry, meta["num_classes"], meta.get("clip_length"), dtype=dtype,
                           conv_impl=conv_impl)
    set_variables(model, params, source=f"{arch} weights")
    labels = meta.get("labels")
    model.labels = tuple(labels) if labels else None
    model.provenance = _provenance(meta)
    model.eval()
    return model


# Where a model's weights came from: these metadata keys are carried from the checkpoint that was
# loaded into the one `save` writes, so a fine-tuned model still names its pretraining and source.
PROVENANCE_KEYS = ("pretraining", "dataset", "url", "source", "source_sha256", "source_format",
                   "new_head")


def _provenance(meta: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    """Where the weights of `meta` came from as sorted pairs (hashable: the model keeps it as static
    graph data): the provenance a saved checkpoint recorded, updated by its own top-level keys."""
    origin = dict(meta.get("provenance") or {})
    origin.update({k: meta[k] for k in PROVENANCE_KEYS if meta.get(k) is not None})
    return tuple(sorted((k, v) for k, v in origin.items() if isinstance(v, str | int | float | bool)))


def head_paths(arch: str) -> tuple[ParamPath, ParamPath]:
    """The classifier's kernel and bias: what `new_head=True` replaces (C3D: only the last fc)."""
    del arch  # every architecture names its classifier `fc`; C3D's fc6/fc7 are part of the backbone
    return ("fc", "kernel"), ("fc", "bias")


def new_head_params(in_features: int, num_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """VMZ's classifier initialisation: kernel ~ normal(0, 0.01), bias 0 (Caffe2 GaussianFill)."""
    rng = np.random.default_rng(seed)
    kernel = (0.01 * rng.standard_normal((in_features, num_classes))).astype(np.float32)
    return kernel, np.zeros((num_classes,), np.float32)


def _classifiers(arch: str) -> list[tuple[ParamPath, ParamPath]]:
    """(kernel, bias) of every classifier `new_head=True` replaces: `head_paths`, and for an
    audio-visual model also its audio and visual heads (Gradient-Blending trains all three)."""
    kernel, bias = head_paths(arch)
    if model_registry.get(arch).family != "audio_visual":
        return [(kernel, bias)]
    return [(kernel, bias), *(((tower, *kernel), (tower, *bias)) for tower in ("audio", "visual"))]


def _with_new_head(params: dict[ParamPath, np.ndarray], arch: str, num_classes: int,
                   clip_length: int | None, seed: int, source: str) -> dict[ParamPath, np.ndarray]:
    """`params` with fresh `num_classes`-way heads (the first drawn from `seed`, any others from
    seed + 1, ...); everything else must fit `arch` exactly."""
    from vmz_jax.models.variables import check_params, expected_shapes

    heads = _classifiers(arch)
    replaced = {path for pair in heads for path in pair}
    shapes = expected_shapes(arch, num_classes, clip_length)
    backbone = {p: v for p, v in params.items() if p not in replaced}
    check_params(backbone, {p: s for p, s in shapes.items() if p not in replaced}, source)
    out = dict(backbone)
    for number, (kernel_path, bias_path) in enumerate(heads):
        out[kernel_path], out[bias_path] = new_head_params(shapes[kernel_path][0], num_classes, seed + number)
    return out


def checkpoint_labels(path: StrPath) -> list[str] | None:
    """The class names saved with an Orbax checkpoint directory (`vmz_jax.save(..., labels=)`), or None
    (no labels saved, or `path` is a file such as a .pth, which carries none)."""
    name = os.fsdecode(path)
    if not os.path.isdir(name):
        return None
    labels = ckpt.read_metadata(name).get("labels")
    return list(labels) if labels else None


def save(model: nnx.Module, path: StrPath, *, labels: Any = None, metadata: dict[str, Any] | None = None,
         overwrite: bool = False) -> Path:
    """Write `model`'s weights (parameters and BatchNorm statistics) as an Orbax checkpoint that
    `vmz_jax.load(arch, checkpoint=path)` reads back, atomically (the directory appears complete or
    not at all).

    The metadata records the architecture, class count, clip length, the class names (`labels`, a
    sequence of `num_classes` strings; default: the model's own `model.labels`, if any) and the
    provenance of the weights the model was loaded from (pretraining, source file and checksum, whether
    the head was new), so a fine-tuned checkpoint still says what it started from. `metadata` adds
    JSON-serialisable keys of your own (e.g. the training config); it cannot override those.
    Returns the absolute path. Raises VMZError/CheckpointError with one line.
    """
    from vmz_jax.models.variables import get_variables

    arch = getattr(model, "arch", None)
    if not isinstance(arch, str) or arch not in ARCHS:
        raise VMZError(f"save: {type(model).__name__} is not a vmz_jax model (no .arch)")
    num_classes = int(model.num_classes)
    if labels is None:
        labels = getattr(model, "labels", None)
    if labels is not None:
        if isinstance(labels, str) or not all(isinstance(x, str) for x in labels):
            raise VMZError("save: labels must be a sequence of strings (class index -> name)")
        labels = list(labels)
        if len(labels) != num_classes:
            raise VMZError(f"save: {len(labels)} labels, but the model has {num_classes} classes")
    meta: dict[str, Any] = dict(metadata or {})
    own = {"arch": arch, "num_classes": num_classes, "clip_length": int(model.clip_length),
           "labels": labels}
    clash = sorted(k for k in meta if k in own or k in (*PROVENANCE_KEYS, "provenance"))
    if clash:
        raise VMZError(f"save: metadata keys {', '.join(clash)} are set by save itself")
    origin = dict(getattr(model, "provenance", None) or ())
    if origin:
        meta["provenance"] = origin
    meta.update(own)
    return ckpt.save(path, get_variables(model), meta, overwrite=overwrite)


def read_local(arch: str | ModelEntry, path: StrPath, num_classes: int | None = None
               ) -> tuple[dict[ParamPath, np.ndarray], dict[str, Any]]:
    """Weights from an Orbax directory or any supported file: (flat params, metadata)."""
    entry = _check_arch(arch)
    name = os.fsdecode(path)
    if os.path.isdir(name):
        params, meta = ckpt.restore(name, arch=entry.name)
        if num_classes is not None and num_classes != meta["num_classes"]:
            raise CheckpointError(f"{name}: the checkpoint has {meta['num_classes']} classes, "
                                  f"but num_classes={num_classes} was asked for")
        return params, meta
    from porting.convert import read_params

    params, info = read_params(name, entry, num_classes=num_classes)
    meta = {"arch": entry.name, "num_classes": info.num_classes, "clip_length": info.clip_length,
            "source": os.path.abspath(info.path), "source_sha256": info.sha256,
            "source_format": info.format, "source_naming": info.naming}
    return params, meta


def _released(entry: registry.Pretraining, local: StrPath | None, progress: bool
              ) -> tuple[dict[ParamPath, np.ndarray], dict[str, Any]]:
    """The weights of a registry entry: from the Orbax cache, or downloaded (or `local`), ported
    and cached. The port runs under a lock on the cache entry, so concurrent processes port once."""
    target = orbax_cache_dir(entry.arch, entry.name)
    if ckpt.is_checkpoint(target):
        return _restore_cached(entry, target)
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(dl.file_lock(target))
        except OSError as exc:
            raise CheckpointError(f"{target}: cannot lock the cache ({exc.strerror or exc})") from None
        if ckpt.is_checkpoint(target):  # another process ported it while we waited
            return _restore_cached(entry, target)
        if local is not None:
            source = Path(os.fsdecode(local))
        else:
            try:
                source = dl.download(entry.url, download_path(entry), sha256_prefix=entry.sha256_prefix,
                                     timeout=DOWNLOAD_TIMEOUT_S, retries=DOWNLOAD_RETRIES,
                                     progress=progress)
            except DownloadError as exc:
                raise DownloadError(f"{entry.arch} {entry.name}: {exc}") from None
        from porting.convert import read_params

        params, info = read_params(source, entry.arch, num_classes=entry.num_classes)
        if entry.sha256_prefix and not info.sha256.startswith(entry.sha256_prefix):
            raise CheckpointError(
                f"{source}: sha256 {info.sha256[:8]} is not that of the released {entry.arch} "
                f"{entry.name} ({entry.sha256_prefix}); load it without pretraining= to use it as is"
            )
        meta = {
            "arch": entry.arch, "num_classes": info.num_classes,
            "clip_length": info.clip_length or entry.clip_length, "crop_size": entry.crop_size,
            "pretraining": entry.name, "dataset": entry.dataset, "url": entry.url,
            "source": str(source), "source_sha256": info.sha256, "source_format": info.format,
            "source_naming": info.naming,
        }
        ckpt.save(target, params, meta)
        return params, ckpt.read_metadata(target)


def _restore_cached(entry: registry.Pretraining, target: Path
                    ) -> tuple[dict[ParamPath, np.ndarray], dict[str, Any]]:
    try:
        return ckpt.restore(target, arch=entry.arch)
    except CheckpointError as exc:
        raise CheckpointError(f"{exc}; remove {target} to download and port it again") from None
