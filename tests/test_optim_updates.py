"""Pure-bf16 updates: stochastic rounding, Kahan summation and fp32 master weights, as wrappers."""

import functools
import operator

import chex
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

from hybrid_jax.optim.updates import (
    LowPrecisionState,
    _update_landing_on,
    kahan_summation,
    low_precision_updates,
    master_weights,
    stochastic_rounding,
)

_BF16_ULP_AT_1 = 2.0**-7


def _train(tx, params, grads, steps=None):
    """Runs ``tx`` for ``steps`` steps of ``grads`` (or one step per leading row of ``grads``).

    One jitted scan, with ``optax.apply_updates`` as a train step applies updates: under standard
    promotion, bf16 params + fp32 updates computed in fp32 and cast back to bf16.
    """

    def step(carry, g):
        p, s = carry
        u, s = tx.update(g, s, p)
        return (optax.apply_updates(p, u), s), None

    @jax.jit
    def run(params):
        carry = (params, tx.init(params))
        if steps is None:
            return jax.lax.scan(step, carry, grads)[0]
        return jax.lax.scan(lambda c, _: step(c, grads), carry, length=steps)[0]

    return run(params)


def _train_eagerly(tx, params, grads):
    """One ``tx.update`` per leading row of ``grads``, op by op (no jit).

    Exact comparisons with a reference optimizer run eagerly: jitted, the wrapped and the plain
    step are different XLA programs, which XLA may fuse differently (an FMA here, a reduction
    order there: measured up to 2 fp32 ulps apart), while op by op both evaluate the same ops.
    """
    state = tx.init(params)
    for i in range(jax.tree_util.tree_leaves(grads)[0].shape[0]):
        updates, state = tx.update(
            jax.tree_util.tree_map(operator.itemgetter(i), grads), state, params
        )
        params = optax.apply_updates(params, updates)
    return params, state


def _ones(n=1):
    return {"w": jnp.ones((n,), jnp.bfloat16)}


# The paper's motivating case: a bf16 weight of 1.0 given 100 updates of +1e-3 (sgd(1.0) on a
# gradient of -1e-3). Each update is below half of bf16's ulp at 1.0 (2^-8), so rounding to nearest
# drops every one of them; the intended result is 1.1.
_SMALL = {"w": jnp.asarray([-1e-3], jnp.float32)}


@pytest.mark.standard_promotion
def test_plain_optax_and_nearest_drop_every_small_update():
    final, _ = _train(optax.sgd(1.0), _ones(), _SMALL, steps=100)
    assert float(final["w"][0]) == 1.0  # exactly: 100 updates lost
    nearest, _ = _train(low_precision_updates(optax.sgd(1.0), "nearest"), _ones(), _SMALL, 100)
    chex.assert_trees_all_equal(nearest, final)


@pytest.mark.standard_promotion
def test_kahan_ends_within_one_ulp_of_the_exact_sum():
    final, state = _train(kahan_summation(optax.sgd(1.0)), _ones(), _SMALL, steps=100)
    w = float(final["w"][0])
    assert abs(w - 1.1) <= _BF16_ULP_AT_1, w  # measured: 1.1015625, the bf16 nearest 1.1
    assert state.compensation["w"].dtype == jnp.bfloat16


@pytest.mark.standard_promotion
def test_stochastic_rounding_is_right_on_average_over_many_weights():
    n = 4096
    final, _ = _train(stochastic_rounding(optax.sgd(1.0), seed=3), _ones(n), _SMALL, steps=100)
    w = np.asarray(final["w"].astype(jnp.float32), np.float64)
    # Each weight is a martingale around 1 + t * 1e-3 whose steps have variance at most ulp^2 / 4,
    # so its final spread is at most sqrt(100) * ulp / 2; the weights use independent bits, so
    # the mean has standard error std / sqrt(n). The fp32 sums p + u add a bias of ~1e-7 at most.
    std = w.std(ddof=1)
    assert std <= 1.1 * np.sqrt(100) * _BF16_ULP_AT_1 / 2, std  # 10% for sampling
    standard_error = std / np.sqrt(n)
    assert abs(w.mean() - 1.1) <= 3 * standard_error, (w.mean(), standard_error)


@pytest.mark.standard_promotion
def test_master_weights_equal_round_to_nearest_of_the_fp32_sum():
    final, state = _train(master_weights(optax.sgd(1.0)), _ones(), _SMALL, steps=100)
    master = np.float32(1.0)
    for _ in range(100):
        master = master + np.float32(1e-3)  # what sgd(1.0) gives for -1e-3, added in fp32
    assert state.master["w"][0] == master
    assert final["w"][0] == master.astype(ml_dtypes.bfloat16)  # measured: 1.1015625


