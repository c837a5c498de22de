"""Evaluation under VMZ's published test protocol: `evaluate` (also `vmz_jax.evaluate`), `Protocol`,
`vmz_protocol`; the reports are described in `vmz_jax.evaluation.report`, the metrics in
`vmz_jax.evaluation.metrics`, the protocols in `vmz_jax.evaluation.protocol` and docs/evaluation.md."""

from __future__ import annotations

from vmz_jax.evaluation.protocol import AVERAGES, HEADS, Protocol, vmz_protocol
from vmz_jax.evaluation.run import EvalResult, default_protocol, evaluate, match_classes, model_labels

__all__ = ["AVERAGES", "HEADS", "EvalResult", "Protocol", "default_protocol", "evaluate", "match_classes",
           "model_labels", "vmz_protocol"]
