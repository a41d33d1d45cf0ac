"""Model merging: whole leaves taken by path rule, and linear interpolation of two models."""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hybrid_jax import tree as tree_lib
from hybrid_jax.mixing._leaves import compute_dtype, flatten_matching, is_averaged, leaf_dtype

__all__ = ["interpolate", "merge"]


def merge(
    trees: Mapping[Any, Any],
    rules: Sequence[tuple[str, Any]],
    *,
    default: Any = None,
    strict: bool = False,
) -> Any:
    """Takes each leaf whole from the tree its path rule names.

    For example, the attention weights of run ``"a"`` and the MLP weights of run ``"b"``::

      merge({"a": params_a, "b": params_b}, [(r"/attn/", "a"), (r"/mlp/", "b")], default="a")

    Rules are matched with the shared matcher (:mod:`hybrid_jax.tree`): the first rule whose
    pattern ``re.search``-es a leaf's path decides it; a rule that decides no leaf warns with
    :class:`~hybrid_jax.tree.UnusedRuleWarning` (an error when ``strict``). Leaves are not
    copied or cast.

    Args:
      trees: a mapping ``name -> tree``; the trees have the same structure, shapes and dtypes.
      rules: an ordered ``[(pattern, name), ...]`` list.
      default: the name of the tree that gives the leaves no rule matches; ``None``: such a leaf
        is an error.
      strict: make a rule that decides no leaf, or a leaf two rules match, an error.

    Returns:
      The merged tree, with the structure of the trees.

    Raises:
      TypeError: ``trees`` is not a mapping, or ``rules`` is not a list of pairs.
      ValueError: ``trees`` is empty; a rule or ``default`` names a tree that is not in
        ``trees``; a leaf matches no rule and there is no default; the trees differ (the message
        names the first leaf that differs); or, under ``strict``, a rule decides nothing.

    Examples:
      >>> a = {"attn": jnp.ones(2), "mlp": jnp.ones(2)}
      >>> b = {"attn": jnp.zeros(2), "mlp": jnp.zeros(2)}
      >>> merge({"a": a, "b": b}, [("attn", "a"), ("mlp", "b")])
      {'attn': Array([1., 1.], dtype=float32), 'mlp': Array([0., 0.], dtype=float32)}
    """
    if not isinstance(trees, Mapping):
        raise TypeError(
            f"merge: trees must be a mapping name -> tree, got {type(trees).__name__}; "
            "e.g. merge({'a': params_a, 'b': params_b}, rules)"
        )
    if not trees:
        raise ValueError("merge: trees is empty; give a mapping name -> tree")
    names = list(trees)
    compiled = tree_lib.compile_rules(rules, kind="merge rule")
    for i, rule in enumerate(compiled):
        if not _known(rule.value, trees):
            raise ValueError(
                f"merge rule {i} ({rule.pattern!r}) names tree {rule.value!r}, which is not one "
                f"of the trees: {names}"
            )
    if default is not None and not _known(default, trees):
        raise ValueError(f"merge: default={default!r} is not one of the trees: {names}")

    leaves, paths, treedef = flatten_matching(
        [trees[n] for n in names], [f"trees[{n!r}]" for n in names], what="merge"
    )
    # Called directly (not via tree.assign) so an unused-rule warning points at our caller.
    indices = tree_lib.match_indices(
        compiled, paths, has_default=default is not None, strict=strict, kind="merge rule"
    )
    position = {name: k for k, name in enumerate(names)}
    out = [
        leaves[position[default if i < 0 else compiled[i].value]][j] for j, i in enumerate(indices)
    ]
    return jax.tree_util.tree_unflatten(treedef, out)


def interpolate(a: Any, b: Any, t: Any) -> Any:
    """The leaf-wise linear interpolation ``(1 - t) a + t b``.

    Computed in fp32 (fp64 for fp64 leaves) as ``a + t (b - a)`` for ``t <= 1/2`` and
    ``b - (1 - t) (b - a)`` above, then cast back once: both ends are exact (``t = 0`` gives ``a``
    and ``t = 1`` gives ``b`` bitwise, in every dtype, infinities included) and the result is
    symmetric in ``(a, t) <-> (b, 1 - t)``. ``t`` outside ``[0, 1]`` extrapolates.

    Integer, boolean and compound leaves are taken whole from the nearer end: ``a`` when
    ``t < 1/2``, else ``b``.

    Args:
      a: a pytree.
      b: a pytree with the structure, shapes and dtypes of ``a``.
      t: the weight of ``b``: a Python number or a scalar array (it may be traced).

    Returns:
      The interpolated tree, shaped and typed like ``a``.

    Raises:
      ValueError: ``t`` is not a scalar, or ``a`` and ``b`` differ (the message names the first
        leaf that differs).

    Examples:
      >>> a = {"w": jnp.array([0.0, 2.0], jnp.bfloat16)}
      >>> b = {"w": jnp.array([1.0, 4.0], jnp.bfloat16)}
      >>> interpolate(a, b, 0.25)
      {'w': Array([0.25, 2.5], dtype=bfloat16)}

    References:
      Wortsman et al., 2022, "Robust fine-tuning of zero-shot models" (WiSE-FT):
      https://arxiv.org/abs/2109.01903
    """
    if np.ndim(t) != 0:
        raise ValueError(f"interpolate: t must be a scalar, got shape {np.shape(t)}")
    (a_leaves, b_leaves), _, treedef = flatten_matching([a, b], ["a", "b"], what="interpolate")
    python_t = isinstance(t, numbers.Real) and not isinstance(t, bool)

    def mix(x, y):
        if is_averaged(x):
            # t in the compute dtype before the jitted kernel: one compilation per leaf dtype
            # and shape, whether t came as an int, a float or an array.
            dtype = compute_dtype(leaf_dtype(x))
            t_c = jnp.asarray(t, dtype) if python_t else jnp.asarray(t).astype(dtype)
            return _lerp_leaf(x, y, t_c)
        if python_t:
            return x if t < 0.5 else y
        first = jnp.asarray(t) < 0.5
        return jax.tree_util.tree_map(lambda u, v: jnp.where(first, u, v), x, y)

    return jax.tree_util.tree_unflatten(
        treedef, [mix(x, y) for x, y in zip(a_leaves, b_leaves, strict=True)]
    )


# Jitted so that an eager call makes one fused pass over each leaf (one kernel, no fp32
# temporaries in memory) instead of one per jnp op; inside a jitted step it is inlined.
@jax.jit
def _lerp_leaf(x: jax.Array, y: jax.Array, t: jax.Array) -> jax.Array:
    dtype = compute_dtype(x.dtype)
    x_c, y_c, t_c = x.astype(dtype), y.astype(dtype), t.astype(dtype)
    diff = y_c - x_c
    mixed = jnp.where(t_c <= 0.5, x_c + t_c * diff, y_c - (1 - t_c) * diff)
    # The formula is already exact at both ends for finite values; the selects make the ends
    # exact for infinities too (0 * inf is NaN).
    mixed = jnp.where(t_c == 0, x_c, jnp.where(t_c == 1, y_c, mixed))
    return mixed.astype(x.dtype)


def _known(name: Any, trees: Mapping[Any, Any]) -> bool:
    try:
        return name in trees
    except TypeError:  # an unhashable name
        return False
