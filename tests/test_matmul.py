"""fp8 and int8 matmuls (hybrid_jax.precision.matmul) against float64 products.

Each bound is the worst case of the format's rounding, summed over the contraction:
``|Σ x̃w̃ - Σ xw| <= Σ |w| δx + |x| δw + δx δw`` per output, where ``δ`` is the largest rounding
error of one element: for e4m3 half a step of 3 mantissa bits, ``2^-4 |x|``, or half the
smallest subnormal step, ``2^-10 / scale`` (e5m2: ``2^-3 |x|`` and ``2^-17 / scale``); for int8
half a step of the per-row or per-channel grid, ``0.5 / scale``. The fp32 accumulation adds at
most ``K 2^-24 Σ|x̃ w̃|``, which the bound includes.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybrid_jax.precision import dtypes
from hybrid_jax.precision.matmul import (
    dot_general_for,
    fp8_dot_general,
    fp8_dot_general_delayed,
    fp8_meta,
    int8_dot_general,
)
from hybrid_jax.precision.quantize import amax_scale, dequantize, quantize

MATMUL = (((1,), (0,)), ((), ()))
K = 48


def _operands(seed=0, n=16, k=K, m=12):
    rng = np.random.default_rng(seed)
    # Mixed magnitudes, so that some elements land on e4m3's subnormals.
    x = rng.normal(size=(n, k)) * np.exp(rng.uniform(-6, 0, size=(n, k)))
    w = rng.normal(0, 0.02, size=(k, m))
    return x.astype(np.float32), w.astype(np.float32)


def _fp8_delta(v, dtype):
    v = np.abs(np.asarray(v, np.float64))
    relative, subnormal = (2.0**-4, 2.0**-10) if dtype == "e4m3" else (2.0**-3, 2.0**-17)
    return relative * v + subnormal / float(amax_scale(jnp.asarray(v, jnp.float32), dtype))


def _bound(x, w, dx, dw):
    x, w = np.abs(np.float64(x)), np.abs(np.float64(w))
    accumulate = x.shape[1] * 2.0**-24 * ((x + dx) @ (w + dw))
    return dx @ w + x @ dw + dx @ dw + accumulate


def test_fp8_forward_within_e4m3_rounding_of_float64():
    x, w = _operands()
    y = np.asarray(fp8_dot_general(jnp.asarray(x), jnp.asarray(w), MATMUL), np.float64)
    exact = np.float64(x) @ np.float64(w)
    bound = _bound(x, w, _fp8_delta(x, "e4m3"), _fp8_delta(w, "e4m3"))
    assert np.all(np.abs(y - exact) <= bound)
    # Not vacuous: the error is of the size the format predicts, far above fp32's.
    assert np.max(np.abs(y - exact)) > 1e3 * np.finfo(np.float32).eps * np.max(np.abs(exact))


def test_fp8_gradients_use_e5m2_gradient_and_e4m3_operands():
    x, w = _operands(1)
    g = np.random.default_rng(2).normal(size=(x.shape[0], w.shape[1])).astype(np.float32)
    _, vjp = jax.vjp(lambda a, b: fp8_dot_general(a, b, MATMUL), jnp.asarray(x), jnp.asarray(w))
    dx, dw = (np.asarray(d, np.float64) for d in vjp(jnp.asarray(g)))
    # dx = g̃ w̃ᵀ and dw = x̃ᵀ g̃, with x̃, w̃ the forward's e4m3 values and g̃ e5m2.
    dg = _fp8_delta(g, "e5m2")
    bound_dx = _bound(g, w.T, dg, _fp8_delta(w, "e4m3").T)
    bound_dw = _bound(x.T, g, _fp8_delta(x, "e4m3").T, dg)
    assert np.all(np.abs(dx - np.float64(g) @ np.float64(w).T) <= bound_dx)
    assert np.all(np.abs(dw - np.float64(x).T @ np.float64(g)) <= bound_dw)


def test_int8_forward_within_per_channel_rounding_of_float64():
    x, w = _operands(3)
    y = np.asarray(int8_dot_general(jnp.asarray(x), jnp.asarray(w), MATMUL), np.float64)
    exact = np.float64(x) @ np.float64(w)
    row_step = np.max(np.abs(x), axis=1, keepdims=True) / 127  # one grid per row of x
    col_step = np.max(np.abs(w), axis=0, keepdims=True) / 127  # one per output channel of w
    dx = np.broadcast_to(row_step / 2, x.shape)
    dw = np.broadcast_to(col_step / 2, w.shape)
    assert np.all(np.abs(y - exact) <= _bound(x, w, dx, dw))
    # Per-channel beats per-tensor: a per-tensor grid for w would be much coarser here.
    w_scaled = w * np.logspace(-3, 0, w.shape[1], dtype=np.float32)
    per_channel = np.asarray(int8_dot_general(jnp.asarray(x), jnp.asarray(w_scaled), MATMUL))
    exact_scaled = np.float64(x) @ np.float64(w_scaled)
    relative = np.abs(per_channel - exact_scaled).max(0) / np.abs(exact_scaled).max(0)
    assert relative.max() < 0.05


def test_int8_gradient_is_straight_through():
    x, w = _operands(4)
    g = np.random.default_rng(5).normal(size=(x.shape[0], w.shape[1])).astype(np.float32)
    _, vjp = jax.vjp(lambda a, b: int8_dot_general(a, b, MATMUL), jnp.asarray(x), jnp.asarray(w))
    dx, dw = (np.asarray(d, np.float64) for d in vjp(jnp.asarray(g)))
    # The gradient of the dequantized product: within the operands' rounding of the exact one.
    dw_col = np.broadcast_to(np.max(np.abs(w), axis=0, keepdims=True) / 254, w.shape)
    dx_row = np.broadcast_to(np.max(np.abs(x), axis=1, keepdims=True) / 254, x.shape)
    zeros_g = np.zeros_like(g, np.float64)
    assert np.all(np.abs(dx - g @ np.float64(w).T) <= _bound(g, w.T, zeros_g, dw_col.T))
    assert np.all(np.abs(dw - np.float64(x).T @ g) <= _bound(x.T, g, dx_row.T, zeros_g))


def test_non_finite_inputs_reach_the_output():
    """int8 keeps a bad row to itself (per-row scales); fp8 carries it through its per-tensor
    scale, so that the dot reads nothing but scaled fp8 codes (the GEMM rewriter's pattern)."""
    x, w = _operands(6)
    x[3, 5] = np.nan
    y = np.asarray(int8_dot_general(jnp.asarray(x), jnp.asarray(w), MATMUL))
    assert np.all(np.isnan(y[3]))
    assert np.all(np.isfinite(np.delete(y, 3, axis=0)))
    for value in (np.nan, np.inf):
        x[3, 5] = value
        y, vjp = jax.vjp(lambda a, b: fp8_dot_general(a, b, MATMUL), jnp.asarray(x), w)
        assert np.all(np.isnan(y))
        dx, dw = vjp(jnp.ones_like(y).at[0, 0].set(np.inf))  # a bad incoming gradient
        assert np.all(np.isnan(dx)) and np.all(np.isnan(dw))


def test_bf16_operands_keep_their_dtype_and_gradients():
    x, w = (jnp.asarray(a, jnp.bfloat16) for a in _operands(7))
    for dot in (fp8_dot_general, int8_dot_general):
        y, vjp = jax.vjp(lambda a, b, dot=dot: dot(a, b, MATMUL), x, w)
        dx, dw = vjp(jnp.ones_like(y))
        assert (y.dtype, dx.dtype, dw.dtype) == (jnp.bfloat16,) * 3


def test_delayed_scaling_starts_from_current_and_records_amaxes():
    x, w = (jnp.asarray(a) for a in _operands(8))
    meta = fp8_meta(3)
    dot = lambda a, b, m: fp8_dot_general_delayed(a, b, MATMUL, meta=m)
    # An empty history falls back on the tensors' own amax: the same as current scaling.
    np.testing.assert_array_equal(dot(x, w, meta), fp8_dot_general(x, w, MATMUL))
    g = jnp.ones((x.shape[0], w.shape[1]))
    _, vjp = jax.vjp(dot, x, w, meta)
    _, _, new = vjp(g)
    np.testing.assert_array_equal(new["lhs"], [np.max(np.abs(x)), 0, 0])
    np.testing.assert_array_equal(new["rhs"], [np.max(np.abs(w)), 0, 0])
    np.testing.assert_array_equal(new["grad"], [1.0, 0, 0])
    _, vjp = jax.vjp(dot, 2 * x, w, new)
    _, _, newer = vjp(g)
    np.testing.assert_array_equal(newer["lhs"], [2 * np.max(np.abs(x)), np.max(np.abs(x)), 0])


def test_delayed_scaling_saturates_values_beyond_the_history():
    w = jnp.eye(2)
    meta = {**fp8_meta(2), "lhs": jnp.array([1.0, 0.5])}  # amax seen so far: 1
    y = fp8_dot_general_delayed(jnp.array([[4.0, 0.5]]), w, MATMUL, meta=meta)
    # 4 clips to the history's 1 (to fp32 rounding: the scales divide the summed product)
    np.testing.assert_allclose(y, [[1.0, 0.5]], rtol=2 * np.finfo(np.float32).eps)


def test_dot_general_for_and_bad_input():
    assert dot_general_for("e5m2").keywords == {"forward_dtype": "e5m2"}
    assert dot_general_for("int8") is int8_dot_general
    assert dot_general_for("f32") is jax.lax.dot_general
    with pytest.raises(ValueError, match="batch dimensions"):
        int8_dot_general(jnp.ones((2, 3, 4)), jnp.ones((2, 4, 5)), (((2,), (1,)), ((0,), (0,))))
    with pytest.raises(TypeError, match="share a dtype"):
        fp8_dot_general(jnp.ones((2, 3)), jnp.ones((3, 4), jnp.bfloat16), MATMUL)
    with pytest.raises(ValueError, match="history_length"):
        fp8_meta(0)


def test_compiled_forms_quantize_before_the_dot():
    x, w = (jnp.asarray(a, jnp.bfloat16) for a in _operands(9))
    loss = lambda dot: jax.jit(
        jax.value_and_grad(lambda a, b: jnp.sum(dot(a, b, MATMUL)), argnums=(0, 1))
    )
    fp8 = loss(fp8_dot_general).lower(x, w).as_text()
    assert "f8E4M3FN" in fp8 and "f8E5M2" in fp8  # e4m3 operands, e5m2 gradient
    int8 = loss(int8_dot_general).lower(x, w).as_text()
    assert "tensor<16x48xi8>" in int8 and "-> tensor<16x12xi32>" in int8  # an int8 GEMM


def test_a_matmul_compiles_once_per_shape():
    x, w = (jnp.asarray(a) for a in _operands(10))
    traces = []

    @functools.partial(jax.jit, static_argnums=2)
    def f(a, b, name):
        traces.append(name)
        return dot_general_for(name)(a, b, MATMUL)

    for _ in range(3):
        f(x, w, "e4m3")
        f(x, w, "int8")
    assert traces == ["e4m3", "int8"]
    assert dtypes.parse_dtype("e4m3") in dtypes.QUANTIZED


@pytest.mark.parametrize(
    "lhs_shape, rhs_shape, dims",
    [
        ((5, 3), (5, 4), (((0,), (0,)), ((), ()))),  # contract lhs's first axis (x^T w)
        ((2, 3, 6), (2, 4, 3), (((1,), (2,)), ((0,), (0,)))),  # a batch axis, rhs transposed
        ((3, 2, 4), (4, 5, 3), (((0, 2), (2, 0)), ((), ()))),  # two contracted axes, crossed
    ],
)
def test_fp8_gradients_are_products_of_the_codes_for_any_dims(lhs_shape, rhs_shape, dims):
    """The codes' products (scales divided out after) give the gradients of the dequantized
    product, for any dimension numbers: fp32 agreement up to summation order and the two
    divisions (1e-5 relative to the largest entry)."""
    key_x, key_w, key_g = jax.random.split(jax.random.key(10), 3)
    x, w = jax.random.normal(key_x, lhs_shape), jax.random.normal(key_w, rhs_shape)
    y, vjp = jax.vjp(lambda a, b: fp8_dot_general(a, b, dims), x, w)
    g = jax.random.normal(key_g, y.shape)
    dequantized = lambda a, dtype: dequantize(*quantize(a, dtype), jnp.float32)
    reference = lambda a, b: jax.lax.dot_general(a, b, dims, precision="highest")
    want_y, want_vjp = jax.vjp(reference, dequantized(x, "e4m3"), dequantized(w, "e4m3"))
    for got, want in zip((y, *vjp(g)), (want_y, *want_vjp(dequantized(g, "e5m2"))), strict=True):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(jnp.max(jnp.abs(want))))
