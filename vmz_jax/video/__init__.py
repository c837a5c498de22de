"""Videos in, model inputs out: decoding (ffmpeg), the exact resize and crops, clip sampling, input
lists, class names, the audio track's log-mels (`audio`) and the batched extract/classify engine."""

from vmz_jax.lazy import lazy_submodules

__getattr__ = lazy_submodules(__name__)  # `vmz_jax.<this>.<module>` without importing the module first
