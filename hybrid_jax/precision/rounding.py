"""Stochastic rounding of fp32 values to bf16: unbiased, so that small updates add up on average.

Rounding to nearest, which ``astype`` does, always drops an update smaller than half a unit in
the last place (ulp) of the value it is added to: a bf16 weight of 1.0 (ulp 2^-7) given updates
of 1e-3 never moves. Stochastic rounding rounds up with probability equal to how far the value
lies between its two bf16 neighbours, so the rounded value equals the exact one in expectation and
the updates survive on average (Gupta et al. 2015; Zamirai et al. 2020).

bf16 is the upper half of fp32's bit pattern (same sign and exponent, 7 of fp32's 23 mantissa
bits). Adding 16 uniform random bits to the lower half and truncating it carries into the upper
half with probability ``lower / 2^16``, which is exactly the fractional position between the two
neighbours: a bf16 value ``v`` and the next one away from zero (the bit pattern orders magnitudes,
and a carry out of the mantissa steps into the next binade, which is the next value there too).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from hybrid_jax.precision import dtypes


def stochastic_round(x: jax.Array, key: jax.Array, dtype=jnp.bfloat16) -> jax.Array:
    """Rounds ``x`` to bf16 stochastically: up with probability equal to its position between.

    For ``x`` between the neighbouring bf16 values ``lo < x < hi``, the result is ``hi`` with
    probability ``(x - lo) / (hi - lo)`` and ``lo`` otherwise, so ``E[result] = x`` exactly
    (relative to fp32 ``x``). Values bf16 holds exactly are returned unchanged; non-finite values
    (inf, NaN) are rounded to nearest, i.e. passed through. A finite value above bf16's largest
    finite value (fp32 reaches a little higher) rounds to ``±inf`` with the corresponding
    probability, as it does to nearest beyond half an ulp. Each element uses its own 16 random
    bits from ``key``, and the arithmetic is integer-only, so the result is the same on every
    backend (subnormals included: they are never flushed).

    Args:
      x: a floating array; bf16 and fp16 are widened to fp32 exactly, fp64 is first rounded to
        nearest fp32.
      key: a typed PRNG key (``jax.random.key``) or a raw ``uint32[2]`` one
        (``jax.random.PRNGKey``).
      dtype: the target dtype; only bf16 (``jnp.bfloat16`` or ``"bf16"``) is supported.

    Returns:
      A bf16 array of ``x``'s shape.

    Raises:
      ValueError: ``dtype`` is not bf16 (the message names it).
      TypeError: ``x`` is not floating.

    Examples:
      >>> x = jnp.full((10_000,), 1.001)  # between bf16's 1.0 and 1.0078125
      >>> y = stochastic_round(x, jax.random.key(0))
      >>> y.dtype, sorted(set(y.tolist()))
      (dtype(bfloat16), [1.0, 1.0078125])
      >>> round(float(jnp.mean(y.astype(jnp.float32))), 3)  # x.astype(bf16) would give 1.0
      1.001

    References:
      Gupta et al., 2015, `Deep Learning with Limited Numerical Precision
      <https://arxiv.org/abs/1502.02551>`_.

      Zamirai et al., 2020, `Revisiting BFloat16 Training <https://arxiv.org/abs/2010.06192>`_.
    """
    target = dtypes.parse_dtype(dtype)
    if target != dtypes.BFLOAT16:
        raise ValueError(
            f"stochastic_round targets bf16 only, got {dtypes.short_name(target)} ({target.name}); "
            "the bit trick relies on bf16 being the upper half of fp32"
        )
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"stochastic_round rounds floating arrays, got {x.dtype}")
    x32 = x.astype(jnp.float32)

    bits = jax.lax.bitcast_convert_type(x32, jnp.uint32)
    noise = jax.random.bits(key, x32.shape, jnp.uint16).astype(jnp.uint32)
    # Sign-magnitude: adding to the bit pattern grows the magnitude, so negative values round
    # away from zero with the same probability as positive ones: unbiased on both sides. The
    # addition cannot wrap for finite x (their patterns are below 0xFF800000).
    upper = ((bits + noise) >> np.uint32(16)).astype(jnp.uint16)
    rounded = jax.lax.bitcast_convert_type(upper, jnp.bfloat16)
    # inf + noise truncates back to inf, but a NaN with only low payload bits would turn into inf
    # (and 0xFFFFxxxx wraps), so non-finite values take the round-to-nearest cast instead.
    return jnp.where(jnp.isfinite(x32), rounded, x32.astype(jnp.bfloat16))
