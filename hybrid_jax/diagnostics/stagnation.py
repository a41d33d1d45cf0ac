"""Update stagnation: which updates ``p + u`` rounds away in a parameter's storage dtype.

Like the range reports, it runs on the host, in NumPy, on concrete arrays, between steps.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from hybrid_jax import tree as tree_lib
from hybrid_jax._table import Table
from hybrid_jax.diagnostics._common import Shown, dtype_label, floating_leaves, host_array
from hybrid_jax.precision import dtypes


def stagnation_fractions(params: Any, updates: Any) -> dict[str, float]:
    """Per leaf, the fraction of nonzero updates that ``p + u`` in ``p``'s dtype rounds away.

    Args:
      params: a pytree of concrete parameter arrays.
      updates: a pytree of updates with the same paths (leaves without an update, such as
        ``None`` or ``optax.MaskedNode()``, are left out).

    Returns:
      ``{path: fraction}`` over floating leaves; NaN where a leaf has no nonzero finite update.
      See :func:`update_stagnation` for the rule.

    Examples:
      >>> p = {"w": jnp.ones(4, jnp.bfloat16)}
      >>> stagnation_fractions(p, {"w": jnp.array([1e-3, 1e-3, 1e-2, 0.0])})
      {'w': 0.6666666666666666}
    """
    return {s.path: s.fraction for s in _stagnation(params, updates)}


def update_stagnation(params: Any, updates: Any) -> Table:
    """A table of the updates each parameter's storage dtype rounds away.

    An update ``u != 0`` stagnates when ``(p + u).astype(p.dtype) == p``, computed as
    ``optax.apply_updates`` does under standard promotion: the sum in fp32 (fp64 if ``p`` or
    ``u`` is fp64), rounded to nearest in ``p``'s dtype. Roughly, updates below half an ulp of
    ``p``: a bf16 weight of 1.0 (ulp 2^-7) ignores an update of 1e-3. Non-finite updates and
    parameters are left out, as are zero updates (frozen or masked entries).

    Columns: ``path``, the ``param`` and ``update`` dtypes, ``size``, ``nonzero`` (nonzero finite
    updates), ``stagnant`` (the fraction of those rounded away; NaN when there are none) and
    ``mean |u|/ulp`` (over the same updates, with ``ulp(p)`` the spacing of ``p``'s dtype above
    ``|p|``). A footer totals the tree.

    Args:
      params: a pytree of concrete parameter arrays.
      updates: a pytree of updates with the same paths.

    Returns:
      A :class:`~hybrid_jax._table.Table`; :func:`stagnation_fractions` gives the raw fractions.

    Raises:
      ValueError: an update whose path is not a parameter's, or whose shape differs from it.
      TypeError: a leaf that is not concrete, or an update that is not floating.

    Examples:
      >>> params = {"bf16": jnp.ones(3, jnp.bfloat16), "f32": jnp.ones(3)}
      >>> updates = {"bf16": jnp.full(3, 1e-3), "f32": jnp.full(3, 1e-3)}
      >>> print(update_stagnation(params, updates))
      path   param  update  size  nonzero  stagnant  mean |u|/ulp
      -----  -----  ------  ----  -------  --------  ------------
      bf16   bf16   f32     3     3        1         0.128
      f32    f32    f32     3     3        0         8.39e+03
      -----  -----  ------  ----  -------  --------  ------------
      total                 6     6        0.5       4.19e+03
    """
    rows, total_size, total_nonzero, total_stagnant, total_ratio = [], 0, 0, 0, 0.0
    for s in _stagnation(params, updates):
        rows.append(
            (s.path, s.param, s.update, s.size, s.nonzero, Shown(s.fraction), Shown(s.mean_ratio))
        )
        total_size += s.size
        total_nonzero += s.nonzero
        total_stagnant += s.stagnant
        total_ratio += s.ratio_sum
    columns = ("path", "param", "update", "size", "nonzero", "stagnant", "mean |u|/ulp")
    footer = (
        "total",
        "",
        "",
        total_size,
        total_nonzero,
        Shown(_ratio(total_stagnant, total_nonzero)),
        Shown(_ratio(total_ratio, total_nonzero)),
    )
    return Table(columns, tuple(rows), (footer,) if rows else ())


class _LeafStagnation(NamedTuple):
    path: str
    param: str
    update: str
    size: int
    nonzero: int
    stagnant: int
    ratio_sum: float

    @property
    def fraction(self) -> float:
        return _ratio(self.stagnant, self.nonzero)

    @property
    def mean_ratio(self) -> float:
        return _ratio(self.ratio_sum, self.nonzero)


def _ratio(a: float, b: int) -> float:
    return a / b if b else math.nan


def _ulp(p: np.ndarray) -> np.ndarray:
    """The spacing of ``p``'s dtype just above ``|p|``, in float64 (subnormals included)."""
    info = jnp.finfo(p.dtype)
    magnitude = np.abs(p.astype(np.float64))
    _, exponent = np.frexp(magnitude)  # magnitude = m * 2**exponent, 0.5 <= m < 1
    binade = np.where(magnitude > 0, np.maximum(exponent - 1, info.minexp), info.minexp)
    return np.ldexp(1.0, binade - info.nmant)


def _stagnation(params: Any, updates: Any) -> list[_LeafStagnation]:
    by_path = dict(tree_lib.leaves_with_paths(updates)[0])
    param_leaves = dict(tree_lib.leaves_with_paths(params)[0])
    stray = [path for path in by_path if path not in param_leaves]
    if stray:
        raise ValueError(
            f"updates have leaves no parameter has: {stray[:10]}; params and updates must be "
            "trees of the same structure"
        )
    out = []
    for path, p in floating_leaves(params, "update_stagnation"):
        if path not in by_path:
            continue
        u = host_array(by_path[path], "update_stagnation", path)
        if u.shape != p.shape:
            raise ValueError(
                f"leaf {path!r}: the update's shape {u.shape} differs from the parameter's "
                f"{p.shape}"
            )
        # apply_updates promotes p + u (bf16 + fp32 -> fp32) and rounds the sum to p's dtype.
        # Adding in fp32 first and rounding again matches it; for bf16 and fp16 operands the two
        # roundings equal one (24 >= 2 * 11 + 2 significand bits), so it is also p + u in p's dtype.
        wide = dtypes.FLOAT64 if dtypes.FLOAT64 in (p.dtype, u.dtype) else dtypes.FLOAT32
        with np.errstate(over="ignore", invalid="ignore"):
            new = (p.astype(wide) + u.astype(wide)).astype(p.dtype)
        u64, p64 = u.astype(np.float64), p.astype(np.float64)
        counted = (u64 != 0) & np.isfinite(u64) & np.isfinite(p64)
        stagnant = counted & (new.astype(np.float64) == p64)
        ratio = np.abs(u64[counted]) / _ulp(p[counted])
        out.append(
            _LeafStagnation(
                path,
                dtype_label(p.dtype),
                dtype_label(u.dtype),
                int(p.size),
                int(np.count_nonzero(counted)),
                int(np.count_nonzero(stagnant)),
                float(ratio.sum()),
            )
        )
    return out
