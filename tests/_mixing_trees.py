"""Trees the mixing tests share: hard values, GPT paths, a Flax NNX State, bitwise equality."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hybrid_jax.precision.storage import Int8Weight
from hybrid_jax.tree import leaves_with_paths

F32_EPS = 2.0**-23  # fp32 spacing at 1 (one ulp)
BF16_EPS = 2.0**-7


def bits(tree):
    """Every leaf's dtype, shape and bytes: equal iff the trees are bitwise equal."""
    return [
        (path, str(np.asarray(x).dtype), np.shape(x), np.asarray(x).tobytes())
        for path, leaf in leaves_with_paths(tree)[0]
        for x in jax.tree_util.tree_leaves(leaf)
    ]


def gpt_like(fill, n_layer=2, d=4):
    """A nested dict with the paths of the bundled GPT, every float leaf equal to ``fill``."""

    def full(*shape, dtype=jnp.float32):
        return jnp.full(shape, fill, dtype)

    return {
        "tok_embed": {"embedding": full(8, d, dtype=jnp.bfloat16)},
        "blocks": [
            {
                "ln_1": {"scale": full(d)},
                "attn": {"qkv": {"kernel": full(d, 3 * d), "bias": full(3 * d)}},
                "mlp": {"fc": {"kernel": full(d, 4 * d)}, "proj": {"kernel": full(4 * d, d)}},
            }
            for _ in range(n_layer)
        ],
        "ln_f": {"scale": full(d)},
    }


def nnx_state(kernel, bias):
    """A Flax NNX State shaped like that of ``nnx.Linear(2, 3)`` (built without running init)."""
    return nnx.State(
        {"kernel": nnx.Param(jnp.asarray(kernel)), "bias": nnx.Param(jnp.asarray(bias))}
    )


def mixed_tree(seed):
    """Floating leaves of several dtypes, hard values included, plus non-floating leaves."""
    rng = np.random.default_rng(seed)
    f32 = rng.normal(size=6) * 10.0 ** rng.integers(-30, 30, size=6)
    f32[:4] = [-0.0, np.inf, -np.inf, 1e-40]  # signed zero, infinities, a subnormal
    return {
        "f32": jnp.asarray(f32, jnp.float32),
        "bf16": jnp.asarray(rng.normal(size=(2, 3)), jnp.bfloat16),
        "f16": jnp.asarray(rng.normal(size=3), jnp.float16),
        "e4m3": jnp.asarray(rng.normal(size=3), jnp.float8_e4m3fn),
        "count": jnp.asarray(rng.integers(0, 100), jnp.int32),
        "mask": jnp.asarray(rng.random(3) < 0.5),
        "frozen": Int8Weight.quantize(jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)),
    }
