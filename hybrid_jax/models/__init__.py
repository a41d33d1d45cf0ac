"""Flax NNX models: a nanoGPT-equivalent GPT and a tiny MLP."""

from hybrid_jax.models.gpt import GPT, GPTConfig, causal_attention, gelu, layer_norm
from hybrid_jax.models.mlp import MLP

__all__ = ["GPT", "MLP", "GPTConfig", "causal_attention", "gelu", "layer_norm"]
