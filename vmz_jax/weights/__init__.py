"""Released weights and checkpoints: the table of released files, the downloader, Orbax
checkpoints and `load`/`save`."""

from vmz_jax.lazy import lazy_submodules

__getattr__ = lazy_submodules(__name__)  # `vmz_jax.<this>.<module>` without importing the module first
