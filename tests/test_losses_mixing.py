"""Gradient mixing (hybrid_jax.losses.mixing): term_gradients, Sum, PCGrad.

References are per-term ``jax.grad`` loops and a float64 NumPy PCGrad that follows the paper's
loop on flattened vectors. Tolerances: our fp32 results against float64 are compared relative to
the largest entry, at ``1e-5`` (fp32 keeps ~7 digits; a Gram-matrix entry sums ~100 products).
"""

import chex
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import assume, given, settings

from hybrid_jax.losses import (
    PCGrad,
    Sum,
    Weighted,
    cross_entropy,
    gram_matrix,
    term_gradients,
    z_loss,
)

# Many leaves of many shapes, nested: scalars, vectors, matrices, a 3-D block, a list.
SHAPES = {
    "embed": (7, 3),
    "blocks": [{"w": (3, 3), "b": (3,)}, {"w": (3, 2), "b": (2,), "scale": ()}],
    "head": {"kernel": (2, 5, 2), "bias": (4,)},
    "gain": (),
}


def _tree(rng, lead=(), dtype=np.float32):
    return jax.tree.map(
        lambda shape: rng.standard_normal(lead + shape).astype(dtype),
        SHAPES,
        is_leaf=lambda x: isinstance(x, tuple),
    )


def _flat(stacked):
    """``[n, P]`` float64: each term's gradient as one vector (the paper's view)."""
    leaves = jax.tree.leaves(stacked)
    n = leaves[0].shape[0]
    return np.concatenate([np.asarray(x, np.float64).reshape(n, -1) for x in leaves], axis=1)


def _naive_pcgrad(vectors, order):
    """Yu et al.'s loop, float64: project each g_i off every original g_j it conflicts with."""
    mixed = np.zeros(vectors.shape[1])
    for i in range(len(vectors)):
        g = vectors[i].copy()
        for j in order[i]:
            dot = g @ vectors[j]
            if dot < 0:
                g -= dot / (vectors[j] @ vectors[j]) * vectors[j]
        mixed += g
    return mixed


@jax.jit
@chex.assert_max_traces(n=3)  # one per number of terms the tests use (2, 3, 4), whatever the key
def _pcgrad(stacked, key):
    """PCGrad with a key (None: the fixed order), and the order it used."""
    n = jax.tree.leaves(stacked)[0].shape[0]
    return PCGrad()(stacked, key), PCGrad.order(n, key)


def _mixed_vector(stacked, key):
    mixed, order = _pcgrad(stacked, key)
    return _flat(jax.tree.map(lambda x: x[None], mixed))[0], np.asarray(order), mixed


# ----------------------------------------------------------------------------------------------
# term_gradients


def _terms_fn(params, x):
    """Four different terms of every leaf; `x` is data (not differentiated)."""
    leaves = jax.tree.leaves(params)
    s = sum(jnp.sum(jnp.sin(leaf * x)) for leaf in leaves)
    q = sum(jnp.sum(leaf**2) for leaf in leaves)
    return {
        "lm": s * s + q,
        "z_loss": jnp.tanh(s) * q,
        "aux": jnp.sum(params["head"]["kernel"] ** 3) + x * params["gain"],
        "reg": jnp.cos(q),
    }


NAMES = ["aux", "lm", "reg", "z_loss"]  # the order of the stacked axis: sorted, as JAX flattens


@jax.jit
def _stacked_and_loop(params, x, weights):
    weights = dict(zip(NAMES, weights, strict=True))
    terms, stacked = term_gradients(_terms_fn, params, x, weights=weights)
    loop = [
        jax.tree.map(
            lambda g, n=n: weights[n] * g, jax.grad(lambda p, n=n: _terms_fn(p, x)[n])(params)
        )
        for n in NAMES
    ]
    return terms, stacked, jax.tree.map(lambda *gs: jnp.stack(gs), *loop)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31))
def test_term_gradients_match_a_per_term_loop(seed):
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda x: 0.5 * x, _tree(rng))
    weights = rng.random(4).astype(np.float32) * 3
    terms, stacked, loop = _stacked_and_loop(params, np.float32(rng.random()), weights)
    assert list(terms) == NAMES
    # The same derivative; the batched backward may order some sums differently.
    chex.assert_trees_all_close(stacked, loop, rtol=1e-5, atol=1e-5)


def test_term_gradients_run_the_forward_once():
    calls = []

    def counted(params, x):
        calls.append(1)
        return _terms_fn(params, x)

    # eval_shape traces exactly as jit does, without compiling.
    jax.eval_shape(
        lambda p: term_gradients(counted, p, np.float32(0.5)), _tree(np.random.default_rng(0))
    )
    assert len(calls) == 1  # one forward trace, however many terms: no per-term Python loop


