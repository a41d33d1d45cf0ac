"""Stochastic rounding to bf16: unbiased, onto the two neighbours, exact and non-finite kept."""

import chex
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings

from hybrid_jax.precision.rounding import stochastic_round

_BF16 = ml_dtypes.bfloat16
_sr = jax.jit(stochastic_round)


def _neighbours(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The bf16 values either side of each fp32 ``x`` (both ``x`` where bf16 holds it), in f64.

    Computed with ml_dtypes' round-to-nearest cast and nextafter, not the bit trick under test.
    """
    x = np.asarray(x, np.float32)
    nearest = x.astype(_BF16)
    exact = nearest.astype(np.float32) == x
    toward_x = np.where(nearest.astype(np.float32) < x, np.inf, -np.inf).astype(_BF16)
    other = np.where(exact, nearest, np.nextafter(nearest, toward_x))
    a, b = nearest.astype(np.float64), other.astype(np.float64)
    return np.minimum(a, b), np.maximum(a, b)


# Values between two bf16 neighbours: near 1, negative, large, tiny normal, fp32 subnormal (bf16
# has fp32's exponent range, so its subnormals are a coarser grid on the same interval).
@pytest.mark.parametrize("value", [1.001, 1.0 + 2.0**-9, -3.3, 12345.678, 1e-30, -3e-39])
def test_mean_of_many_draws_is_the_exact_value(value):
    n = 20_000
    x = jnp.full((n,), value, jnp.float32)
    draws = np.asarray(_sr(x, jax.random.key(42)).astype(jnp.float32), np.float64)
    exact = float(np.float32(value))  # the fp32 input is what the rounding is unbiased about
    lo, hi = (float(v[0]) for v in _neighbours(np.float32([value])))

    assert lo < exact < hi
    assert set(np.unique(draws)) <= {lo, hi}
    # Each draw is Bernoulli between lo and hi, so the mean has standard error
    # (hi - lo) sqrt(q (1 - q) / n) with q the exact fractional position; 3 SE is a 0.3% miss.
    q = (exact - lo) / (hi - lo)
    standard_error = (hi - lo) * np.sqrt(q * (1 - q) / n)
    assert abs(draws.mean() - exact) <= 3 * standard_error, (draws.mean(), exact, standard_error)
    # Round-to-nearest, by contrast, is biased by the whole distance to the nearer neighbour.
    assert abs(float(np.float32(value).astype(_BF16)) - exact) > 10 * standard_error


_FINITE_F32 = st.floats(allow_nan=False, allow_infinity=False, width=32)


@settings(max_examples=100, deadline=None)
# One shape, so that the jitted function compiles once.
@given(x=hnp.arrays(np.float32, 128, elements=_FINITE_F32), seed=st.integers(0, 99))
def test_every_draw_is_one_of_the_two_neighbours(x, seed):
    y = np.asarray(_sr(jnp.asarray(x), jax.random.key(seed)).astype(jnp.float32), np.float64)
    # Above bf16's largest finite value (fp32 goes a little higher) the outer neighbour is inf.
    lo, hi = _neighbours(x)
    assert np.all((y == lo) | (y == hi)), x[(y != lo) & (y != hi)]
    # Sign is kept (-0.0 included).
    assert np.all(np.signbit(y) == np.signbit(x))


def test_every_finite_bf16_value_is_unchanged():
    # Exhaustive: all 2^16 bit patterns, widened to fp32 and rounded back, keep their bits.
    bits = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
    values = bits.view(_BF16)
    finite = np.isfinite(values.astype(np.float32))
    x = jnp.asarray(values[finite].astype(np.float32))
    y = np.asarray(_sr(x, jax.random.key(0))).view(np.uint16)
    np.testing.assert_array_equal(y, bits[finite])


def test_non_finite_values_pass_through():
    # 0x7F800001 and 0xFFFFFFFF are NaNs whose bit pattern plus noise would truncate to inf or
    # wrap around to zero: they must stay NaN.
    nan_bits = np.array([0x7F800001, 0x7FC00000, 0xFFFFFFFF, 0xFF80FFFF], np.uint32)
    x = np.concatenate([np.float32([np.inf, -np.inf]), nan_bits.view(np.float32)])
    y = np.asarray(_sr(jnp.asarray(np.tile(x, 100)), jax.random.key(3)).astype(jnp.float32))
    y = y.reshape(100, -1)
    assert np.all(y[:, 0] == np.inf) and np.all(y[:, 1] == -np.inf)
    assert np.all(np.isnan(y[:, 2:]))


def test_keys_typed_and_raw_give_the_same_bits_and_different_keys_differ():
    x = jnp.linspace(1.0, 2.0, 1000, dtype=jnp.float32)
    typed = stochastic_round(x, jax.random.key(7))
    chex.assert_trees_all_equal(typed, stochastic_round(x, jax.random.PRNGKey(7)))
    chex.assert_trees_all_equal(typed, _sr(x, jax.random.key(7)))  # eager == jit
    assert not np.array_equal(np.asarray(typed), np.asarray(stochastic_round(x, jax.random.key(8))))


def test_narrower_inputs_are_widened_exactly():
    x = jnp.asarray([1.0, -2.5, 0.0078125], jnp.bfloat16)
    chex.assert_trees_all_equal(stochastic_round(x, jax.random.key(0)), x)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.float32, "e4m3", "f16"])
def test_targets_other_than_bf16_are_refused(dtype):
    with pytest.raises(ValueError, match=r"bf16 only, got (f16|f32|e4m3)"):
        stochastic_round(jnp.ones(3), jax.random.key(0), dtype)


def test_unknown_dtype_name_and_integer_input_are_refused():
    with pytest.raises(ValueError, match="unknown dtype 'bf17'"):
        stochastic_round(jnp.ones(3), jax.random.key(0), "bf17")
    with pytest.raises(TypeError, match="floating arrays, got int32"):
        stochastic_round(jnp.ones(3, jnp.int32), jax.random.key(0))
