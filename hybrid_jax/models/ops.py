"""The GPT's elementwise and attention cores, each with its derivative in closed form.

Exact (erf) GELU, LayerNorm with fp32 statistics, and causal softmax attention with an fp32
softmax. Pure JAX functions (no Flax): a custom derivative states the backward pass directly,
so XLA runs fewer elementwise passes and keeps fewer activations for it than autodiff of the
forward would (``benchmarks/model_speed.py`` measures the difference).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

_LN_EPS = 1e-5  # torch.nn.LayerNorm's default, which nanoGPT uses


@jax.custom_jvp
def gelu(x: jax.Array) -> jax.Array:
    """The exact GELU ``x Φ(x)``, with the normal CDF written with ``erf`` as PyTorch does.

    Same values as ``jax.nn.gelu(x, approximate=False)``, which goes through ``erfc`` (a longer
    expansion on XLA:CPU). The derivative ``Φ(x) + x φ(x)`` takes ``Φ(x)`` as ``gelu(x) / x``
    from the output, which the next matmul keeps for its own gradient anyway: so ``Φ(x)`` is
    not one more activation to keep for the backward pass.

    Examples:
      >>> gelu(jnp.array([-1.0, 0.0, 2.0]))
      Array([-0.158655...,  0.      ,  1.954499...], dtype=float32)
    """
    return x * _normal_cdf(x)


@gelu.defjvp
def _gelu_jvp(primals, tangents):
    (x,), (x_dot,) = primals, tangents
    y = x * _normal_cdf(x)
    inv_sqrt_2pi = jnp.asarray(1 / math.sqrt(2 * math.pi), x.dtype)
    # Φ(x) = y / x up to rounding. Near 0 that division loses the second derivative (x² under-
    # flows), so there Φ(x) = 1/2 + x φ(0), exact to O(x³) (< 1e-10 for |x| < 1e-3). The safe
    # divisor keeps the untaken branch finite: a NaN there would leak into derivatives.
    away = jnp.abs(x) > jnp.asarray(1e-3, x.dtype)
    cdf = jnp.where(away, y / jnp.where(away, x, 1), 0.5 + x * inv_sqrt_2pi)
    pdf = jnp.exp(-0.5 * jnp.square(x)) * inv_sqrt_2pi
    return y, x_dot * (cdf + x * pdf)


def _normal_cdf(x: jax.Array) -> jax.Array:
    return 0.5 + 0.5 * jax.lax.erf(x * jnp.asarray(1 / math.sqrt(2), x.dtype))


def _ln_statistics(x_f32: jax.Array) -> tuple[jax.Array, jax.Array]:
    mean = jnp.mean(x_f32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x_f32 - mean), axis=-1, keepdims=True)
    return mean, jax.lax.rsqrt(var + _LN_EPS)


@jax.custom_jvp
def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    """LayerNorm over the last axis: statistics in fp32, the result in ``x``'s dtype.

    ``y = (x - mean) / sqrt(var + 1e-5) * scale + bias``, as ``torch.nn.LayerNorm``. The
    derivative is written out, ``dx̂ = rstd (dx - mean(dx) - x̂ mean(x̂ dx))``, in terms of the
    normalised ``x̂`` and ``rstd``: autodiff of the formula leads XLA to keep ``x - mean`` for
    the backward pass as well (2.6 MiB more for the default model at batch 12).

    Examples:
      >>> layer_norm(jnp.array([[1.0, 3.0]]), jnp.ones(2))
      Array([[-0.999995...,  0.999995...]], dtype=float32)
    """
    x_f32 = x.astype(jnp.float32)
    mean, rstd = _ln_statistics(x_f32)
    return _ln_affine((x_f32 - mean) * rstd, scale, bias).astype(x.dtype)


@layer_norm.defjvp
def _layer_norm_jvp(primals, tangents):
    x, scale, bias = primals
    x_dot, scale_dot, bias_dot = tangents
    x_f32 = x.astype(jnp.float32)
    mean, rstd = _ln_statistics(x_f32)
    x_hat = (x_f32 - mean) * rstd
    y = _ln_affine(x_hat, scale, bias).astype(x.dtype)
    dx = x_dot.astype(jnp.float32)
    dx_hat = rstd * (
        dx
        - jnp.mean(dx, axis=-1, keepdims=True)
        - x_hat * jnp.mean(x_hat * dx, axis=-1, keepdims=True)
    )
    y_dot = dx_hat * scale.astype(jnp.float32) + x_hat * scale_dot.astype(jnp.float32)
    if bias is not None:
        y_dot = y_dot + bias_dot.astype(jnp.float32)
    return y, y_dot.astype(x.dtype)


def _ln_affine(x_hat: jax.Array, scale: jax.Array, bias: jax.Array | None) -> jax.Array:
    y = x_hat * scale.astype(jnp.float32)
    return y if bias is None else y + bias.astype(jnp.float32)


@jax.custom_vjp
def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Causal softmax attention ``softmax(q kᵀ + mask) v`` per batch row and head.

    ``q`` comes scaled (by ``1 / sqrt(D)`` in a GPT): the scaled copy costs nothing where the
    heads are transposed out of the ``qkv`` projection anyway, while scaling the scores keeps
    one more ``[B, H, T, T]`` array alive. The scores and the softmax are fp32 (the first
    product accumulates into fp32 and is not rounded to the inputs' dtype); the probabilities
    are rounded to the inputs' dtype for the second product. The backward pass is written out
    (``dS = P ⊙ (dP - rowsum(P ⊙ dP))``) so that it keeps only ``q, k, v`` and the
    probabilities ``P``; autodiff through ``jax.nn.softmax`` and the mask also keeps the
    unnormalised exponentials. There is no forward-mode derivative (``jax.jvp``).

    Args:
      q, k, v: ``[B, H, T, D]`` arrays of one dtype, ``q`` already scaled.

    Returns:
      ``[B, H, T, D]`` in the inputs' dtype.

    Examples:
      >>> q = k = v = jnp.ones((1, 1, 3, 2))
      >>> causal_attention(q, k, v).shape
      (1, 1, 3, 2)
    """
    return _attention_forward(q, k, v)[0]


