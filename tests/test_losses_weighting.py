"""Loss weightings (hybrid_jax.losses.weighting, .adaptive): Weighted, Uncertainty, DWA.

Covers RELIABILITY row 14 (NaN term with weight 0 stays NaN, negative/NaN weights rejected,
weighted sum against an fp32 reference). Jitted drivers are module-level and shared.

Tolerances: a sum of n fp32 products is within about n ulps of the float64 sum of the same fp32
inputs, relative to Σ|λ_i L_i|; ``rtol=1e-6`` with n <= 6 covers that and catches a bf16 step.
"""

import chex
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings

from hybrid_jax.losses import DWA, DWAState, Uncertainty, Weighted, term_gradients

NAMES = ["lm", "z_loss", "aux"]


def _terms(values, dtype=jnp.float32):
    return {name: jnp.asarray(v, dtype) for name, v in zip(NAMES, values, strict=True)}


# ----------------------------------------------------------------------------------------------
# Weighted: numerics


@settings(max_examples=30, deadline=None)
@given(
    weights=st.lists(st.floats(0, 1e3, width=32), min_size=3, max_size=3),
    values=st.lists(st.floats(-1e4, 1e4, width=32), min_size=3, max_size=3),
)
def test_weighted_sum_matches_fp32_and_float64_references(weights, values):
    total, metrics = _weighted_sum_jit(np.float32(weights), _terms(values))
    products = [np.float32(w) * np.float32(v) for w, v in zip(weights, values, strict=True)]
    fp32_reference = np.float32(0)
    for p in products:
        fp32_reference = np.float32(fp32_reference + p)
    exact = sum(float(w) * float(v) for w, v in zip(weights, values, strict=True))
    scale = sum(abs(float(p)) for p in products) + 1e-30
    assert total.dtype == jnp.float32
    assert abs(float(total) - exact) <= 1e-6 * scale
    assert abs(float(total) - float(fp32_reference)) <= 1e-6 * scale
    for name, w, v in zip(NAMES, weights, values, strict=True):
        assert metrics[f"weight/{name}"] == np.float32(w)
        assert metrics[f"loss/{name}"] == np.float32(v)  # the raw term, not the weighted one


@jax.jit
def _weighted_sum_jit(weights, terms):
    # Weighted built under jit from traced weights: one compilation for every example.
    return Weighted(dict(zip(NAMES, weights, strict=True)))(terms)


def _terms_fn(params, coeffs):
    """Three different smooth terms of a small parameter tree; ``coeffs`` are random constants."""
    a, b, c = coeffs
    w, v = params["w"], params["layer"]["v"]
    return {
        "lm": jnp.sum(jnp.sin(w * a)) + jnp.sum(v**2),
        "z_loss": jnp.sum(jnp.tanh(w * v[:4]) * b),
        "aux": jnp.sum(jnp.exp(0.1 * w) * c) - jnp.sum(v[:2] * v[2:4]),
    }


@jax.jit
def _three_ways(params, coeffs, weights):
    """The gradient of the weighted total, per-term gradients, and term_gradients' rows."""
    # Weighted built under jit from traced weights: the construction path for swept weights.
    weighting = Weighted(dict(zip(NAMES, weights, strict=True)))
    grad_total = jax.grad(lambda p: weighting(_terms_fn(p, coeffs))[0])(params)
    per_term = [jax.grad(lambda p, n=n: _terms_fn(p, coeffs)[n])(params) for n in NAMES]
    _, stacked = term_gradients(
        _terms_fn, params, coeffs, weights=dict(zip(NAMES, weights, strict=True))
    )
    return grad_total, per_term, stacked


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    weights=st.lists(st.floats(0, 10, width=32), min_size=3, max_size=3),
)
def test_gradient_of_total_is_weighted_sum_of_term_gradients(seed, weights):
    rng = np.random.default_rng(seed)
    coeffs = rng.standard_normal((3, 4)).astype(np.float32)
    params = {
        "w": rng.standard_normal(4).astype(np.float32),
        "layer": {"v": rng.standard_normal(6).astype(np.float32)},
    }
    grad_total, per_term, stacked = _three_ways(params, coeffs, np.float32(weights))
    expected = jax.tree.map(
        lambda *gs: sum(
            np.float64(w) * np.asarray(g, np.float64) for w, g in zip(weights, gs, strict=True)
        ),
        *per_term,
    )
    # fp32: each leaf is a sum of 3 weighted fp32 gradients, so 1e-5 relative; 1e-5 absolute for
    # leaves that cancel to ~0.
    chex.assert_trees_all_close(grad_total, expected, rtol=1e-5, atol=1e-5)
    # term_gradients (order: sorted names) sums to the same gradient.
    chex.assert_trees_all_close(
        jax.tree.map(lambda g: g.sum(0), stacked), expected, rtol=1e-5, atol=1e-5
    )


