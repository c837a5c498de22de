"""`vmz_jax.train.memory` and `vmz-jax bench --train --memory`: XLA's memory analysis of the compiled
training step, without allocating the model or running anything."""

import json

import jax
import numpy as np
from flax import nnx

from vmz_jax.cli import main
from vmz_jax.models import build
from vmz_jax.train.memory import format_report, train_memory


def run(capsys, *argv: object) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse's own usage errors
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def test_the_step_donates_the_weights_and_optimizer_state():
    report = train_memory("r3d_10", (2, 4, 16, 16), num_classes=5)
    built = build("r3d_10", 5, rngs=nnx.Rngs(0))
    assert report.param_bytes == sum(x.nbytes for x in jax.tree.leaves(nnx.state(built, nnx.Param)))
    # SGD momentum holds one more copy of the parameters (and a step count)
    assert report.param_bytes < report.optimizer_bytes < report.param_bytes + 64
    assert report.donated_enough and report.train.aliased >= report.param_bytes + report.optimizer_bytes
    t = report.train
    assert t.argument >= report.model_state_bytes + report.optimizer_bytes + 2 * 4 * 16 * 16 * 3 * 4
    assert t.temp > 0 and t.peak == t.argument + t.output - t.aliased + t.temp
    assert report.forward is not None and 0 < report.forward.temp < t.temp
    text = format_report(report)
    assert "aliased (donated)" in text and ">= parameters + optimizer state" in text
    assert report.platform == jax.default_backend()


def test_the_cli_prints_and_writes_the_analysis(capsys, tmp_path):
    path = tmp_path / "m.json"
    code, out, err = run(capsys, "bench", "--train", "r3d_10", "--shape", "1x4x16x16", "--memory",
                         "--remat", "full", "--json", path)
    assert code == 0, err
    assert "remat full" in out and "peak" in out
    (row,) = json.loads(path.read_text())
    assert row["arch"] == "r3d_10" and row["remat"] == "full" and row["shape"] == [1, 4, 16, 16]
    assert row["donated_enough"] is True
    train = row["train"]
    assert train["peak"] == train["argument"] + train["output"] - train["aliased"] + train["temp"]
    assert np.isfinite(train["temp"]) and train["temp"] > 0


def test_bad_memory_requests_are_one_line_errors(capsys, tmp_path):
    code, out, err = run(capsys, "bench", "r3d_10", "--memory")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--train --memory" in err, err
    code, out, err = run(capsys, "bench", "--train", "r3d_10", "--remat", "blocks")
    assert code == 2 and "--train --memory" in err, err
    code, out, err = run(capsys, "bench", "--train", "no_such_arch", "--memory")
    assert code == 2 and "no_such_arch" in err, err
    code, out, err = run(capsys, "bench", "--train", "r3d_10", "--memory", "--remat", "most")
    assert code == 2 and "most" in err
    assert not list(tmp_path.iterdir())


def test_a_rematerializing_step_uses_the_memory_optimized_cpu_scheduler():
    """remat "blocks" compiles the step with `REMAT_COMPILER_OPTIONS` (on CPU, XLA's memory-optimized
    scheduler): fewer temp bytes than the same step under XLA's default scheduler; remat "none" keeps
    the default (the fastest)."""
    import jax.numpy as jnp
    import optax
    import pytest

    from vmz_jax.models.remat import REMAT_COMPILER_OPTIONS, set_remat
    from vmz_jax.train.step import compiled_train_step, lower_train_step

    if jax.default_backend() not in REMAT_COMPILER_OPTIONS:
        pytest.skip("no options for this backend")

    def make():
        model = build("r2plus1d_10", 5, rngs=nnx.Rngs(0))
        return model, nnx.Optimizer(model, optax.sgd(0.1, momentum=0.9), wrt=nnx.Param)

    x, y = jax.ShapeDtypeStruct((2, 4, 32, 32, 3), jnp.float32), jax.ShapeDtypeStruct((2,), jnp.int32)
    temps = {}
    for mode in ("none", "blocks"):
        model, optimizer = nnx.eval_shape(make)
        model.train()
        set_remat(model, mode)
        ours = lower_train_step(model, optimizer, x, y).compile().memory_analysis().temp_size_in_bytes
        graphdef, state = nnx.split((model, optimizer))
        default = compiled_train_step(jax.default_backend(), donate=True, remat=False).lower(
            graphdef, state, x, y, 0.0, None).compile().memory_analysis().temp_size_in_bytes
        temps[mode] = ours, default
    assert temps["none"][0] == temps["none"][1]
    assert temps["blocks"][0] < 0.85 * temps["blocks"][1], temps


def test_the_compiled_step_really_recomputes_checkpointed_blocks():
    """XLA's CPU pipeline drops `jax.checkpoint`'s optimization barriers before its common-subexpression
    passes unless told not to (`REMAT_COMPILER_OPTIONS`), which merged every recomputation outside a
    loop back into the forward pass. r3d_10 has one block per stage, so no scanned stage: counted in
    the compiled step, with the plain `lax` convolutions, "full" runs every convolution of the forward
    pass once more (each block's and the stem's, recomputed) than "none", "blocks" some of them (with
    the barriers dropped: "none" 35, "blocks" 35, "full" 37)."""
    import jax.numpy as jnp
    import optax
    import pytest

    from vmz_jax.models.remat import REMAT_COMPILER_OPTIONS, set_remat
    from vmz_jax.train.step import lower_train_step

    if jax.default_backend() not in REMAT_COMPILER_OPTIONS:
        pytest.skip("no options for this backend")

    def make():
        model = build("r3d_10", 5, conv_impl="reference", rngs=nnx.Rngs(0))
        return model, nnx.Optimizer(model, optax.sgd(0.1, momentum=0.9), wrt=nnx.Param)

    x, y = jax.ShapeDtypeStruct((2, 4, 16, 16, 3), jnp.float32), jax.ShapeDtypeStruct((2,), jnp.int32)
    convolutions = {}
    for mode in ("none", "blocks", "full"):
        model, optimizer = nnx.eval_shape(make)
        model.train()
        set_remat(model, mode)
        text = lower_train_step(model, optimizer, x, y).compile().as_text()
        convolutions[mode] = text.count(" convolution(")
    # the stem, 4 blocks of two 3x3x3 convs, 3 shortcut projections: 12 in the forward pass
    assert convolutions["full"] == convolutions["none"] + 12, convolutions
    assert convolutions["none"] < convolutions["blocks"] < convolutions["full"], convolutions

