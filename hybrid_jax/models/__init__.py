"""Flax models: a nanoGPT-equivalent GPT, a tiny MLP, per-layer quantized matmuls (NNX, Linen),
and a Trainer for any NNX model."""

from hybrid_jax.models.gpt import ATTENTION, GPT, GPTConfig, resolve_attention
from hybrid_jax.models.linen_matmuls import LinenMatmuls, quantize_linen_matmuls
from hybrid_jax.models.matmuls import (
    FP8_SCALINGS,
    DelayedFp8DotGeneral,
    Fp8Meta,
    ScopedDot,
    ScopedEinsum,
    quantize_matmuls,
)
from hybrid_jax.models.mlp import MLP
from hybrid_jax.models.ops import causal_attention, gelu, layer_norm
from hybrid_jax.models.trainer import Trainer

__all__ = [
    "ATTENTION",
    "FP8_SCALINGS",
    "GPT",
    "MLP",
    "DelayedFp8DotGeneral",
    "Fp8Meta",
    "GPTConfig",
    "LinenMatmuls",
    "ScopedDot",
    "ScopedEinsum",
    "Trainer",
    "causal_attention",
    "gelu",
    "layer_norm",
    "quantize_linen_matmuls",
    "quantize_matmuls",
    "resolve_attention",
]