def _attention_forward(q_BxHxTxD, k_BxHxTxD, v_BxHxTxD):
    t = q_BxHxTxD.shape[2]
    # fp32 island: the scores leave the product in fp32 (a bf16 product would round them to 8
    # significant bits before the softmax), and the softmax runs on them.
    scores_BxHxTxT = jnp.einsum(
        "bhqd,bhkd->bhqk", q_BxHxTxD, k_BxHxTxD, preferred_element_type=jnp.float32
    )
    causal_TxT = jnp.tril(jnp.ones((t, t), jnp.bool_))
    scores_BxHxTxT = jnp.where(causal_TxT, scores_BxHxTxT, -jnp.inf)
    probs_BxHxTxT = jax.nn.softmax(scores_BxHxTxT, axis=-1).astype(v_BxHxTxD.dtype)
    y_BxHxTxD = jnp.einsum("bhqk,bhkd->bhqd", probs_BxHxTxT, v_BxHxTxD)
    return y_BxHxTxD, probs_BxHxTxT


def _attention_fwd(q, k, v):
    y, probs = _attention_forward(q, k, v)
    return y, (q, k, v, probs)


def _attention_bwd(residuals, dy_BxHxTxD):
    q_BxHxTxD, k_BxHxTxD, v_BxHxTxD, probs_BxHxTxT = residuals
    dv_BxHxTxD = jnp.einsum("bhqk,bhqd->bhkd", probs_BxHxTxT, dy_BxHxTxD)
    dprobs_BxHxTxT = jnp.einsum(
        "bhqd,bhkd->bhqk", dy_BxHxTxD, v_BxHxTxD, preferred_element_type=jnp.float32
    )
    # Masked positions have P = 0, so their score gradient is 0 without the mask.
    probs_f32 = probs_BxHxTxT.astype(jnp.float32)
    rowsum_BxHxTx1 = jnp.sum(probs_f32 * dprobs_BxHxTxT, axis=-1, keepdims=True)
    dscores_BxHxTxT = (probs_f32 * (dprobs_BxHxTxT - rowsum_BxHxTx1)).astype(q_BxHxTxD.dtype)
    dq_BxHxTxD = jnp.einsum("bhqk,bhkd->bhqd", dscores_BxHxTxT, k_BxHxTxD)
    dk_BxHxTxD = jnp.einsum("bhqk,bhqd->bhkd", dscores_BxHxTxT, q_BxHxTxD)
    return dq_BxHxTxD, dk_BxHxTxD, dv_BxHxTxD


causal_attention.defvjp(_attention_fwd, _attention_bwd)