def test_term_gradients_with_bf16_params_and_weights_from_the_terms():
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _tree(np.random.default_rng(1)))
    seen = []

    def weights(terms):  # e.g. a weighting whose λ_i depend on the current losses
        seen.append(sorted(terms))
        return {n: 1 / terms[n] for n in terms}

    def f32_terms(p, x):
        return jax.tree.map(lambda t: t.astype(jnp.float32), _terms_fn(p, x))

    # eval_shape traces as jit does, without compiling: dtypes and shapes of the bf16 path.
    terms, stacked = jax.eval_shape(
        lambda p: term_gradients(f32_terms, p, jnp.bfloat16(0.5), weights=weights), params
    )
    assert seen == [NAMES]
    assert all(t.dtype == jnp.float32 for t in terms.values())
    assert all(g.dtype == jnp.bfloat16 and g.shape[0] == 4 for g in jax.tree.leaves(stacked))

    # Values, on a small problem: with λ_i = 1 / L_i, row i is ∇L_i / L_i = ∇ log L_i.
    def small_terms(w):
        return {"a": jnp.sum(w**2), "b": jnp.sum(jnp.exp(w))}

    w = jnp.array([0.5, -1.0, 2.0], jnp.float32)
    _, rows = jax.jit(lambda w: term_gradients(small_terms, w, weights=weights))(w)
    np.testing.assert_allclose(rows[0], 2 * w / jnp.sum(w**2), rtol=1e-6)
    np.testing.assert_allclose(rows[1], jnp.exp(w) / jnp.sum(jnp.exp(w)), rtol=1e-6)


def test_term_gradients_reject_mismatched_weights_and_bad_terms():
    params = _tree(np.random.default_rng(2))
    # Under jit: the errors come at trace time, before any compilation.
    with pytest.raises(ValueError, match=r"\['reg', 'z_loss'\] in the loss terms but not in"):
        jax.jit(lambda p: term_gradients(_terms_fn, p, 0.5, weights={"aux": 1.0, "lm": 1.0}))(
            params
        )
    with pytest.raises(TypeError, match="'lm' must be a floating scalar"):
        jax.jit(lambda p: term_gradients(lambda p: {"lm": p["embed"]}, p))(params)
    with pytest.raises(TypeError, match="must return a"):
        jax.jit(lambda p: term_gradients(lambda p: p["gain"], p))(params)


# ----------------------------------------------------------------------------------------------
# PCGrad properties (keyed with 2 and 4 terms, fixed order with 3: three compilations in all)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31), along=st.floats(0.1, 3.0))
def test_pcgrad_two_conflicting_terms_conflict_with_neither(seed, along):
    rng = np.random.default_rng(seed)
    g1 = _tree(rng)
    g2 = jax.tree.map(lambda a, b: -along * a + b, g1, _tree(rng))  # mostly opposite to g1
    stacked = jax.tree.map(lambda a, b: np.stack([a, b]), g1, g2)
    vectors = _flat(stacked)
    assume(vectors[0] @ vectors[1] < 0)
    mixed, _, _ = _mixed_vector(stacked, jax.random.key(seed))
    for g in vectors:
        # exactly >= 0 in real arithmetic; fp32 rounding allows ~1e-6 of the norms' product
        assert mixed @ g >= -1e-5 * np.linalg.norm(mixed) * np.linalg.norm(g)
    # ... and it is not the plain sum, which conflicts with one of them when they oppose.
    assert not np.allclose(mixed, vectors.sum(0), rtol=1e-3)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31))
def test_pcgrad_of_agreeing_terms_is_the_plain_sum(seed):
    rng = np.random.default_rng(seed)
    # Each g_i = shared + small noise: every pairwise dot product is positive.
    stacked = jax.tree.map(lambda s, e: s + 0.1 * e, _tree(rng), _tree(rng, (4,)))
    vectors = _flat(stacked)
    assert (vectors @ vectors.T > 0).all()
    _, _, mixed = _mixed_vector(stacked, jax.random.key(seed))
    chex.assert_trees_all_close(mixed, Sum()(stacked), rtol=1e-6, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31), n=st.sampled_from([2, 3, 4]))
def test_pcgrad_matches_the_naive_loop(seed, n):
    rng = np.random.default_rng(seed)
    stacked = _tree(rng, (n,))  # independent Gaussians: most pairs conflict
    key = None if n == 3 else jax.random.key(seed)  # 3 terms: the fixed order
    actual, order, mixed = _mixed_vector(stacked, key)
    expected = _naive_pcgrad(_flat(stacked), order)
    np.testing.assert_allclose(actual, expected, atol=1e-5 * np.abs(expected).max())
    chex.assert_trees_all_equal_shapes_and_dtypes(mixed, jax.tree.map(lambda x: x[0], stacked))


