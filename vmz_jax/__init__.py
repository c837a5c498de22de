"""vmz-jax: Facebook's VMZ video models (R(2+1)D, R3D, MCx, rMCx, ir-CSN, ip-CSN, C3D) in Flax NNX."""

from __future__ import annotations

from vmz_jax import export, models
from vmz_jax.compare import compare
from vmz_jax.errors import CheckpointError, DownloadError, VMZError
from vmz_jax.evaluation import evaluate
from vmz_jax.version import __version__
from vmz_jax.weights.loading import list_pretrainings, load, save


def list_models() -> list[str]:
    """Every architecture name `vmz_jax.models.build` accepts."""
    return list(models.ARCHS)


__all__ = [
    "__version__",
    "CheckpointError",
    "DownloadError",
    "VMZError",
    "compare",
    "evaluate",
    "export",
    "list_models",
    "list_pretrainings",
    "load",
    "models",
    "save",
]
