"""Test-wide settings: small compiles (tiny inputs, optimizations mostly off) and float64 on demand."""

import os

# Tests run tiny inputs, where XLA's compile time dominates: most optimizations are not worth it.
os.environ.setdefault("VMZ_JAX_TEST", "1")

import jax  # noqa: E402

jax.config.update("jax_disable_most_optimizations", True)
jax.config.update("jax_enable_x64", True)  # float64 parity tests; float32 stays the default dtype