def test_pcgrad_order_is_a_permutation_of_the_others_and_follows_the_key():
    fixed = np.asarray(PCGrad.order(4))
    np.testing.assert_array_equal(fixed, [[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]])
    stacked = _tree(np.random.default_rng(5), (4,))
    _, a, mixed_a = _mixed_vector(stacked, jax.random.key(0))
    for i, row in enumerate(a):
        assert sorted(row) == [j for j in range(4) if j != i]
    _, again, mixed_again = _mixed_vector(stacked, jax.random.key(0))
    np.testing.assert_array_equal(a, again)  # a pure function of the key
    chex.assert_trees_all_equal(mixed_a, mixed_again)
    orders = {tuple(_mixed_vector(stacked, jax.random.key(k))[1].ravel()) for k in range(8)}
    assert len(orders) > 1  # actually shuffled
    # The order is not cosmetic: with several conflicting terms the result depends on it.
    results = {tuple(np.round(_mixed_vector(stacked, jax.random.key(k))[0], 4)) for k in range(8)}
    assert len(results) > 1


def test_gram_matrix_sums_dot_products_over_leaves_in_fp32():
    rng = np.random.default_rng(3)
    stacked = {
        "a": jnp.asarray(rng.standard_normal((3, 40)), jnp.bfloat16),
        "b": [jnp.asarray(rng.standard_normal((3, 2, 5)), jnp.bfloat16)],
    }
    gram = jax.jit(gram_matrix)(stacked)
    vectors = _flat(stacked)  # the bf16 values, exactly, in float64
    assert gram.dtype == jnp.float32
    # fp32 accumulation of exact bf16 products; a bf16 accumulator would be off by ~1e-2.
    np.testing.assert_allclose(gram, vectors @ vectors.T, rtol=1e-5, atol=1e-5)


def test_mixers_reject_ragged_stacks_naming_the_leaf():
    stacked = {"a": np.ones((2, 3), np.float32), "b": {"c": np.ones((3, 3), np.float32)}}
    for mixer in (PCGrad(), Sum()):
        with pytest.raises(ValueError, match=r"'a': 2, 'b/c': 3"):
            mixer(stacked)
    with pytest.raises(ValueError, match="no leaves"):
        PCGrad()({})


# ----------------------------------------------------------------------------------------------
# A train-step-shaped use: bf16 compute, fp32 master params and loss values, under jit

VOCAB, DIM = 11, 8


def _lm_terms(compute_params, tokens):
    x = compute_params["embed"][tokens[:, :-1]]
    logits = x @ compute_params["head"]  # bf16 logits
    return {"lm": cross_entropy(logits, tokens[:, 1:]), "z_loss": z_loss(logits)}


WEIGHTING = Weighted({"lm": 1.0, "z_loss": optax.linear_schedule(0.0, 1e-1, 10)})
TX = optax.sgd(0.1)


TRACES = []


@jax.jit
def _pcgrad_step(params, opt_state, step, tokens, key):
    """The train step's order: compute cast, per-term gradients, mixing, update in fp32."""
    TRACES.append(1)
    compute = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
    terms, stacked = term_gradients(
        _lm_terms, compute, tokens, weights=WEIGHTING.weight_values(step)
    )
    grads = PCGrad()(stacked, key)
    total, metrics = WEIGHTING(terms, {}, {}, step)
    grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)  # master precision
    updates, opt_state = TX.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, total, metrics, stacked


def test_pcgrad_runs_in_a_jitted_bf16_step_with_fp32_losses():
    rng = np.random.default_rng(4)
    params = {
        "embed": rng.standard_normal((VOCAB, DIM)).astype(np.float32),
        "head": (0.3 * rng.standard_normal((DIM, VOCAB))).astype(np.float32),
    }
    opt_state = TX.init(params)
    for i in range(3):
        tokens = rng.integers(0, VOCAB, (4, 6)).astype(np.int32)
        params, opt_state, total, metrics, stacked = _pcgrad_step(
            params, opt_state, jnp.int32(i + 5), tokens, jax.random.key(i)
        )
        assert total.dtype == jnp.float32 and np.isfinite(total)
        assert all(v.dtype == jnp.float32 for v in metrics.values())
        assert all(g.dtype == jnp.bfloat16 for g in jax.tree.leaves(stacked))  # compute dtype
        assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    assert len(TRACES) == 1  # a new step, batch and key each call, and no retrace
