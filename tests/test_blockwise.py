"""The 8-bit block-wise codec (optim._blockwise): code book, round trip, stochastic rounding."""

import chex
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

from hybrid_jax.optim._blockwise import (
    dequantize_blocks,
    dynamic_map,
    quantize_blocks,
)

# --- The code book ------------------------------------------------------------------------------


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_is_256_sorted_distinct_fp32_values_with_0_and_1(signed):
    table = dynamic_map(signed)
    assert table.dtype == np.float32 and table.shape == (256,)
    assert np.all(np.diff(table) > 0)
    assert 0.0 in table and table[-1] == 1.0
    assert table[0] == (-1.0 if signed else 0.0)
    assert dynamic_map(signed) is table and not table.flags.writeable  # cached, read-only


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_spreads_levels_over_decades_most_in_the_upper_ones(signed):
    table = dynamic_map(signed).astype(np.float64)
    magnitudes = table[table > 0]
    assert 1e-7 <= magnitudes.min() <= 1e-6 * (1 + 1e-6)
    # Levels in each decade (10^-(e+1), 10^-e], e = 0 (top) ... 5: every decade down to 1e-6 is
    # populated, and a decade never has more levels than the one above it.
    counts = [
        np.sum((magnitudes > 10.0 ** -(e + 1) * (1 + 1e-6)) & (magnitudes <= 10.0**-e * (1 + 1e-6)))
        for e in range(6)
    ]
    assert all(c >= 1 for c in counts) and counts == sorted(counts, reverse=True)
    assert counts[0] == (64 if signed else 128)
    if signed:  # symmetric, but for the spare code at -1e-7
        table = dynamic_map(True)
        np.testing.assert_array_equal(-table[table < 0][::-1][1:], table[table > 0])


# --- The round trip -----------------------------------------------------------------------------


# quantize_blocks and dequantize_blocks are jitted inside the library, so eager calls compile
# once per shape and mode; the tests below share one shape (777 elements, blocks of 64, the last
# one padded) to share those compilations.
_N, _BLOCK = 777, 64
_MODES = {"signed": (True, False), "unsigned": (False, False), "sqrt": (False, True)}


def _round_trip(x, mode):
    signed, sqrt = _MODES[mode]
    return dequantize_blocks(quantize_blocks(x, block_size=_BLOCK, signed=signed, sqrt=sqrt))


