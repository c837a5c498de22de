"""vmz_jax equals the PyTorch reference: every architecture, every stage, float32 and float64.

Weights are random and non-symmetric (a wrong transpose shows), BatchNorm statistics random with
variances in [0.5, 1.5]. Inputs: a cubic clip and an odd-sized one that exercises the padding.
"""

import numpy as np
import pytest
import torch

from tests.parity import (
    jax_stage_outputs,
    make_pair,
    relative_error,
    torch_stage_outputs,
)
from vmz_jax.models import VIDEO_ARCHS as ARCHS
from vmz_jax.reference import vmz_torch

SLOW_DEPTHS = ("_101", "_152")
FAST_ARCHS = [a for a in ARCHS if not a.endswith(SLOW_DEPTHS) and a != "c3d"]
SLOW_ARCHS = [a for a in ARCHS if a.endswith(SLOW_DEPTHS)]

CUBIC = (1, 16, 16, 16, 3)
ODD = (2, 6, 100, 130, 3)
ODD_SMALL = (2, 6, 33, 47, 3)


def _input(shape, dtype, seed=1):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def check_parity(arch, shape, dtype, tol, clip_length=8, **kw):
    ref, model = make_pair(arch, clip_length=clip_length,
                           dtype=np.float64 if dtype == np.float64 else np.float32, **kw)
    x = _input(shape, dtype)
    if dtype == np.float64:
        ref = ref.double()
    want = torch_stage_outputs(ref, x.transpose(0, 4, 1, 2, 3))
    got = jax_stage_outputs(model, x)
    assert set(got) == set(want)
    errors = {k: relative_error(got[k], want[k]) for k in want}
    assert max(errors.values()) < tol, errors


@pytest.mark.parametrize("arch", FAST_ARCHS)
def test_parity_float32(arch):
    check_parity(arch, CUBIC, np.float32, 1e-5)
    # R2D's stem spans 8 frames: give it 9 so that two temporal positions survive
    check_parity(arch, (2, 9, 33, 47, 3) if arch == "r2d_18" else ODD_SMALL, np.float32, 1e-5)


@pytest.mark.parametrize("arch", ["r2plus1d_18", "ir_csn_26", "ip_csn_50", "r3d_10", "mc4_18",
                                  "rmc3_18", "r2d_18", "r2df_18"])
def test_parity_float64(arch):
    check_parity(arch, (1, 9, 33, 47, 3) if arch == "r2d_18" else (1, 6, 33, 47, 3), np.float64, 1e-10)


@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_parity_both_conv_implementations(impl):
    check_parity("ip_csn_26", ODD_SMALL, np.float32, 1e-5, conv_impl=impl)
    check_parity("r2plus1d_16", ODD_SMALL, np.float32, 1e-5, conv_impl=impl)


def test_parity_r2d_clip16():
    check_parity("r2d_18", (1, 16, 24, 24, 3), np.float32, 1e-5, clip_length=16)


def test_parity_c3d():
    check_parity("c3d", (1, 16, 112, 112, 3), np.float32, 1e-5)


def test_short_clip_rule_matches_reference():
    # T < 4: stage 3 and 4 keep time; T < 8: stage 4 keeps time (Caffe2 create_r3d).
    check_parity("r2plus1d_10", (1, 2, 16, 16, 3), np.float32, 1e-5)
    check_parity("ir_csn_26", (1, 3, 16, 16, 3), np.float32, 1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("arch", [a for a in FAST_ARCHS if a != "c3d"])
def test_parity_odd_full_size(arch):
    check_parity(arch, (2, 9, 100, 130, 3) if arch == "r2d_18" else ODD, np.float32, 1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("arch", SLOW_ARCHS)
def test_parity_deep(arch):
    check_parity(arch, CUBIC, np.float32, 1e-5)
    check_parity(arch, ODD, np.float32, 1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("arch", SLOW_ARCHS + ["c3d"])
def test_parity_deep_float64(arch):
    shape = (1, 16, 112, 112, 3) if arch == "c3d" else ODD_SMALL
    check_parity(arch, shape, np.float64, 1e-10)


def test_reference_names_match_vmz_layout():
    # The reference is only useful if its names are VMZ's: spot-check the spec's examples.
    keys = set(vmz_torch.build("r2plus1d_34").state_dict())
    for key in ["stem.0.weight", "stem.4.running_var", "layer2.0.conv1.0.3.weight",
                "layer2.0.downsample.1.weight", "fc.bias"]:
        assert key in keys
    ip = set(vmz_torch.build("ip_csn_50").state_dict())
    assert {"layer1.0.conv2.0.0.weight", "layer1.0.conv2.0.2.weight"} <= ip
    assert torch.Size([128, 1, 3, 3, 3]) == vmz_torch.build("ir_csn_50").state_dict()[
        "layer2.1.conv2.0.weight"].shape
