"""Gradient mixing: combining the loss terms' gradients before the optimizer update.

A mixer takes per-term gradients stacked on a leading axis (``[n_terms, ...]`` per leaf, from
:func:`term_gradients`) and returns one gradient tree. :class:`Sum` is the default and is never
run on stacked gradients: a train step whose mixer has ``per_term = False`` takes one plain
``jax.grad`` of the weighted total, which is the same sum at no extra cost. Only a mixer with
``per_term = True`` (:class:`PCGrad`) pays for per-term gradients.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from hybrid_jax.losses.weighting import check_same_names
from hybrid_jax.tree import path_str

Weights = Mapping[str, Any] | Callable[[dict[str, jax.Array]], Mapping[str, Any]] | None


def term_gradients(
    terms_fn: Callable[..., Mapping[str, jax.Array]],
    params: Any,
    *args: Any,
    weights: Weights = None,
) -> tuple[dict[str, jax.Array], Any]:
    """Every loss term's weighted gradient, from one forward pass and one batched ``jax.vjp``.

    The forward pass runs once; its VJP is then ``jax.vmap``-ed over the ``n`` cotangents
    ``λ_i e_i`` (``e_i`` the i-th basis vector of the terms), so row ``i`` of the result is
    ``λ_i ∇L_i``. That is one backward pass over a batch of ``n`` cotangents, sharing the forward
    residuals, instead of ``n`` forward and backward passes in a Python loop. The backward still
    does ``n`` times the work and the result holds ``n`` gradients: use it only for a mixer that
    needs per-term gradients.

    Args:
      terms_fn: ``terms_fn(params, *args) -> {name: scalar}``.
      params: the pytree to differentiate (e.g. the compute-precision parameters).
      *args: the other arguments of ``terms_fn`` (batch, rng), not differentiated.
      weights: the ``λ_i`` (folded into the cotangents, so they cost nothing): ``None`` for 1, a
        ``{name: scalar}`` mapping, or a function of the terms returning one (for weightings whose
        ``λ_i`` depend on the current losses). Multiply them by the loss scale to scale the loss.

    Returns:
      ``(terms, grads)``: the terms as ``terms_fn`` gave them, and a tree shaped like ``params``
      whose leaves have a leading axis of size ``n`` in the order JAX flattens ``terms`` (for a
      dict, ``list(terms)``: sorted names). Gradients have the dtype of ``params``.

    Raises:
      TypeError: ``terms_fn`` does not return a mapping of floating scalars.
      ValueError: the weights name other terms than ``terms_fn`` returns.

    Examples:
      >>> terms_fn = lambda w: {"a": jnp.sum(w**2), "b": jnp.sum(w)}
      >>> w = jnp.array([1.0, 2.0])
      >>> terms, grads = term_gradients(terms_fn, w, weights={"a": 1.0, "b": 3.0})
      >>> grads  # rows: 1 * d(a)/dw, 3 * d(b)/dw
      Array([[2., 4.],
             [3., 3.]], dtype=float32)
    """
    terms, vjp_fn = jax.vjp(lambda p: terms_fn(p, *args), params)
    if not isinstance(terms, Mapping):
        raise TypeError(
            f"terms_fn must return a {{name: scalar}} mapping, got {type(terms).__name__}"
        )
    flat, treedef = jax.tree_util.tree_flatten_with_path(terms)
    names = [path_str(keypath) for keypath, _ in flat]
    for name, (_, term) in zip(names, flat, strict=True):
        if jnp.ndim(term) != 0 or not jnp.issubdtype(jnp.result_type(term), jnp.floating):
            raise TypeError(
                f"loss term {name!r} must be a floating scalar, got "
                f"{jnp.result_type(term)}{list(jnp.shape(term))}"
            )
    if len(flat) != len(terms):
        raise TypeError(f"terms_fn must return a flat {{name: scalar}} mapping, got {names}")
    if weights is None:
        weights = {name: np.float32(1) for name in names}
    elif callable(weights) and not isinstance(weights, Mapping):
        weights = weights(jax.lax.stop_gradient(terms))
    check_same_names(list(weights), names, "the weights", "the loss terms")

    # Batch element b of the cotangents is λ_b e_b, so term i's cotangent is the column λ_i δ_bi.
    eye = jnp.eye(len(names), dtype=jnp.float32)
    cotangents = [
        (eye[:, i] * jnp.asarray(weights[name]).astype(jnp.float32)).astype(jnp.result_type(term))
        for i, (name, (_, term)) in enumerate(zip(names, flat, strict=True))
    ]
    (grads,) = jax.vmap(vjp_fn)(jax.tree_util.tree_unflatten(treedef, cotangents))
    return terms, grads


class Mixer(Protocol):
    """What a train step needs of a gradient mixer (:class:`Sum`, :class:`PCGrad`).

    Attributes:
      per_term: whether the mixer needs per-term gradients. ``False`` promises that mixing is
        the plain sum, so the step takes one ``jax.grad`` of the weighted total and never calls
        the mixer; ``True`` makes the step stack the terms' gradients (:func:`term_gradients`)
        and call the mixer on them.
    """

    per_term: bool

    def __call__(self, stacked_grads: Any, key: jax.Array | None = None) -> Any:
        """One gradient tree from ``[n_terms, ...]`` leaves; ``key`` for random choices."""
        ...


class Sum:
    """The default mixer: the plain sum of the per-term gradients.

    ``per_term = False`` tells the train step not to compute per-term gradients at all: it takes
    one ``jax.grad`` of the weighted total, which equals this sum (the gradient is linear in the
    terms) and costs nothing beyond the plain backward pass. Calling a ``Sum`` on stacked
    gradients is for tests and for comparing mixers.

    Examples:
      >>> Sum()({"w": jnp.array([[1.0, -1.0], [2.0, 3.0]])})
      {'w': Array([3., 2.], dtype=float32)}
    """

    per_term = False

    def __repr__(self) -> str:
        return "Sum()"

    def __call__(self, stacked_grads: Any, key: jax.Array | None = None) -> Any:
        """Sums each leaf over its leading (term) axis, in fp32, keeping the leaf's dtype."""
        del key
        _num_terms(stacked_grads)
        return jax.tree_util.tree_map(
            lambda g: jnp.sum(g.astype(jnp.float32), axis=0).astype(g.dtype), stacked_grads
        )