def _assert_within_half_a_code_step(x, decoded, block_size, signed, sqrt):
    """Checks |decode(encode(x)) - x| against half the local code-book gap times the block scale.

    With s the block's absmax and c_j <= x/s <= c_{j+1} the entries around x's normalized value,
    round to nearest gives |x_hat - x| <= (c_{j+1} - c_j) / 2 * s exactly; fp32 adds the rounding
    of x/s and of c*s, each under 2^-24 * s, plus that of the midpoints, so the test allows
    2^-22 * s on top. Under sqrt the bound holds for sqrt(x) (the stored value), where squaring
    and the square root add a few more roundings: 2^-21 * s.
    """
    table = dynamic_map(signed).astype(np.float64)
    stored = np.asarray(x, np.float64).reshape(-1)
    got = np.asarray(decoded, np.float64).reshape(-1)
    if sqrt:
        stored, got = np.sqrt(stored), np.sqrt(got)
    n_blocks = -(-stored.size // block_size)
    padded = np.zeros(n_blocks * block_size)
    padded[: stored.size] = stored
    scale = np.repeat(np.max(np.abs(padded.reshape(n_blocks, block_size)), axis=1), block_size)
    scale = scale[: stored.size]
    y = stored / np.where(scale > 0, scale, 1.0)
    j = np.clip(np.searchsorted(table, y, side="right") - 1, 0, 254)
    gap = table[j + 1] - table[j]
    bound = (gap / 2 + (2.0**-21 if sqrt else 2.0**-22)) * scale
    excess = np.abs(got - stored) - bound
    assert np.all(excess <= 0), f"error exceeds the bound by up to {np.max(excess)}"


@st.composite
def _mixed_magnitudes(draw):
    # Values spread over up to 12 decades (a block then holds values below the map's range),
    # at an overall scale from 1e-20 to 1e20, with some exact zeros; seeded numpy, so that a
    # failure reproduces.
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    decades = draw(st.integers(0, 12))
    scale = 10.0 ** draw(st.integers(-20, 20))
    x = scale * 10.0 ** rng.uniform(-decades, 0, _N) * rng.choice([-1.0, 1.0], _N)
    x[rng.random(_N) < 0.1] = 0.0
    return x.astype(np.float32)


@settings(max_examples=40, deadline=None)
@given(x=_mixed_magnitudes(), mode=st.sampled_from(list(_MODES)))
def test_round_trip_error_is_at_most_half_the_local_code_step_times_the_block_scale(x, mode):
    signed, sqrt = _MODES[mode]
    if not signed:
        x = np.abs(x)
    decoded = _round_trip(jnp.asarray(x), mode)
    assert decoded.dtype == jnp.float32 and decoded.shape == x.shape
    _assert_within_half_a_code_step(x, decoded, _BLOCK, signed, sqrt)


def _first_block_then_ones(first_block):
    return jnp.asarray(np.r_[first_block, np.ones(_N - _BLOCK)], jnp.float32)


def test_sqrt_domain_keeps_values_1e8_below_the_block_max():
    x = _first_block_then_ones(np.r_[1.0, np.full(_BLOCK - 1, 1e-8)])
    # sqrt(1e-8) = 1e-4 is a code-book entry: decodes to 1e-8 up to fp32 rounding.
    np.testing.assert_allclose(_round_trip(x, "sqrt")[1:_BLOCK], 1e-8, rtol=1e-5)
    # The plain map ends at 1e-7 of the block max: the same values round to 0.
    np.testing.assert_array_equal(_round_trip(x, "unsigned")[1:_BLOCK], 0.0)


@pytest.mark.parametrize("mode", list(_MODES))
def test_a_zero_block_decodes_to_zeros(mode):
    decoded = _round_trip(_first_block_then_ones(np.zeros(_BLOCK)), mode)
    np.testing.assert_array_equal(decoded[:_BLOCK], 0.0)
    np.testing.assert_array_equal(decoded[_BLOCK:], 1.0)  # 1 is its block's max: exact
    np.testing.assert_array_equal(_round_trip(jnp.zeros(_N), mode), 0.0)


@pytest.mark.parametrize("key", [None, 0], ids=["nearest", "stochastic"])
def test_a_non_finite_value_spoils_only_its_block(key):
    x = _first_block_then_ones(np.r_[np.nan, np.ones(63)])
    key = None if key is None else jax.random.key(key)
    decoded = np.asarray(dequantize_blocks(quantize_blocks(x, block_size=_BLOCK, key=key)))
    assert np.all(np.isnan(decoded[:_BLOCK]))
    np.testing.assert_array_equal(decoded[_BLOCK:], 1.0)


@pytest.mark.parametrize(
    ("shape", "dtype"),
    [((), jnp.float32), ((1,), jnp.bfloat16), ((3, 5, 7), jnp.float32)],
)
def test_round_trip_keeps_shape_and_decodes_to_float32(shape, dtype):
    x = jnp.asarray(np.random.default_rng(0).normal(size=shape), dtype)
    q = quantize_blocks(x, block_size=64)
    assert q.codes.shape == (-(-x.size // 64), 64) and q.scales.shape == (q.codes.shape[0],)
    decoded = q.dequantize()
    assert decoded.shape == shape and decoded.dtype == jnp.float32
    if x.size:  # an element that is its block's absmax decodes exactly: the map holds +-1
        i = np.argmax(np.abs(np.asarray(x, np.float32)))
        assert decoded.reshape(-1)[i] == x.reshape(-1)[i].astype(jnp.float32)


def test_block_quantized_is_a_pytree_of_codes_and_scales_with_static_metadata():
    q = quantize_blocks(jnp.ones(_N), block_size=_BLOCK, signed=False, sqrt=True)
    leaves, treedef = jax.tree_util.tree_flatten(q)
    assert [leaf.dtype for leaf in leaves] == [jnp.uint8, jnp.float32]
    back = jax.tree_util.tree_unflatten(treedef, leaves)
    assert (back.shape, back.signed, back.sqrt, back.block_size) == ((_N,), False, True, _BLOCK)
    chex.assert_trees_all_equal(jax.jit(lambda q: q)(q).dequantize(), q.dequantize())


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"block_size": 0}, ValueError, "positive"),
        ({"block_size": 2.5}, TypeError, "positive int"),
        ({"block_size": True}, TypeError, "positive int"),
        ({"signed": True, "sqrt": True}, ValueError, "signed=False"),
    ],
)
def test_quantize_blocks_rejects_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        quantize_blocks(jnp.ones(4), **kwargs)


