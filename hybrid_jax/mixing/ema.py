"""Exponential moving averages of the parameters, for a train step to keep beside them."""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hybrid_jax import tree as tree_lib
from hybrid_jax.mixing._leaves import (
    compute_dtype,
    copy_leaf,
    flatten_matching,
    is_averaged,
    leaf_dtype,
)

__all__ = ["EMA", "ema_init", "ema_update"]


def ema_init(params: Any, dtype: Any = None) -> Any:
    """A new exponential moving average of ``params``: a copy of them.

    The copy is a real one (new buffers), so the EMA and the parameters can sit in one train
    state that is donated to a jitted step.

    Args:
      params: any pytree of parameters.
      dtype: ``None`` keeps each leaf's dtype (the contract: the EMA is shaped and typed like the
        parameters). A floating dtype (e.g. ``jnp.float32``) stores every floating-point leaf of
        the EMA in it instead: for bf16 parameters an fp32 EMA is more exact, because with
        ``decay=0.999`` a bf16 EMA rounds away any update smaller than ``2**-9`` of its value.
        Integer, boolean and compound leaves keep their dtype.

    Returns:
      The EMA tree.

    Raises:
      TypeError: ``dtype`` is not a floating-point dtype.

    Examples:
      >>> params = {"w": jnp.array([1.0, 2.0], jnp.bfloat16), "n": jnp.array(3)}
      >>> ema_init(params, dtype=jnp.float32)
      {'n': Array(3, dtype=int32, weak_type=True), 'w': Array([1., 2.], dtype=float32)}

    References:
      Polyak and Juditsky, 1992, "Acceleration of Stochastic Approximation by Averaging".
    """
    if dtype is not None:
        dtype = _float_dtype(dtype, "ema_init(dtype=)")

    def init(x):
        if is_averaged(x):
            return jnp.array(x, dtype=leaf_dtype(x) if dtype is None else dtype, copy=True)
        return copy_leaf(x)

    return jax.tree_util.tree_map(init, params, is_leaf=tree_lib.is_leaf)


