"""`vmz-jax bench --suite accelerator`: the --tiny run on CPU, its budget, and the pieces it decides with."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from vmz_jax import bench_accelerator as acc

# Not installed on the GPU image the suite is written for: it must run without them.
ABSENT_ON_GPU_IMAGE = ("imageio_ffmpeg", "matplotlib", "tqdm", "onnx", "onnxruntime")


def hide_modules(tmp_path: Path) -> dict[str, str]:
    """An environment whose Python cannot import `ABSENT_ON_GPU_IMAGE` (a sitecustomize on PYTHONPATH)."""
    site = tmp_path / "site"
    site.mkdir()
    # None in sys.modules: `import x` raises ModuleNotFoundError and importlib.util.find_spec("x") is
    # None, exactly as when x is not installed (torch probes some optional modules that way)
    hide = f"sys.modules.update(dict.fromkeys({ABSENT_ON_GPU_IMAGE!r}))"
    (site / "sitecustomize.py").write_text(f"import sys\n{hide}\n")
    root = Path(__file__).resolve().parents[1]
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(root)]), "JAX_PLATFORMS": "cpu"}


def run_tiny(tmp_path: Path, budget: float) -> tuple[dict, float, subprocess.CompletedProcess]:
    out = tmp_path / "out"
    env = hide_modules(tmp_path)
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "vmz_jax.cli", "bench", "--suite", "accelerator", "--tiny",
                           "--budget", str(budget), "--out", str(out)], env=env, capture_output=True,
                          text=True, timeout=budget + 120)
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "accelerator.json").read_text()), elapsed, proc


def model_rows(results: dict) -> dict[tuple, dict]:
    return {(r["side"], r["arch"], r["task"], r["dtype"]): r for r in results["models"]}


def check_structure(results: dict) -> None:
    """Every row the suite owes is there: measured, or skipped/failed with a reason."""
    assert results["suite"] == "accelerator" and results["tiny"] is True
    env = results["environment"]
    assert env["backend"] == "cpu" and env["torch_device"] == "cpu" and set(env["auto_impl_row"]) >= {
        "pointwise", "spatial", "temporal", "depthwise", "grouped", "dense"}
    rows = model_rows(results)
    for case in acc.TINY.models:
        for side in ("torch", "ours"):
            for task in ("forward", "train"):
                for dtype in acc.DTYPES:
                    row = rows[(side, case.arch, task, dtype)]
                    assert row["status"] == "ok" or row["reason"], row
                    if row["status"] == "ok":
                        assert row["step_s"] > 0 and row["repeats"] >= 1 and row["clips_per_s"] > 0
                        if task == "train":  # every step's loss: both sides really train (ln 400 ~ 6)
                            assert len(row["losses"]) == row["repeats"] + 1
                            assert all(0 < loss < 20 for loss in row["losses"]), row
                    if row["status"] == "nonfinite":  # shown in CI's warnings summary: which side, where
                        warnings.warn(f"accelerator suite: {side} {case.arch} {dtype}: {row['reason']}",
                                      stacklevel=1)
                    # float32 training of ours is what the parity and training suites prove: never NaN
                    assert not (side == "ours" and dtype == "float32" and row["status"] == "nonfinite"), row
    for row in results.get("forms", []):
        assert row["status"] == "ok" or row["reason"], row


def test_tiny_run_within_budget_without_the_gpu_image_missing_modules(tmp_path):
    """The fast CI run: a tight budget, with the modules the GPU image lacks hidden. It never overruns,
    writes every row (measured, or skipped with the reason), and measures in priority order: torch's
    rows and our first forward before anything else."""
    budget = 60.0
    results, elapsed, proc = run_tiny(tmp_path, budget)
    assert results["elapsed_s"] <= budget and elapsed < budget + 5  # the budget counts the imports
    check_structure(results)
    rows = model_rows(results)
    assert rows[("torch", "r2plus1d_10", "forward", "float32")]["status"] == "ok"
    assert rows[("ours", "r2plus1d_10", "forward", "float32")]["status"] == "ok"
    md = (tmp_path / "out" / "accelerator.md").read_text()
    assert "| r2plus1d_10 | forward | float32 | 1x4x16x16 |" in md
    assert "ModuleNotFoundError" not in proc.stderr and "ImportError" not in proc.stderr


@pytest.mark.slow
def test_tiny_run_complete(tmp_path):
    """With time enough, every row is measured: both sides, both dtypes, every form's A/B and the row."""
    results, _, _ = run_tiny(tmp_path, 1500.0)
    check_structure(results)
    assert all(r["status"] == "ok" for r in results["models"]), [r for r in results["models"]
                                                                 if r["status"] != "ok"]
    assert results["complete"], "something was skipped"
    forms = {(r["form"], r["impl"], r["dtype"]) for r in results["forms"] if r["status"] == "ok"}
    for dtype in acc.DTYPES:
        for form in ("depthwise", "pointwise", "spatial", "temporal"):
            assert {(form, "reference", dtype), (form, "fast", dtype)} <= forms
    auto = results["auto_impl"]
    assert set(auto["recommended"]) == set(auto["current"])
    assert "all_reference" in auto["whole_model_evidence"]


