"""The PyTorch name map: complete, invertible, and strict with every problem reported at once."""

import numpy as np
import pytest

from porting.torch_names import model_layout, params_to_torch, torch_to_params
from vmz_jax.errors import CheckpointError
from vmz_jax.models import VIDEO_ARCHS as ARCHS
from vmz_jax.models.variables import abstract_shapes
from vmz_jax.reference import vmz_torch


def _reference_shapes(arch, num_classes=7):
    model = vmz_torch.build(arch, num_classes=num_classes)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()
            if not k.endswith("num_batches_tracked")}


@pytest.mark.parametrize("arch", [a for a in ARCHS if not a.endswith(("_101", "_152"))])
def test_layout_equals_reference_state_dict(arch):
    layout = model_layout(abstract_shapes(arch, 7))
    assert {k: s.external_shape for k, s in layout.items()} == _reference_shapes(arch)


def _random_state_dict(arch, seed=0):
    rng = np.random.default_rng(seed)
    sd = {k: rng.standard_normal(s).astype(np.float32) for k, s in _reference_shapes(arch).items()}
    sd["layer1.0.conv1.1.num_batches_tracked"] = np.array(3, np.int64)  # ignored
    return sd


def test_round_trip_is_bit_identical():
    sd = _random_state_dict("ip_csn_26")
    shapes = abstract_shapes("ip_csn_26", 7)
    params = torch_to_params(sd, shapes)
    back = params_to_torch(params)
    assert set(back) == set(sd) - {"layer1.0.conv1.1.num_batches_tracked"}
    for k, v in back.items():
        np.testing.assert_array_equal(v, sd[k])
    # stacked blocks: layer1 block 1 lands at index 0 of the `rest` stack, transposed to DHWIO
    np.testing.assert_array_equal(
        params[("layer1", "rest", "conv2", "depthwise", "kernel")][0],
        sd["layer1.1.conv2.0.2.weight"].transpose(2, 3, 4, 1, 0))


def test_every_problem_is_reported_together():
    sd = _random_state_dict("r2plus1d_16")
    del sd["layer2.0.conv1.0.3.weight"]
    sd["layer9.0.conv1.0.weight"] = np.zeros(3, np.float32)
    sd["fc.weight"] = np.zeros((7, 99), np.float32)
    sd["stem.1.running_var"] = sd["stem.1.running_var"].astype(np.float64)
    with pytest.raises(CheckpointError) as err:
        torch_to_params(sd, abstract_shapes("r2plus1d_16", 7), source="weights.pth")
    message = str(err.value)
    assert message.startswith("weights.pth: 4 problem(s)") and "\n" not in message
    for fragment in ["missing 'layer2.0.conv1.0.3.weight'", "unexpected 'layer9.0.conv1.0.weight'",
                     "'fc.weight' has shape (7, 99), expected (7, 512)",
                     "'stem.1.running_var' has dtype float64"]:
        assert fragment in message


def test_non_finite_weights_are_refused():
    sd = _random_state_dict("r3d_10")
    sd["layer3.0.conv2.0.weight"][0, 0, 1, 1, 1] = np.nan
    with pytest.raises(CheckpointError, match="non-finite values in layer3.first.conv2.kernel"):
        torch_to_params(sd, abstract_shapes("r3d_10", 7))
