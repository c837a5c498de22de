"""Train-mode BatchNorm parity: batch statistics in the forward pass, and the running averages.

Running means follow the same rule everywhere. Running variances differ by convention: torch folds
in the unbiased batch variance, Caffe2's CPU SpatialBN and Flax the biased one; we follow torch (the
reference, and the trainer of the released .pth models), so the states compare directly.
"""

import numpy as np
import pytest
import torch
from flax import nnx

from porting.torch_names import model_layout
from tests.parity import make_pair, relative_error
from vmz_jax.models.variables import get_variables, variable_shapes


@pytest.mark.parametrize("arch", ["r2plus1d_16", "ip_csn_26", "mc3_18", "ir_csn_26"])
def test_train_mode_parity(arch):
    ref, model = make_pair(arch, seed=3)
    before = get_variables(model)
    ref.train()
    model.train()
    # big enough that every BatchNorm, layer4's included, normalizes over >= 16 values
    x = np.random.default_rng(5).standard_normal((4, 8, 48, 48, 3)).astype(np.float32)
    with torch.no_grad():
        out = ref.forward_stages(torch.from_numpy(x.transpose(0, 4, 1, 2, 3)))
    want = {k: v.numpy() for k, v in out.items()}
    got = nnx.jit(lambda m, x: m.stage_outputs(x))(model, x)
    for key in want:
        g = np.asarray(got[key])
        g = g if g.ndim == 2 else g.transpose(0, 4, 1, 2, 3)
        assert relative_error(g, want[key]) < 1e-5, key

    after = get_variables(model)
    torch_state = ref.state_dict()
    layout = model_layout(variable_shapes(model))
    checked = 0
    for name, slot in layout.items():
        if not name.endswith(("running_mean", "running_var")):
            continue
        old, new = before[slot.path], after[slot.path]
        if slot.index is not None:
            old, new = old[slot.index], new[slot.index]
        torch_new = torch_state[name].numpy()
        assert not np.allclose(old, new), f"{name} was not updated"
        assert relative_error(new, torch_new) < 1e-5, name
        checked += 1
    assert checked == sum(1 for n in layout if n.endswith(("running_mean", "running_var")))
