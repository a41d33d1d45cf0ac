"""Scaled quantization to fp8 and int8, and the straight-through quantize-dequantize cast.

A bare ``astype`` to fp8 is unusable for weights: e4m3 has no values between 0 and 2^-9 and
only a few subnormals below 2^-6, so weights of typical size (std 0.02) lose most of their bits
or flush to zero, while the cast does not saturate (``float8_e4m3fn(1e3)`` is NaN). Here every
tensor is first multiplied by a per-tensor scale chosen so that its largest finite magnitude lands
on the format's largest value (amax scaling, as in Micikevicius et al. 2022 and Transformer
Engine), clipped to the format's range, and cast.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hybrid_jax.precision import dtypes


def _check_quantized(dtype) -> np.dtype:
    dtype = dtypes.parse_dtype(dtype)
    if dtype not in dtypes.QUANTIZED:
        raise ValueError(
            f"quantization targets fp8 (e4m3, e5m2) or int8, got {dtypes.short_name(dtype)}"
        )
    return dtype


def amax(x: jax.Array) -> jax.Array:
    """The largest finite magnitude of ``x`` (0 if there is none), in at least fp32.

    Examples:
      >>> amax(jnp.array([0.5, -2.0, jnp.inf]))
      Array(2., dtype=float32)
    """
    magnitude = jnp.abs(x.astype(dtypes.at_least_f32(x.dtype)))
    return jnp.max(jnp.where(jnp.isfinite(magnitude), magnitude, 0), initial=0)


def scale_from_amax(amax: jax.Array, dtype) -> jax.Array:
    """The scale that maps a magnitude ``amax`` onto ``dtype``'s maximum (1 when ``amax`` is 0).

    The scale is capped at the largest finite value of ``amax``'s dtype, so that it stays finite.
    """
    dtype = _check_quantized(dtype)
    fmax = np.asarray(dtypes.format_max(dtype), amax.dtype)
    scale = jnp.minimum(fmax / jnp.where(amax > 0, amax, fmax), np.finfo(amax.dtype).max)
    return scale.astype(amax.dtype)


def amax_scale(x: jax.Array, dtype) -> jax.Array:
    """The per-tensor scale that maps ``x``'s largest finite magnitude onto ``dtype``'s maximum.

    Non-finite values are left out of the amax. An all-zero (or all non-finite) tensor gets scale
    1, and the scale is capped at fp32's largest finite value so that it stays finite: a tensor
    whose largest magnitude is an fp32 subnormal (below 1.2e-38) may quantize to zero.

    Args:
      x: a floating array.
      dtype: the target format (fp8 or int8, by name or dtype).

    Returns:
      A scalar fp32 (fp64 for fp64 input) scale: ``format_max / amax(x)``.
    """
    return scale_from_amax(amax(x), dtype)


def quantize(x: jax.Array, dtype, scale: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Quantizes ``x`` to fp8 or int8 with a per-tensor scale; values saturate at the format's max.

    Args:
      x: a floating array.
      dtype: ``"e4m3"``, ``"e5m2"`` or ``"int8"`` (any accepted name, or the dtype).
      scale: the scale to use; by default :func:`amax_scale` of ``x``.

    Returns:
      ``(q, scale)``: ``q`` in ``dtype`` with ``x ≈ q / scale``. int8 rounds half to even and uses
      the symmetric range [-127, 127]. Non-finite inputs give meaningless ``q``; see
      :func:`quantize_dequantize`, which passes them through.

    Examples:
      >>> q, scale = quantize(jnp.array([0.02, -0.01, 0.0]), "e4m3")
      >>> q.dtype, float(scale)
      (dtype(float8_e4m3fn), 22400.0)
    """
    dtype = _check_quantized(dtype)
    # Scale and round in at least fp32: a bf16 product x * scale would round before the cast.
    work = dtypes.at_least_f32(x.dtype)
    if scale is None:
        scale = amax_scale(x, dtype)
    fmax = dtypes.format_max(dtype)
    scaled = jnp.clip(x.astype(work) * scale.astype(work), -fmax, fmax)
    if dtype == dtypes.INT8:
        scaled = jnp.round(scaled)
    return scaled.astype(dtype), scale


