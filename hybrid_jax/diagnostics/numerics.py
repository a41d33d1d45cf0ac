"""Range diagnostics of concrete arrays: which values each narrower format flushes to zero or
overflows, and the narrowest format whose range a tensor tolerates.

Everything here runs on the host, in NumPy, on concrete arrays (jax or NumPy arrays, any pytree
including Flax NNX ``State``): it is a tool to look at a tree of gradients, activations or
weights between steps, not something to call inside ``jit``. Magnitudes are compared in float64,
which holds every fp32, bf16, fp16 and fp8 value exactly; the rounding rules are those of
:mod:`~hybrid_jax.diagnostics.formats`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from hybrid_jax._table import Table
from hybrid_jax.diagnostics._common import Shown, dtype_label, floating_leaves, host_array
from hybrid_jax.diagnostics.formats import FORMATS, SCALED_FORMATS, format_limits
from hybrid_jax.precision import dtypes

#: :func:`suggest_precision`'s candidates, the first one tried first: fp8 before 16 bits before
#: fp32 and, at equal width, the more precise format first (e4m3 before e5m2, fp16 before bf16),
#: since a range criterion alone would always prefer the wider range.
CANDIDATES = ("e4m3", "e5m2", "f16", "bf16", "f32")


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
    counts = _counts(host_array(x, "leaf_numerics"), _check_scale(scale))
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
    for path, leaf in floating_leaves(tree, "numerics_report"):
        counts = _counts(leaf, scale)
        total = counts if total is None else _merge(total, counts)
        stats = _fractions(counts)
        suggestion = suggest_precision(stats, tolerance)
        rows.append(_row(columns, stats, (path, dtype_label(leaf.dtype)), suggestion))
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
    cells += [Shown(stats[c]) for c in columns[3:-1]]
    return (*cells, suggestion)
