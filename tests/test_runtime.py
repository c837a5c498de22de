"""Process-wide runtime settings (`vmz_jax.runtime`), each checked in a fresh interpreter."""

import json
import platform
import subprocess
import sys

import pytest

# A jitted step whose 32 MB temporary buffer (the product y) is allocated on every call; prints
# the page faults per call, and what reuse_host_memory returned before and after JAX started.
PROBE = """
import json, resource, sys
import jax, jax.numpy as jnp
from vmz_jax.runtime import reuse_host_memory
applied = reuse_host_memory() if sys.argv[1] == "reuse" else None
def step(x, w):
    y = jnp.tanh(x @ w)
    return jnp.sum(jnp.tanh(y @ w.T) * x)
step = jax.jit(step)
x, w = jnp.ones((2048, 1024), jnp.float32), jnp.full((1024, 4096), 1e-3, jnp.float32)
float(step(x, w))
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    float(step(x, w))
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5
print(json.dumps({"applied": applied, "faults": faults, "again": reuse_host_memory()}))
"""


def _probe(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                         check=True, timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's")
def test_reuse_host_memory_stops_faulting_in_each_calls_temporary_buffer():
    plain, reused = _probe("plain"), _probe("reuse")
    assert reused["applied"] is True
    if plain["faults"] < 4_000:  # 32 MB of fresh 4 KiB pages is 8k faults per call
        pytest.skip(f"this kernel backs a fresh block with huge pages ({plain['faults']} faults per "
                    "call): nothing to save here")
    assert reused["faults"] < plain["faults"] / 10, (plain, reused)
    # once JAX's backends run, the async-dispatch half cannot take effect: refused, nothing changed
    assert plain["again"] is False and reused["again"] is False
