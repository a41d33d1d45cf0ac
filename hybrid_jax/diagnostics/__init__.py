"""Diagnostics: what each format loses of a tensor, stagnant updates, the dots a step runs."""

from hybrid_jax.diagnostics.audit import audit, audit_step, expected_from_plan
from hybrid_jax.diagnostics.dots import HloDot, hlo_dots, layer_of
from hybrid_jax.diagnostics.formats import FormatLimits, format_limits, limits_table
from hybrid_jax.diagnostics.numerics import leaf_numerics, numerics_report, suggest_precision
from hybrid_jax.diagnostics.stagnation import stagnation_fractions, update_stagnation

__all__ = [
    "FormatLimits",
    "HloDot",
    "audit",
    "audit_step",
    "expected_from_plan",
    "format_limits",
    "hlo_dots",
    "layer_of",
    "leaf_numerics",
    "limits_table",
    "numerics_report",
    "stagnation_fractions",
    "suggest_precision",
    "update_stagnation",
]