# ----------------------------------------------------------------------------------------------
# Weighted: schedules


SCHEDULE = optax.warmup_cosine_decay_schedule(0.0, 1.0, 10, 100)  # not strict-promotion clean
SCHEDULED = Weighted({"lm": 1.0, "z_loss": SCHEDULE, "aux": optax.linear_schedule(2.0, 0.0, 50)})


@jax.jit
@chex.assert_max_traces(n=1)
def _scheduled_step(step, terms):
    return SCHEDULED(terms, {}, {}, step)


def test_scheduled_weight_is_the_schedule_at_the_step_inside_jit():
    terms = _terms([1.0, 2.0, 3.0])
    for step in [0, 5, 10, 37, 100, 500]:
        step = jnp.int32(step)  # the train state's step: one dtype, so no retrace
        total, metrics = _scheduled_step(step, terms)
        with jax.numpy_dtype_promotion("standard"):
            z, aux = SCHEDULE(step), optax.linear_schedule(2.0, 0.0, 50)(step)
        # atol: jit fuses the schedule's arithmetic, a few fp32 ulps from the eager value.
        np.testing.assert_allclose(metrics["weight/z_loss"], z, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(metrics["weight/aux"], aux, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(total, 1.0 + 2 * z + 3 * aux, rtol=1e-6)


def test_schedule_needs_a_step():
    with pytest.raises(ValueError, match="'z_loss' is a schedule"):
        SCHEDULED(_terms([1.0, 2.0, 3.0]))


# ----------------------------------------------------------------------------------------------
# Weighted: faults (RELIABILITY row 14)


def test_nan_term_with_zero_weight_is_still_nan():
    weighting = Weighted({"lm": 1.0, "z_loss": 0.0, "aux": 1.0})

    def total(p):
        # z_loss is sqrt(p) at p = -1: NaN, with a NaN gradient
        terms = {"lm": p**2, "z_loss": jnp.sqrt(p), "aux": 2 * p}
        return weighting(terms)

    (value, metrics), grad = jax.jit(jax.value_and_grad(total, has_aux=True))(jnp.float32(-1))
    assert np.isnan(value)  # 0 * NaN = NaN: a broken term is not silently dropped
    assert np.isnan(metrics["loss/z_loss"]) and metrics["weight/z_loss"] == 0
    assert np.isnan(grad)  # 0 * NaN in the backward too, so the train step skips the update
    # The way to switch a term off is to leave it out of both.
    total, _ = Weighted({"lm": 1.0, "aux": 1.0})({"lm": jnp.float32(1), "aux": jnp.float32(2)})
    assert float(total) == 3.0


@pytest.mark.parametrize("bad", [-1.0, -1e-30, np.nan, np.inf, np.float32(-2)])
def test_negative_or_nan_weight_is_rejected(bad):
    with pytest.raises(ValueError, match=r"weight of 'z_loss' must be finite and >= 0"):
        Weighted({"lm": 1.0, "z_loss": bad})


@pytest.mark.parametrize("bad", ["1.0", [1.0], True, None, np.ones(2)])
def test_weight_of_wrong_type_is_rejected(bad):
    with pytest.raises(TypeError, match="'lm' must be a number or a schedule"):
        Weighted({"lm": bad})


def test_bad_schedules_are_rejected_as_far_as_they_can_be():
    with pytest.raises(ValueError, match=r"'lm' must be finite and >= 0, got -1 at step 0"):
        Weighted({"lm": lambda step: -1.0})
    with pytest.raises(ValueError, match="schedule of 'lm' must return a scalar"):
        Weighted({"lm": lambda step: jnp.ones(2)})
    with pytest.raises(ValueError, match="schedule of 'lm' failed at step 0: ZeroDivision"):
        Weighted({"lm": lambda step: 1 / 0})
    # Valid at step 0, negative from step 10 on:
    weighting = Weighted({"lm": optax.linear_schedule(1.0, -1.0, 20)})
    terms = {"lm": jnp.float32(2.0)}
    with pytest.raises(ValueError, match=r"got -0\.1 at step 11"):
        weighting(terms, step=jnp.int32(11))  # a concrete step can be checked
    # Traced, it cannot: the total goes NaN so that the train step skips the update.
    total, metrics = jax.jit(lambda s: weighting(terms, step=s))(jnp.int32(11))
    assert np.isnan(total) and np.isnan(metrics["weight/lm"])
    total, _ = jax.jit(lambda s: weighting(terms, step=s))(jnp.int32(5))
    np.testing.assert_allclose(total, 2 * 0.5, rtol=1e-6)


def test_mismatched_names_are_errors_that_name_them():
    weighting = Weighted({"lm": 1.0, "z_loss": 1e-4})
    with pytest.raises(ValueError, match=r"\['z_loss'\] in the weights but not in the loss terms"):
        weighting({"lm": jnp.float32(1.0)})
    with pytest.raises(ValueError, match=r"\['extra'\] in the loss terms but not in the weights"):
        weighting({"lm": jnp.float32(1.0), "z_loss": jnp.float32(1.0), "extra": jnp.float32(1)})
    with pytest.raises(ValueError, match=r"\['z_loss'\] in the weights"):
        weighting.init(["lm"])
    with pytest.raises(ValueError, match="duplicate term names"):
        weighting.init(["lm", "z_loss", "lm"])
    with pytest.raises(ValueError, match="at least one"):
        Weighted({})
    with pytest.raises(TypeError, match="mapping, got list"):
        Weighted([("lm", 1.0)])


def test_terms_must_be_floating_scalars():
    weighting = Weighted({"lm": 1.0})
    with pytest.raises(ValueError, match=r"'lm' must be a scalar, got shape \(3,\)"):
        weighting({"lm": jnp.ones(3)})
    with pytest.raises(TypeError, match="'lm' must be floating"):
        weighting({"lm": jnp.int32(3)})


# ----------------------------------------------------------------------------------------------
# Uncertainty


def test_uncertainty_total_and_gradients_follow_the_documented_form():
    weighting = Uncertainty(init_log_var={"lm": 0.5, "z_loss": -1.0, "aux": 2.0})
    params, state = weighting.init(NAMES)
    assert state == {}
    values = np.array([2.0, 0.3, 5.0])
    s = np.array([0.5, -1.0, 2.0])

    def total(p, t):
        return weighting(t, p, state, jnp.int32(0))[0]

    (value, grads) = jax.value_and_grad(total, argnums=(0, 1))(params, _terms(values))
    np.testing.assert_allclose(value, np.sum(np.exp(-s) * values + s), rtol=1e-6)
    for i, name in enumerate(NAMES):
        # dL/ds = 1 - e^{-s} L_i: zero exactly when e^s = L_i
        np.testing.assert_allclose(
            grads[0]["log_var"][name], 1 - np.exp(-s[i]) * values[i], rtol=1e-5
        )
        np.testing.assert_allclose(grads[1][name], np.exp(-s[i]), rtol=1e-6)


def test_uncertainty_learns_to_down_weight_the_noisier_task():
    """Two regressions, noise std 0.1 and 1.0: e^{s} -> MSE, so weights end ~1/σ² apart."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 4)).astype(np.float32)
    w_true = rng.standard_normal((4, 2)).astype(np.float32)
    noise = np.array([0.1, 1.0], np.float32)  # task "noisy" has 10x the noise of "clean"
    y = x @ w_true + noise * rng.standard_normal((256, 2)).astype(np.float32)

    weighting = Uncertainty(optimizer=optax.adam(5e-2))
    loss_params, _ = weighting.init(["clean", "noisy"])
    model = {"w": jnp.zeros((4, 2), jnp.float32)}
    model_tx = optax.adam(5e-2)

    def loss(both):
        model, loss_params = both
        err = (x @ model["w"] - y) ** 2
        terms = {"clean": err[:, 0].mean(), "noisy": err[:, 1].mean()}
        return weighting(terms, loss_params, {}, jnp.int32(0))

    def step(carry, _):
        model, loss_params, opt_model, opt_loss = carry
        (_, metrics), (g_model, g_loss) = jax.value_and_grad(loss, has_aux=True)(
            (model, loss_params)
        )
        # Optax's Adam computes `decay ** count` (float ** int32), which strict promotion rejects.
        with jax.numpy_dtype_promotion("standard"):
            u, opt_model = model_tx.update(g_model, opt_model)
            v, opt_loss = weighting.optimizer.update(g_loss, opt_loss)
        carry = (optax.apply_updates(model, u), optax.apply_updates(loss_params, v))
        return (*carry, opt_model, opt_loss), metrics

    init = (model, loss_params, model_tx.init(model), weighting.optimizer.init(loss_params))
    _, metrics = jax.jit(lambda c: jax.lax.scan(step, c, length=400))(init)
    clean, noisy = float(metrics["weight/clean"][-1]), float(metrics["weight/noisy"][-1])
    assert clean > 10 * noisy, (clean, noisy)  # expected ~100x: 1/0.1² vs 1/1²
    assert 0.3 < noisy < 3 and 30 < clean < 300, (clean, noisy)


def test_uncertainty_needs_its_params_and_matching_names():
    weighting = Uncertainty()
    params, _ = weighting.init(["lm", "aux"])
    with pytest.raises(ValueError, match="needs its learned params"):
        weighting({"lm": jnp.float32(1.0), "aux": jnp.float32(1.0)}, {})
    with pytest.raises(ValueError, match=r"\['aux'\] in the learned log-variances"):
        weighting({"lm": jnp.float32(1.0)}, params)
    with pytest.raises(ValueError, match=r"\['aux'\] in the loss terms but not in init_log_var"):
        Uncertainty(init_log_var={"lm": 0.0}).init(["lm", "aux"])
    with pytest.raises(ValueError, match="must be finite"):
        Uncertainty(init_log_var=np.nan).init(["lm"])


# ----------------------------------------------------------------------------------------------
# DWA


def _dwa_reference(history, temperature, period):
    """Weights before each step, from the paper's formula on window means, in float64."""
    names = list(history[0])
    means, window, out = [], [], []
    for losses in history:
        if len(means) >= 2:
            r = np.array([means[-1][n] / means[-2][n] for n in names])
            e = np.exp(r / temperature)
            out.append(len(names) * e / e.sum())
        else:
            out.append(np.ones(len(names)))
        window.append(losses)
        if len(window) == period:
            means.append({n: np.mean([w[n] for w in window]) for n in names})
            window = []
    return np.array(out)


@pytest.mark.parametrize("period", [1, 3])
def test_dwa_follows_the_formula_and_keeps_stable_state(period):
    weighting = DWA(temperature=2.0, period=period)
    params, state = weighting.init(NAMES)
    rng = np.random.default_rng(period)
    history = (rng.random((12, 3)) + 0.1).astype(np.float32)
    history_dicts = [dict(zip(NAMES, row.tolist(), strict=True)) for row in history]
    dtypes = jax.tree.map(lambda x: (x.dtype, x.shape), state)

    def step(state, row):
        terms = dict(zip(NAMES, row, strict=True))
        _, metrics = weighting(terms, params, state, jnp.int32(0))
        state = weighting.update(terms, state, jnp.int32(0))
        return state, jnp.stack([metrics[f"weight/{n}"] for n in NAMES])

    # lax.scan fails to trace if update changes a leaf's dtype or shape.
    final, weights = jax.jit(lambda s, h: jax.lax.scan(step, s, h))(state, history)
    assert jax.tree.map(lambda x: (x.dtype, x.shape), final) == dtypes
    assert isinstance(final, DWAState)
    expected = _dwa_reference(history_dicts, 2.0, period)
    np.testing.assert_allclose(weights, expected, rtol=1e-5)
    np.testing.assert_allclose(weights.sum(1), 3.0, rtol=1e-6)
    assert not np.allclose(weights[-1], 1.0)  # the test sees non-trivial weights


def test_dwa_weights_carry_no_gradient_and_validate():
    weighting = DWA()
    params, state = weighting.init(["a", "b"])
    for a in [4.0, 2.0]:
        state = weighting.update({"a": jnp.float32(a), "b": jnp.float32(4.0)}, state, 0)
    grad_fn = jax.jit(jax.grad(lambda s: weighting({"a": 1.0 * s, "b": 2.0 * s}, params, state)[0]))
    grads = grad_fn(1.0)
    _, metrics = jax.jit(weighting)({"a": jnp.float32(1), "b": jnp.float32(1)}, params, state)
    np.testing.assert_allclose(grads, metrics["weight/a"] + 2 * metrics["weight/b"], rtol=1e-6)
    with pytest.raises(ValueError, match="temperature"):
        DWA(temperature=0.0)
    with pytest.raises(ValueError, match="period"):
        DWA(period=0)
    with pytest.raises(ValueError, match="needs its state"):
        weighting({"a": jnp.float32(1), "b": jnp.float32(1)}, params, {})


# ----------------------------------------------------------------------------------------------
# Every weighting: jit, bf16 terms, fp32 values, no retrace


@pytest.mark.parametrize(
    "weighting",
    [Weighted({"lm": 1.0, "z_loss": SCHEDULE, "aux": 0.5}), Uncertainty(), DWA(period=2)],
    ids=["weighted", "uncertainty", "dwa"],
)
def test_every_weighting_runs_jitted_on_bf16_terms_with_fp32_results(weighting):
    params, state = weighting.init(NAMES)
    traces = []

    @jax.jit
    def step(params, state, step, terms):
        traces.append(1)
        total, metrics = weighting(terms, params, state, step)
        return total, metrics, weighting.update(terms, state, step)

    for i in range(4):
        terms = _terms([1.5 + i, 0.25, 3.0 - i], jnp.bfloat16)
        total, metrics, state = step(params, state, jnp.int32(i), terms)
        assert total.dtype == jnp.float32
        assert all(v.dtype == jnp.float32 and v.shape == () for v in metrics.values())
        assert sorted(metrics) == sorted([f"{k}/{n}" for k in ("loss", "weight") for n in NAMES])
    assert len(traces) == 1  # params and state keep their dtypes and shapes across steps
    opt = weighting.optimizer
    assert (opt is None) == (params == {})
