"""Model soups: the uniform and the greedy average of fine-tuned checkpoints of one model."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from hybrid_jax.mixing._leaves import flatten_matching, is_averaged, leaf_dtype, tree_list, widen

__all__ = ["GreedySoupInfo", "greedy_soup", "uniform_soup"]


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
    trees = tree_list(trees, "uniform_soup")
    leaves, _, treedef = flatten_matching(
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
    trees = tree_list(trees, "greedy_soup")
    leaves, _, treedef = flatten_matching(
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
        self.acc = acc if acc is not None else [widen(x) if is_averaged(x) else x for x in first]

    def add(self, leaves: list[Any], k: int) -> _Mean:
        """The means with ``leaves`` added as the ``k``-th tree."""
        acc = []
        for m, x, x0 in zip(self.acc, leaves, self.first, strict=True):
            if not is_averaged(x0):
                acc.append(m)
                continue
            acc.append(_mean_step(m, x, k))
        return _Mean(self.first, acc)

    def leaves(self) -> list[Any]:
        return [
            m.astype(leaf_dtype(x0)) if is_averaged(x0) else m
            for m, x0 in zip(self.acc, self.first, strict=True)
        ]


# Jitted so that an eager call makes one fused pass over each leaf (one kernel, no fp32
# temporaries in memory) instead of one per jnp op; inside a jitted step it is inlined.
@jax.jit
def _mean_step(m: jax.Array, x: jax.Array, k: jax.Array) -> jax.Array:
    """The running mean ``m`` of ``k - 1`` values with ``x`` added."""
    x = x.astype(m.dtype)
    # Equal values stay bitwise as they are: inf - inf and -0 + 0 would not.
    return jnp.where(x == m, m, m + (x - m) / jnp.asarray(k).astype(m.dtype))
