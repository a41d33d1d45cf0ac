"""Range diagnostics: exact underflow/overflow fractions, checked against real casts."""

import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings

from hybrid_jax.diagnostics import (
    format_limits,
    leaf_numerics,
    limits_table,
    numerics_report,
    suggest_precision,
)
from hybrid_jax.precision import dtypes
from hybrid_jax.precision.quantize import quantize
from hybrid_jax.precision.storage import Int8Weight

# Casting beyond fp16's range is what these tests check: NumPy's warning about it is expected.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")

_NP_DTYPE = {
    "f16": np.dtype(np.float16),
    "bf16": np.dtype(ml_dtypes.bfloat16),
    "e4m3": np.dtype(ml_dtypes.float8_e4m3fn),
    "e5m2": np.dtype(ml_dtypes.float8_e5m2),
}


def _up(x):
    return np.nextafter(np.float32(x), np.float32(np.inf))


def _down(x):
    return np.nextafter(np.float32(x), np.float32(0))


# ------------------------------------------------------------------------------------------------
# format_limits


@pytest.mark.parametrize(
    "name, fmax, min_normal, min_subnormal",
    [
        ("f16", 65504.0, 2.0**-14, 2.0**-24),
        ("bf16", float(ml_dtypes.finfo(ml_dtypes.bfloat16).max), 2.0**-126, 2.0**-133),
        ("e4m3", 448.0, 2.0**-6, 2.0**-9),
        ("e5m2", 57344.0, 2.0**-14, 2.0**-16),
        ("f32", float(np.finfo(np.float32).max), 2.0**-126, 2.0**-149),
    ],
)
def test_format_limits(name, fmax, min_normal, min_subnormal):
    lim = format_limits(name)
    assert (lim.name, lim.max, lim.min_normal, lim.min_subnormal) == (
        name,
        fmax,
        min_normal,
        min_subnormal,
    )
    assert lim.underflow_at == min_subnormal / 2
    assert format_limits(_NP_DTYPE.get(name, np.float32)) == lim


def test_overflow_thresholds_and_ties():
    # IEEE formats: max has an odd significand, so the tie rounds up to inf.
    assert (format_limits("f16").overflow_at, format_limits("f16").tie_overflows) == (65520, True)
    assert (format_limits("e5m2").overflow_at, format_limits("e5m2").tie_overflows) == (61440, True)
    # e4m3fn: 448 = 1.110b x 2^8 is even, so 464 rounds back to 448.
    assert (format_limits("e4m3").overflow_at, format_limits("e4m3").tie_overflows) == (464, False)


def test_format_limits_rejects_int8_and_unknown_names():
    with pytest.raises(ValueError, match="fixed point"):
        format_limits("int8")
    with pytest.raises(ValueError, match="unknown dtype"):
        format_limits("fp7")


def test_limits_table_prints():
    table = limits_table()
    assert table.column("format") == ["f32", "bf16", "f16", "e4m3", "e5m2"]
    assert "> 464" in str(table) and ">= 65520" in str(table)
    assert "<table>" in table._repr_html_()


# ------------------------------------------------------------------------------------------------
# Exact fractions on known values

# fp16: 1e-9 and 2.9e-8 are below 2^-25 = 2.98e-8 (flush to 0); 3e-8 is above it (rounds up to
# 2^-24) and 6e-8 rounds to 2^-24 too; 7e4 and 1e5 are beyond 65520 (inf).
# e4m3: everything below 2^-10 = 9.8e-4 flushes (the four tiny values), beyond 464 is NaN.
# e5m2: below 2^-17 = 7.6e-6 flushes (the four tiny values), from 61440 on is inf (7e4, 1e5).
_KNOWN = np.array([0.0, 1e-9, 2.9e-8, 3e-8, 6e-8, 1.0, 7e4, 1e5], np.float32)