class PCGrad:
    """Projecting conflicting gradients (PCGrad, Yu et al., 2020).

    For each term ``i``, start from ``g_i`` and, for every other term ``j`` in turn, remove the
    component along ``g_j`` when the two conflict::

        g_i' = g_i
        for j in order_i:                          # every j != i
            if g_i' · g_j < 0:
                g_i' -= (g_i' · g_j) / |g_j|² g_j
        mixed = Σ_i g_i'

    where ``g_j`` is always the *original* gradient. For two terms the result has a non-negative
    dot product with both; when no pair conflicts it is the plain sum.

    Every ``g_i'`` stays in the span of the original gradients, so the procedure runs on their
    ``n x n`` Gram matrix alone (computed in fp32 at full matmul precision, one contraction per
    leaf) and ends in one weighted sum per leaf: no gradient is flattened into one long vector,
    and the projections cost ``O(n³)`` scalar work, not ``O(n² params)``.

    Order: with ``key=None`` every ``order_i`` is ascending (``0, 1, …`` without ``i``), which is
    deterministic and reproducible. With a ``key``, each ``order_i`` is an independent random
    permutation, as in the paper's implementation; the result is a pure function of the key, so
    pass a fresh one each step (e.g. split from the train state's rng).

    Examples:
      >>> grads = {"w": jnp.array([[1.0, 0.0], [-1.0, 1.0]])}  # conflicting: dot = -1
      >>> PCGrad()(grads)
      {'w': Array([0.5, 1.5], dtype=float32)}

    References:
      Yu et al., 2020, `Gradient Surgery for Multi-Task Learning
      <https://arxiv.org/abs/2001.06782>`_.
    """

    per_term = True

    def __repr__(self) -> str:
        return "PCGrad()"

    def __call__(self, stacked_grads: Any, key: jax.Array | None = None) -> Any:
        """The mixed gradient: a tree shaped like one term's gradient, in the leaves' dtypes.

        Args:
          stacked_grads: per-term gradients, each leaf ``[n_terms, ...]`` (from
            :func:`term_gradients`).
          key: a PRNG key for random projection orders, or ``None`` for the fixed order.

        Raises:
          ValueError: the leaves disagree on the number of terms, or there are no leaves.
        """
        _num_terms(stacked_grads)  # a clear error before tracing
        return _pcgrad(stacked_grads, key)

    @staticmethod
    def order(n: int, key: jax.Array | None = None) -> jax.Array:
        """The projection order, an ``[n, n - 1]`` int32 array: row ``i`` lists every ``j != i``."""
        if key is None:
            others = jnp.arange(n - 1, dtype=jnp.int32)[None, :].repeat(n, axis=0)
        else:
            # Independent uniform permutations, one per row (argsort of uniform noise; one sort
            # compiles far faster than a vmapped jax.random.permutation).
            noise = jax.random.uniform(key, (n, n - 1))
            others = jnp.argsort(noise, axis=1).astype(jnp.int32)
        rows = jnp.arange(n, dtype=jnp.int32)[:, None]
        return others + (others >= rows).astype(jnp.int32)  # skip the diagonal

    @staticmethod
    def coefficients(gram: jax.Array, order: jax.Array) -> jax.Array:
        """``c`` such that ``mixed = Σ_k c_k g_k``, from the Gram matrix and the projection order.

        Row ``i`` of ``a`` holds ``g_i'`` in the basis of the original gradients (``g_i' =
        Σ_k a_ik g_k``), so ``g_i' · g_j = (a @ gram)_ij``; all rows are projected at once.
        """
        n = gram.shape[0]
        gram = gram.astype(jnp.float32)

        def project(t, a):
            pick = jax.nn.one_hot(order[:, t], n, dtype=jnp.float32)  # row i selects j = order_it
            gram_j = pick @ gram  # row i: g_j · g_k for every k
            dots = jnp.sum(a * gram_j, axis=1)  # g_i' · g_j
            norms = jnp.sum(pick * gram_j, axis=1)  # |g_j|²
            conflict = (dots < 0) & (norms > 0)
            scale = jnp.where(conflict, dots / jnp.where(conflict, norms, 1.0), 0.0)
            return a - scale[:, None] * pick

        # The loop is tiny (n x n per step); fori_loop keeps compile time flat in n.
        a = jax.lax.fori_loop(0, n - 1, project, jnp.eye(n, dtype=jnp.float32))
        return jnp.sum(a, axis=0)


