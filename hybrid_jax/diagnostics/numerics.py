"""Range diagnostics: which values a narrower format flushes to zero or overflows, and which
updates a parameter's dtype rounds away.

Everything here runs on the host, in NumPy, on concrete arrays (jax or NumPy arrays, any pytree
including Flax NNX ``State``): it is a tool to look at a tree of gradients, activations or
weights between steps, not something to call inside ``jit``. Magnitudes are compared in float64,
which holds every fp32, bf16, fp16 and fp8 value exactly.

Both rules follow from the round-to-nearest-even cast, for a magnitude ``y = |x| * scale``:

- **underflow**: ``x != 0`` (and finite) and ``y <= min_subnormal / 2``. Exactly half the
  smallest subnormal is a tie between 0 (even) and the smallest subnormal (odd), so it rounds to
  0; anything above rounds to at least the smallest subnormal.
- **overflow**: ``y`` lies beyond the midpoint ``max + ulp(max) / 2`` between the largest finite
  value and the next step above it, or on it where the tie goes up. In the IEEE-like formats
  (fp32, bf16, fp16, e5m2) the largest finite value has an odd significand, so the tie rounds up
  and ``y >= max + ulp(max)/2`` casts to inf (65520 for fp16, 61440 for e5m2). e4m3fn has no inf:
  its largest value 448 has an even significand, so the tie 464 rounds to 448 and only ``y > 464``
  overflows (a plain cast gives NaN; a saturating cast, as :func:`~.quantize.quantize` does,
  clips to 448 with an error above half an ulp). Values between ``max`` and the midpoint round
  to ``max`` and are not counted.

Non-finite inputs (NaN, ±inf) are counted apart (``nonfinite``) and in neither rule: no format
makes them worse. The rules assume IEEE gradual underflow; hardware or compilers that flush
subnormals to zero (XLA on CPU does so for fp32 arithmetic) flush a little more.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from hybrid_jax import tree as tree_lib
from hybrid_jax._table import Table
from hybrid_jax.precision import dtypes

#: The formats :func:`leaf_numerics` measures, by short name.
FORMATS = ("f32", "bf16", "f16", "e4m3", "e5m2")
#: The fp8 formats, also measured under per-tensor amax scaling.
SCALED_FORMATS = ("e4m3", "e5m2")
#: :func:`suggest_precision`'s candidates, the first one tried first: fp8 before 16 bits before
#: fp32 and, at equal width, the more precise format first (e4m3 before e5m2, fp16 before bf16),
#: since a range criterion alone would always prefer the wider range.
CANDIDATES = ("e4m3", "e5m2", "f16", "bf16", "f32")


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
                _Shown(lim.max, 5),
                _Shown(lim.min_normal, 5),
                _Shown(lim.min_subnormal, 5),
                f"<= {_Shown(lim.underflow_at, 5)}",
                f"{over} {_Shown(lim.overflow_at, 5)}",
            )
        )
    columns = ("format", "max", "min_normal", "min_subnormal", "underflows", "overflows")
    return Table(columns, tuple(rows))


def leaf_numerics(x: Any, *, scale: float = 1.0) -> dict[str, float]:
    """Range statistics of one array, and the fraction of it each format would lose.

    Fractions are over all of ``x``'s elements (0 for an empty array). For every format ``f`` in
    :data:`FORMATS`, ``f_under`` and ``f_over`` are the fractions of values that underflow and
    overflow (rules in the module docstring) when ``x * scale`` is cast to ``f``. For fp8,
    ``f_scaled_under`` is the fraction that underflows under per-tensor amax scaling, computed
    as :func:`~hybrid_jax.precision.quantize.quantize` does it (in fp32, amax mapped to the
    format's max): nothing overflows there by construction, and ``scale`` does not matter.

    Args:
      x: a concrete floating array (jax, NumPy, ml_dtypes).
      scale: the scale ``x`` will be multiplied by before the cast (e.g. the loss scale, for
        gradients); the product is taken in float64, exactly for powers of two.

    Returns:
      A dict: ``size`` (int), ``max_abs`` and ``min_abs_nonzero`` (over finite values;
      ``min_abs_nonzero`` is NaN when there is no finite nonzero value), ``range_log2``
      (``log2(max_abs / min_abs_nonzero)``, NaN likewise), ``zeros`` and ``nonfinite``
      (fractions), then ``{f}_under``, ``{f}_over`` and ``{f}_scaled_under``.

    Raises:
      TypeError: ``x`` is not floating, or not concrete (a tracer or ``ShapeDtypeStruct``).
      ValueError: ``scale`` is not a positive finite number.

    Examples:
      >>> stats = leaf_numerics(jnp.array([0.0, 1e-9, 1.0, 1e5]))
      >>> stats["zeros"], stats["f16_under"], stats["f16_over"], stats["e4m3_scaled_under"]
      (0.25, 0.25, 0.25, 0.25)
      >>> leaf_numerics(jnp.array([0.0, 1e-9, 1.0, 1e5]), scale=2.0**15)["f16_under"]
      0.0
    """
    counts = _counts(_host_array(x, "leaf_numerics"), _check_scale(scale))
    return _fractions(counts)


def numerics_report(
    tree: Any,
    *,
    scale: float = 1.0,
    formats: Sequence[Any] = ("f16", "e4m3", "e5m2"),
    tolerance: float = 1e-3,
) -> Table:
    """A table of each floating leaf's range and what each format would lose of it.

    One row per floating leaf (others, and compound leaves such as ``Int8Weight``, are left out),
    with the statistics of :func:`leaf_numerics`, the columns of the formats asked for
    (``f16_under``, ``f16_over``, ``e4m3_under``, ``e4m3_over``, ``e4m3_scaled_under``, ...), and
    ``suggest``: :func:`suggest_precision` at ``tolerance``. A footer totals the whole tree
    (fractions of all its values; fp8 amax scaling stays per tensor). ``rows`` keep raw numbers
    (floats that print short).

    Args:
      tree: a pytree of concrete arrays: parameters, gradients, activations.
      scale: the scale the values will be multiplied by before a cast: the current loss scale
        when ``tree`` holds gradients of the unscaled loss.
      formats: the formats to show columns for, from :data:`FORMATS`.
      tolerance: the largest fraction of lost values :func:`suggest_precision` accepts.

    Returns:
      A :class:`~hybrid_jax._table.Table`; ``str()`` prints it, notebooks render HTML.

    Raises:
      TypeError: a leaf is not concrete (the message names it).
      ValueError: an unknown format, or a ``scale`` that is not positive and finite.

    Examples:
      >>> grads = {"w": jnp.array([1e-9, 2e-5, 1e-3, 0.0]), "b": jnp.array([1.0, 2.0])}
      >>> report = numerics_report(grads)  # print(report) shows the whole table
      >>> report.column("path"), report.column("f16_under"), report.column("suggest")
      (['b', 'w'], [0.0, 0.25], ['e4m3', 'e5m2'])
      >>> report.column("e4m3_scaled_under")  # 1e-9 is 2^-20 of w's amax: below e4m3's reach
      [0.0, 0.25]
      >>> numerics_report(grads, scale=2.0**15).column("f16_under")  # loss scaling saves it
      [0.0, 0.0]
    """
    scale = _check_scale(scale)
    names = _format_names(formats)
    columns = ["path", "dtype", "size", *_STAT_COLUMNS]
    for name in names:
        columns += [f"{name}_under", f"{name}_over"]
        if name in SCALED_FORMATS:
            columns.append(f"{name}_scaled_under")
    columns.append("suggest")

    rows, total = [], None
    for path, leaf in _floating_leaves(tree, "numerics_report"):
        counts = _counts(leaf, scale)
        total = counts if total is None else _merge(total, counts)
        stats = _fractions(counts)
        suggestion = suggest_precision(stats, tolerance)
        rows.append(_row(columns, stats, (path, _dtype_name(leaf.dtype)), suggestion))
    footer = () if total is None else (_row(columns, _fractions(total), ("total", ""), ""),)
    return Table(tuple(columns), tuple(rows), footer)


def suggest_precision(
    stats: Mapping[str, float] | Any,
    tolerance: float = 1e-3,
    *,
    scale: float = 1.0,
    candidates: Sequence[str] = CANDIDATES,
) -> str:
    """The first of ``candidates`` (narrowest first) whose range loses at most ``tolerance``.

    A format is tolerated when the fraction of values that underflow plus those that overflow is
    ``<= tolerance``: for fp8 under per-tensor amax scaling (``{f}_scaled_under``; nothing
    overflows), for fp16, bf16 and fp32 at the stats' scale (``{f}_under + {f}_over``). bf16 has
    fp32's exponent range, so it fails only on values below ~4.6e-41 or above ~3.4e38.

    This is a range criterion only. It says which values a format cannot represent at all, not
    how much rounding the representable ones suffer (e4m3 keeps 3 significand bits, bf16 7), nor
    what either does to the loss; non-finite values are not counted. Treat the answer as the
    narrowest format worth trying, then measure the loss.

    Args:
      stats: the dict :func:`leaf_numerics` returns, a row of :func:`numerics_report` as a dict
        (``dict(zip(report.columns, row))``; it needs the candidates' columns), or an array.
      tolerance: the largest fraction of lost values accepted.
      scale: for an array, the scale to measure it at; stats already carry theirs.
      candidates: formats to try, in order; by default :data:`CANDIDATES`.

    Returns:
      The short name of the first tolerated candidate, or of the last one if none is.

    Raises:
      ValueError: a negative ``tolerance``, an unknown candidate, stats lacking a candidate's
        columns, or a ``scale`` given with stats.

    Examples:
      >>> rng = np.random.default_rng(0)
      >>> suggest_precision(rng.normal(0, 0.02, 1000).astype(np.float32))
      'e4m3'
      >>> suggest_precision(np.logspace(-30, 0, 1000, dtype=np.float32))  # 100 powers of two
      'bf16'
    """
    if not tolerance >= 0:
        raise ValueError(f"tolerance must be a fraction >= 0, got {tolerance!r}")
    if isinstance(stats, Mapping):
        if scale != 1.0:
            raise ValueError(
                "scale= applies when suggest_precision is given an array; stats were computed "
                "at their own scale (pass it to leaf_numerics or numerics_report instead)"
            )
    else:
        stats = leaf_numerics(stats, scale=scale)
    names = _format_names(candidates)
    if not names:
        raise ValueError("candidates is empty; give at least one format")
    # Check every candidate's columns first, so that a short stats dict fails whatever it holds.
    needed = {name: _loss_keys(name) for name in names}
    missing = [key for keys in needed.values() for key in keys if key not in stats]
    if missing:
        raise ValueError(
            f"stats have no {', '.join(missing)}, needed for candidates {names}; pass the dict "
            "leaf_numerics returns (every format), or restrict candidates= to the formats the "
            "report shows"
        )
    for name in names:
        if sum(float(stats[key]) for key in needed[name]) <= tolerance:
            return name
    return names[-1]


def stagnation_fractions(params: Any, updates: Any) -> dict[str, float]:
    """Per leaf, the fraction of nonzero updates that ``p + u`` in ``p``'s dtype rounds away.

    Args:
      params: a pytree of concrete parameter arrays.
      updates: a pytree of updates with the same paths (leaves without an update, such as
        ``None`` or ``optax.MaskedNode()``, are left out).

    Returns:
      ``{path: fraction}`` over floating leaves; NaN where a leaf has no nonzero finite update.
      See :func:`update_stagnation` for the rule.

    Examples:
      >>> p = {"w": jnp.ones(4, jnp.bfloat16)}
      >>> stagnation_fractions(p, {"w": jnp.array([1e-3, 1e-3, 1e-2, 0.0])})
      {'w': 0.6666666666666666}
    """
    return {s.path: s.fraction for s in _stagnation(params, updates)}


def update_stagnation(params: Any, updates: Any) -> Table:
    """A table of the updates each parameter's storage dtype rounds away.

    An update ``u != 0`` stagnates when ``(p + u).astype(p.dtype) == p``, computed as
    ``optax.apply_updates`` does under standard promotion: the sum in fp32 (fp64 if ``p`` or
    ``u`` is fp64), rounded to nearest in ``p``'s dtype. Roughly, updates below half an ulp of
    ``p``: a bf16 weight of 1.0 (ulp 2^-7) ignores an update of 1e-3. Non-finite updates and
    parameters are left out, as are zero updates (frozen or masked entries).

    Columns: ``path``, the ``param`` and ``update`` dtypes, ``size``, ``nonzero`` (nonzero finite
    updates), ``stagnant`` (the fraction of those rounded away; NaN when there are none) and
    ``mean |u|/ulp`` (over the same updates, with ``ulp(p)`` the spacing of ``p``'s dtype above
    ``|p|``). A footer totals the tree.

    Args:
      params: a pytree of concrete parameter arrays.
      updates: a pytree of updates with the same paths.

    Returns:
      A :class:`~hybrid_jax._table.Table`; :func:`stagnation_fractions` gives the raw fractions.

    Raises:
      ValueError: an update whose path is not a parameter's, or whose shape differs from it.
      TypeError: a leaf that is not concrete, or an update that is not floating.

    Examples:
      >>> params = {"bf16": jnp.ones(3, jnp.bfloat16), "f32": jnp.ones(3)}
      >>> updates = {"bf16": jnp.full(3, 1e-3), "f32": jnp.full(3, 1e-3)}
      >>> print(update_stagnation(params, updates))
      path   param  update  size  nonzero  stagnant  mean |u|/ulp
      -----  -----  ------  ----  -------  --------  ------------
      bf16   bf16   f32     3     3        1         0.128
      f32    f32    f32     3     3        0         8.39e+03
      -----  -----  ------  ----  -------  --------  ------------
      total                 6     6        0.5       4.19e+03
    """
    rows, total_size, total_nonzero, total_stagnant, total_ratio = [], 0, 0, 0, 0.0
    for s in _stagnation(params, updates):
        rows.append(
            (s.path, s.param, s.update, s.size, s.nonzero, _Shown(s.fraction), _Shown(s.mean_ratio))
        )
        total_size += s.size
        total_nonzero += s.nonzero
        total_stagnant += s.stagnant
        total_ratio += s.ratio_sum
    columns = ("path", "param", "update", "size", "nonzero", "stagnant", "mean |u|/ulp")
    footer = (
        "total",
        "",
        "",
        total_size,
        total_nonzero,
        _Shown(_ratio(total_stagnant, total_nonzero)),
        _Shown(_ratio(total_ratio, total_nonzero)),
    )
    return Table(columns, tuple(rows), (footer,) if rows else ())


# ------------------------------------------------------------------------------------------------


class _Shown(float):
    """A float that ``str()`` prints with a few significant digits (tables); ``repr`` is exact."""

    def __new__(cls, value: float, digits: int = 3) -> _Shown:
        self = super().__new__(cls, value)
        self.digits = digits
        return self

    def __str__(self) -> str:
        return f"{float(self):.{self.digits}g}"


_STAT_COLUMNS = ("max_abs", "min_abs_nonzero", "range_log2", "zeros", "nonfinite")


def _loss_keys(name: str) -> tuple[str, ...]:
    if name in SCALED_FORMATS:
        return (f"{name}_scaled_under",)
    return (f"{name}_under", f"{name}_over")


def _check_scale(scale: Any) -> float:
    try:
        value = float(scale)
    except (TypeError, ValueError):
        raise ValueError(f"scale must be a positive finite number, got {scale!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"scale must be a positive finite number, got {value!r}")
    return value


def _format_names(formats: Sequence[Any]) -> list[str]:
    if isinstance(formats, str):  # a lone "f16" would otherwise iterate over its letters
        formats = (formats,)
    names = []
    for f in formats:
        name = dtypes.short_name(dtypes.parse_dtype(f))
        if name not in FORMATS:
            raise ValueError(f"no range statistics for {name!r}; formats: {', '.join(FORMATS)}")
        names.append(name)
    return names


def _dtype_name(dtype: Any) -> str:
    dtype = np.dtype(dtype)
    try:
        return dtypes.short_name(dtype)
    except KeyError:
        return dtype.name


def _host_array(x: Any, what: str, path: str | None = None) -> np.ndarray:
    where = "" if path is None else f" (leaf {path!r})"
    if isinstance(x, (jax.core.Tracer, jax.ShapeDtypeStruct)):
        raise TypeError(
            f"{what} reads values, so it needs concrete arrays, got {type(x).__name__}{where}; "
            "call it outside jit, on the arrays a step returns"
        )
    arr = np.asarray(x)
    if not jnp.issubdtype(arr.dtype, jnp.floating):
        raise TypeError(f"{what} takes floating arrays, got dtype {arr.dtype}{where}")
    return arr


def _floating_leaves(tree: Any, what: str) -> list[tuple[str, np.ndarray]]:
    out = []
    for path, leaf in tree_lib.leaves_with_paths(tree)[0]:
        dtype = getattr(leaf, "dtype", None)
        if tree_lib.is_leaf(leaf) or dtype is None or not jnp.issubdtype(dtype, jnp.floating):
            continue
        out.append((path, _host_array(leaf, what, path)))
    return out


def _amax_scaled(arr: np.ndarray, name: str) -> np.ndarray:
    """``|x * amax_scale(x)|`` in float64, with quantize's fp32 (fp64) arithmetic, on the host."""
    fmt = dtypes.parse_dtype(name)
    work = dtypes.at_least_f32(arr.dtype)
    x = arr.astype(work)
    magnitude = np.abs(x)
    amax = magnitude[np.isfinite(magnitude)].max(initial=0).astype(work)
    fmax = np.asarray(dtypes.format_max(fmt), work)
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        scale = np.minimum(fmax / (amax if amax > 0 else fmax), np.finfo(work).max).astype(work)
        return np.abs(x * scale).astype(np.float64)


def _counts(arr: np.ndarray, scale: float) -> dict[str, float]:
    # float64 holds every value of every narrower float format exactly.
    magnitude = np.abs(arr.astype(np.float64))
    finite = np.isfinite(magnitude)
    nonzero = finite & (magnitude != 0)
    smallest = magnitude[nonzero]
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        scaled = magnitude * scale
    counts: dict[str, float] = {
        "size": arr.size,
        "max_abs": float(magnitude[finite].max(initial=0.0)),
        "min_abs_nonzero": float(smallest.min()) if smallest.size else math.nan,
        "zeros": int(np.count_nonzero(magnitude == 0)),
        "nonfinite": int(np.count_nonzero(~finite)),
    }
    for name in FORMATS:
        lim = format_limits(name)
        counts[f"{name}_under"] = int(np.count_nonzero(nonzero & lim.underflows(scaled)))
        counts[f"{name}_over"] = int(np.count_nonzero(finite & lim.overflows(scaled)))
    for name in SCALED_FORMATS:
        lim = format_limits(name)
        under = nonzero & lim.underflows(_amax_scaled(arr, name))
        counts[f"{name}_scaled_under"] = int(np.count_nonzero(under))
    return counts


def _merge(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    merged = {k: a[k] + b[k] for k in a}
    merged["max_abs"] = max(a["max_abs"], b["max_abs"])
    merged["min_abs_nonzero"] = float(np.fmin(a["min_abs_nonzero"], b["min_abs_nonzero"]))
    return merged


def _fractions(counts: dict[str, float]) -> dict[str, float]:
    size = counts["size"]
    stats = {}
    for key, value in counts.items():
        if key in ("size", "max_abs", "min_abs_nonzero"):
            stats[key] = value
        else:
            stats[key] = value / size if size else 0.0
        if key == "min_abs_nonzero":
            # A difference of logs: the ratio itself could overflow for fp64 leaves.
            has_range = not math.isnan(value)
            stats["range_log2"] = (
                math.log2(counts["max_abs"]) - math.log2(value) if has_range else math.nan
            )
    return stats


def _row(columns: list[str], stats: dict[str, float], head: tuple, suggestion: str) -> tuple:
    cells = [*head, stats["size"]]
    cells += [_Shown(stats[c]) for c in columns[3:-1]]
    return (*cells, suggestion)


class _LeafStagnation(NamedTuple):
    path: str
    param: str
    update: str
    size: int
    nonzero: int
    stagnant: int
    ratio_sum: float

    @property
    def fraction(self) -> float:
        return _ratio(self.stagnant, self.nonzero)

    @property
    def mean_ratio(self) -> float:
        return _ratio(self.ratio_sum, self.nonzero)


def _ratio(a: float, b: int) -> float:
    return a / b if b else math.nan


def _ulp(p: np.ndarray) -> np.ndarray:
    """The spacing of ``p``'s dtype just above ``|p|``, in float64 (subnormals included)."""
    info = jnp.finfo(p.dtype)
    magnitude = np.abs(p.astype(np.float64))
    _, exponent = np.frexp(magnitude)  # magnitude = m * 2**exponent, 0.5 <= m < 1
    binade = np.where(magnitude > 0, np.maximum(exponent - 1, info.minexp), info.minexp)
    return np.ldexp(1.0, binade - info.nmant)


def _stagnation(params: Any, updates: Any) -> list[_LeafStagnation]:
    by_path = dict(tree_lib.leaves_with_paths(updates)[0])
    param_leaves = dict(tree_lib.leaves_with_paths(params)[0])
    stray = [path for path in by_path if path not in param_leaves]
    if stray:
        raise ValueError(
            f"updates have leaves no parameter has: {stray[:10]}; params and updates must be "
            "trees of the same structure"
        )
    out = []
    for path, p in _floating_leaves(params, "update_stagnation"):
        if path not in by_path:
            continue
        u = _host_array(by_path[path], "update_stagnation", path)
        if u.shape != p.shape:
            raise ValueError(
                f"leaf {path!r}: the update's shape {u.shape} differs from the parameter's "
                f"{p.shape}"
            )
        # apply_updates promotes p + u (bf16 + fp32 -> fp32) and rounds the sum to p's dtype.
        # Adding in fp32 first and rounding again matches it; for bf16 and fp16 operands the two
        # roundings equal one (24 >= 2 * 11 + 2 significand bits), so it is also p + u in p's dtype.
        wide = dtypes.FLOAT64 if dtypes.FLOAT64 in (p.dtype, u.dtype) else dtypes.FLOAT32
        with np.errstate(over="ignore", invalid="ignore"):
            new = (p.astype(wide) + u.astype(wide)).astype(p.dtype)
        u64, p64 = u.astype(np.float64), p.astype(np.float64)
        counted = (u64 != 0) & np.isfinite(u64) & np.isfinite(p64)
        stagnant = counted & (new.astype(np.float64) == p64)
        ratio = np.abs(u64[counted]) / _ulp(p[counted])
        out.append(
            _LeafStagnation(
                path,
                _dtype_name(p.dtype),
                _dtype_name(u.dtype),
                int(p.size),
                int(np.count_nonzero(counted)),
                int(np.count_nonzero(stagnant)),
                float(ratio.sum()),
            )
        )
    return out
