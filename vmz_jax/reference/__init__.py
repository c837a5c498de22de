"""An independent pure-PyTorch implementation of the VMZ models with VMZ's `state_dict` names.

Optional (needs torch: `pip install vmz-jax[torch]`): parity tests, `vmz-jax bench` and
`vmz-jax compare` use it as the second implementation to check this package against."""
