"""Hybrid optimizers: a different Optax transformation per parameter group, by path rules."""

from hybrid_jax.optim.by_path import DEFAULT_GROUP, by_path, describe, group_labels
from hybrid_jax.optim.moments import MomentStorageState, adamw_8bit, with_moment_storage
from hybrid_jax.optim.muon import (
    MuonState,
    muon,
    newton_schulz,
    orthogonalize_by_shape,
    scale_by_muon,
)
from hybrid_jax.optim.precision_aware import check_applied, with_precision
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
from hybrid_jax.optim.updates import (
    kahan_summation,
    low_precision_updates,
    master_weights,
    stochastic_rounding,
)

__all__ = [
    "DEFAULT_GROUP",
    "EMBEDDING",
    "GAIN_OR_BIAS",
    "HEAD",
    "HIDDEN_MATRIX",
    "MomentStorageState",
    "MuonState",
    "adamw_8bit",
    "by_path",
    "check_applied",
    "describe",
    "frozen",
    "group_labels",
    "kahan_summation",
    "layerwise_lr_decay",
    "low_precision_updates",
    "master_weights",
    "muon",
    "muon_adamw",
    "muon_adamw_rules",
    "newton_schulz",
    "orthogonalize_by_shape",
    "scale_by_muon",
    "scale_by_path",
    "stochastic_rounding",
    "with_moment_storage",
    "with_precision",
    "with_state_dtype",
]
