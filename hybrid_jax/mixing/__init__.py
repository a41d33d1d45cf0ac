"""Parameter mixing: EMA, model soups, path-wise merge and interpolation of pytrees.

Every function here is pure and works on any pytree (dicts, lists, Flax NNX ``State``, registered
dataclasses). Leaf paths and rules are those of :mod:`hybrid_jax.tree` (one path function, one
matcher, first match wins).

Dtypes and sharding:

* Floating-point leaves are combined in fp32 (fp64 for fp64 leaves, their own dtype for complex
  ones) and cast back to the leaf's dtype once, so a bf16 leaf stays bf16 and is rounded once.
* The combination is elementwise ``jnp`` arithmetic on inputs that share a sharding, so a sharded
  ``jax.Array`` keeps its sharding; nothing is ``device_put``.
* Integer and boolean leaves, and :class:`hybrid_jax.tree.CompoundLeaf` leaves (an int8-stored
  frozen weight is codes *and* scales), are never averaged: each function takes them whole from
  one tree, which its docstring names.
* Leaves taken whole are the input arrays themselves (JAX arrays are immutable), except in
  :func:`ema_init` and :func:`ema_update`, which copy them: an EMA lives beside the parameters in
  one donated train state, and a buffer cannot be donated twice.
"""

from hybrid_jax.mixing.ema import EMA, ema_init, ema_update
from hybrid_jax.mixing.merging import interpolate, merge
from hybrid_jax.mixing.soups import GreedySoupInfo, greedy_soup, uniform_soup

__all__ = [
    "EMA",
    "GreedySoupInfo",
    "ema_init",
    "ema_update",
    "greedy_soup",
    "interpolate",
    "merge",
    "uniform_soup",
]
