"""Training exactness against the PyTorch reference, and the training recipe of `TrainConfig`.

Float64, train mode (batch statistics), random non-symmetric weights and BatchNorm statistics
(`vmz_torch.randomize_`): the loss and every gradient equal torch's within 1e-10 relative, and after
two `optax.sgd(lr, momentum=0.9)` steps through `train_step` the weights and the BatchNorm running
statistics equal torch.optim.SGD's. Then the recipe: parameter groups, weight-decay mask, head
multiplier, schedules, freezing (bitwise), frozen BatchNorm, dropout, accumulation, clipping,
label smoothing, bfloat16 compute, on tiny inputs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

from porting.torch_names import model_layout, torch_to_params
from vmz_jax.errors import VMZError
from vmz_jax.models import build
from vmz_jax.models.variables import get_variables, set_variables, variable_shapes
from vmz_jax.reference import vmz_torch
from vmz_jax.train import (
    TrainConfig,
    apply_train_mode,
    eval_step,
    learning_rate,
    make_optimizer,
    make_schedule,
    param_groups,
    train_step,
)
from vmz_jax.train.optim import _keys

CLASSES = 5
TOL = 1e-10


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The float64 reference on tiny inputs: one thread is 5x faster than two on a busy runner."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pair64(arch: str, clip_length: int, seed: int = 0) -> tuple[torch.nn.Module, nnx.Module]:
    """The float64 reference and our float64 model with the same float32-representable weights."""
    ref = vmz_torch.build(arch, num_classes=CLASSES, clip_length=clip_length)
    vmz_torch.randomize_(ref, seed)
    state = {k: v.numpy() for k, v in ref.state_dict().items() if v.is_floating_point()}
    ref.double().train()
    model = nnx.eval_shape(lambda: build(arch, CLASSES, clip_length=clip_length, dtype=jnp.float64,
                                         param_dtype=jnp.float64, rngs=nnx.Rngs(0)))
    set_variables(model, torch_to_params(state, variable_shapes(model), source=arch), source=arch)
    model.train()
    return ref, model


def ours_as_torch(model: nnx.Module, flat: dict) -> dict[str, np.ndarray]:
    """Our flat {path: array} -> {torch name: float64 array in torch's layout}."""
    out = {}
    for name, slot in model_layout(variable_shapes(model)).items():
        value = np.asarray(flat[slot.path], np.float64)
        if slot.index is not None:
            value = value[slot.index]
        out[name] = slot.transform.to_external(value)
    return out


def relative(got: np.ndarray, want: np.ndarray) -> float:
    assert got.shape == want.shape
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-300))