def test_quantize_blocks_rejects_integer_input():
    with pytest.raises(TypeError, match="floating"):
        quantize_blocks(jnp.ones(4, jnp.int32))


# --- Stochastic rounding ------------------------------------------------------------------------


def _between_entries(mode):
    """Four values of the quantized domain, each 0.3 of the way between two code-book entries.

    One per decade region: near 1, near 0.1, near 1e-3 and (signed) a negative one. Returns the
    values and the entries around each, in float64.
    """
    signed, _ = _MODES[mode]
    table = dynamic_map(signed).astype(np.float64)
    lower = [250, 150, 140, 40] if signed else [250, 200, 120, 60]
    values = np.float32([table[j] + 0.3 * (table[j + 1] - table[j]) for j in lower])
    return values.astype(np.float64), table[lower], table[np.add(lower, 1)]


def _stochastic_draws(x, n, mode):
    # Eager calls: quantize_blocks compiles once per shape and mode, and a new key reuses it.
    signed, sqrt = _MODES[mode]
    return np.stack(
        [
            dequantize_blocks(
                quantize_blocks(x, block_size=_BLOCK, signed=signed, sqrt=sqrt, key=key)
            )
            for key in map(jax.random.key, range(n))  # (iterating over split keys is slow)
        ]
    )


@pytest.mark.parametrize("mode", list(_MODES))
def test_stochastic_rounding_is_unbiased_and_picks_one_of_the_two_neighbours(mode):
    _, sqrt = _MODES[mode]
    values, low, high = _between_entries(mode)
    # Block b holds 1.0 first (its scale, so normalized values are the values themselves) and
    # value b % 4 after it: 13 blocks, about 190 elements per value and draw.
    which = np.arange(_N) // _BLOCK % 4
    stored = values[which].astype(np.float32)
    stored[::_BLOCK] = 1.0
    x = np.square(stored) if sqrt else stored  # sqrt mode stores sqrt(x): the values
    draws = _stochastic_draws(jnp.asarray(x), 100, mode)
    inner = np.ones(_N, bool)
    inner[::_BLOCK] = False
    decoded = (lambda c: np.square(np.float32(c))) if sqrt else np.float32
    for k in range(4):
        got = draws[:, inner & (which == k)].reshape(-1)
        is_high = got == decoded(high[k])
        assert np.all(is_high | (got == decoded(low[k]))), k
        # Unbiased in the domain quantized (that of sqrt(x) under sqrt): the mean of n draws of
        # {low, high}, high with probability p, is within 3 standard errors,
        # (high - low) sqrt(p (1 - p) / n), of the value. p = 0.3 up to fp32 rounding.
        value = float(np.sqrt(np.float32(x[which == k][-1]))) if sqrt else float(values[k])
        p = (value - low[k]) / (high[k] - low[k])
        mean = np.mean(np.where(is_high, high[k], low[k]))
        error = (high[k] - low[k]) * np.sqrt(p * (1 - p) / got.size)
        assert abs(mean - value) <= 3 * error, (k, mean, value, error)
        assert 0.29 < p < 0.31


def test_stochastic_rounding_depends_on_the_key_alone():
    x = jnp.asarray(np.random.default_rng(0).normal(size=_N), jnp.float32)
    codes = lambda key: np.asarray(quantize_blocks(x, block_size=_BLOCK, key=key).codes)
    key = jax.random.key(3)
    np.testing.assert_array_equal(codes(key), codes(key))
    assert np.mean(codes(key) != codes(jax.random.key(4))) > 0.1
    # Each code is the nearest one or its neighbour on the other side of the value.
    nearest = np.asarray(quantize_blocks(x, block_size=_BLOCK).codes, np.int32)
    assert np.all(np.abs(codes(key).astype(np.int32) - nearest) <= 1)