def ema_update(
    ema: Any,
    params: Any,
    step: Any,
    *,
    decay: float = 0.999,
    warmup_steps: float = 0,
    rules: Sequence[tuple[str, float | None]] | None = None,
) -> Any:
    """One step of an exponential moving average of the parameters.

    Per floating-point leaf, computed in fp32 (fp64 for fp64 leaves) and cast back to the EMA
    leaf's dtype once::

      ema <- ema + (1 - d_t) * (params - ema)

    With ``warmup_steps = W > 1`` the decay warms up as in TensorFlow's
    ``ExponentialMovingAverage(num_updates=step)`` (``W = 10`` is exactly TF's formula, and the
    default of diffusers' ``EMAModel``)::

      d_t = min(decay, (1 + t) / (W + t)),   t = step

    so early on the EMA is a mean over about the last ``t / (W - 1)`` steps instead of being
    dominated by the random initialization; a larger ``W`` warms up longer (``d_t`` reaches
    ``decay`` at ``t = (W * decay - 1) / (1 - decay)``). ``W <= 1`` gives ``d_t = decay``
    throughout. The weight of the new parameters, ``1 - d_t = max(1 - decay, (W - 1) / (W + t))``,
    is computed directly: subtracting an fp32 ``d_t`` close to 1 from 1 would lose digits.

    Leaves taken whole from ``params`` (the newest tree), copied: integer and boolean leaves,
    :class:`~hybrid_jax.tree.CompoundLeaf` leaves, and leaves a rule excludes (cast to the EMA
    leaf's dtype). Jit-able: ``step`` may be a traced integer, and the output has the dtypes and
    shapes of ``ema``, so it can be a ``lax.scan`` carry.

    Args:
      ema: the current EMA, from :func:`ema_init` (its floating leaves may be wider than the
        parameters').
      params: the current parameters, same structure and shapes as ``ema``.
      step: the number of updates made so far (0 for the first); a Python int or an integer
        array, traced or not. Only used when ``warmup_steps > 1``.
      decay: the decay of leaves no rule matches, in ``[0, 1]``.
      warmup_steps: ``W`` of the warm-up above; 0 (the default) for none.
      rules: an ordered ``[(pattern, decay_or_None), ...]`` list, matched against leaf paths with
        the shared matcher (first match wins; a rule that decides no leaf warns with
        :class:`~hybrid_jax.tree.UnusedRuleWarning`). A float gives the matching leaves that decay
        (warmed up the same way); ``None`` excludes them: their EMA is the parameters.

    Returns:
      The new EMA, shaped and typed like ``ema``.

    Raises:
      ValueError: ``ema`` and ``params`` differ in structure or shapes (the message names the
        first leaf that differs), or a decay is outside ``[0, 1]``.
      TypeError: a decay or ``warmup_steps`` is not a number.

    Examples:
      >>> ema = {"w": jnp.array([0.0, 0.0]), "b": jnp.array(0.0)}
      >>> params = {"w": jnp.array([1.0, 2.0]), "b": jnp.array(5.0)}
      >>> ema_update(ema, params, step=0, decay=0.9, rules=[("^b$", None)])
      {'b': Array(5., dtype=float32), 'w': Array([0.1, 0.2], dtype=float32)}

    References:
      Polyak and Juditsky, 1992, "Acceleration of Stochastic Approximation by Averaging".
      TensorFlow, ``tf.train.ExponentialMovingAverage``:
      https://www.tensorflow.org/api_docs/python/tf/train/ExponentialMovingAverage
    """
    decay = _check_decay(decay, "decay")
    warmup_steps = _check_warmup(warmup_steps)
    (ema_leaves, param_leaves), paths, treedef = flatten_matching(
        [ema, params], ["ema", "params"], what="ema_update", same_dtypes=False
    )

    if rules is None:
        decays = [decay] * len(paths)
    else:
        compiled = _compile_ema_rules(rules)
        # match_indices warns with stacklevel=3: the warning points at our caller's line.
        indices = tree_lib.match_indices(compiled, paths, has_default=True, kind="EMA rule")
        decays = [decay if i < 0 else compiled[i].value for i in indices]

    weights: dict[tuple[float, np.dtype], jax.Array] = {}

    def weight(leaf_decay: float, dtype: np.dtype) -> jax.Array:
        # One scalar per (decay, compute dtype), not one per leaf: fewer ops to trace.
        if (leaf_decay, dtype) not in weights:
            w = jnp.asarray(1.0 - leaf_decay, dtype)  # 1 - decay in float64, rounded once
            if warmup_steps > 1:
                t = jnp.asarray(step).astype(dtype)
                warm = jnp.asarray(warmup_steps - 1, dtype) / (jnp.asarray(warmup_steps, dtype) + t)
                w = jnp.maximum(w, warm)
            weights[leaf_decay, dtype] = w
        return weights[leaf_decay, dtype]

    out = []
    for e, p, leaf_decay in zip(ema_leaves, param_leaves, decays, strict=True):
        if not is_averaged(e):
            out.append(copy_leaf(p))
        elif leaf_decay is None:
            out.append(jnp.array(p, dtype=leaf_dtype(e), copy=True))
        else:
            out.append(_ema_leaf(e, p, weight(leaf_decay, compute_dtype(leaf_dtype(e)))))
    return jax.tree_util.tree_unflatten(treedef, out)


