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

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from hybrid_jax import tree as tree_lib

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

_TRUNCATE = 300


# --------------------------------------------------------------------------------------------
# EMA
# --------------------------------------------------------------------------------------------


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
        if _is_float(x):
            return jnp.array(x, dtype=_dtype(x) if dtype is None else dtype, copy=True)
        return _copy(x)

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
    (ema_leaves, param_leaves), paths, treedef = _flatten_matching(
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
        if not _is_float(e):
            out.append(_copy(p))
        elif leaf_decay is None:
            out.append(jnp.array(p, dtype=_dtype(e), copy=True))
        else:
            out.append(_ema_leaf(e, p, weight(leaf_decay, _compute_dtype(_dtype(e)))))
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


# --------------------------------------------------------------------------------------------
# Soups
# --------------------------------------------------------------------------------------------


def uniform_soup(trees: Sequence[Any]) -> Any:
    """The leaf-wise mean of trees with the same structure, shapes and dtypes.

    The mean is a running mean in fp32 (fp64 for fp64 leaves), ``m_k = m_{k-1} + (x_k -
    m_{k-1}) / k``, cast back once. It needs one accumulator per leaf however many trees there
    are, and the soup of identical trees is bitwise that tree in every dtype (each step adds an
    exact zero; equal values, including infinities and signed zeros, are kept as they are).

    Integer, boolean and compound leaves are taken from ``trees[0]``.

    Args:
      trees: a non-empty sequence of pytrees (e.g. fine-tuned checkpoints of one model).

    Returns:
      The soup, shaped and typed like ``trees[0]``.

    Raises:
      TypeError: ``trees`` is not a sequence.
      ValueError: ``trees`` is empty, or two trees differ in structure, shapes or dtypes (the
        message names the first leaf that differs).

    Examples:
      >>> uniform_soup([{"w": jnp.array([1.0, 2.0])}, {"w": jnp.array([3.0, 6.0])}])
      {'w': Array([2., 4.], dtype=float32)}

    References:
      Wortsman et al., 2022, "Model soups: averaging weights of multiple fine-tuned models
      improves accuracy without increasing inference time": https://arxiv.org/abs/2203.05482
    """
    trees = _tree_list(trees, "uniform_soup")
    leaves, _, treedef = _flatten_matching(
        trees, [f"trees[{i}]" for i in range(len(trees))], what="uniform_soup"
    )
    means = _Mean(leaves[0])
    for k, tree_leaves in enumerate(leaves[1:], start=2):
        means = means.add(tree_leaves, k)
    return jax.tree_util.tree_unflatten(treedef, means.leaves())


class GreedySoupInfo(NamedTuple):
    """What :func:`greedy_soup` did.

    Attributes:
      kept: the indices (into the caller's ``trees``, ascending) of the ingredients in the soup.
      losses: each ingredient's own loss, in the caller's order.
      loss: the soup's loss (never above ``min(losses)``).
      order: all indices ranked by their own loss (best first): the order they were tried. The
        soup is bitwise ``uniform_soup([trees[i] for i in order if i in kept])``.
    """

    kept: tuple[int, ...]
    losses: tuple[float, ...]
    loss: float
    order: tuple[int, ...]


def greedy_soup(
    trees: Sequence[Any],
    evaluate: Callable[..., Any],
    *,
    key: jax.Array | None = None,
) -> tuple[Any, GreedySoupInfo]:
    """Wortsman et al.'s greedy soup: average only the ingredients that do not hurt.

    Each ingredient is evaluated alone and they are ranked by that loss (ties by index). The soup
    starts as the best one; each next one is added if the uniform soup of the kept ones plus it
    has a loss ``<=`` the current soup's, and skipped otherwise. The returned loss is therefore
    never worse than the best ingredient's (for a deterministic ``evaluate``). ``evaluate`` runs
    ``2 * len(trees) - 1`` times; a NaN loss ranks last and is never accepted.

    Integer, boolean and compound leaves come from the best ingredient.

    Args:
      trees: a non-empty sequence of pytrees with the same structure, shapes and dtypes.
      evaluate: ``evaluate(tree) -> loss`` (lower is better; a float or a scalar array), e.g. a
        validation loss; ``evaluate(tree, key)`` when ``key`` is given.
      key: an optional PRNG key passed to every call of ``evaluate``, so a stochastic evaluation
        (sampled batches, dropout) compares every candidate on the same randomness.

    Returns:
      ``(soup, info)``: the soup, shaped and typed like the trees (the best ingredient itself when
      no other joins it), and a :class:`GreedySoupInfo`.

    Raises:
      TypeError: ``trees`` is not a sequence, or ``evaluate`` does not return a scalar.
      ValueError: ``trees`` is empty or the trees differ (the message names the first leaf).

    Examples:
      >>> trees = [{"w": jnp.array(1.0)}, {"w": jnp.array(-1.0)}, {"w": jnp.array(3.0)}]
      >>> soup, info = greedy_soup(trees, lambda t: float(t["w"] ** 2))
      >>> soup["w"], info.kept, info.loss
      (Array(0., dtype=float32), (0, 1), 0.0)

    References:
      Wortsman et al., 2022, "Model soups: averaging weights of multiple fine-tuned models
      improves accuracy without increasing inference time", Algorithm 1:
      https://arxiv.org/abs/2203.05482
    """
    trees = _tree_list(trees, "greedy_soup")
    leaves, _, treedef = _flatten_matching(
        trees, [f"trees[{i}]" for i in range(len(trees))], what="greedy_soup"
    )

    def loss_of(tree: Any, what: str) -> float:
        value = evaluate(tree) if key is None else evaluate(tree, key)
        if np.ndim(value) != 0:
            raise TypeError(
                f"greedy_soup: evaluate must return a scalar loss, got shape {np.shape(value)} "
                f"for {what}"
            )
        return float(value)

    losses = tuple(loss_of(t, f"trees[{i}]") for i, t in enumerate(trees))
    order = tuple(sorted(range(len(trees)), key=lambda i: (math.isnan(losses[i]), losses[i], i)))

    best = order[0]
    soup, loss, kept = trees[best], losses[best], [best]
    means = _Mean(leaves[best])
    for i in order[1:]:
        candidate_means = means.add(leaves[i], len(kept) + 1)
        candidate = jax.tree_util.tree_unflatten(treedef, candidate_means.leaves())
        candidate_loss = loss_of(candidate, f"the soup of {[*kept, i]}")
        # `<=`, as in the paper (accuracy `>=`): an ingredient that does not hurt joins.
        if candidate_loss <= loss:
            soup, loss, means = candidate, candidate_loss, candidate_means
            kept.append(i)
    return soup, GreedySoupInfo(tuple(sorted(kept)), losses, loss, order)


class _Mean:
    """Running means of flat leaf lists: fp32 (or wider) accumulators for floating leaves."""

    def __init__(self, first: list[Any], acc: list[Any] | None = None):
        self.first = first  # dtypes to cast back to; the non-floating leaves taken whole
        self.acc = acc if acc is not None else [_widen(x) if _is_float(x) else x for x in first]

    def add(self, leaves: list[Any], k: int) -> _Mean:
        """The means with ``leaves`` added as the ``k``-th tree."""
        acc = []
        for m, x, x0 in zip(self.acc, leaves, self.first, strict=True):
            if not _is_float(x0):
                acc.append(m)
                continue
            acc.append(_mean_step(m, x, k))
        return _Mean(self.first, acc)

    def leaves(self) -> list[Any]:
        return [
            m.astype(_dtype(x0)) if _is_float(x0) else m
            for m, x0 in zip(self.acc, self.first, strict=True)
        ]


# --------------------------------------------------------------------------------------------
# Merge and interpolation
# --------------------------------------------------------------------------------------------


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

    leaves, paths, treedef = _flatten_matching(
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
    (a_leaves, b_leaves), _, treedef = _flatten_matching([a, b], ["a", "b"], what="interpolate")
    python_t = isinstance(t, numbers.Real) and not isinstance(t, bool)

    def mix(x, y):
        if _is_float(x):
            # t in the compute dtype before the jitted kernel: one compilation per leaf dtype
            # and shape, whether t came as an int, a float or an array.
            dtype = _compute_dtype(_dtype(x))
            t_c = jnp.asarray(t, dtype) if python_t else jnp.asarray(t).astype(dtype)
            return _lerp_leaf(x, y, t_c)
        if python_t:
            return x if t < 0.5 else y
        first = jnp.asarray(t) < 0.5
        return jax.tree_util.tree_map(lambda u, v: jnp.where(first, u, v), x, y)

    return jax.tree_util.tree_unflatten(
        treedef, [mix(x, y) for x, y in zip(a_leaves, b_leaves, strict=True)]
    )


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


# The per-leaf arithmetic is jitted so that an eager call makes one fused pass over each leaf
# (one kernel, no fp32 temporaries in memory) instead of one per jnp op; inside a jitted train
# step these calls are inlined into it.


@jax.jit
def _ema_leaf(e: jax.Array, p: jax.Array, w: jax.Array) -> jax.Array:
    e_c = e.astype(w.dtype)
    return (e_c + w * (p.astype(w.dtype) - e_c)).astype(e.dtype)


@jax.jit
def _mean_step(m: jax.Array, x: jax.Array, k: jax.Array) -> jax.Array:
    """The running mean ``m`` of ``k - 1`` values with ``x`` added."""
    x = x.astype(m.dtype)
    # Equal values stay bitwise as they are: inf - inf and -0 + 0 would not.
    return jnp.where(x == m, m, m + (x - m) / jnp.asarray(k).astype(m.dtype))


@jax.jit
def _lerp_leaf(x: jax.Array, y: jax.Array, t: jax.Array) -> jax.Array:
    dtype = _compute_dtype(x.dtype)
    x_c, y_c, t_c = x.astype(dtype), y.astype(dtype), t.astype(dtype)
    diff = y_c - x_c
    mixed = jnp.where(t_c <= 0.5, x_c + t_c * diff, y_c - (1 - t_c) * diff)
    # The formula is already exact at both ends for finite values; the selects make the ends
    # exact for infinities too (0 * inf is NaN).
    mixed = jnp.where(t_c == 0, x_c, jnp.where(t_c == 1, y_c, mixed))
    return mixed.astype(x.dtype)


def _dtype(x: Any) -> np.dtype | None:
    """The dtype of an array-like leaf, or None for a leaf that is not one (a string, ...)."""
    dtype = getattr(x, "dtype", None)
    if dtype is not None:
        return np.dtype(dtype)
    try:
        return np.dtype(jnp.asarray(x).dtype)
    except TypeError:
        return None


def _is_float(x: Any) -> bool:
    if tree_lib.is_leaf(x):
        return False
    dtype = _dtype(x)
    return dtype is not None and bool(jnp.issubdtype(dtype, jnp.inexact))


def _compute_dtype(dtype: Any) -> np.dtype:
    """fp32 for fp32 and narrower floats; fp64 and complex keep their own dtype."""
    dtype = np.dtype(dtype)
    if dtype in (np.dtype(np.float64), np.dtype(np.complex64), np.dtype(np.complex128)):
        return dtype
    return np.dtype(np.float32)


def _widen(x: Any) -> jax.Array:
    x = jnp.asarray(x)
    return x.astype(_compute_dtype(x.dtype))


def _copy(x: Any) -> Any:
    """A copy of a leaf with new buffers (each array of a compound leaf copied)."""
    return jax.tree_util.tree_map(
        lambda u: jnp.array(u, copy=True) if isinstance(u, (jax.Array, np.ndarray)) else u, x
    )


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


def _known(name: Any, trees: Mapping[Any, Any]) -> bool:
    try:
        return name in trees
    except TypeError:  # an unhashable name
        return False


def _tree_list(trees: Any, what: str) -> list[Any]:
    if isinstance(trees, (Mapping, str, bytes)) or not isinstance(trees, Sequence):
        raise TypeError(
            f"{what}: trees must be a sequence (list or tuple) of pytrees, got "
            f"{type(trees).__name__}"
        )
    if not trees:
        raise ValueError(f"{what}: trees is empty; give at least one tree")
    return list(trees)


def _flatten_matching(
    trees: Sequence[Any], names: Sequence[str], *, what: str, same_dtypes: bool = True
) -> tuple[list[list[Any]], list[str], Any]:
    """Flattens trees that must match; the error names the first leaf where they differ.

    Returns each tree's leaves, the leaf paths and the treedef of ``trees[0]``.
    """
    flats = [tree_lib.leaves_with_paths(t) for t in trees]
    ref_flat, ref_def = flats[0]
    paths = [path for path, _ in ref_flat]
    for name, (flat, treedef) in zip(names[1:], flats[1:], strict=True):
        other_paths = [path for path, _ in flat]
        if other_paths != paths or treedef != ref_def:
            raise ValueError(
                f"{what}: {name} and {names[0]} differ in structure: "
                + _structure_difference(paths, other_paths, ref_def, treedef, names[0], name)
            )
        for (path, x), (_, y) in zip(ref_flat, flat, strict=True):
            problem = _leaf_difference(x, y, same_dtypes)
            if problem:
                raise ValueError(
                    f"{what}: {name} and {names[0]} differ at leaf {path!r}: {problem} "
                    f"({names[0]} vs {name})"
                )
    return [[leaf for _, leaf in flat] for flat, _ in flats], paths, ref_def


def _structure_difference(ref_paths, paths, ref_def, treedef, ref_name, name) -> str:
    ref_set, other_set = set(ref_paths), set(paths)
    missing = [p for p in ref_paths if p not in other_set]
    extra = [p for p in paths if p not in ref_set]
    parts = []
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        parts.append(f"{name} lacks leaf {missing[0]!r}{more}")
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        parts.append(f"{name} has leaf {extra[0]!r} that {ref_name} lacks{more}")
    if not parts:
        parts.append(
            f"same leaf paths but different containers: {str(ref_def)[:_TRUNCATE]} vs "
            f"{str(treedef)[:_TRUNCATE]}"
        )
    return "; ".join(parts)


def _leaf_difference(x: Any, y: Any, same_dtypes: bool) -> str | None:
    if tree_lib.is_leaf(x) or tree_lib.is_leaf(y):
        if type(x) is not type(y):
            return f"{type(x).__name__} vs {type(y).__name__}"
        x_parts, x_def = jax.tree_util.tree_flatten(x)
        y_parts, y_def = jax.tree_util.tree_flatten(y)
        if x_def != y_def:
            return f"{type(x).__name__} with different contents"
        pairs = list(zip(x_parts, y_parts, strict=True))
    else:
        pairs = [(x, y)]
    for u, v in pairs:
        if np.shape(u) != np.shape(v):
            return f"shape {np.shape(u)} vs {np.shape(v)}"
        du, dv = _dtype(u), _dtype(v)
        if same_dtypes and du != dv:
            return f"dtype {du} vs {dv}"
        if _is_float(u) != _is_float(v):
            return f"dtype {du} vs {dv} (one is floating-point, the other not)"
    return None
