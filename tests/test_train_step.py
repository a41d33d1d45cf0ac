"""The jitted train step: order of operations, skipping, loss scaling, accumulation, mixing."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hybrid_jax as hj
from hybrid_jax.losses import DWA, PCGrad, Uncertainty, Weighted
from hybrid_jax.optim import by_path, with_precision
from hybrid_jax.train import TrainState, make_train_step


def _params(scale=0.3):
    rng = np.random.default_rng(0)
    w = lambda *s: jnp.asarray(rng.normal(0, scale, s), jnp.float32)
    return {"a": {"kernel": w(4, 8), "bias": w(8)}, "b": {"kernel": w(8, 2), "bias": w(2)}}


def _mlp(params, x):
    x = x.astype(params["a"]["kernel"].dtype)  # inputs in the compute dtype too
    h = jnp.tanh(x @ params["a"]["kernel"] + params["a"]["bias"])
    return h @ params["b"]["kernel"] + params["b"]["bias"]


def _terms(params, batch, rng):
    del rng
    out = _mlp(params, batch["x"]).astype(jnp.float32)
    # `poison` multiplies one leaf into the loss: NaN/Inf there makes only that leaf's grad bad.
    poison = sum(
        jnp.sum(p.astype(jnp.float32) * batch["poison"][name])
        for name, p in _leaves(params).items()
    )
    return {
        "mse": jnp.mean((out - batch["y"]) ** 2) + poison.astype(jnp.float32),
        "l2": sum(jnp.sum(p.astype(jnp.float32) ** 2) for p in jax.tree.leaves(params)),
    }


def _leaves(params):
    return {path: leaf for path, leaf in hj.tree.leaves_with_paths(params)[0]}


def _batch(seed=0, n=8, poison=None):
    rng = np.random.default_rng(seed)
    zero = {path: jnp.zeros_like(leaf) for path, leaf in _leaves(_params()).items()}
    if poison:
        path, value = poison
        zero[path] = zero[path].at[(0,) * zero[path].ndim].set(value)
    return {
        "x": jnp.asarray(rng.normal(size=(n, 4)), jnp.float32),
        "y": jnp.asarray(rng.normal(size=(n, 2)), jnp.float32),
        "poison": zero,
    }


_WEIGHTS = Weighted({"mse": 1.0, "l2": 1e-3})
_TWO_GROUPS = by_path([(r"^a/", optax.sgd(0.1, momentum=0.9))], default=optax.adam(1e-2))


# The suite compiles with XLA's optimizations off (conftest.py), which rounds the two programs'
# sums differently; the claim is about the programs a user runs, so both compile as XLA's default.
_DEFAULT_XLA = {"xla_backend_optimization_level": 3, "xla_cpu_use_fusion_emitters": True}


def test_fp32_no_scaling_one_group_is_bitwise_a_plain_optax_loop():
    tx = optax.adam(1e-2)
    step = make_train_step(_terms, optimizer=tx, weighting=_WEIGHTS, precision="fp32", donate=False)
    state = TrainState.create(_params(), tx)

    @jax.jit
    def plain(params, opt_state, batch):
        def loss(p):
            t = _terms(p, batch, None)
            return t["mse"] * 1.0 + t["l2"] * jnp.float32(1e-3)

        grads = jax.grad(loss)(params)
        with jax.numpy_dtype_promotion("standard"):  # Optax's Adam mixes int32 and float
            updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    params, opt_state = _params(), tx.init(_params())
    step = step.lower(state, _batch(0)).compile(_DEFAULT_XLA)
    plain = plain.lower(params, opt_state, _batch(0)).compile(_DEFAULT_XLA)
    for i in range(10):
        state, metrics = step(state, _batch(i))
        params, opt_state = plain(params, opt_state, _batch(i))
    chex.assert_trees_all_equal(state.params, params)
    chex.assert_trees_all_equal(state.opt_state, opt_state)
    assert int(state.step) == 10 and int(metrics["skipped"]) == 0


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("leaf", ["a/bias", "b/kernel", "a/kernel"])
def test_a_non_finite_gradient_skips_the_step_and_leaves_everything_bitwise(value, leaf):
    # a/bias: first leaf; b/kernel: last leaf and in the second optimizer group (Adam's);
    # a/kernel: the first group's (SGD with momentum).
    step = _SKIP_STEP
    state = TrainState.create(
        _params(), _TWO_GROUPS, loss_scale=hj.DynamicLossScale(2.0**15, period=3)
    )
    state, _ = step(state, _batch(0))  # one good step so that every state is non-trivial
    before = jax.tree.map(np.asarray, state)
    state, metrics = step(state, _batch(1, poison=(leaf, value)))
    assert int(metrics["skipped"]) == 1
    chex.assert_trees_all_equal(state.params, before.params)
    chex.assert_trees_all_equal(state.opt_state, before.opt_state)
    assert float(state.loss_scale.loss_scale) == 2.0**14 and int(state.loss_scale.counter) == 0
    assert int(state.step) == 2  # the step count moves on; Optax's counts inside do not
    state, metrics = step(state, _batch(2))
    assert int(metrics["skipped"]) == 0 and float(metrics["loss_scale"]) == 2.0**14


_SKIP_STEP = make_train_step(
    _terms,
    optimizer=_TWO_GROUPS,
    weighting=_WEIGHTS,
    loss_scale=hj.DynamicLossScale(2.0**15, period=3),
    donate=False,
)


def test_fp16_forward_overflow_is_skipped_and_the_scale_backs_off():
    # A layer whose fp16 output passes 65504: h = tanh(~10) = 1, and
    # out = sum of 8 * 1e4 = 8e4, inf in fp16, while every weight itself fits in fp16.
    big = _params()
    big = {
        "a": {**big["a"], "bias": jnp.full(8, 10.0)},
        "b": {**big["b"], "kernel": jnp.full((8, 2), 1e4)},
    }
    tx = optax.adam(1e-3)
    scale = hj.DynamicLossScale(2.0**15)
    step = make_train_step(
        _terms,
        optimizer=tx,
        weighting=_WEIGHTS,
        precision="fp16-mixed",
        loss_scale=scale,
        donate=False,
    )
    state = TrainState.create(big, tx, loss_scale=scale)
    new, metrics = step(state, _batch(0))
    assert int(metrics["skipped"]) == 1 and not np.isfinite(float(metrics["loss"]))
    chex.assert_trees_all_equal((new.params, new.opt_state), (state.params, state.opt_state))
    assert float(new.loss_scale.loss_scale) == 2.0**14


def test_the_step_compiles_once_while_the_loss_scale_changes():
    state = TrainState.create(
        _params(), _TWO_GROUPS, loss_scale=hj.DynamicLossScale(2.0**15, period=3)
    )
    step = make_train_step(
        _terms,
        optimizer=_TWO_GROUPS,
        weighting=_WEIGHTS,
        loss_scale=hj.DynamicLossScale(2.0**15, period=3),
    )
    scales = []
    for i in range(7):
        poison = ("a/bias", np.nan) if i == 2 else None
        state, metrics = step(state, _batch(i, poison=poison))
        scales.append(float(metrics["loss_scale"]))
    assert len(set(scales)) > 1  # the value changed...
    assert step._cache_size() == 1  # ...and the step was traced and compiled once


def test_bf16_mixed_keeps_fp32_masters_and_fp32_losses():
    tx = optax.sgd(0.1)
    step = make_train_step(_terms, optimizer=tx, weighting=_WEIGHTS, precision="bf16-mixed")
    state, metrics = step(TrainState.create(_params(), tx), _batch(0))
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
    assert all(v.dtype in (jnp.float32, jnp.int32) for v in metrics.values())
    assert set(metrics) == {
        "loss",
        "loss/mse",
        "loss/l2",
        "weight/mse",
        "weight/l2",
        "grad_norm",
        "loss_scale",
        "skipped",
    }


def test_gradient_accumulation_matches_one_big_batch():
    tx = optax.sgd(0.1)
    one = make_train_step(_terms, optimizer=tx, weighting=_WEIGHTS, donate=False)
    four = make_train_step(_terms, optimizer=tx, weighting=_WEIGHTS, grad_accum=4, donate=False)
    state = TrainState.create(_params(), tx)
    batch = _batch(0, n=16)
    batch4 = {**batch, "poison": jax.tree.map(lambda z: jnp.stack([z] * 16), batch["poison"])}
    a, ma = one(state, batch)
    b, mb = four(state, {**batch4, "poison": batch4["poison"]})
    # The mean of four micro-batch means equals the mean over 16 rows; fp32 summation order
    # differs, so equal to a few ulps.
    chex.assert_trees_all_close(a.params, b.params, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(float(ma["loss/mse"]), float(mb["loss/mse"]), rtol=1e-6)
    with pytest.raises(ValueError, match="grad_accum=3 must divide"):
        make_train_step(_terms, optimizer=tx, grad_accum=3)(state, batch)


def test_a_scheduled_weight_takes_the_schedules_value_at_the_states_step():
    schedule = optax.linear_schedule(0.0, 1.0, transition_steps=4)
    weighting = Weighted({"mse": 1.0, "l2": schedule})
    tx = optax.sgd(0.01)
    step = make_train_step(_terms, optimizer=tx, weighting=weighting)
    state = TrainState.create(_params(), tx, weighting=weighting)
    for i in range(5):
        state, metrics = step(state, _batch(i))
        assert float(metrics["weight/l2"]) == pytest.approx(float(schedule(i)))
    assert step._cache_size() == 1


def test_pcgrad_with_agreeing_terms_equals_the_plain_sum():
    # Two copies of the same term always agree, so PCGrad projects nothing.
    def twice(params, batch, rng):
        mse = _terms(params, batch, rng)["mse"]
        return {"first": mse, "second": mse}

    weighting = Weighted({"first": 0.5, "second": 0.5})
    tx = optax.sgd(0.1)
    state = TrainState.create(_params(), tx)
    plain = make_train_step(twice, optimizer=tx, weighting=weighting, donate=False)
    mixed = make_train_step(twice, optimizer=tx, weighting=weighting, mixer=PCGrad(), donate=False)
    a, _ = plain(state, _batch(0))
    b, metrics = mixed(state, _batch(0))
    chex.assert_trees_all_close(a.params, b.params, rtol=1e-6, atol=1e-7)
    assert float(metrics["weight/first"]) == 0.5


def test_uncertainty_weights_are_learned_inside_the_step():
    weighting = Uncertainty(optimizer=optax.sgd(0.1))
    tx = optax.sgd(0.01)
    state = TrainState.create(_params(), tx, weighting=weighting, loss_names=["mse", "l2"])
    step = make_train_step(_terms, optimizer=tx, weighting=weighting)
    start = jax.tree.map(float, state.weight_params)
    for i in range(3):
        state, metrics = step(state, _batch(i))
    assert jax.tree.map(float, state.weight_params) != start
    assert float(metrics["weight/mse"]) != 1.0


def test_dwa_runs_inside_the_donated_step():
    """DWA's state has three dicts of averages: each must own its buffers, or the donated step
    would donate one buffer twice."""
    weighting = DWA(temperature=2.0, period=1)
    tx = optax.sgd(0.01)
    state = TrainState.create(_params(), tx, weighting=weighting, loss_names=["mse", "l2"])
    step = make_train_step(_terms, optimizer=tx, weighting=weighting)
    for i in range(3):
        state, metrics = step(state, _batch(i))
    assert float(metrics["weight/mse"]) != 1.0


def test_mismatches_are_clear_errors():
    tx = optax.sgd(0.1)
    state = TrainState.create(_params(), tx)
    step = make_train_step(_terms, optimizer=tx, precision="bf16-pure")
    with pytest.raises(TypeError, match=r"parameter 'a/bias' is stored as float32, but .* bf"):
        step(state, _batch(0))
    pure = TrainState.create(_params(), tx, precision="bf16-pure")
    assert pure.params["a"]["bias"].dtype == jnp.bfloat16
    step = make_train_step(_terms, optimizer=tx, loss_scale=hj.DynamicLossScale(2.0**15))
    with pytest.raises(TypeError, match="the step was built for loss_scale=DynamicLossScale"):
        step(state, _batch(0))
    with pytest.raises(ValueError, match="grad_accum must be a positive int"):
        make_train_step(_terms, optimizer=tx, grad_accum=0)


@pytest.mark.standard_promotion
def test_the_ema_follows_the_applied_updates_and_skips_with_them():
    ema = hj.mixing.EMA(decay=0.9)
    tx = optax.sgd(0.1)
    step = make_train_step(_terms, optimizer=tx, weighting=_WEIGHTS, ema=ema)
    state = TrainState.create(_params(), tx, ema=ema)
    reference = jax.tree.map(lambda x: np.asarray(x, np.float64), _params())
    for t in range(3):
        state, _ = step(state, _batch(t))
        params = jax.tree.map(lambda x: np.asarray(x, np.float64), state.params)
        reference = jax.tree.map(lambda e, p: 0.9 * e + 0.1 * p, reference, params)
    # fp32 EMA against a float64 one over three steps: a few ulps.
    chex.assert_trees_all_close(state.ema_params, reference, rtol=1e-6)
    before = jax.tree.map(np.asarray, state.ema_params)
    state, metrics = step(state, _batch(9, poison=("a/kernel", np.nan)))
    assert int(metrics["skipped"]) == 1
    chex.assert_trees_all_equal(state.ema_params, before)
    with pytest.raises(ValueError, match="ema=ema"):
        step(TrainState.create(_params(), tx), _batch(0))


def test_a_policys_optimizer_keys_need_with_precision():
    # update=kahan lives in the optimizer state (a compensation buffer) that TrainState.create
    # builds from the optimizer: a plain one would round every +1e-3 away in bf16, silently.
    def terms(params, batch, rng):
        del batch, rng
        return {"pull": -1e-3 * jnp.sum(params["w"].astype(jnp.float32))}  # gradient -1e-3

    params, plain = {"w": jnp.ones(4)}, optax.sgd(1.0)
    step = make_train_step(terms, optimizer=plain, precision="bf16-pure-kahan")
    state = TrainState.create(params, plain, precision="bf16-pure-kahan")
    with pytest.raises(
        ValueError, match=r"'w' \(.*update=kahan\).*hybrid_jax\.optim\.with_precision"
    ):
        step(state, None)
    tx = with_precision(plain, "bf16-pure-kahan")
    step = make_train_step(terms, optimizer=tx, precision="bf16-pure-kahan")
    state = TrainState.create(params, tx, precision="bf16-pure-kahan")
    for _ in range(100):
        state, _ = step(state, None)
    assert state.params["w"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(state.params["w"], np.full(4, 1.1015625, jnp.bfloat16))
    # A policy without optimizer keys takes any optimizer.
    step = make_train_step(terms, optimizer=plain, precision="bf16-pure")
    state, _ = step(TrainState.create(params, plain, precision="bf16-pure"), None)
    np.testing.assert_array_equal(state.params["w"], np.ones(4, jnp.bfloat16))


def test_a_mixer_without_per_term_is_a_clear_error():
    def mix(stacked, key=None):
        return jax.tree.map(lambda g: g.sum(0), stacked)

    with pytest.raises(TypeError, match="bool attribute per_term"):
        make_train_step(_terms, optimizer=optax.sgd(0.1), mixer=mix)


def test_the_step_does_not_delete_the_callers_parameters():
    """The step donates the state; TrainState.create copies the leaves it would otherwise share
    with the caller, so a model's variables can start a second state (or be evaluated)."""
    params = {"w": jnp.ones((3, 1)), "b": jnp.zeros((1,))}
    tx = optax.sgd(0.1)
    loss = lambda p, batch, rng: {"l": (jnp.sum(p["w"]) + jnp.sum(p["b"])).astype(jnp.float32)}
    step = make_train_step(loss, optimizer=tx, precision="bf16-mixed")
    for _ in range(2):  # a second state from the same arrays
        step(TrainState.create(params, tx, precision="bf16-mixed"), {})
        assert not any(leaf.is_deleted() for leaf in jax.tree_util.tree_leaves(params))
