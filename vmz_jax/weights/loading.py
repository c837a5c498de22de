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
from vmz_jax.models.variables import abstract_model, set_variables
from vmz_jax.weights import checkpoint as ckpt
from vmz_jax.weights import download as dl
from vmz_jax.weights import pretrained as registry

__all__ = ["download_path", "list_pretrainings", "load", "orbax_cache_dir"]

StrPath = str | os.PathLike[str]
ParamPath = tuple[str, ...]

#: Per-request timeout and number of retries of a checkpoint download (see `vmz_jax.weights.download`).
DOWNLOAD_TIMEOUT_S: float = 30.0
DOWNLOAD_RETRIES: int = 3
LOCAL_FORMATS = "an Orbax checkpoint directory, or a .pth, .pkl, .npz or .safetensors file"


def _check_arch(arch: str) -> None:
    if arch not in ARCHS:
        raise VMZError(f"unknown architecture {arch!r}; available: {', '.join(ARCHS)}")


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
         num_classes: int | None = None, dtype: Any = jnp.float32, conv_impl: str = "auto",
         progress: bool = True) -> nnx.Module:
    """`arch` with weights, in eval mode.

    * `load(arch, pretraining)`: released weights by name (`list_pretrainings(arch)`); downloaded,
      ported and cached on the first call, read from the cache afterwards (works offline then).
    * `load(arch, checkpoint=PATH)`: weights from PATH, an Orbax checkpoint directory (read without
      importing torch or unpickling anything) or a .pth, .pkl, .npz or .safetensors file (ported in
      memory, not cached).
    * `load(arch, pretraining, checkpoint=PATH)`: PATH is a local copy of the released file (for
      machines without network): it is checked against the registry's checksum where one is known,
      ported and cached like a download. An existing cache entry is used as is.

    `num_classes`, when given, must equal the class count of the weights (read from the file).
    `dtype` is the computation dtype (parameters stay float32); `conv_impl` as in
    `vmz_jax.models.build`. Errors are `VMZError`s with a one-line message: `CheckpointError` for
    weights that are unreadable or do not fit `arch`, `DownloadError` for a failed download.
    """
    _check_arch(arch)
    if pretraining is None and checkpoint is None:
        names = registry.list_pretrainings(arch)
        available = (f"released weights for {arch}: {', '.join(names)}" if names
                     else f"{arch} has no released weights")
        raise VMZError(f"load({arch!r}) needs pretraining=NAME or checkpoint=PATH ({LOCAL_FORMATS}); "
                       f"{available}")
    if pretraining is not None:
        entry = registry.get_pretraining(arch, pretraining)
        if num_classes is not None and num_classes != entry.num_classes:
            raise CheckpointError(f"{arch} {entry.name} has {entry.num_classes} classes, "
                                  f"not num_classes={num_classes}")
        params, meta = _released(entry, checkpoint, progress)
    else:
        assert checkpoint is not None
        params, meta = read_local(arch, checkpoint, num_classes)
    model = abstract_model(arch, meta["num_classes"], meta.get("clip_length"), dtype=dtype,
                                conv_impl=conv_impl)


    set_variables(model, params, source=f"{arch} weights")
    model.eval()
    return model


def read_local(arch: str, path: StrPath, num_classes: int | None = None
               ) -> tuple[dict[ParamPath, np.ndarray], dict[str, Any]]:
    """Weights from an Orbax directory or any supported file: (flat params, metadata)."""
    name = os.fsdecode(path)
    if os.path.isdir(name):
        params, meta = ckpt.restore(name, arch=arch)
        if num_classes is not None and num_classes != meta["num_classes"]:
            raise CheckpointError(f"{name}: the checkpoint has {meta['num_classes']} classes, "
                                  f"but num_classes={num_classes} was asked for")
        return params, meta
    from porting.convert import read_params

    params, info = read_params(name, arch, num_classes=num_classes)
    meta = {"arch": arch, "num_classes": info.num_classes, "clip_length": info.clip_length,
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