@pytest.mark.parametrize(
    "scale, expected",
    [
        # (f16_under, f16_over, e4m3_under, e4m3_over, e5m2_under, e5m2_over), in eighths
        (1.0, (2, 2, 4, 2, 4, 2)),
        # x 1024: the tiny values become 1.0e-6 .. 6.1e-5: fp16 keeps them all, e5m2 loses only
        # 1.0e-6; 1.0 becomes 1024, beyond e4m3's 464.
        (2.0**10, (0, 2, 4, 3, 1, 2)),
        # x 2^-10: 1.0 becomes exactly 2^-10, half e4m3's smallest subnormal: a tie to 0.
        (2.0**-10, (4, 0, 5, 0, 4, 0)),
    ],
)
def test_known_values_give_exact_fractions(scale, expected):
    stats = leaf_numerics(jnp.asarray(_KNOWN), scale=scale)
    keys = ("f16_under", "f16_over", "e4m3_under", "e4m3_over", "e5m2_under", "e5m2_over")
    assert tuple(stats[k] for k in keys) == tuple(n / 8 for n in expected)
    assert stats["size"] == 8
    assert stats["zeros"] == 1 / 8
    assert stats["nonfinite"] == 0.0
    assert stats["bf16_under"] == stats["bf16_over"] == stats["f32_over"] == 0.0
    assert stats["max_abs"] == 1e5
    assert stats["min_abs_nonzero"] == float(np.float32(1e-9))
    assert stats["range_log2"] == pytest.approx(np.log2(1e5 / float(np.float32(1e-9))))
    # Amax scaling ignores the scale: 1e5 -> 448 (e4m3) or 57344 (e5m2) leaves 1.0 at 4.5e-3 and
    # 0.57, both representable, and the four tiny values below reach.
    assert stats["e4m3_scaled_under"] == stats["e5m2_scaled_under"] == 4 / 8


@pytest.mark.parametrize("fmt", ["f16", "e4m3", "e5m2", "bf16"])
def test_boundaries_follow_round_to_nearest_even(fmt):
    lim = format_limits(fmt)
    half, mid = lim.underflow_at, lim.overflow_at
    values = np.array(
        [half, _up(half), _down(half), lim.max, _up(lim.max), mid, _down(mid), _up(mid)],
        np.float32,
    )
    assert values[0] == half and values[5] == mid  # all thresholds are fp32 values
    x = np.concatenate([values, -values])
    under = lim.underflows(np.abs(x.astype(np.float64)))
    over = lim.overflows(np.abs(x.astype(np.float64)))
    expected_under = np.array([1, 0, 1, 0, 0, 0, 0, 0] * 2, bool)
    expected_over = np.array([0, 0, 0, 0, 0, lim.tie_overflows, 0, 1] * 2, bool)
    np.testing.assert_array_equal(under, expected_under)
    np.testing.assert_array_equal(over, expected_over)
    # ... and so does the actual cast, in ml_dtypes and in XLA.
    for cast in (x.astype(_NP_DTYPE[fmt]), np.asarray(jnp.asarray(x).astype(_NP_DTYPE[fmt]))):
        back = cast.astype(np.float64)
        np.testing.assert_array_equal(back == 0, expected_under)
        np.testing.assert_array_equal(~np.isfinite(back), expected_over)
    stats = leaf_numerics(x)
    assert stats[f"{fmt}_under"] == 4 / 16
    assert stats[f"{fmt}_over"] == (4 if lim.tie_overflows else 2) / 16


def test_non_finite_values_are_counted_apart():
    x = jnp.array([jnp.nan, jnp.inf, -jnp.inf, 1.0, 0.0, 1e-9])
    stats = leaf_numerics(x)
    assert stats["nonfinite"] == 3 / 6
    assert stats["zeros"] == 1 / 6
    assert (stats["max_abs"], stats["min_abs_nonzero"]) == (1.0, float(np.float32(1e-9)))
    assert stats["f16_over"] == stats["e4m3_over"] == 0.0  # inf is not an overflow of the format
    assert stats["f16_under"] == 1 / 6
    # Amax scaling skips them too: 1.0 -> 448, and 1e-9 -> 4.5e-7 underflows.
    assert stats["e4m3_scaled_under"] == 1 / 6


def test_empty_and_all_zero_arrays():
    empty = leaf_numerics(jnp.zeros((0,)))
    assert empty["size"] == 0 and empty["f16_under"] == 0.0 and np.isnan(empty["range_log2"])
    zeros = leaf_numerics(jnp.zeros((4,)))
    assert zeros["zeros"] == 1.0 and zeros["max_abs"] == 0.0
    assert np.isnan(zeros["min_abs_nonzero"]) and zeros["e4m3_scaled_under"] == 0.0
    assert suggest_precision(zeros) == "e4m3"


# ------------------------------------------------------------------------------------------------
# The rules against real casts, on random values

# Random fp32 bit patterns cover every binade (subnormals to 3e38) evenly; the intervals add
# values near the thresholds, which bit patterns rarely hit.
_near = [
    st.floats(lo, hi, width=32)
    for lo, hi in [
        (2.0**-27, 2.0**-23),
        (2.0**-12, 2.0**-8),
        (2.0**-19, 2.0**-15),
        (400.0, 520.0),
        (57000.0, 70000.0),
    ]
]
_f32 = hnp.arrays(
    np.float32,
    64,
    elements=st.one_of(
        st.integers(0, 2**32 - 1).map(lambda b: np.uint32(b).view(np.float32)), *_near
    ).filter(np.isfinite),
)


