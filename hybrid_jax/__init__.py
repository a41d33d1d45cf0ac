"""hybrid_jax: mixed- and low-precision training with hybrid optimizers in JAX."""

from hybrid_jax import diagnostics, losses, mixing, optim, precision, train, tree
from hybrid_jax._table import Table
from hybrid_jax.precision import (
    DynamicLossScale,
    NoOpLossScale,
    Policy,
    PrecisionRules,
    StaticLossScale,
    all_finite,
    cast_to_compute,
    cast_to_output,
    cast_to_param,
    select_tree,
)
from hybrid_jax.train import TrainState, make_train_step
from hybrid_jax.tree import UnusedRuleWarning

__version__ = "0.1.0"

__all__ = [
    "DynamicLossScale",
    "NoOpLossScale",
    "Policy",
    "PrecisionRules",
    "StaticLossScale",
    "Table",
    "TrainState",
    "UnusedRuleWarning",
    "all_finite",
    "cast_to_compute",
    "cast_to_output",
    "cast_to_param",
    "diagnostics",
    "losses",
    "make_train_step",
    "mixing",
    "optim",
    "precision",
    "select_tree",
    "train",
    "tree",
]