def quantize_int8_channels(x: jax.Array, axes: Sequence[int]) -> tuple[jax.Array, jax.Array]:
    """Symmetric int8 codes and fp32 scales, one scale per index of the axes not in ``axes``.

    Each scale is ``127 / amax`` over ``axes`` (1 where the amax is 0), kept with size-1 axes so
    that ``codes / scale`` dequantizes; values round half to even onto ``[-127, 127]``. Unlike
    :func:`amax`, the amax keeps non-finite values: a channel holding one gets a NaN or zero
    scale, so what it feeds comes out non-finite and a finite check sees it.

    Examples:
      >>> codes, scale = quantize_int8_channels(jnp.array([[0.5, -0.01], [0.25, 0.02]]), (0,))
      >>> codes
      Array([[127, -64],
             [ 64, 127]], dtype=int8)
    """
    x_f32 = x.astype(dtypes.FLOAT32)
    channel_amax = jnp.max(jnp.abs(x_f32), axis=tuple(axes), keepdims=True)
    scale = jnp.where(channel_amax == 0, np.float32(1), np.float32(127) / channel_amax)
    codes = jnp.round(jnp.clip(x_f32 * scale, -127, 127)).astype(jnp.int8)
    return codes, scale


def dequantize(q: jax.Array, scale: jax.Array, dtype=jnp.bfloat16) -> jax.Array:
    """Returns ``q / scale`` in ``dtype`` (computed in fp32, rounded once to ``dtype``)."""
    work = dtypes.at_least_f32(scale.dtype)
    return (q.astype(work) / scale.astype(work)).astype(dtype)


def round_trip(x: jax.Array, dtype, carrier_dtype, scale: jax.Array | None = None) -> jax.Array:
    """``dequantize(*quantize(x, dtype, scale), carrier_dtype)``, with non-finite values kept.

    The forward value of :func:`quantize_dequantize`, without its custom gradient: the building
    block of the quantized matmuls, which define their own.
    """
    q, scale = quantize(x, dtype, scale)
    y = dequantize(q, scale, carrier_dtype)
    return jnp.where(jnp.isfinite(x), y, x.astype(carrier_dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def quantize_dequantize(x: jax.Array, dtype, carrier_dtype=jnp.bfloat16) -> jax.Array:
    """Rounds ``x`` onto the grid of a scaled fp8 or int8 format, with a straight-through gradient.

    The forward pass is ``dequantize(*quantize(x, dtype), carrier_dtype)``: the values a scaled
    low-bit tensor can hold, carried in a wider dtype (bf16 by default) so that ordinary XLA ops
    consume them; on Hopper GPUs XLA rewrites such quantize-dequantize-dot patterns into fp8
    GEMMs. Non-finite inputs pass through unchanged so that a finite check downstream still sees
    them. The gradient is the identity (straight-through estimator), cast to ``x``'s dtype.

    Args:
      x: a floating array.
      dtype: the quantized format: ``"e4m3"``, ``"e5m2"`` or ``"int8"``.
      carrier_dtype: the dtype of the result.

    Returns:
      An array of ``carrier_dtype`` and ``x``'s shape.

    Examples:
      >>> w = jnp.array([0.02, -0.0007, 0.0131, 0.05])
      >>> quantize_dequantize(w, "e4m3", jnp.float32)
      Array([ 0.01964286, -0.00072545,  0.01339286,  0.05      ], dtype=float32)
      >>> w.astype(jnp.float8_e4m3fn).astype(jnp.float32)  # a bare cast flushes -0.0007 to zero
      Array([ 0.01953125, -0.        ,  0.01367188,  0.05078125], dtype=float32)

    References:
      Micikevicius et al., 2022, `FP8 Formats for Deep Learning
      <https://arxiv.org/abs/2209.05433>`_.
    """
    return round_trip(x, dtype, carrier_dtype)


def _qdq_fwd(x, dtype, carrier_dtype):
    return quantize_dequantize(x, dtype, carrier_dtype), jnp.zeros((0,), x.dtype)


def _qdq_bwd(dtype, carrier_dtype, like, g):
    del dtype, carrier_dtype
    return (g.astype(like.dtype),)


quantize_dequantize.defvjp(_qdq_fwd, _qdq_bwd)
