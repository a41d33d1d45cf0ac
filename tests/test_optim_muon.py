"""hybrid_jax.optim.muon: the shape-batched Muon against Optax's and against the SVD."""

import chex
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hybrid_jax.optim import by_path, muon, newton_schulz, orthogonalize_by_shape


def _tree():
    # Two matrices of each of two shapes, one tall (iterated as its transpose), one alone.
    key = jax.random.key(0)
    shapes = {"a": (8, 16), "b": (8, 16), "c": (16, 8), "d": (16, 8), "e": (8, 8)}
    return {
        name: 0.1 * jax.random.normal(jax.random.fold_in(key, i), shape)
        for i, (name, shape) in enumerate(shapes.items())
    }


def _train(tx, params, steps=4):
    state = tx.init(params)
    update = jax.jit(tx.update)
    for t in range(steps):
        grads = jax.tree.map(
            lambda p, t=t: jax.random.normal(jax.random.key(t), p.shape) + p, params
        )
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return params, state


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(weight_decay=0.1, consistent_rms=0.2),
        dict(consistent_rms=None, nesterov=False, beta=0.9),
    ],
)
def test_muon_is_optax_muon_up_to_fp32_rounding(kwargs):
    params = _tree()
    ours, _ = _train(muon(0.02, **kwargs), params)
    with jax.numpy_dtype_promotion("standard"):  # Optax's `beta ** count`: float ** int32
        reference, _ = _train(optax.contrib.muon(0.02, **kwargs), params)
    # Both iterate in fp32; stacking changes only the order of a few roundings per product,
    # which five Newton-Schulz iterations amplify to ~1e-6 of the update.
    chex.assert_trees_all_close(ours, reference, atol=1e-6, rtol=1e-5)


def test_stacking_by_shape_changes_nothing():
    tree = _tree()
    batched = orthogonalize_by_shape(tree)
    one_by_one = {name: newton_schulz(x) for name, x in tree.items()}
    chex.assert_trees_all_close(batched, one_by_one, atol=1e-6)


_WELL_CONDITIONED = hnp.arrays(
    np.float32,
    st.tuples(st.integers(2, 12), st.integers(2, 12)),
    elements=st.floats(-1, 1, width=32),
)


@settings(max_examples=25, deadline=None)
@given(_WELL_CONDITIONED)
def test_newton_schulz_approximates_the_polar_factor(x):
    s = np.linalg.svd(x.astype(np.float64), compute_uv=False)
    # Five iterations lift singular values above ~2e-2 of the Frobenius norm into Muon's band;
    # smaller ones (a nearly rank-deficient draw) are meant to stay small.
    if s.min() <= 0.05 * np.linalg.norm(s):
        return
    q = np.asarray(newton_schulz(jnp.asarray(x)), np.float64)
    # The quintic trades exactness for speed: singular values end in about [0.7, 1.2].
    sq = np.linalg.svd(q, compute_uv=False)
    assert sq.min() > 0.6 and sq.max() < 1.25, sq
    # ...and the singular vectors are x's: q is close to U Vᵀ.
    u, _, vt = np.linalg.svd(x.astype(np.float64), full_matrices=False)
    assert np.linalg.norm(q - u @ vt, 2) < 0.4


def test_bf16_products_stay_close_to_fp32():
    x = jax.random.normal(jax.random.key(1), (3, 16, 32))
    exact, low = newton_schulz(x), newton_schulz(x, ns_dtype="bf16")
    assert low.dtype == jnp.float32
    # bf16 keeps 8 bits: each product's inputs are off by up to 2^-9 relative.
    assert float(jnp.max(jnp.abs(low - exact))) < 0.05


def test_state_is_shaped_like_the_params_and_keeps_its_dtype():
    params = _tree()
    tx = muon(0.02, mu_dtype="bf16")
    _, state = _train(tx, params, steps=2)
    mu = state[0].mu
    assert jax.tree.map(jnp.shape, mu) == jax.tree.map(jnp.shape, params)
    assert {leaf.dtype for leaf in jax.tree.leaves(mu)} == {jnp.dtype(jnp.bfloat16)}


def test_a_leaf_that_is_not_a_matrix_is_named():
    tx = muon(0.02)
    params = {"w": jnp.ones((4, 4)), "ln": {"scale": jnp.ones(4)}}
    with pytest.raises(ValueError, match=r"leaf 'ln/scale' has shape \(4,\)"):
        tx.update(params, tx.init(params), params)


def test_under_by_path_the_other_groups_leaves_are_left_out():
    params = {"w": jnp.ones((4, 8)), "v": 2 * jnp.ones((4, 8)), "b": jnp.ones(8)}
    tx = by_path([(r"^b$", optax.sgd(1e-3)), (r".", muon(0.1))])
    updates, _ = tx.update(params, tx.init(params), params)
    assert updates["b"].shape == (8,)
    chex.assert_trees_all_close(updates["w"], updates["v"])  # same direction, stacked together
