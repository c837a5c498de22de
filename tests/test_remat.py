"""Rematerialization: the same loss, gradients and BatchNorm updates with every remat mode, the same
state (checkpoints unchanged), and really less kept memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vmz_jax.errors import VMZError
from vmz_jax.models import build
from vmz_jax.models.remat import REMAT_MODES, set_remat
from vmz_jax.train import TrainConfig

CLASSES = 5

# float64 (1e-12): one per family that checkpoints differently: (2+1)D basic blocks with scanned
# stages, ir-CSN bottlenecks with the max-pooling stem, ip-CSN's pointwise + depthwise pair, a mixed
# 3-D/2-D network, and C3D's conv groups (its fixed 16x112x112 input makes it the slowest).
# float32 (1e-6): the recomputed forward may round differently from the kept one (XLA fuses it
# differently); measured on C3D: 1.7e-6 on one BatchNorm gradient, so it is checked on the ResNets.
CASES = [
    ("r2plus1d_16", (2, 4, 16, 16), jnp.float64, 1e-12),
    ("r2plus1d_16", (2, 4, 16, 16), jnp.float32, 1e-6),
    pytest.param("ir_csn_26", (2, 4, 32, 32), jnp.float64, 1e-12, marks=pytest.mark.slow),
    pytest.param("ir_csn_26", (2, 4, 32, 32), jnp.float32, 1e-6, marks=pytest.mark.slow),
    pytest.param("ip_csn_26", (2, 4, 32, 32), jnp.float64, 1e-12, marks=pytest.mark.slow),
    pytest.param("mc3_18", (2, 4, 16, 16), jnp.float64, 1e-12, marks=pytest.mark.slow),
    pytest.param("c3d", (1, 16, 112, 112), jnp.float64, 1e-12, marks=pytest.mark.slow),
]


def model_of(arch: str, dtype: jnp.dtype) -> nnx.Module:
    model = build(arch, CLASSES, clip_length=4 if arch != "c3d" else 16, dtype=dtype, param_dtype=dtype,
                  rngs=nnx.Rngs(0))
    if arch == "c3d":  # its dropouts are random: compare the deterministic network
        model.dropout6.rate = model.dropout7.rate = 0.0
    # non-trivial running statistics, so that a lost BatchNorm update would show
    stats = nnx.state(model, nnx.BatchStat)
    rng = np.random.default_rng(1)
    nnx.update(model, jax.tree.map(lambda v: jnp.asarray(rng.uniform(0.5, 1.5, v.shape), v.dtype), stats))
    model.train()
    return model


@nnx.jit
def loss_and_grads(model: nnx.Module, x: jax.Array, y: jax.Array) -> tuple[jax.Array, nnx.State]:
    def loss(model: nnx.Module) -> jax.Array:
        logits = model(x)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))

    return nnx.value_and_grad(loss)(model)


def relative(got: jax.Array, want: jax.Array) -> float:
    got, want = np.asarray(got), np.asarray(want)
    return float(np.max(np.abs(got - want)) / max(float(np.max(np.abs(want))), 1e-300))


@pytest.mark.parametrize("arch,shape,dtype,tol", CASES)
def test_loss_gradients_and_statistics_equal_none(arch, shape, dtype, tol):
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((*shape, 3)), dtype)
    y = jnp.asarray(rng.integers(0, CLASSES, shape[0]))
    results = {}
    for mode in REMAT_MODES:
        model = set_remat(model_of(arch, dtype), mode)
        loss, grads = loss_and_grads(model, x, y)
        results[mode] = (loss, grads, nnx.state(model, nnx.BatchStat))
    loss0, grads0, stats0 = results["none"]
    for mode in ("blocks", "full"):
        loss, grads, stats = results[mode]
        assert relative(loss, loss0) <= tol, mode
        assert jax.tree.structure(grads) == jax.tree.structure(grads0)
        for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(grads0), strict=True):
            assert relative(got, want) <= tol, mode
        for got, want in zip(jax.tree.leaves(stats), jax.tree.leaves(stats0), strict=True):
            assert relative(got, want) <= tol, mode


def test_the_compiled_training_step_equals_none():
    """`train_step` compiles a rematerializing model with options of its own (on CPU the checkpoints'
    optimization barriers stay in the program XLA runs, `REMAT_COMPILER_OPTIONS`): two SGD-momentum
    steps of r3d_10, whose checkpoints are all outside a scanned stage, give "none"'s losses, weights
    and BatchNorm statistics in float64."""
    import optax

    from vmz_jax.train import train_step

    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((2, 4, 16, 16, 3)), jnp.float64)
    y = jnp.asarray(rng.integers(0, CLASSES, 2), jnp.int32)
    results = {}
    for mode in REMAT_MODES:
        model = set_remat(model_of("r3d_10", jnp.float64), mode)
        optimizer = nnx.Optimizer(model, optax.sgd(0.05, momentum=0.9), wrt=nnx.Param)
        losses = [float(train_step(model, optimizer, x, y)["loss"]) for _ in range(2)]
        results[mode] = losses, nnx.state(model, (nnx.Param, nnx.BatchStat))
    losses0, state0 = results["none"]
    for mode in ("blocks", "full"):
        losses, state = results[mode]
        np.testing.assert_allclose(losses, losses0, rtol=1e-12)
        for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(state0), strict=True):
            assert relative(got, want) <= 1e-12, mode


def test_fit_with_remat_trains_as_none_and_keeps_the_mode_in_its_run(tmp_path):
    """`fit(..., TrainConfig(remat="blocks"))`, the path of `vmz-jax finetune --remat`: the model it
    trains rematerializes, the per-step losses and final weights are none's (float32: the recomputed
    forward may round differently), the run's config.json records the mode, and the same run directory
    refuses another mode."""
    import json

    from vmz_jax.errors import VMZError
    from vmz_jax.models.remat import rematerializes
    from vmz_jax.train import ArrayDataset, fit
    from vmz_jax.train.reporting import read_metrics

    rng = np.random.default_rng(4)
    data = ArrayDataset(rng.normal(size=(4, 4, 8, 8, 3)).astype(np.float32), [0, 1, 2, 0])
    results = {}
    for mode in ("none", "blocks"):
        model = build("r3d_10", 3, clip_length=4, rngs=nnx.Rngs(0))
        config = TrainConfig(epochs=1, batch_size=2, lr=0.05, remat=mode)
        fit(model, data, None, config, tmp_path / mode, progress=False)
        assert rematerializes(model) == (mode != "none")
        losses = [r["loss"] for r in read_metrics(tmp_path / mode) if "loss" in r]
        results[mode] = losses, nnx.state(model, nnx.Param)
    assert len(results["none"][0]) == 2
    np.testing.assert_allclose(results["blocks"][0], results["none"][0], rtol=1e-5)
    for got, want in zip(jax.tree.leaves(results["blocks"][1]), jax.tree.leaves(results["none"][1]),
                         strict=True):
        assert relative(got, want) <= 1e-5
    assert json.loads((tmp_path / "blocks" / "config.json").read_text())["config"]["remat"] == "blocks"
    with pytest.raises(VMZError, match="another configuration"):
        fit(build("r3d_10", 3, clip_length=4, rngs=nnx.Rngs(0)), data, None, config.replace(remat="full"),
            tmp_path / "blocks", progress=False)


def test_remat_is_no_part_of_the_state_and_really_recomputes():
    """The state tree is the same in every mode; the differentiated program recomputes convolutions:
    "blocks" the widening ones, "full" every one (counted on the plain `lax` convolutions). The memory
    this saves shows on real shapes only (tiny inputs are dominated by the gradients of the weights):
    docs/benchmarks.md, "Training memory"."""
    model = build("r2plus1d_16", CLASSES, conv_impl="reference", rngs=nnx.Rngs(0))
    model.train()
    structure = jax.tree.structure(nnx.state(model))
    x = jnp.ones((2, 4, 16, 16, 3))
    convs, remats = {}, {}
    for mode in REMAT_MODES:
        set_remat(model, mode)
        assert jax.tree.structure(nnx.state(model)) == structure
        jaxpr = str(jax.make_jaxpr(lambda m: nnx.value_and_grad(lambda m: jnp.sum(m(x)))(m))(model))
        convs[mode], remats[mode] = jaxpr.count("conv_general_dilated["), jaxpr.count("remat")
    # 33 convolutions (stem pair, 7 blocks of two (2+1)D pairs, 3 shortcuts), each with a forward and
    # two gradients; the stem, 4 first blocks and 3 scan bodies checkpointed
    assert convs["none"] == 98 and convs["none"] < convs["blocks"] < convs["full"], convs
    assert remats["none"] == 0 and remats["blocks"] == remats["full"] == 8, remats


def test_bad_modes_are_refused():
    with pytest.raises(VMZError, match="unknown remat mode 'some'"):
        set_remat(build("r3d_10", CLASSES, rngs=nnx.Rngs(0)), "some")
    with pytest.raises(VMZError, match="TrainConfig.remat"):
        TrainConfig(remat="some")
    assert TrainConfig(remat="blocks").remat == "blocks"
