"""Muon that orthogonalises all matrices of one shape in one batched Newton-Schulz iteration.

Optax's ``optax.contrib.muon`` runs the Newton-Schulz iteration leaf by leaf: a transformer's
hidden matrices come in a few shapes repeated once per block, and on a CPU sixteen small
iterations cost about 2.5x one batched iteration over four stacks (measured on nanoGPT's baby
GPT; the products are too small to fill the cores one at a time). :func:`scale_by_muon` stacks
the leaves of equal shape and dtype, orthogonalises each stack at once and unstacks; its state
stays leaf by leaf, shaped like the parameters, so moment storage, sharding and checkpoints see
what they see for Adam. With the same arguments it computes what Optax's ``muon`` computes
(tested to fp32 rounding); ``ns_dtype`` runs the products' inputs in a narrower dtype.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from hybrid_jax import tree as tree_lib
from hybrid_jax.precision import dtypes

#: Keller Jordan's quintic coefficients (a, b, c): ``X <- a X + (b A + c A²) X`` with
#: ``A = X Xᵀ``, tuned to raise small singular values quickly rather than to converge exactly.
NS_COEFFS = (3.4445, -4.7750, 2.0315)

Schedule = float | optax.Schedule


class MuonState(NamedTuple):
    """The step count and the momentum, one leaf per parameter."""

    count: jax.Array
    mu: optax.Updates


def newton_schulz(
    x: jax.Array,
    *,
    ns_steps: int = 5,
    ns_coeffs: tuple[float, float, float] = NS_COEFFS,
    ns_dtype: Any = None,
    eps: float = 1e-8,
) -> jax.Array:
    """Approximately orthogonalises the matrices ``x[..., :, :]``: ``U Vᵀ`` for ``x = U S Vᵀ``.

    Each matrix is divided by its Frobenius norm (so every singular value is at most 1), then
    ``ns_steps`` quintic iterations push its singular values towards 1 (to about 0.7-1.2 with
    the default coefficients, which is what Muon needs). A tall matrix is iterated as its
    transpose, so the Gram matrices ``X Xᵀ`` are the small side squared.

    Args:
      x: an array of rank >= 2; leading axes are a batch.
      ns_steps: the number of iterations.
      ns_coeffs: the quintic's coefficients ``(a, b, c)``.
      ns_dtype: the dtype the products' inputs are rounded to (e.g. ``jnp.bfloat16``), or
        ``None`` for ``x``'s; products accumulate in fp32 and the iterate stays in fp32.
      eps: added to the norm, so a zero matrix stays zero.

    Returns:
      An fp32 array of ``x``'s shape.

    Examples:
      >>> q = newton_schulz(jnp.array([[3.0, 0.0], [0.0, 0.5]]))
      >>> bool(jnp.all(jnp.abs(jnp.diag(q) - 1) < 0.35))
      True
    """
    a, b, c = ns_coeffs
    dot_dtype = jnp.float32 if ns_dtype is None else dtypes.parse_dtype(ns_dtype)
    x = x.astype(jnp.float32)
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = jnp.swapaxes(x, -1, -2)
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=(-2, -1), keepdims=True))
    x = x / (norm + eps)

    def matmul(p, q):
        return jnp.matmul(
            p.astype(dot_dtype), q.astype(dot_dtype), preferred_element_type=jnp.float32
        )

    for _ in range(ns_steps):
        gram = matmul(x, jnp.swapaxes(x, -1, -2))
        poly = b * gram + c * matmul(gram, gram)
        x = a * x + matmul(poly, x)
    return jnp.swapaxes(x, -1, -2) if tall else x


def orthogonalize_by_shape(updates: optax.Updates, **ns_kwargs) -> optax.Updates:
    """:func:`newton_schulz` of every 2-D leaf, one batched iteration per shape and dtype.

    Args:
      updates: a tree of 2-D arrays (``optax.MaskedNode`` s, which have no leaves, allowed).
      **ns_kwargs: :func:`newton_schulz`'s keyword arguments.

    Returns:
      The orthogonalised tree, each leaf in its own dtype.

    Raises:
      ValueError: a leaf is not a matrix; the message names it.
    """
    flat, treedef = tree_lib.leaves_with_paths(updates)
    groups: dict[tuple, list[int]] = {}
    for i, (path, leaf) in enumerate(flat):
        if leaf.ndim != 2:
            raise ValueError(
                f"Muon orthogonalises matrices, but leaf {path!r} has shape {leaf.shape}; give "
                "it to another optimizer (e.g. Adam through hybrid_jax.optim.by_path)"
            )
        groups.setdefault((leaf.shape, leaf.dtype), []).append(i)
    out = [leaf for _, leaf in flat]
    for members in groups.values():
        stacked = jnp.stack([flat[i][1] for i in members])
        orthogonal = newton_schulz(stacked, **ns_kwargs)
        for j, i in enumerate(members):
            out[i] = orthogonal[j].astype(flat[i][1].dtype)
    return jax.tree_util.tree_unflatten(treedef, out)


def _shape_scale(shape: tuple[int, ...], consistent_rms: float | None) -> float:
    fan_in, fan_out = shape
    if consistent_rms is None:
        return max(1.0, fan_out / fan_in) ** 0.5  # Keller Jordan's width scaling
    return max(fan_in, fan_out) ** 0.5 * consistent_rms


def scale_by_muon(
    *,
    beta: float = 0.95,
    nesterov: bool = True,
    ns_steps: int = 5,
    ns_coeffs: tuple[float, float, float] = NS_COEFFS,
    ns_dtype: Any = None,
    consistent_rms: float | None = None,
    mu_dtype: Any = None,
    eps: float = 1e-8,
) -> optax.GradientTransformation:
    """Muon's direction: momentum, orthogonalised by shape-batched Newton-Schulz, then scaled.

    The momentum and its bias correction are Optax's ``scale_by_muon``'s; the orthogonalisation
    is :func:`orthogonalize_by_shape`; the scale is ``sqrt(max(fan_in, fan_out)) *
    consistent_rms`` (update RMS about ``consistent_rms``, Liu et al. 2025) or, with
    ``consistent_rms=None``, ``sqrt(max(1, fan_out / fan_in))``.

    Args:
      beta: the momentum's decay.
      nesterov: use Nesterov momentum.
      ns_steps, ns_coeffs, ns_dtype: the Newton-Schulz iteration (:func:`newton_schulz`).
      consistent_rms: the update RMS to match, or ``None`` for width scaling.
      mu_dtype: the momentum's dtype (``None``: the parameters').
      eps: the Newton-Schulz normalisation's epsilon.

    Returns:
      An ``optax.GradientTransformation`` whose state is a :class:`MuonState`.

    References:
      Jordan et al., 2024, `Muon: An optimizer for hidden layers in neural networks
      <https://kellerjordan.github.io/posts/muon/>`_; Liu et al., 2025, `Muon is Scalable for
      LLM Training <https://arxiv.org/abs/2502.16982>`_.
    """
    mu_dtype = None if mu_dtype is None else dtypes.parse_dtype(mu_dtype)
    ns_kwargs = dict(ns_steps=ns_steps, ns_coeffs=ns_coeffs, ns_dtype=ns_dtype, eps=eps)

    def init_fn(params):
        mu = optax.tree.zeros_like(params, dtype=mu_dtype)
        return MuonState(count=jnp.zeros([], jnp.int32), mu=mu)

    def update_fn(updates, state, params=None):
        del params
        mu = jax.tree.map(lambda m, g: m.astype(g.dtype), state.mu, updates)  # e.g. bf16 to fp32
        mu = optax.tree.update_moment(updates, mu, beta, 1)
        count = optax.safe_increment(state.count)
        # A float count: `beta ** count` with an int32 count breaks strict dtype promotion.
        t = count.astype(jnp.float32)
        if nesterov:
            mu_hat = jax.tree.map(
                lambda m, g: beta * m + (1 - beta) * g,
                optax.tree.bias_correction(mu, beta, t + 1),
                optax.tree.bias_correction(updates, beta, t),
            )
        else:
            mu_hat = optax.tree.bias_correction(mu, beta, t)
        with jax.named_scope("muon"):
            orthogonal = orthogonalize_by_shape(mu_hat, **ns_kwargs)
        scaled = jax.tree.map(lambda u: u * _shape_scale(u.shape, consistent_rms), orthogonal)
        return scaled, MuonState(count=count, mu=optax.tree.cast(mu, mu_dtype))

    return optax.GradientTransformation(init_fn, update_fn)


def muon(
    learning_rate: Schedule,
    *,
    weight_decay: float = 0.0,
    **kwargs,
) -> optax.GradientTransformation:
    """Muon: :func:`scale_by_muon`, decoupled weight decay, then the learning rate.

    For the hidden matrices only; give embeddings, the head, gains and biases to Adam
    (:func:`~hybrid_jax.optim.muon_adamw` does).

    Args:
      learning_rate: a number or an Optax schedule.
      weight_decay: decoupled weight decay, times the learning rate.
      **kwargs: :func:`scale_by_muon`'s arguments.

    Returns:
      An ``optax.GradientTransformation``.

    Examples:
      >>> params = [jnp.eye(4), 2 * jnp.eye(4)]  # one shape: one batched iteration
      >>> tx = muon(0.1)
      >>> updates, _ = tx.update(params, tx.init(params), params)
      >>> bool(jnp.allclose(updates[0], updates[1]))  # the direction, not the size
      True

    References:
      Jordan et al., 2024, `Muon: An optimizer for hidden layers in neural networks
      <https://kellerjordan.github.io/posts/muon/>`_.
    """
    return optax.chain(
        scale_by_muon(**kwargs),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(learning_rate),
    )
