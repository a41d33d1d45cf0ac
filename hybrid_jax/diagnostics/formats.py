"""The range of each floating-point format, and which magnitudes its cast flushes or overflows.

Both rules follow from the round-to-nearest-even cast, for a magnitude ``y = |x| * scale``:

- **underflow**: ``x != 0`` (and finite) and ``y <= min_subnormal / 2``. Exactly half the
  smallest subnormal is a tie between 0 (even) and the smallest subnormal (odd), so it rounds to
  0; anything above rounds to at least the smallest subnormal.
- **overflow**: ``y`` lies beyond the midpoint ``max + ulp(max) / 2`` between the largest finite
  value and the next step above it, or on it where the tie goes up. In the IEEE-like formats
  (fp32, bf16, fp16, e5m2) the largest finite value has an odd significand, so the tie rounds up
  and ``y >= max + ulp(max)/2`` casts to inf (65520 for fp16, 61440 for e5m2). e4m3fn has no inf:
  its largest value 448 has an even significand, so the tie 464 rounds to 448 and only ``y > 464``
  overflows (a plain cast gives NaN; a saturating cast, as
  :func:`~hybrid_jax.precision.quantize` does, clips to 448 with an error above half an ulp).
  Values between ``max`` and the midpoint round to ``max`` and are not counted.

Non-finite inputs (NaN, ±inf) are counted apart (``nonfinite``) and in neither rule: no format
makes them worse. The rules assume IEEE gradual underflow; hardware or compilers that flush
subnormals to zero (XLA on CPU does so for fp32 arithmetic) flush a little more.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from hybrid_jax._table import Table
from hybrid_jax.diagnostics._common import Shown
from hybrid_jax.precision import dtypes

#: The formats :func:`~hybrid_jax.diagnostics.leaf_numerics` measures, by short name.
FORMATS = ("f32", "bf16", "f16", "e4m3", "e5m2")
#: The fp8 formats, also measured under per-tensor amax scaling.
SCALED_FORMATS = ("e4m3", "e5m2")


class FormatLimits(NamedTuple):
    """The range of a floating-point format, and the thresholds of its round-to-nearest cast.

    Attributes:
      name: the short name (``"f16"``).
      max: the largest finite value.
      min_normal: the smallest positive normal value.
      min_subnormal: the smallest positive (subnormal) value.
    """

    name: str
    max: float
    min_normal: float
    min_subnormal: float

    @property
    def ulp_max(self) -> float:
        """The spacing of the values just below :attr:`max`."""
        mantissa, exponent = math.frexp(self.max)
        del mantissa
        return 2.0 ** (exponent - 1 - jnp.finfo(dtypes.parse_dtype(self.name)).nmant)

    @property
    def underflow_at(self) -> float:
        """Half the smallest subnormal: nonzero magnitudes ``<=`` this round to 0."""
        return self.min_subnormal / 2

    @property
    def overflow_at(self) -> float:
        """The midpoint between :attr:`max` and the next step above it (inf in float64 for f64)."""
        return self.max + self.ulp_max / 2

    @property
    def tie_overflows(self) -> bool:
        """Whether :attr:`overflow_at` itself overflows: ties go to the even neighbour, which is
        the step above when :attr:`max`'s significand is odd (IEEE formats), ``max`` otherwise."""
        return int(self.max / self.ulp_max) % 2 == 1

    def underflows(self, magnitude: np.ndarray) -> np.ndarray:
        """Whether a round-to-nearest cast flushes each nonnegative ``magnitude`` to 0.

        True for 0 itself; callers mask out zeros to count only nonzero values flushed.
        """
        return magnitude <= self.underflow_at

    def overflows(self, magnitude: np.ndarray) -> np.ndarray:
        """Whether a round-to-nearest cast of each nonnegative ``magnitude`` leaves the finite
        range (inf, or NaN for e4m3fn); ``magnitude`` should be float64."""
        if self.tie_overflows:
            return magnitude >= self.overflow_at
        return magnitude > self.overflow_at


def format_limits(dtype: Any) -> FormatLimits:
    """The largest finite, smallest normal and smallest subnormal value of a float format.

    Args:
      dtype: a floating dtype or its name: ``"f32"``, ``"bf16"``, ``"f16"``, ``"e4m3"``
        (float8_e4m3fn), ``"e5m2"``, ``"f64"``.

    Returns:
      A :class:`FormatLimits`, whose ``underflow_at`` and ``overflow_at`` give the cast's
      thresholds.

    Raises:
      ValueError: an unknown name, or int8 (which has no floating range).

    Examples:
      >>> format_limits("e4m3")
      FormatLimits(name='e4m3', max=448.0, min_normal=0.015625, min_subnormal=0.001953125)
      >>> lim = format_limits("f16")
      >>> lim.max, lim.min_subnormal == 2.0**-24, lim.overflow_at
      (65504.0, True, 65520.0)
    """
    dtype = dtypes.parse_dtype(dtype)
    if dtype == dtypes.INT8:
        raise ValueError(
            "int8 is fixed point, not a floating format; format_limits takes f64, "
            "f32, bf16, f16, e4m3 or e5m2"
        )
    info = jnp.finfo(dtype)
    return FormatLimits(
        dtypes.short_name(dtype),
        float(info.max),
        float(info.smallest_normal),
        float(info.smallest_subnormal),
    )


def limits_table(formats: Sequence[Any] = FORMATS) -> Table:
    """A table of :func:`format_limits` for several formats, with the cast's thresholds.

    ``underflows`` and ``overflows`` give the magnitudes (after any scale) that a
    round-to-nearest cast flushes to zero or takes out of the finite range.

    Examples:
      >>> print(limits_table(["f16", "e4m3", "e5m2"]))
      format  max    min_normal  min_subnormal  underflows     overflows
      ------  -----  ----------  -------------  -------------  ---------
      f16     65504  6.1035e-05  5.9605e-08     <= 2.9802e-08  >= 65520
      e4m3    448    0.015625    0.0019531      <= 0.00097656  > 464
      e5m2    57344  6.1035e-05  1.5259e-05     <= 7.6294e-06  >= 61440
    """
    rows = []
    for name in formats:
        lim = format_limits(name)
        over = ">=" if lim.tie_overflows else ">"
        rows.append(
            (
                lim.name,
                Shown(lim.max, 5),
                Shown(lim.min_normal, 5),
                Shown(lim.min_subnormal, 5),
                f"<= {Shown(lim.underflow_at, 5)}",
                f"{over} {Shown(lim.overflow_at, 5)}",
            )
        )
    columns = ("format", "max", "min_normal", "min_subnormal", "underflows", "overflows")
    return Table(columns, tuple(rows))
