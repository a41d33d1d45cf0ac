"""Optimizer state kept in a narrower dtype than the parameters (e.g. bf16 Adam moments)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from hybrid_jax.precision import dtypes
from hybrid_jax.tree import is_float_leaf


def _cast_state(state: Any, dtype) -> Any:
    def cast(x):
        if not is_float_leaf(x):
            return x
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(x.shape, dtype)
        return x.astype(dtype)

    return jax.tree_util.tree_map(cast, state)


def with_state_dtype(
    inner: optax.GradientTransformation, dtype: Any = jnp.bfloat16
) -> optax.GradientTransformationExtraArgs:
    """Stores every floating leaf of ``inner``'s state in ``dtype``; computes in fp32.

    Optax's ``mu_dtype`` covers only Adam's first moment; this wrapper covers every moment of any
    transformation. Each ``update`` upcasts the stored state to fp32, runs ``inner``, and rounds
    the new state to ``dtype`` (round to nearest), so the arithmetic is unchanged and only the
    storage is narrower: bf16 halves the state's bytes, at bf16's 8 significant bits per moment.

    Args:
      inner: the transformation whose state to narrow.
      dtype: the storage dtype of floating state leaves (a name such as ``"bf16"`` or a dtype).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with ``inner``'s update rule.

    Examples:
      >>> tx = with_state_dtype(optax.adam(1e-3), "bf16")
      >>> state = tx.init({"w": jnp.zeros(3)})
      >>> state[0].mu["w"].dtype, state[0].nu["w"].dtype
      (dtype(bfloat16), dtype(bfloat16))
    """
    dtype = dtypes.parse_dtype(dtype)
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        return _cast_state(inner.init(params), dtype)

    def update_fn(updates, state, params=None, **extra_args):
        state = _cast_state(state, jnp.float32)
        updates, state = inner.update(updates, state, params, **extra_args)
        return updates, _cast_state(state, dtype)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
