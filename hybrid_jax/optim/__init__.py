"""Hybrid optimizers: a different Optax transformation per parameter group, by path rules."""

from hybrid_jax.optim.by_path import DEFAULT_GROUP, by_path, describe, group_labels
from hybrid_jax.optim.recipes import (
    EMBEDDING,
    GAIN_OR_BIAS,
    HEAD,
    HIDDEN_MATRIX,
    frozen,
    layerwise_lr_decay,
    muon_adamw,
    muon_adamw_rules,
    scale_by_path,
)
from hybrid_jax.optim.state_dtype import with_state_dtype

__all__ = [
    "DEFAULT_GROUP",
    "EMBEDDING",
    "GAIN_OR_BIAS",
    "HEAD",
    "HIDDEN_MATRIX",
    "by_path",
    "describe",
    "frozen",
    "group_labels",
    "layerwise_lr_decay",
    "muon_adamw",
    "muon_adamw_rules",
    "scale_by_path",
    "with_state_dtype",
]