@pytest.mark.standard_promotion
def test_kahan_recovers_a_long_sum_of_sub_half_ulp_updates():
    # 2000 updates, each uniform in (0, 2^-9): below half an ulp of every weight in [1, 4)
    # (2^-8 or 2^-7), so plain bf16 addition loses all of them; Kahan's bf16 buffer carries them
    # along. Several weights (columns) so one lucky ending is not the whole test.
    steps, n = 2000, 8
    rng = np.random.default_rng(0)
    updates = rng.uniform(0, 2.0**-9, (steps, n)).astype(np.float32)
    exact = 1.0 + updates.astype(np.float64).sum(axis=0)  # about 2.95
    grads = {"w": -jnp.asarray(updates)}

    plain, _ = _train(optax.sgd(1.0), _ones(n), grads)
    kahan, state = _train(kahan_summation(optax.sgd(1.0)), _ones(n), grads)

    np.testing.assert_array_equal(np.asarray(plain["w"], np.float64), np.ones(n))
    # Tolerance half a bf16 ulp in [2, 4), 2^-7: the weight has only 8 bits, so the exact sum
    # rounded to nearest is the best it can hold (measured: at most 0.0059 off, which is what
    # master weights give too).
    w = np.asarray(kahan["w"].astype(jnp.float32), np.float64)
    assert np.all(np.abs(w - exact) <= 2.0**-7), w - exact
    # The buffer holds (minus) the rest: weight - buffer is closer still. Not exact: rounding the
    # buffer itself to bf16 loses up to 2^-9 of it each step, uncompensated (measured 7.6e-4).
    c = np.asarray(state.compensation["w"].astype(jnp.float32), np.float64)
    assert np.all(np.abs(w - c - exact) <= 2.0**-9), w - c - exact


@pytest.mark.standard_promotion
def test_kahan_works_on_float16_too():
    params = {"w": jnp.ones((1,), jnp.float16)}
    # 1e-4 is below half of fp16's ulp at 1.0 (2^-11 ≈ 4.9e-4).
    grads = {"w": jnp.asarray([-1e-4], jnp.float32)}
    plain, _ = _train(optax.sgd(1.0), params, grads, steps=1000)
    kahan, state = _train(kahan_summation(optax.sgd(1.0)), params, grads, steps=1000)
    assert float(plain["w"][0]) == 1.0
    assert abs(float(kahan["w"][0]) - 1.1) <= 2.0**-10  # one fp16 ulp at 1.1
    assert state.compensation["w"].dtype == jnp.float16


def _bf16_params(seed=0, extra=()):
    rng = np.random.default_rng(seed)
    params = {"a": jnp.asarray(rng.normal(size=(64,)), jnp.bfloat16)}
    for name in extra:
        params[name] = jnp.asarray(rng.normal(size=(3, 5)), jnp.bfloat16)
    return params


def _grads_for(params):
    return jax.tree_util.tree_map(lambda p: jnp.full(p.shape, -1e-3, jnp.float32), params)


@pytest.mark.standard_promotion
def test_stochastic_rounding_is_reproducible_and_keyed_by_path():
    # Ten steps of +1e-3. Compiling is what costs here (a threefry hash per leaf), so each seed
    # and tree compiles once.
    @functools.cache
    def compiled(seed):
        tx = stochastic_rounding(optax.sgd(1.0), seed=seed)
        return jax.jit(lambda params: _train(tx, params, _grads_for(params), steps=10)[0])

    run = lambda seed, params: compiled(seed)(params)

    params = _bf16_params()
    first = run(0, params)
    chex.assert_trees_all_equal(first, run(0, params))  # bitwise, the same seed
    assert not np.array_equal(np.asarray(first["a"]), np.asarray(run(1, params)["a"]))

    # Leaves added before and after "a" move it in the flattened order, and a nested one changes
    # the tree's shape; "a"'s bits come from its path, so its result is unchanged.
    bigger = {**_bf16_params(extra=("0_first", "z_last")), "nested": {"b": jnp.ones(4, "bfloat16")}}
    chex.assert_trees_all_equal(run(0, bigger)["a"], first["a"])