# jit: an eager call compiles once per tree shape, not once per op; inlined under an outer jit.
@jax.jit
def _pcgrad(stacked_grads: Any, key: jax.Array | None) -> Any:
    n = _num_terms(stacked_grads)
    coefficients = PCGrad.coefficients(gram_matrix(stacked_grads), PCGrad.order(n, key))

    def combine(g):
        c = coefficients.reshape((n,) + (1,) * (g.ndim - 1))
        return jnp.sum(c * g.astype(jnp.float32), axis=0).astype(g.dtype)

    return jax.tree_util.tree_map(combine, stacked_grads)


def gram_matrix(stacked_grads: Any) -> jax.Array:
    """``G_ij = g_i · g_j`` summed over every leaf, in fp32 (an ``[n, n]`` array)."""
    n = _num_terms(stacked_grads)
    gram = jnp.zeros((n, n), jnp.float32)
    for g in jax.tree_util.tree_leaves(stacked_grads):
        flat = g.reshape(n, -1)
        # HIGHEST: a default-precision f32 matmul is bf16-pass on TPU (TF32 on some GPUs), enough
        # to flip the sign of a small dot product and with it the conflict test.
        gram = gram + jnp.dot(
            flat,
            flat.T,
            precision=jax.lax.Precision.HIGHEST,
            preferred_element_type=jnp.float32,
        )
    return gram


def _num_terms(stacked_grads: Any) -> int:
    flat, _ = jax.tree_util.tree_flatten_with_path(stacked_grads)
    if not flat:
        raise ValueError("stacked_grads has no leaves: nothing to mix")
    sizes = {}
    for keypath, leaf in flat:
        shape = jnp.shape(leaf)
        sizes.setdefault(shape[0] if shape else None, path_str(keypath))
    if len(sizes) != 1 or None in sizes:
        listed = ", ".join(f"{path!r}: {size}" for size, path in sizes.items())
        raise ValueError(
            "every leaf of stacked_grads needs the same leading (term) axis; leading sizes "
            f"differ ({listed}). Stack per-term gradients with term_gradients."
        )
    return next(iter(sizes))