def recording(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """`tx` that also keeps the last gradients in its state: one compiled `train_step` then yields
    both the gradients and the update (compiling a separate gradient function costs as much again)."""
    def init(params):
        return {"grads": jax.tree.map(jnp.zeros_like, params), "inner": tx.init(params)}

    def update(grads, state, params=None):
        updates, inner = tx.update(grads, state["inner"], params)
        return updates, {"grads": grads, "inner": inner}

    return optax.GradientTransformation(init, update)


# (arch, input N, T, H, W): one per family, big enough that layer4's BatchNorms see >= 8 values.
# Each compiles a float64 training step (30-90 s on a busy 2-core runner): one in the fast suite,
# the rest (bottlenecks, max-pool, pointwise and depthwise convs, mixed 2-D/3-D) marked slow.
FAMILIES = [
    ("r2plus1d_10", (2, 4, 32, 32)),
    pytest.param("ip_csn_26", (2, 4, 48, 48), marks=pytest.mark.slow),
    pytest.param("r3d_10", (2, 4, 32, 32), marks=pytest.mark.slow),
    pytest.param("mc3_18", (2, 4, 32, 32), marks=pytest.mark.slow),
    pytest.param("rmc3_18", (2, 4, 32, 32), marks=pytest.mark.slow),
    pytest.param("ir_csn_26", (2, 4, 48, 48), marks=pytest.mark.slow),
    pytest.param("r2d_18", (2, 4, 32, 32), marks=pytest.mark.slow),
    pytest.param("c3d", (2, 16, 112, 112), marks=pytest.mark.slow),
]


@pytest.mark.parametrize("arch,shape", FAMILIES)
def test_float64_loss_gradients_and_sgd_steps_equal_torch(arch, shape):
    n, t, h, w = shape
    ref, model = pair64(arch, clip_length=t, seed=1)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((n, t, h, w, 3))
    labels = rng.integers(0, CLASSES, n)
    xt = torch.from_numpy(x.transpose(0, 4, 1, 2, 3).copy())
    lt = torch.from_numpy(labels)
    if arch == "c3d":  # its dropouts are random: compare the deterministic network
        ref.dropout6.p = ref.dropout7.p = 0.0
        model.dropout6.rate = model.dropout7.rate = 0.0

    # two SGD steps with momentum (the second one uses the momentum buffer); the first step's
    # gradients are those at the starting weights
    optimizer = nnx.Optimizer(model, recording(optax.sgd(0.05, momentum=0.9)), wrt=nnx.Param)
    torch_opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    for step in range(2):
        metrics = train_step(model, optimizer, jnp.asarray(x), jnp.asarray(labels))
        torch_opt.zero_grad()
        torch_loss = torch.nn.functional.cross_entropy(ref(xt), lt)
        torch_loss.backward()
        torch_opt.step()
        assert abs(float(metrics["loss"]) - torch_loss.item()) <= TOL * abs(torch_loss.item())
        if step == 0:
            flat = {_keys(p): np.asarray(v)
                    for p, v in jax.tree_util.tree_flatten_with_path(optimizer.opt_state["grads"])[0]}
            shapes = variable_shapes(model)
            ours = ours_as_torch(model, {p: flat.get(p, np.zeros(s)) for p, s in shapes.items()})
            torch_grads = {k: v.grad.numpy() for k, v in ref.named_parameters()}
            assert set(flat) == {p for p in shapes if p[-1] not in ("mean", "var")}
            for name, grad in torch_grads.items():
                assert relative(ours[name], grad) < TOL, name
    after = ours_as_torch(model, get_variables(model))
    torch_after = {k: v.numpy() for k, v in ref.state_dict().items() if v.is_floating_point()}
    assert after.keys() == torch_after.keys()
    for name, value in torch_after.items():
        assert relative(after[name], value) < TOL, name


# ---- the recipe ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    """r3d_10 and a 2x4x16x16 batch: the cheapest complete network."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 4, 16, 16, 3)), jnp.float32)
    return x, jnp.array([1, 3])


def fresh(arch: str = "r3d_10") -> nnx.Module:
    return build(arch, CLASSES, rngs=nnx.Rngs(0))


def test_config_round_trips_and_rejects_bad_values():
    config = TrainConfig(freeze=["stem"], step_epochs=[2, 4], schedule="step", clip_grad_norm=40.0)
    assert config.freeze == ("stem",) and TrainConfig.from_dict(config.to_dict()) == config
    assert TrainConfig.from_dict({}) == TrainConfig()
    assert hash(config) == hash(TrainConfig.from_dict(config.to_dict()))
    for bad, fragment in [({"optimizer": "lamb"}, "optimizer='lamb'"), ({"lr": -1.0}, "lr=-1.0"),
                          ({"dropout": 1.0}, "dropout"), ({"accumulate": 0}, "accumulate=0"),
                          ({"step_epochs": [4, 2]}, "increasing"), ({"clip_grad_norm": 0}, "clip_grad_norm"),
                          ({"bn": "off"}, "bn='off'"), ({"epoch": 3}, r"unknown field\(s\) epoch")]:
        with pytest.raises(VMZError, match=fragment):
            TrainConfig.from_dict(bad)


def test_groups_decay_mask_and_head_multiplier():
    model = fresh()
    config = TrainConfig(lr=0.1, momentum=0.0, weight_decay=0.5, head_lr_mult=10.0, freeze=("layer1",),
                         schedule="step")
    groups = param_groups(model, config)
    assert groups["head"] == ["fc.bias", "fc.kernel"]
    assert groups["frozen"] and all(p.startswith("layer1.") for p in groups["frozen"])
    with pytest.raises(VMZError, match="no stage 'layer9'.* available: backbone, stem, layer1"):
        make_optimizer(model, config.replace(freeze=("layer9",)), 10)

    optimizer = make_optimizer(model, config, 10)
    params = nnx.as_pure(nnx.state(model, nnx.Param))
    ones = jax.tree.map(jnp.ones_like, params)
    updates, _ = optimizer.tx.update(ones, optimizer.opt_state, params)
    flat_p = {_keys(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    flat_u = {_keys(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(updates)[0]}
    assert flat_u.keys() == flat_p.keys() and len(flat_p) == 38
    for path, u in flat_u.items():
        p = flat_p[path]
        if path[0] == "layer1":
            want = np.zeros_like(p)  # frozen
        else:
            lr = 0.1 * (10.0 if path[0] == "fc" else 1.0)
            decay = 0.5 if path[-1] == "kernel" else 0.0  # never BN scale/bias, never biases
            want = -lr * (1.0 + decay * p)
        np.testing.assert_allclose(u, want, rtol=1e-6, atol=1e-7, err_msg=".".join(path))


def test_schedules():
    cosine = make_schedule(TrainConfig(lr=1.0, epochs=2, warmup_steps=2), 5)  # 10 updates
    assert [round(float(cosine(i)), 6) for i in (0, 1, 2)] == [0.0, 0.5, 1.0]
    assert float(cosine(6)) == pytest.approx(0.5) and float(cosine(10)) == pytest.approx(0.0)
    step = make_schedule(TrainConfig(lr=1.0, epochs=4, schedule="step", step_epochs=(1, 3), gamma=0.1), 5)
    assert [float(step(i)) for i in (0, 4, 5, 14, 15, 19)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    # with accumulation the schedule counts updates: 10 batches per epoch, 5 updates
    accumulated = make_schedule(TrainConfig(lr=1.0, epochs=1, accumulate=2), 10)
    assert float(accumulated(5)) == pytest.approx(0.0) and float(accumulated(0)) == 1.0


def test_frozen_stages_are_bitwise_unchanged_and_the_rest_trains(tiny):
    x, y = tiny
    model = fresh()
    config = TrainConfig(freeze=("stem", "layer1"), clip_grad_norm=1.0, label_smoothing=0.1, dropout=0.5,
                         accumulate=2, weight_decay=1e-2, lr=0.1)
    apply_train_mode(model, config)
    assert model.dropout.rate == 0.5 and model.stem.conv.bn.frozen and not model.layer2.first.conv1.bn.frozen
    optimizer = make_optimizer(model, config, 4)
    before = get_variables(model)
    metrics = train_step(model, optimizer, x, y, label_smoothing=config.label_smoothing)
    assert set(metrics) == {"loss", "accuracy"} and np.isfinite(float(metrics["loss"]))
    middle = get_variables(model)
    # accumulating: no parameter moved after the first of two batches; BatchNorm statistics did
    assert all(np.array_equal(before[p], middle[p]) for p in before if p[-1] not in ("mean", "var"))
    assert not np.array_equal(before[("layer2", "first", "conv1", "bn", "mean")],
                              middle[("layer2", "first", "conv1", "bn", "mean")])
    train_step(model, optimizer, x, y, label_smoothing=config.label_smoothing)
    after = get_variables(model)
    for path in before:
        unchanged = np.array_equal(before[path], after[path])
        assert unchanged == (path[0] in ("stem", "layer1")), ".".join(path)
    assert learning_rate(optimizer) == pytest.approx(float(make_schedule(config, 4)(1)))


@pytest.mark.slow
def test_frozen_batchnorm_trains_only_convolutions_and_head(tiny):
    x, y = tiny
    model = fresh()
    config = TrainConfig(bn="frozen", lr=0.1)
    apply_train_mode(model, config)
    optimizer = make_optimizer(model, config, 1)
    before = get_variables(model)
    train_step(model, optimizer, x, y)
    after = get_variables(model)
    for path in before:
        assert np.array_equal(before[path], after[path]) == (path[-2] == "bn"), ".".join(path)
    # frozen BatchNorm in train mode computes what eval mode computes
    model.dropout.rate = 0.0
    train_logits = nnx.jit(lambda m, v: m(v))(model, x)
    model.eval()
    np.testing.assert_allclose(np.asarray(train_logits), np.asarray(nnx.jit(lambda m, v: m(v))(model, x)),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_dropout_changes_nothing_in_eval_and_no_parameter_tree(tiny):
    x, y = tiny
    model = fresh()
    shapes = variable_shapes(model)
    model.eval()
    want = np.asarray(eval_step(model, x, y)["logits"])
    apply_train_mode(model, TrainConfig(dropout=0.9, bn="frozen"))  # frozen BN: only dropout differs
    assert variable_shapes(model) == shapes
    forward = nnx.jit(lambda m, v: m(v))
    dropped = np.asarray(forward(model, x))
    assert not np.allclose(dropped, want, rtol=1e-3)  # active in training
    model.dropout.rate = 0.0
    np.testing.assert_allclose(np.asarray(forward(model, x)), want, rtol=1e-5, atol=1e-6)
    model.dropout.rate = 0.9
    model.eval()
    np.testing.assert_array_equal(np.asarray(eval_step(model, x, y)["logits"]), want)


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_master_weights(tiny):
    x, y = tiny
    model = fresh()
    config = TrainConfig(dtype="bfloat16", lr=0.01)
    apply_train_mode(model, config)
    assert model.stem.conv.dtype == jnp.bfloat16
    optimizer = make_optimizer(model, config, 1)
    metrics = train_step(model, optimizer, x, y)
    assert np.isfinite(float(metrics["loss"]))
    assert all(v.dtype == np.float32 for v in get_variables(model).values())


def test_bad_batches_are_refused(tiny):
    x, y = tiny
    model = fresh()
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
    with pytest.raises(ValueError, match="labels must be integer"):
        train_step(model, optimizer, x, y.astype(jnp.float32))
    with pytest.raises(ValueError, match=r"expected labels \(2,\)"):
        train_step(model, optimizer, x, y[:1])
    with pytest.raises(ValueError, match=r"expected clips \(N, T, H, W, 3\)"):
        eval_step(model, x[..., :2], y)


# ---- donation -------------------------------------------------------------------------------------


def test_the_step_donates_model_and_optimizer_and_they_stay_usable(tiny):
    """One copy of the weights and optimizer state: XLA aliases every input buffer of the model and
    optimizer with its output; the objects (and a forward built before) see the new values, arrays
    taken out before are deleted, and `donate=False` keeps them."""
    from vmz_jax.models.forward import make_forward
    from vmz_jax.train.step import lower_train_step

    x, y = tiny
    model = fresh()
    model.train()
    optimizer = nnx.Optimizer(model, optax.sgd(0.1, momentum=0.9), wrt=nnx.Param)
    forward = make_forward(model)
    state_bytes = sum(v.nbytes for obj in (model, optimizer) for v in jax.tree.leaves(nnx.state(obj)))
    memory = lower_train_step(model, optimizer, x, y).compile().memory_analysis()
    assert memory.alias_size_in_bytes >= state_bytes > 0
    kernel = model.fc.kernel[...]
    losses = [float(train_step(model, optimizer, x, y)["loss"]) for _ in range(2)]
    assert kernel.is_deleted() and losses[1] < losses[0]
    model.eval()
    np.testing.assert_allclose(np.asarray(forward(x)), np.asarray(make_forward(model)(x)), rtol=1e-6)
    model.train()
    kept = model.fc.kernel[...]
    train_step(model, optimizer, x, y, donate=False)
    assert not kept.is_deleted()
    assert not np.array_equal(np.asarray(kept), np.asarray(model.fc.kernel[...]))


def test_a_model_and_optimizer_sharing_arrays_step_without_donation(tiny):
    """An optimizer state that holds the parameters themselves (as some optax transforms' do)
    cannot be donated twice: the step runs undonated, with the same result."""
    x, y = tiny

    def holding_params(tx):
        def init(params):
            return {"params": params, "inner": tx.init(params)}

        def update(grads, state, params=None):
            updates, inner = tx.update(grads, state["inner"], params)
            return updates, {"params": params, "inner": inner}

        return optax.GradientTransformation(init, update)

    results = []
    for tx in (optax.sgd(0.1), holding_params(optax.sgd(0.1))):
        model = fresh()
        model.train()
        optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
        train_step(model, optimizer, x, y)
        results.append(np.asarray(model.fc.kernel[...]))
    np.testing.assert_array_equal(results[0], results[1])


DATA_PARALLEL = """
import json, sys
import jax, jax.numpy as jnp, numpy as np, optax
jax.config.update("jax_enable_x64", True)
from flax import nnx
from vmz_jax.models import build
from vmz_jax.models.variables import get_variables
from vmz_jax.train import data_mesh, replicate, shard_batch, train_step

assert jax.device_count() == 2, jax.devices()
rng = np.random.default_rng(0)
x = rng.standard_normal((4, 4, 16, 16, 3))
y = np.array([0, 1, 2, 3])
out = {}
for name in ("one", "two"):
    model = build("r3d_10", 5, dtype=jnp.float64, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
    model.train()
    optimizer = nnx.Optimizer(model, optax.sgd(0.1, momentum=0.9), wrt=nnx.Param)
    if name == "two":
        mesh = data_mesh()
        replicate(mesh, model, optimizer)
        clips, labels = shard_batch(mesh, x, y)
        assert len(clips.sharding.device_set) == 2
    else:
        clips, labels = jax.device_put(x, jax.devices()[0]), jax.device_put(y, jax.devices()[0])
    kernel = model.fc.kernel[...]
    losses = [float(train_step(model, optimizer, clips, labels)["loss"]) for _ in range(2)]
    assert kernel.is_deleted()  # donated, on one device and on two
    out[name] = (losses, get_variables(model))
(l1, v1), (l2, v2) = out["one"], out["two"]
worst = max(float(np.max(np.abs(v1[p] - v2[p])) / max(np.max(np.abs(v1[p])), 1e-30)) for p in v1)
print(json.dumps({"losses": [l1, l2], "worst": worst}))
"""


@pytest.mark.slow
def test_data_parallel_over_two_devices_equals_one_device(tmp_path):
    """The batch split over two (CPU) devices: same losses, weights and BatchNorm statistics as on one
    device, because the statistics are reduced over the global batch (float64, so that any other
    normalization, e.g. per device, would show far above the tolerance)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.run([sys.executable, "-c", DATA_PARALLEL], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    (one, two) = result["losses"]
    assert one == pytest.approx(two, rel=1e-10)
    assert result["worst"] < 1e-9