@dataclasses.dataclass(frozen=True)
class EMA:
    """An exponential moving average of the parameters, as a frozen, hashable configuration.

    Wraps :func:`ema_init` and :func:`ema_update` so a train step can hold one (and use it as a
    static argument of ``jax.jit``). ``rules`` is stored as a tuple of pairs, so a list works too.

    Attributes:
      decay: the decay of leaves no rule matches, in ``[0, 1]``.
      warmup_steps: the TF-style warm-up of :func:`ema_update`; 0 for none.
      rules: ``[(pattern, decay_or_None), ...]``, as in :func:`ema_update`.
      dtype: the dtype of the EMA's floating leaves, as in :func:`ema_init`; ``None`` keeps the
        parameters'.

    Examples:
      >>> ema_fn = EMA(decay=0.5)
      >>> params = {"w": jnp.array([2.0])}
      >>> ema = ema_fn.init({"w": jnp.array([0.0])})
      >>> ema_fn.update(ema, params, step=0)
      {'w': Array([1.], dtype=float32)}

    References:
      Polyak and Juditsky, 1992, "Acceleration of Stochastic Approximation by Averaging".
    """

    decay: float = 0.999
    warmup_steps: float = 0
    rules: tuple[tuple[str, float | None], ...] | None = None
    dtype: Any = None

    def __post_init__(self):
        # Validate at construction (the error points at the config) and normalize to hashables.
        object.__setattr__(self, "decay", _check_decay(self.decay, "decay"))
        object.__setattr__(self, "warmup_steps", _check_warmup(self.warmup_steps))
        if self.rules is not None:
            compiled = _compile_ema_rules(self.rules)
            object.__setattr__(self, "rules", tuple((r.pattern, r.value) for r in compiled))
        if self.dtype is not None:
            object.__setattr__(self, "dtype", _float_dtype(self.dtype, "EMA(dtype=)"))

    def init(self, params: Any) -> Any:
        """:func:`ema_init` with this configuration's ``dtype``."""
        return ema_init(params, dtype=self.dtype)

    def update(self, ema: Any, params: Any, step: Any) -> Any:
        """:func:`ema_update` with this configuration's decay, warm-up and rules."""
        return ema_update(
            ema,
            params,
            step,
            decay=self.decay,
            warmup_steps=self.warmup_steps,
            rules=self.rules,
        )


# Jitted so that an eager call makes one fused pass over each leaf (one kernel, no fp32
# temporaries in memory) instead of one per jnp op; inside a jitted step it is inlined.
@jax.jit
def _ema_leaf(e: jax.Array, p: jax.Array, w: jax.Array) -> jax.Array:
    e_c = e.astype(w.dtype)
    return (e_c + w * (p.astype(w.dtype) - e_c)).astype(e.dtype)


def _float_dtype(dtype: Any, what: str) -> np.dtype:
    try:
        dtype = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"{what}: {dtype!r} is not a dtype; use e.g. jnp.float32") from None
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"{what}: the EMA dtype must be floating-point, got {dtype}")
    return dtype


def _check_decay(decay: Any, what: str) -> float:
    if isinstance(decay, bool) or not isinstance(decay, numbers.Real):
        raise TypeError(f"{what} must be a number in [0, 1], got {type(decay).__name__}: {decay!r}")
    if not 0.0 <= float(decay) <= 1.0:
        raise ValueError(f"{what} must be in [0, 1], got {decay!r}")
    return float(decay)


def _check_warmup(warmup_steps: Any) -> float:
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, numbers.Real):
        raise TypeError(
            f"warmup_steps must be a non-negative number, got "
            f"{type(warmup_steps).__name__}: {warmup_steps!r}"
        )
    if not warmup_steps >= 0:
        raise ValueError(f"warmup_steps must be >= 0 (0: no warm-up), got {warmup_steps!r}")
    return warmup_steps


def _compile_ema_rules(rules: Sequence[tuple[str, Any]]) -> tuple[tree_lib.Rule, ...]:
    compiled = tree_lib.compile_rules(rules, kind="EMA rule")
    checked = []
    for i, rule in enumerate(compiled):
        value = rule.value
        if value is not None:
            value = _check_decay(value, f"EMA rule {i} ({rule.pattern!r}): the decay")
        checked.append(dataclasses.replace(rule, value=value))
    return tuple(checked)
