"""Batcher: examples of many groups, bucketed by shape and padded, come back whole per group."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vmz_jax.models.forward import make_forward
from vmz_jax.video.batcher import Batcher, Engine


@pytest.fixture(scope="module")
def linear():
    layer = nnx.Linear(4, 2, rngs=nnx.Rngs(0))
    layer.bias[...] = jnp.array([0.5, -1.0], jnp.float32)
    return layer


def _batcher(linear, batch_size=3):
    # The output carries a row sum of the input too, so that a row given to the wrong key shows.
    fwd = make_forward(linear, lambda net, x: {"y": net(x), "sum": x.sum(axis=-1)})
    return Batcher(Engine(fwd, batch_size))


def _want(linear, x):
    return {"y": np.asarray(linear(jnp.asarray(x))), "sum": x.sum(axis=-1)}


def test_groups_come_back_whole_with_their_own_rows(linear):
    b = _batcher(linear)
    rng = np.random.default_rng(0)
    examples = {("a", i): rng.standard_normal(4).astype(np.float32) for i in range(4)}
    examples[("b", 0)] = rng.standard_normal(4).astype(np.float32)
    examples[("b", 1)] = rng.standard_normal((2, 4)).astype(np.float32)  # another shape: its own bucket
    for (group, key), x in examples.items():
        b.add(group, key, x)
    assert b.batches == 1 and b.queued == 3  # a0 a1 a2 filled one batch
    b.close("a")
    b.poll()
    assert b.take() == []  # a3 is still queued
    b.close("b")
    b.finish()
    done = {d.group: d.outputs for d in b.take()}
    assert set(done) == {"a", "b"} and b.take() == []
    assert set(done["a"]) == {0, 1, 2, 3} and set(done["b"]) == {0, 1}
    for (group, key), x in examples.items():
        got, want = done[group][key], _want(linear, x)
        np.testing.assert_allclose(got["y"], want["y"], rtol=1e-6)
        np.testing.assert_allclose(got["sum"], want["sum"], rtol=1e-6)
    assert b.batches == 3 and b.padded_rows == 1 + 2  # [a3, b0, pad] and [b1, pad, pad]


def test_discard_flush_closed_only_and_empty_groups(linear):
    b = _batcher(linear)
    x = np.ones(4, np.float32)
    b.add("open", 0, x)
    b.add("closed", 0, x[None])  # a bucket of its own
    b.add("dropped", 0, x[None])
    b.discard("dropped")  # its queued example leaves the bucket
    b.close("closed")
    with pytest.raises(ValueError, match="closed"):
        b.add("closed", 1, x)
    b.close("empty")  # no examples: complete at once
    assert [d.group for d in b.take()] == ["empty"]
    b.flush(closed_only=True)  # only the bucket nobody waits on runs
    assert b.batches == 1 and b.queued == 1 and b.padded_rows == 2
    b.finish()
    assert [d.group for d in b.take()] == ["closed"]  # "open" is never closed, "dropped" is gone