@pytest.mark.standard_promotion
def test_fp32_leaves_get_exactly_the_unwrapped_updates():
    # One fp32 leaf under each mode, next to bf16 leaves that each mode does act on.
    rng = np.random.default_rng(1)
    modes = ("nearest", "stochastic", "kahan", "master")
    params, grads, rounding = {}, {}, {}
    for mode in modes:
        for dtype in (jnp.float32, jnp.bfloat16):
            name = f"{mode}_{jnp.dtype(dtype).name}"
            params[name] = jnp.asarray(rng.normal(size=(3,)), dtype)
            grads[name] = jnp.asarray(rng.normal(size=(3, 3)), dtype)
            rounding[name] = mode
    inner = optax.adamw(1e-2, weight_decay=0.1)
    wrapped, _ = _train_eagerly(low_precision_updates(inner, rounding), params, grads)
    reference, _ = _train_eagerly(inner, params, grads)
    for mode in modes:
        chex.assert_trees_all_equal(wrapped[f"{mode}_float32"], reference[f"{mode}_float32"])
        assert wrapped[f"{mode}_bfloat16"].dtype == jnp.bfloat16


@pytest.mark.standard_promotion
def test_master_weights_match_the_fp32_optimizer_rounded_to_bf16():
    # A master copy is the classic mixed-precision recipe, so the bf16 weights must be exactly
    # the round-to-nearest of an fp32 run of the same optimizer on the fp32-widened gradients,
    # and the state (moments) fp32.
    rng = np.random.default_rng(2)
    params = {"w": jnp.asarray(rng.normal(size=(16,)), jnp.bfloat16)}
    grads = {"w": jnp.asarray(rng.normal(size=(4, 16)), jnp.bfloat16)}
    inner = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=0.1))
    final, state = _train_eagerly(master_weights(inner), params, grads)

    fp32 = jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), (params, grads))
    reference, _ = _train_eagerly(inner, *fp32)
    chex.assert_trees_all_equal(state.master, reference)
    chex.assert_trees_all_equal(final["w"], reference["w"].astype(jnp.bfloat16))
    assert state.inner_state[1][0].mu["w"].dtype == jnp.float32


@pytest.mark.standard_promotion
def test_per_leaf_rounding_tree_with_chain_under_jit():
    params = {
        "kahan": jnp.ones((3,), jnp.bfloat16),
        "stochastic": jnp.ones((3,), jnp.bfloat16),
        "master": jnp.ones((3,), jnp.bfloat16),
        "none": jnp.ones((3,), jnp.bfloat16),
        "fp32": jnp.ones((3,), jnp.float32),
    }
    rounding = {k: k for k in ("kahan", "stochastic", "master")} | {"none": None, "fp32": "kahan"}
    tx = low_precision_updates(optax.chain(optax.scale(-2.0), optax.scale(0.5)), rounding)

    state = tx.init(params)
    # Buffers only where a mode needs them: they cost no bytes elsewhere.
    assert isinstance(state, LowPrecisionState)
    assert [k for k, v in state.compensation.items() if isinstance(v, jax.Array)] == ["kahan"]
    assert [k for k, v in state.master.items() if isinstance(v, jax.Array)] == ["master"]

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(params, state):
        updates, state = tx.update(_grads_for(params), state, params)
        return optax.apply_updates(params, updates), state

    p, s = params, state
    for _ in range(100):
        p, s = step(p, s)
    # Same structure, dtypes and shapes after 100 steps (an update inside lax.cond needs that).
    chex.assert_trees_all_equal_shapes_and_dtypes(s, state)
    assert int(s.count) == 100
    np.testing.assert_array_equal(np.asarray(p["none"], np.float32), 1.0)  # nearest: lost
    for k in ("kahan", "master"):
        np.testing.assert_allclose(np.asarray(p[k], np.float32), 1.1, atol=_BF16_ULP_AT_1)
    assert np.all(np.asarray(p["stochastic"], np.float32) > 1.0)
    np.testing.assert_allclose(np.asarray(p["fp32"]), 1.1, rtol=1e-5)  # fp32: plain fp32 sum


@pytest.mark.standard_promotion
def test_a_rounding_tree_may_be_a_prefix_of_the_params():
    params = {k: {"w": jnp.ones(2, jnp.bfloat16)} for k in ("enc", "dec", "head")}
    rounding = {"enc": "kahan", "dec": "master", "head": None}
    state = low_precision_updates(optax.sgd(1.0), rounding).init(params)
    assert isinstance(state.compensation["enc"]["w"], jax.Array)
    assert isinstance(state.master["dec"]["w"], jax.Array)
    for k in ("enc", "head"):
        assert isinstance(state.master[k]["w"], optax.MaskedNode)
    for k in ("dec", "head"):
        assert isinstance(state.compensation[k]["w"], optax.MaskedNode)


