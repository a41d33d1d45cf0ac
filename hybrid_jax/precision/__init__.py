"""Per-parameter precision: dtypes, Policy, PrecisionRules, casts, loss scaling, quantization."""

from hybrid_jax.precision.dtypes import ACCEPTED_NAMES, parse_dtype
from hybrid_jax.precision.loss_scale import (
    DynamicLossScale,
    LossScale,
    NoOpLossScale,
    StaticLossScale,
    all_finite,
    select_tree,
)
from hybrid_jax.precision.policy import PRESETS, Policy
from hybrid_jax.precision.quantize import (
    amax_scale,
    dequantize,
    quantize,
    quantize_dequantize,
)
from hybrid_jax.precision.rules import (
    Precision,
    PrecisionRules,
    cast_to_compute,
    cast_to_output,
    cast_to_param,
    plan,
)

__all__ = [
    "ACCEPTED_NAMES",
    "PRESETS",
    "DynamicLossScale",
    "LossScale",
    "NoOpLossScale",
    "Policy",
    "Precision",
    "PrecisionRules",
    "StaticLossScale",
    "all_finite",
    "amax_scale",
    "cast_to_compute",
    "cast_to_output",
    "cast_to_param",
    "dequantize",
    "parse_dtype",
    "plan",
    "quantize",
    "quantize_dequantize",
    "select_tree",
]
