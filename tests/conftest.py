"""Test-wide settings: small compiles (tiny inputs, optimizations mostly off) and float64 on demand."""

import os

# Tests run tiny inputs, where XLA's compile time dominates: most optimizations are not worth it.
os.environ.setdefault("VMZ_JAX_TEST", "1")

import jax  # noqa: E402

jax.config.update("jax_disable_most_optimizations", True)
jax.config.update("jax_enable_x64", True)  # float64 parity tests; float32 stays the default dtype


import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_code():
    """Drop every compiled executable after each test module. Each one keeps its code mapped (a
    jitted train step of a small model is ~900 memory maps with optimizations off), and a whole
    session of them passed Linux's default limit of 65530 maps per process, which makes XLA's
    compiler crash (segmentation fault or abort) in whichever test compiles next."""
    yield
    from vmz_jax.models import forward

    forward._jit.cache_clear()
    forward._pure.cache_clear()
    jax.clear_caches()


@pytest.fixture(autouse=True)
def _release_after_slow_tests(request):
    """A full-size (slow) test compiles 101- and 152-layer models: free them after each such test,
    not only at the end of its module."""
    yield
    if request.node.get_closest_marker("slow") is not None:
        jax.clear_caches()


@pytest.fixture(autouse=True)
def _forget_a_test_compilation_cache():
    """A CLI command run in the test process points JAX's on-disk compilation cache at the test's
    VMZ_JAX_HOME; JAX keeps writing there (its cache is set up once per process) after that folder
    is deleted. Reset it after any test that set it, so later tests compile without a disk cache."""
    before = jax.config.jax_compilation_cache_dir
    yield
    if jax.config.jax_compilation_cache_dir != before:
        from jax.experimental.compilation_cache import compilation_cache

        jax.config.update("jax_compilation_cache_dir", before)
        compilation_cache.reset_cache()


@pytest.fixture
def bfloat16_cpu(monkeypatch):
    """Trace bfloat16 as on a CPU with bfloat16 instructions, whatever this one has: a CPU without
    them computes bfloat16 models in float32 (`conv.compute_dtype`), so tests of the bfloat16 path
    would otherwise check float32 on such hosts."""
    from vmz_jax.models import conv

    monkeypatch.setattr(conv, "cpu_has_bfloat16", lambda: True)