def test_conv_shapes_from_the_jaxpr_count_every_block():
    """Scanned blocks count once per block: the totals per form equal the torch reference's modules."""
    torch = pytest.importorskip("torch")
    from vmz_jax.models.conv import conv_form
    from vmz_jax.reference import vmz_torch

    shape = (1, 4, 16, 16)
    ours: dict[str, int] = {}
    for conv, count in acc.model_conv_shapes("ir_csn_26", shape).items():
        ours[conv.form] = ours.get(conv.form, 0) + count
    theirs: dict[str, int] = {}
    for m in vmz_torch.build("ir_csn_26", num_classes=400).modules():
        if isinstance(m, torch.nn.Conv3d):
            kernel = (*m.kernel_size, m.in_channels // m.groups, m.out_channels)
            form = conv_form(m.in_channels, kernel, tuple(m.padding), m.groups)
            theirs[form] = theirs.get(form, 0) + 1
    assert ours == theirs and ours["depthwise"] == 8  # ir-CSN-26: 2 + 2 + 2 + 2 bottlenecks


def test_a_training_row_with_a_nonfinite_loss_is_reported_not_measured(tmp_path):
    """A step whose loss turns NaN is no measurement of training: the row says so, with the step and the
    losses, instead of a time; a finite row keeps every step's loss."""
    suite = acc.Suite(acc.TINY, acc.Budget(60.0, reserve_s=0.0), tmp_path, log=lambda message: None)
    suite.budget.begin("test", 1.0)
    losses = iter([6.0, 5.5, float("nan"), float("nan")])
    row = {"side": "ours", "arch": "a", "task": "train", "dtype": "bfloat16", "shape": [2, 4, 16, 16]}
    result = acc._measure(suite, "models", row, "ours:train", lambda: (lambda: next(losses), {}), dict)
    assert result["status"] == "nonfinite" and result["losses"][:2] == [6.0, 5.5]
    assert result["reason"].startswith("loss not finite from step 3 of 3 on (losses 6, 5.5, nan)")
    steady = acc._measure(suite, "models", {**row, "arch": "b"}, "ours:train",
                          lambda: (lambda: 4.0, {}), dict)
    assert steady["status"] == "ok" and steady["loss"] == 4.0 and steady["losses"] == [4.0, 4.0, 4.0]
    assert acc.nonfinite_loss([1.0, float("inf")]).startswith("loss not finite from step 2 of 2")


def test_largest_batch_scales_the_plan_and_stays_in_bounds():
    assert acc.largest_batch(8 * 3 << 30, 8, 70 << 30, 64) == 23  # 3 GiB a clip, 70 GiB usable
    assert acc.largest_batch(8 * 3 << 30, 8, 1 << 30, 64) == 1
    assert acc.largest_batch(8 << 20, 8, 70 << 30, 64) == 64


def test_row_recommendation_follows_the_evidence():
    current = {"pointwise": "reference", "depthwise": "fast"}

    def form_row(form, impl, dtype, train_s, key="k"):
        return {"status": "ok", "form": form, "impl": impl, "dtype": dtype, "shape_key": key,
                "count": {"m": 2}, "forward_s": train_s / 3, "train_s": train_s}

    forms = [form_row("depthwise", "reference", d, 1.0) for d in acc.DTYPES]
    forms += [form_row("depthwise", "fast", d, 0.5) for d in acc.DTYPES]
    forms += [form_row("pointwise", "reference", d, 1.0) for d in acc.DTYPES]
    forms += [form_row("pointwise", "fast", d, 0.97) for d in acc.DTYPES]  # within the margin: kept
    summary = acc.summarize_forms(forms, current)
    assert summary["recommended_row"] == current
    assert summary["per_form"]["depthwise"]["float32"]["totals"]["fast"]["train_s"] == pytest.approx(1.0)
    forms += [form_row("pointwise", "fast", d, 0.5, key="k2") for d in acc.DTYPES]  # no reference for k2
    assert acc.summarize_forms(forms, current)["recommended_row"] == current

    def step(row, arch, s, section_row="current"):
        return {"row": section_row, "arch": arch, "status": "ok", "task": "train", "dtype": "float32",
                "step_s": s}

    results = {"models": [step("current", "a", 1.0), step("current", "b", 2.0)],
               "rows": [step("x", "a", 0.5, "all_reference"), step("x", "b", 1.0, "all_reference")]}
    reference = dict.fromkeys(current, "reference")
    decided = acc.decide_row(results, current, {"all_reference": reference})
    assert decided["recommended"] == reference and decided["recommended_from"] == "all_reference"
    results["rows"] = [step("x", "a", 0.99, "all_reference"), step("x", "b", 2.0, "all_reference")]
    assert acc.decide_row(results, current, {"all_reference": reference})["recommended"] == current


def test_budget_gives_each_phase_a_share_of_what_is_left():
    budget = acc.Budget(100.0, reserve_s=10.0)
    budget.begin("a", 0.5)
    assert 44 < budget.left() <= 45 and budget.fits(40) and not budget.fits(50)
    budget.begin("b", 1.0)
    assert 89 < budget.left() <= 90
    budget.begin("c", 0.1)  # a phase's first measurement may use the whole run's time, the rest its share
    assert not budget.fits(95) and budget.fits(50) and not budget.fits(20) and budget.fits(5)


def test_cli_rejects_a_bad_budget_and_arch_names_with_the_suite(capsys):
    from vmz_jax.cli import main

    assert main(["bench", "--suite", "accelerator", "--budget", "0"]) == 2
    assert "--budget must be a positive number" in capsys.readouterr().err
    assert main(["bench", "r2plus1d_18", "--suite", "accelerator"]) == 2
    assert main(["bench"]) == 2


def test_every_form_and_implementation_runs_in_both_dtypes():
    """The per-form A/B's functions, on the smallest shape of each form of the tiny models: every
    implementation runs forward and backward (bfloat16 fast forms return float32: the cotangent follows)."""
    shapes: dict[str, acc.ConvShape] = {}
    for case in acc.TINY.models:
        for shape in acc.model_conv_shapes(case.arch, case.forward_shape):
            size = np.prod(shape.x_shape) * np.prod(shape.w_shape)
            if shape.form not in shapes or size < np.prod(shapes[shape.form].x_shape) * np.prod(
                    shapes[shape.form].w_shape):
                shapes[shape.form] = shape
    assert set(shapes) == {"pointwise", "spatial", "temporal", "depthwise", "dense"}
    for shape in shapes.values():
        for impl in acc.form_impls(shape.form):
            for dtype in acc.DTYPES:
                forward, train = acc.conv_functions(shape, impl, dtype)
                forward()
                train()
