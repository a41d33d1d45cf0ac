"""Language-model loss terms that compute in fp32 whatever the compute dtype.

Logits are upcast to fp32 *before* ``logsumexp``: a bf16 softmax keeps 8 bits of mantissa, so the
log-probabilities of a 50k-token vocabulary lose most of their digits, and the loss curve shows it.
Both terms return an fp32 scalar: the mean over the tokens the mask keeps.

Any other term is a plain function returning a scalar; these two are the ones every LM run needs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


# jit: eager calls (notebooks, doctests) compile once per shape instead of once per op; under an
# outer jit the call is inlined. The checks below run at trace time, on shapes and dtypes.
@jax.jit
def cross_entropy(
    logits: jax.Array, targets: jax.Array, mask: jax.Array | None = None
) -> jax.Array:
    """Token cross-entropy, the mean over unmasked tokens, computed in fp32.

    .. math::
      L = \\frac{\\sum_t m_t (\\log Z_t - z_{t, y_t})}{\\sum_t m_t},
      \\qquad \\log Z_t = \\operatorname{logsumexp}_v z_{t, v}

    Args:
      logits: ``[..., vocab]`` in any floating dtype (upcast to fp32 first).
      targets: integer class indices shaped like ``logits`` without its last axis. There is no
        ignore index: a negative target wraps around like a NumPy index, so mask padding instead.
        A target ``>= vocab`` gives NaN, not a silent clamp.
      mask: optional weights shaped like ``targets`` (bool or floating; ``0`` drops a token, even
        one whose loss is NaN, such as padding with an out-of-range target). A mask that keeps no
        token gives a loss of ``0`` with zero gradient, not ``0 / 0``.

    Returns:
      The fp32 scalar loss.

    Raises:
      TypeError: ``targets`` is not integer, or ``logits`` is not floating.
      ValueError: the shapes of ``logits``, ``targets`` and ``mask`` do not line up.

    Examples:
      >>> logits = jnp.array([[2.0, 0.0], [0.0, 2.0]], jnp.bfloat16)
      >>> cross_entropy(logits, jnp.array([0, 0]), mask=jnp.array([True, False]))
      Array(0.126928..., dtype=float32)
    """
    logits = _check_logits(logits)
    targets = jnp.asarray(targets)
    if not jnp.issubdtype(targets.dtype, jnp.integer):
        raise TypeError(
            f"cross_entropy: targets must be integer class indices, got {targets.dtype}; "
            "for soft targets use optax.softmax_cross_entropy"
        )
    if targets.shape != logits.shape[:-1]:
        raise ValueError(
            f"cross_entropy: targets shape {targets.shape} must be logits shape {logits.shape} "
            "without its last (vocabulary) axis"
        )
    mask = _check_mask(mask, targets.shape, "cross_entropy")
    logits_f32 = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits_f32, axis=-1)
    # mode="fill" turns an out-of-range target into NaN rather than clamping it to the last class.
    target_logit = jnp.take_along_axis(logits_f32, targets[..., None], axis=-1, mode="fill")
    return _masked_mean(log_z - target_logit[..., 0], mask)


@jax.jit
def z_loss(logits: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """The z-loss of PaLM, ``mean(logsumexp(logits)^2)`` over unmasked tokens, in fp32.

    It pulls ``log Z`` towards 0, which keeps the softmax normaliser from drifting and the logits
    from growing without bound (a source of bf16 divergence). PaLM weights it ``1e-4``; give that
    weight in :class:`~hybrid_jax.losses.Weighted`, not here.

    Args:
      logits: ``[..., vocab]`` in any floating dtype (upcast to fp32 first).
      mask: optional weights shaped like ``logits`` without its last axis; as in
        :func:`cross_entropy`.

    Returns:
      The fp32 scalar loss.

    Raises:
      TypeError: ``logits`` is not floating.
      ValueError: ``mask`` does not match the logits.

    Examples:
      >>> z_loss(jnp.zeros((3, 4), jnp.bfloat16))  # log Z = log 4 for every token
      Array(1.921812, dtype=float32)

    References:
      Chowdhery et al., 2022, `PaLM: Scaling Language Modeling with Pathways
      <https://arxiv.org/abs/2204.02311>`_ (section 5, "auxiliary loss").
    """
    logits = _check_logits(logits)
    mask = _check_mask(mask, logits.shape[:-1], "z_loss")
    log_z = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
    return _masked_mean(jnp.square(log_z), mask)


def lm_terms(logits: jax.Array, targets: jax.Array) -> dict[str, jax.Array]:
    """A language model's two terms: next-token cross-entropy ``lm`` and ``z_loss``, in fp32.

    Weigh them with :class:`~hybrid_jax.losses.Weighted`, e.g. ``{"lm": 1.0, "z_loss": 1e-4}``.

    Args:
      logits: ``[..., vocab]`` in any floating dtype.
      targets: integer class ids shaped like ``logits`` without its last axis.

    Returns:
      ``{"lm": cross_entropy(logits, targets), "z_loss": z_loss(logits)}``.

    Examples:
      >>> terms = lm_terms(jnp.zeros((2, 4)), jnp.array([0, 3]))
      >>> {name: round(float(value), 4) for name, value in terms.items()}
      {'lm': 1.3863, 'z_loss': 1.9218}
    """
    return {"lm": cross_entropy(logits, targets), "z_loss": z_loss(logits)}


def _check_logits(logits: jax.Array) -> jax.Array:
    logits = jnp.asarray(logits)
    if not jnp.issubdtype(logits.dtype, jnp.floating) or logits.ndim < 1:
        raise TypeError(
            f"logits must be a floating array with a vocabulary axis last, got "
            f"{logits.dtype}{list(logits.shape)}"
        )
    return logits


def _check_mask(mask: jax.Array | None, shape: tuple[int, ...], name: str) -> jax.Array | None:
    if mask is None:
        return None
    mask = jnp.asarray(mask)
    if mask.shape != shape:
        raise ValueError(
            f"{name}: mask shape {mask.shape} must be the per-token shape {shape} "
            "(logits shape without its last axis)"
        )
    return mask


def _masked_mean(values: jax.Array, mask: jax.Array | None) -> jax.Array:
    if mask is None:
        return jnp.mean(values)
    weights = mask.astype(jnp.float32)
    count = jnp.sum(weights)
    # A safe denominator, not jnp.where(count > 0, total / count, 0): the untaken 0 / 0 branch of
    # a where still sends NaN into the gradient.
    total = jnp.sum(jnp.where(weights != 0, values * weights, 0.0))
    return total / jnp.where(count > 0, count, 1.0)