@settings(max_examples=40, deadline=None)
@given(x=_f32)
def test_rules_match_casts(x):
    magnitude = np.abs(x.astype(np.float64))
    n = x.size
    stats = leaf_numerics(x)
    for fmt in ("f16", "e4m3", "e5m2", "bf16"):
        lim = format_limits(fmt)
        for cast in (x.astype(_NP_DTYPE[fmt]), np.asarray(jnp.asarray(x).astype(_NP_DTYPE[fmt]))):
            back = cast.astype(np.float64)
            flushed = (back == 0) & (x != 0)
            np.testing.assert_array_equal(lim.underflows(magnitude) & (x != 0), flushed)
            # fp16, e5m2, bf16 cast beyond the range to inf; e4m3fn, which has none, to NaN.
            lost = np.isnan(back) if fmt == "e4m3" else np.isinf(back)
            np.testing.assert_array_equal(lim.overflows(magnitude), lost)
            assert not np.any(np.isnan(back)) or fmt == "e4m3"
        assert stats[f"{fmt}_under"] == np.count_nonzero(flushed) / n
        assert stats[f"{fmt}_over"] == np.count_nonzero(lost) / n


@settings(max_examples=25, deadline=None)
@given(x=_f32, k=st.integers(-30, 30))
def test_scaled_rules_match_casts_of_the_scaled_values(x, k):
    # A power-of-two scale: x * 2^k is exact in float64, and NumPy rounds float64 to fp16 once.
    y = x.astype(np.float64) * 2.0**k
    stats = leaf_numerics(x, scale=2.0**k)
    back = y.astype(np.float16).astype(np.float64)
    assert stats["f16_under"] == np.count_nonzero((back == 0) & (x != 0)) / x.size
    assert stats["f16_over"] == np.count_nonzero(~np.isfinite(back)) / x.size


@settings(max_examples=25, deadline=None)
@given(
    log_magnitude=hnp.arrays(np.float64, 64, elements=st.floats(-30, 5)),
    signs=hnp.arrays(np.bool_, 64),
)
def test_scaled_underflow_is_what_quantize_flushes(log_magnitude, signs):
    x = np.where(signs, -1, 1) * (10.0**log_magnitude)
    x = jnp.asarray(x, jnp.float32)
    stats = leaf_numerics(x)
    for fmt in ("e4m3", "e5m2"):
        q, _ = quantize(x, fmt)
        flushed = (np.asarray(q.astype(jnp.float32)) == 0) & (np.asarray(x) != 0)
        assert stats[f"{fmt}_scaled_under"] == np.count_nonzero(flushed) / x.size
        # Overflow is 0 by construction: the amax lands on the format's max.
        assert not np.any(np.isnan(np.asarray(q.astype(jnp.float32))))


# ------------------------------------------------------------------------------------------------
# Gradients and loss scaling


def test_fp16_gradient_underflow_is_what_loss_scaling_fixes():
    rng = np.random.default_rng(0)
    grads = {
        "w": jnp.asarray(rng.normal(0, 1e-8, (64, 64)), jnp.float32),
        "b": jnp.asarray(rng.normal(0, 1e-7, (256,)), jnp.float32),
    }
    unscaled = numerics_report(grads)
    scaled = numerics_report(grads, scale=2.0**15)
    under = dict(zip(unscaled.column("path"), unscaled.column("f16_under"), strict=True))
    assert under["w"] > 0.99 and under["b"] > 0.15
    assert max(scaled.column("f16_under")) < 1e-3
    assert scaled.column("f16_over") == [0.0, 0.0]
    # The exact numbers are those an fp16 cast of the scaled gradients flushes.
    for report, scale in ((unscaled, 1.0), (scaled, 2.0**15)):
        for path, fraction in zip(report.column("path"), report.column("f16_under"), strict=True):
            g = np.asarray(grads[path])
            cast = (g * np.float32(scale)).astype(np.float16)
            assert fraction == np.count_nonzero((cast == 0) & (g != 0)) / g.size
        total = report.footer[0][report.columns.index("f16_under")]
        flushed = sum(
            np.count_nonzero((np.asarray(g) * np.float32(scale)).astype(np.float16) == 0)
            for g in grads.values()
        )
        assert total == flushed / (64 * 64 + 256)


# ------------------------------------------------------------------------------------------------
# suggest_precision and the report


