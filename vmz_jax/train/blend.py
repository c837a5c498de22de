"""Gradient-Blending's loss: `w_a * L_a + w_v * L_v + w_av * L_av` (Wang, Tran, Feiszli, CVPR 2020).

As Caffe2's `add_g_blend_loss` (`c2/lib/models/loss/loss_creator.py`) builds it for single-label
data: each head's softmax cross-entropy averaged over the batch (`SoftmaxWithLoss`), scaled by its
weight (`audio_weight`, `visual_weight`, `av_weight`), summed. The heads are those of
`vmz_jax.models.audio_visual.AudioVisualResNet.heads`.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import optax

__all__ = ["BLEND_WEIGHTS", "BlendWeights", "blended_loss", "published_weights"]

#: (audio, visual, av) weights.
BlendWeights = tuple[float, float, float]

#: The weights `c2/tutorials/gradient_blending.md` gives, by (dataset, pre-training, architecture).
BLEND_WEIGHTS: dict[tuple[str, str, str], BlendWeights] = {
    ("kinetics400", "none", "av_r3d_50"): (0.014, 0.630, 0.356),
    ("kinetics400", "none", "av_ip_csn_152"): (0.009, 0.485, 0.506),
    ("kinetics400", "ig65m", "av_ip_csn_152"): (0.070, 0.485, 0.445),
    ("audioset", "none", "av_r2plus1d_101"): (0.239, 0.384, 0.377),
    ("epic_kitchens_noun", "ig65m", "av_ip_csn_152"): (0.175, 0.460, 0.364),
    ("epic_kitchens_verb", "ig65m", "av_ip_csn_152"): (0.524, 0.247, 0.229),
}


def _pretraining_kind(pretraining: str | None) -> str:
    """The table's pre-training column for a released weights name: "ig65m" for the IG-65M ones
    (``ig_...``), "sports1m" for Sports-1M's, "none" for random initialisation and for weights trained
    from scratch (``kinetics_32frms``, ``audioset_16frms``)."""
    first = (pretraining or "").split("_")[0]
    return {"ig": "ig65m", "sports1m": "sports1m"}.get(first, "none")


def published_weights(arch: str, pretraining: str | None = None) -> tuple[BlendWeights, str] | None:
    """The weights `BLEND_WEIGHTS` gives for `arch` fine-tuned from `pretraining` (a released weights
    name; None: random initialisation or one's own weights): the row of the same architecture and
    pre-training, Kinetics-400's where several datasets have one; and which row it is. None when the
    table has no such row."""
    kind = _pretraining_kind(pretraining)
    rows = [key for key in BLEND_WEIGHTS if key[2] == arch and key[1] == kind]
    if not rows:
        return None
    row = min(rows, key=lambda key: key[0] != "kinetics400")
    return BLEND_WEIGHTS[row], f"gradient_blending.md: {row[0]}, pre-training {row[1]}, {row[2]}"


def blended_loss(logits: Mapping[str, jax.Array], labels: jax.Array, weights: BlendWeights
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(blended loss, {"audio", "visual", "av": each head's mean cross-entropy}).

    `logits`: {"av", "audio", "visual"} -> (N, num_classes); `labels`: (N,) integer classes;
    `weights`: (w_a, w_v, w_av). The cross-entropy is computed in float32 or wider.
    """
    w_a, w_v, w_av = weights
    losses = {}
    for head in ("audio", "visual", "av"):
        x = logits[head]
        x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        losses[head] = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(x, labels))
    return w_a * losses["audio"] + w_v * losses["visual"] + w_av * losses["av"], losses