def test_the_returned_update_lands_apply_updates_on_the_chosen_value():
    # The wrappers return u = new - p in fp32 and rely on fl32(p + u) cast to bf16 being new.
    # Random bf16 pairs (any signs, exponents within 2^±15 of each other, and growth by any
    # factor) land exactly; only shrinking by more than 2^15 in one step may miss, by at most
    # ~2^-24 |p|.
    rng = np.random.default_rng(0)
    n = 200_000
    bits = rng.integers(0, 2**16, (2, n), dtype=np.uint16)
    p, new = bits.view(ml_dtypes.bfloat16).astype(np.float32)
    ok = np.isfinite(p) & np.isfinite(new)
    p, new = p[ok].astype(ml_dtypes.bfloat16), new[ok].astype(ml_dtypes.bfloat16)

    u = _update_landing_on(jnp.asarray(new), jnp.asarray(p))
    with jax.numpy_dtype_promotion("standard"):
        landed = np.asarray(optax.apply_updates(jnp.asarray(p), u)).astype(np.float64)
    p64, new64 = p.astype(np.float64), new.astype(np.float64)
    # Pairs whose difference overflows fp32 (|new - p| > 3.4e38, opposite signs near the top of
    # the range) cannot be expressed as an fp32 update at all; no weight gets there.
    # And XLA:CPU (like GPUs) flushes fp32 subnormals to zero, so a new value or a difference
    # below 1.2e-38 (but not 0) cannot be made or applied, whatever the update; no real weight
    # lives there either.
    tiny = np.finfo(np.float32).tiny
    keep = np.abs(new64 - p64) <= np.finfo(np.float32).max
    for v in (new64, new64 - p64):
        keep &= (v == 0) | (np.abs(v) >= tiny)
    p64, new64, landed = p64[keep], new64[keep], landed[keep]
    with np.errstate(divide="ignore"):
        shrinks_a_lot = (new64 != 0) & (np.abs(p64) > 2.0**15 * np.abs(new64))
    np.testing.assert_array_equal(landed[~shrinks_a_lot], new64[~shrinks_a_lot])
    miss = np.abs(landed - new64)[shrinks_a_lot] / np.abs(p64[shrinks_a_lot])
    assert miss.max() <= 2.0**-23, miss.max()


def test_the_wrappers_own_code_is_strict_promotion_clean():
    # No marker: this runs under strict promotion, which refuses any implicit bf16/fp32 mix.
    # (optax.apply_updates on bf16 params + fp32 updates needs standard promotion; not here.)
    rounding = {
        "nearest": "nearest",
        "stochastic": "stochastic",
        "kahan": "kahan",
        "master": "master",
        "f16_kahan": "kahan",
        "f16_master": "master",
        "f32": "stochastic",
    }
    params = {k: jnp.ones(3, jnp.float16 if "f16" in k else jnp.bfloat16) for k in rounding}
    params["f32"] = jnp.ones(3, jnp.float32)
    grads = jax.tree_util.tree_map(lambda p: jnp.full(3, -1e-3, p.dtype), params)
    tx = low_precision_updates(optax.sgd(1.0), rounding)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    # Rounded leaves get fp32 updates; the others keep the inner's (here the gradients') dtype.
    dtypes = {k: u.dtype for k, u in updates.items()}
    assert dtypes == {k: jnp.float32 for k in rounding} | {"nearest": jnp.bfloat16}, dtypes


def test_unknown_mode_names_list_the_accepted_ones():
    with pytest.raises(ValueError, match="'stochastik' for every leaf; accepted: 'nearest'"):
        low_precision_updates(optax.sgd(1.0), "stochastik")
    with pytest.raises(ValueError, match="leaf 'dec/w' of the rounding tree; accepted"):
        low_precision_updates(optax.sgd(1.0), {"enc": {"w": "kahan"}, "dec": {"w": "fp32"}})
    with pytest.raises(TypeError, match="seed must be an int"):
        low_precision_updates(optax.sgd(1.0), seed=1.5)


def test_a_rounding_tree_that_does_not_fit_the_params_is_refused():
    tx = low_precision_updates(optax.sgd(1.0), {"enc": "kahan", "dec": "master"})
    with pytest.raises(ValueError, match=r"does not fit the params(.|\n)*expected keys"):
        tx.init({"enc": jnp.ones(2, jnp.bfloat16), "head": jnp.ones(2, jnp.bfloat16)})


def test_stochastic_on_float16_names_the_leaf():
    tx = stochastic_rounding(optax.sgd(1.0))
    with pytest.raises(ValueError, match="leaf 'layers/0/scale' is float16"):
        tx.init({"layers": [{"scale": jnp.ones(2, jnp.float16)}]})


def test_update_without_params_is_refused():
    tx = kahan_summation(optax.sgd(1.0))
    params = _ones()
    with pytest.raises(ValueError, match=r"needs the params.*tx.update\(grads, state, params\)"):
        tx.update(params, tx.init(params))
