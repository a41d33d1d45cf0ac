"""Shared fixtures: small parameter trees shaped like the real models."""

import jax.numpy as jnp
import numpy as np
import pytest


def gpt_params(n_layer: int = 2, d: int = 8, vocab: int = 11, block: int = 6) -> dict:
    """A nanoGPT-shaped parameter tree with DESIGN.md's paths and tiny shapes."""
    rng = np.random.default_rng(0)
    w = lambda *shape: jnp.asarray(rng.normal(0, 0.02, shape), jnp.float32)
    block_params = lambda: {
        "ln_1": {"scale": jnp.ones(d), "bias": jnp.zeros(d)},
        "attn": {
            "qkv": {"kernel": w(d, 3 * d), "bias": jnp.zeros(3 * d)},
            "proj": {"kernel": w(d, d), "bias": jnp.zeros(d)},
        },
        "ln_2": {"scale": jnp.ones(d), "bias": jnp.zeros(d)},
        "mlp": {
            "fc": {"kernel": w(d, 4 * d), "bias": jnp.zeros(4 * d)},
            "proj": {"kernel": w(4 * d, d), "bias": jnp.zeros(d)},
        },
    }
    return {
        "tok_embed": {"embedding": w(vocab, d)},
        "pos_embed": {"embedding": w(block, d)},
        "blocks": [block_params() for _ in range(n_layer)],
        "ln_f": {"scale": jnp.ones(d), "bias": jnp.zeros(d)},
        "lm_head": {"kernel": w(d, vocab)},
    }


@pytest.fixture
def gpt_tree():
    return gpt_params()