def test_suggest_precision_by_dynamic_range():
    rng = np.random.default_rng(0)
    # A well-conditioned weight: all within e4m3's 2^18 of scaled range.
    assert suggest_precision(rng.normal(0, 0.02, 4096).astype(np.float32)) == "e4m3"
    # 2^-24 .. 2^0 (24 binades) is too wide for e4m3 (~18 scaled), fine for e5m2 (~33).
    assert suggest_precision(np.logspace(-24, 0, 1000, base=2, dtype=np.float32)) == "e5m2"
    # 2^-20 .. 2^15 (35 binades) is too wide for e5m2 but inside fp16 at scale 1.
    assert suggest_precision(np.logspace(-20, 15, 1000, base=2, dtype=np.float32)) == "f16"
    # ... but not at scale 4 (2^17 > 65520): bf16.
    wide = np.logspace(-20, 15, 1000, base=2, dtype=np.float32)
    assert suggest_precision(wide, scale=4.0) == "bf16"
    # Magnitudes from 2^-60: fp16 flushes a third of them; bf16 (fp32's range) keeps them.
    assert suggest_precision(np.logspace(-60, 0, 1000, base=2, dtype=np.float32)) == "bf16"


def test_suggest_precision_tolerance_and_candidates():
    x = np.array([1.0] * 999 + [1e-12], np.float32)  # 1 in 1000 below e4m3's and e5m2's reach
    stats = leaf_numerics(x)
    assert suggest_precision(stats, tolerance=1e-3) == "e4m3"
    assert suggest_precision(stats, tolerance=1e-4) == "bf16"  # fp16 flushes 1e-9 too
    assert suggest_precision(stats, 0.0, candidates=("e4m3", "f16")) == "f16"  # none: the last
    assert suggest_precision(stats, 0.0, candidates=["fp16", "float32"]) == "f32"


def test_suggest_precision_errors():
    stats = leaf_numerics(np.ones(3, np.float32))
    with pytest.raises(ValueError, match="tolerance"):
        suggest_precision(stats, -1.0)
    with pytest.raises(ValueError, match="scale="):
        suggest_precision(stats, scale=2.0)
    with pytest.raises(ValueError, match="no range statistics"):
        suggest_precision(stats, candidates=("int8",))
    report = numerics_report({"w": np.ones(3, np.float32)})
    row = dict(zip(report.columns, report.rows[0], strict=True))
    with pytest.raises(ValueError, match="bf16_under"):
        suggest_precision(row)  # the default report shows no bf16 columns
    assert suggest_precision(row, candidates=("e4m3", "f16")) == "e4m3"


def test_report_rows_columns_and_rendering():
    tree = {
        "w": jnp.asarray(_KNOWN),
        "h": jnp.asarray(_KNOWN[1:6], jnp.bfloat16),
        "step": jnp.array(3, jnp.int32),  # not floating: left out
        "q": Int8Weight.quantize(jnp.ones((2, 2))),  # a compound leaf: left out
    }
    report = numerics_report(tree, formats=("f16", "e4m3"))
    assert report.columns == (
        "path",
        "dtype",
        "size",
        "max_abs",
        "min_abs_nonzero",
        "range_log2",
        "zeros",
        "nonfinite",
        "f16_under",
        "f16_over",
        "e4m3_under",
        "e4m3_over",
        "e4m3_scaled_under",
        "suggest",
    )
    assert report.column("path") == ["h", "w"]
    assert report.column("dtype") == ["bf16", "f32"]
    assert report.column("f16_over") == [0.0, 2 / 8]
    assert report.column("suggest") == [
        suggest_precision(leaf_numerics(tree["h"])),
        suggest_precision(leaf_numerics(tree["w"])),
    ]
    (total,) = report.footer
    assert total[:3] == ("total", "", 13)
    assert total[report.columns.index("max_abs")] == 1e5
    assert "f16_under" in str(report) and "total" in str(report)
    html = report._repr_html_()
    assert html.startswith("<table>") and "<th>e4m3_scaled_under</th>" in html


def test_report_on_nnx_state():
    nnx = pytest.importorskip("flax.nnx")
    model = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
    report = numerics_report(nnx.state(model, nnx.Param))
    assert report.column("path") == ["bias", "kernel"]
    assert report.column("zeros")[0] == 1.0


def test_report_needs_concrete_arrays():
    with pytest.raises(TypeError, match=r"concrete arrays.*'w'"):
        jax.jit(lambda t: numerics_report(t) and 0)({"w": jnp.ones(2)})
    with pytest.raises(TypeError, match="ShapeDtypeStruct"):
        leaf_numerics(jax.ShapeDtypeStruct((2,), jnp.float32))
    with pytest.raises(TypeError, match="floating"):
        leaf_numerics(np.arange(3))
    with pytest.raises(ValueError, match="positive finite"):
        numerics_report({"w": jnp.ones(2)}, scale=0.0)
    with pytest.raises(ValueError, match="no range statistics"):
        numerics_report({"w": jnp.ones(2)}, formats=("f64",))


def test_dtypes_of_the_module_are_the_package_dtypes():
    # The short names in reports are those of hybrid_jax.precision.dtypes.
    assert {dtypes.short_name(d) for d in _NP_DTYPE.values()} == set(_NP_DTYPE)
