"""Flax NNX models: a nanoGPT-equivalent GPT, a tiny MLP, and per-layer quantized matmuls."""

from hybrid_jax.models.gpt import GPT, GPTConfig
from hybrid_jax.models.matmuls import FP8_SCALINGS, DelayedFp8DotGeneral, Fp8Meta, quantize_matmuls
from hybrid_jax.models.mlp import MLP
from hybrid_jax.models.ops import causal_attention, gelu, layer_norm

__all__ = [
    "FP8_SCALINGS",
    "GPT",
    "MLP",
    "DelayedFp8DotGeneral",
    "Fp8Meta",
    "GPTConfig",
    "causal_attention",
    "gelu",
    "layer_norm",
    "quantize_matmuls",
]
