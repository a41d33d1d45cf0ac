"""Update stagnation: which updates a parameter's dtype rounds away, against two references."""

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from hybrid_jax.diagnostics import stagnation_fractions, update_stagnation


@pytest.mark.parametrize(
    "param_dtype, update, expected",
    [
        (jnp.bfloat16, 1e-3, 1.0),  # below half of bf16's ulp 2^-7 at 1.0: rounded away
        (jnp.bfloat16, 1e-2, 0.0),  # above it: 1.0 -> 1.0078125
        (jnp.float32, 1e-3, 0.0),
        (jnp.float16, 1e-4, 1.0),  # fp16's ulp at 1.0 is 2^-10
        (jnp.float16, 1e-3, 0.0),
    ],
)
def test_stagnation_of_a_unit_weight(param_dtype, update, expected):
    params = {"w": jnp.ones((8,), param_dtype)}
    updates = {"w": jnp.full((8,), update, jnp.float32)}
    assert stagnation_fractions(params, updates) == {"w": expected}
    table = update_stagnation(params, updates)
    ulp = float(jnp.finfo(param_dtype).eps)
    assert table.column("mean |u|/ulp") == [pytest.approx(float(np.float32(update)) / ulp)]
    assert table.column("nonzero") == [8]


def _random_params_and_updates(rng, dtype, low, high, n=4000):
    p = (rng.normal(0, 1, n) * 10.0 ** rng.uniform(-3, 1, n)).astype(dtype)
    p[:10] = 0  # ulp(0) is the smallest subnormal: any representable update moves it
    # Updates between 2^low and 2^high of |p|.
    u = (np.abs(p.astype(np.float64)) * 2.0 ** rng.uniform(low, high, n)).astype(np.float32)
    u *= np.where(rng.random(n) < 0.5, -1, 1).astype(np.float32)
    u[10:20] = 0  # zero updates are not counted
    u[20] = np.nan  # nor non-finite ones
    return p, u


# Relative update sizes straddling half an ulp for bf16 (2^-8) and fp16 (2^-11); the same sizes
# as bf16's leave fp32 (2^-24) untouched.
@pytest.mark.parametrize(
    "dtype, low, high",
    [(ml_dtypes.bfloat16, -12, -4), (np.float16, -15, -7), (np.float32, -12, -4)],
)
def test_stagnation_is_exact_against_references(dtype, low, high):
    rng = np.random.default_rng(1)
    p, u = _random_params_and_updates(rng, dtype, low, high)
    fraction = stagnation_fractions({"p": p}, {"p": u})["p"]
    table = update_stagnation({"p": jnp.asarray(p)}, {"p": jnp.asarray(u)})

    counted = (u != 0) & np.isfinite(u)
    # Reference 1: what optax.apply_updates computes, in XLA (bf16 + fp32 -> fp32, then cast).
    new = np.asarray((jnp.asarray(p).astype(jnp.float32) + jnp.asarray(u)).astype(p.dtype))
    same = new.astype(np.float64) == p.astype(np.float64)
    assert fraction == np.count_nonzero(same & counted) / np.count_nonzero(counted)
    # Reference 2: element by element, with NumPy / ml_dtypes scalars.
    stuck = [
        dtype(np.float32(pi) + np.float32(ui)) == pi
        for pi, ui in zip(p[counted], u[counted], strict=True)
    ]
    assert fraction == np.mean(stuck)
    assert 0.1 < fraction < 0.9 if dtype != np.float32 else fraction == 0.0
    # mean |u| / ulp(p), with NumPy's spacing (the gap above |p|).
    spacing = np.spacing(np.abs(p[counted])).astype(np.float64)
    expected_ratio = np.mean(np.abs(u[counted].astype(np.float64)) / spacing)
    assert table.column("mean |u|/ulp")[0] == pytest.approx(expected_ratio, rel=1e-12)
    assert table.column("stagnant") == [fraction]


def test_stagnation_table_and_structure():
    params = {
        "w": jnp.ones((2, 2), jnp.bfloat16),
        "frozen": jnp.ones((3,)),
        "count": jnp.array(1, jnp.int32),
    }
    updates = {"w": jnp.full((2, 2), 1e-3), "frozen": None, "count": None}
    table = update_stagnation(params, updates)
    assert table.column("path") == ["w"]  # leaves without an update are left out
    assert table.footer == (("total", "", "", 4, 4, 1.0, table.column("mean |u|/ulp")[0]),)
    assert "stagnant" in str(table) and "<table>" in table._repr_html_()
    assert np.isnan(stagnation_fractions({"w": jnp.ones(2)}, {"w": jnp.zeros(2)})["w"])
    with pytest.raises(ValueError, match="shape"):
        update_stagnation({"w": jnp.ones(2)}, {"w": jnp.ones(3)})
    with pytest.raises(ValueError, match="no parameter has"):
        update_stagnation({"w": jnp.ones(2)}, {"w": jnp.ones(2), "v": jnp.ones(2)})
