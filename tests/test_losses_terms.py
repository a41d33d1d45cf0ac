"""LM loss terms (hybrid_jax.losses.terms): fp32 numerics against references, masks, bf16 inputs.

Tolerances: the references are float64 NumPy; our fp32 logsumexp over a small vocabulary is within
a few ulps of it, so ``rtol=1e-5`` (~80 fp32 ulps) leaves room for the summation order of the mean
and still catches any bf16 step (bf16 is off by ~1e-2).
"""

import chex
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings

from hybrid_jax.losses import cross_entropy, z_loss

SHAPE = (3, 5, 11)  # batch, time, vocab: one shape, so the jitted functions compile once


def _logsumexp64(logits):
    logits = np.asarray(logits, np.float64)
    top = logits.max(-1, keepdims=True)
    return (top + np.log(np.exp(logits - top).sum(-1, keepdims=True)))[..., 0]


def _ce64(logits, targets, mask=None):
    logits = np.asarray(logits, np.float64)
    nll = _logsumexp64(logits) - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    mask = np.ones_like(nll) if mask is None else np.asarray(mask, np.float64)
    return (nll * mask).sum() / mask.sum()


def _data(seed, scale=3.0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    logits = (scale * rng.standard_normal(SHAPE)).astype(dtype)
    targets = rng.integers(0, SHAPE[-1], SHAPE[:-1]).astype(np.int32)
    mask = rng.random(SHAPE[:-1]) < 0.6
    mask[0, 0] = True  # at least one token
    return logits, targets, mask


# Module-level and jitted: each (dtype, mask kind) compiles once for the whole file.
ce_jit, z_jit = cross_entropy, z_loss  # jitted by the library
ce_vg = jax.jit(jax.value_and_grad(cross_entropy))
z_vg = jax.jit(jax.value_and_grad(z_loss))
_optax_ce = jax.jit(lambda lg, t: optax.softmax_cross_entropy_with_integer_labels(lg, t).mean())


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31), scale=st.sampled_from([0.1, 3.0, 1e3]))
def test_cross_entropy_matches_float64_and_optax(seed, scale):
    logits, targets, mask = _data(seed, scale)
    # 1e3-scale logits overflow a naive exp: this also checks the max-subtraction.
    np.testing.assert_allclose(ce_jit(logits, targets), _ce64(logits, targets), rtol=1e-5)
    np.testing.assert_allclose(
        ce_jit(logits, targets, mask), _ce64(logits, targets, mask), rtol=1e-5
    )
    optax_ce = _optax_ce(logits, targets)
    np.testing.assert_allclose(ce_jit(logits, targets), optax_ce, rtol=1e-6)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31))
def test_z_loss_matches_float64(seed):
    logits, _, mask = _data(seed)
    log_z = _logsumexp64(logits)
    np.testing.assert_allclose(z_jit(logits), np.mean(log_z**2), rtol=1e-5)
    np.testing.assert_allclose(z_jit(logits, mask), np.mean(log_z[mask] ** 2), rtol=1e-5)
    # d/dz mean(logZ^2) = 2 logZ softmax(z) / tokens
    softmax = np.exp(logits - log_z[..., None])
    expected = 2 * log_z[..., None] * softmax / log_z.size
    np.testing.assert_allclose(z_vg(logits)[1], expected, rtol=1e-4, atol=1e-9)


def test_bf16_logits_are_upcast_before_the_softmax():
    logits, targets, mask = _data(0, dtype=jnp.bfloat16)
    upcast = logits.astype(np.float32)
    for fn, args in [(ce_vg, (targets, mask)), (z_vg, (mask,))]:
        (low, grad), (high, _) = fn(logits, *args), fn(upcast, *args)
        assert low.dtype == jnp.float32
        # Bitwise: the only bf16 step is the input itself, so the loss is the fp32 loss of the
        # bf16 values. A softmax in bf16 would differ by ~1e-2.
        np.testing.assert_array_equal(low, high)
        assert grad.dtype == jnp.bfloat16  # the gradient comes back in the logits' dtype


def test_bf16_softmax_would_be_visibly_wrong():
    """The test above can fail: a bf16 log-softmax is far from the fp32 loss at this scale."""
    logits, targets, _ = _data(1, dtype=jnp.bfloat16)
    in_bf16 = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1).mean()
    assert abs(float(in_bf16) - float(ce_jit(logits, targets))) > 1e-3


def test_mask_selects_tokens_and_float_mask_weighs_them():
    logits, targets, mask = _data(2)
    np.testing.assert_allclose(
        ce_jit(logits, targets, mask),
        _ce64(logits[mask][None], targets[mask][None]),
        rtol=1e-5,
    )
    weights = np.random.default_rng(3).random(SHAPE[:-1]).astype(np.float32)
    np.testing.assert_allclose(
        ce_jit(logits, targets, weights), _ce64(logits, targets, weights), rtol=1e-5
    )


def test_empty_mask_gives_zero_loss_and_zero_gradient():
    logits, targets, _ = _data(4)
    empty = np.zeros(SHAPE[:-1], bool)
    loss, grad = ce_vg(logits, targets, empty)
    assert float(loss) == 0.0
    np.testing.assert_array_equal(grad, np.zeros_like(grad))  # finite: no 0/0 in the backward


def test_out_of_range_target_is_nan_unless_masked():
    logits, targets, mask = _data(5)
    targets = targets.copy()
    targets[0, 1] = SHAPE[-1]  # one past the vocabulary: padding gone wrong
    assert np.isnan(ce_jit(logits, targets))  # not clamped to the last class
    mask = mask.copy()
    mask[0, 1] = False
    loss, grad = ce_vg(logits, targets, mask)
    assert np.isfinite(loss) and np.isfinite(grad).all()
    targets[0, 1] = 0
    np.testing.assert_allclose(loss, ce_jit(logits, targets, mask), rtol=1e-6)


def test_bad_inputs_name_the_problem():
    logits, targets, mask = _data(6)
    with pytest.raises(TypeError, match="integer class indices"):
        cross_entropy(logits, targets.astype(np.float32))
    with pytest.raises(ValueError, match=r"targets shape \(3, 4\)"):
        cross_entropy(logits, targets[:, :4])
    with pytest.raises(ValueError, match="mask shape"):
        cross_entropy(logits, targets, mask[:, :2])
    with pytest.raises(ValueError, match="mask shape"):
        z_loss(logits, mask[0])
    with pytest.raises(TypeError, match="floating"):
        z_loss(targets)


@jax.jit
@chex.assert_max_traces(n=1)
def _both(logits, targets, mask):
    return cross_entropy(logits, targets, mask) + 1e-4 * z_loss(logits, mask)


def test_jitted_terms_do_not_retrace():
    for seed in range(3):
        logits, targets, mask = _data(seed)
        assert _both(logits, targets, mask).dtype == jnp.float32
