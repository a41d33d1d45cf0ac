"""Per-parameter precision: dtypes, Policy, PrecisionRules, casts, loss scaling, quantization."""

from hybrid_jax.precision.dtypes import ACCEPTED_NAMES, UnknownDtypeError, parse_dtype
from hybrid_jax.precision.loss_scale import (
    DynamicLossScale,
    LossScale,
    NoOpLossScale,
    ScalarBoolError,
    StaticLossScale,
    all_finite,
    select_tree,
)
from hybrid_jax.precision.matmul import (
    WEIGHT_NAMES,
    dot_general_for,
    fp8_dot_general,
    fp8_dot_general_delayed,
    fp8_meta,
    int8_dot_general,
)
from hybrid_jax.precision.policy import PRESETS, Policy
from hybrid_jax.precision.quantize import (
    amax_scale,
    dequantize,
    quantize,
    quantize_dequantize,
)
from hybrid_jax.precision.rounding import stochastic_round
from hybrid_jax.precision.rules import (
    Precision,
    PrecisionRules,
    cast_to_compute,
    cast_to_output,
    cast_to_param,
    computes_in,
    is_policy,
    plan,
    policies_with_paths,
)
from hybrid_jax.precision.storage import Int8Weight

__all__ = [
    "ACCEPTED_NAMES",
    "PRESETS",
    "WEIGHT_NAMES",
    "DynamicLossScale",
    "Int8Weight",
    "LossScale",
    "NoOpLossScale",
    "Policy",
    "Precision",
    "PrecisionRules",
    "ScalarBoolError",
    "StaticLossScale",
    "UnknownDtypeError",
    "all_finite",
    "amax_scale",
    "cast_to_compute",
    "cast_to_output",
    "cast_to_param",
    "computes_in",
    "dequantize",
    "dot_general_for",
    "fp8_dot_general",
    "fp8_dot_general_delayed",
    "fp8_meta",
    "int8_dot_general",
    "is_policy",
    "parse_dtype",
    "plan",
    "policies_with_paths",
    "quantize",
    "quantize_dequantize",
    "select_tree",
    "stochastic_round",
]
