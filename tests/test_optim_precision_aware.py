"""with_precision: one rule list decides each parameter's gradient, moments and update rounding."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hybrid_jax as hj
from hybrid_jax.optim import with_precision
from hybrid_jax.optim.moments import BlockQuantized
from hybrid_jax.optim.precision_aware import check_applied
from hybrid_jax.precision import plan
from hybrid_jax.train import state_bytes

pytestmark = pytest.mark.standard_promotion  # every test steps Optax's Adam


def _params():
    rng = np.random.default_rng(0)
    return {
        "embed": jnp.asarray(rng.normal(0, 0.02, (64, 32)), jnp.float32),
        "hidden": jnp.asarray(rng.normal(0, 0.02, (128, 64)), jnp.float32),  # 8192 values
        "gain": jnp.ones(32, jnp.float32),
    }


RULES = hj.PrecisionRules(
    [
        ("embed", "fp32"),
        ("hidden", "p=bf16,c=bf16,o=bf16,mu=bf16,nu=int8,update=sr"),
        ("gain", "p=bf16,c=bf16,o=bf16,master=f32,grad=bf16"),
    ]
)


def _grads(params, seed=1):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda p: jnp.asarray(rng.normal(0, 1e-2, p.shape), p.dtype), params)


def test_policies_without_optimizer_keys_change_nothing():
    params = _params()
    inner = optax.adam(1e-3)
    tx = with_precision(inner, "bf16-mixed")
    chex.assert_trees_all_equal(tx.init(params), inner.init(params))
    grads = _grads(params)
    chex.assert_trees_all_equal(
        tx.update(grads, tx.init(params), params), inner.update(grads, inner.init(params), params)
    )


def test_each_leaf_gets_what_its_policy_asks_for():
    params = hj.cast_to_param(_params(), RULES)
    assert params["hidden"].dtype == jnp.bfloat16 and params["embed"].dtype == jnp.float32
    tx = with_precision(optax.adam(1e-3), RULES, min_size=4096)
    state = tx.init(params)
    # Rounding state: an fp32 master copy for the gain only; no Kahan buffers.
    assert state.master["gain"].dtype == jnp.float32
    assert isinstance(state.master["hidden"], optax.MaskedNode)
    is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)
    [adam] = [x for x in jax.tree.leaves(state, is_leaf=is_adam) if is_adam(x)]
    assert adam.mu["hidden"].dtype == jnp.bfloat16
    assert isinstance(adam.nu["hidden"], BlockQuantized)
    assert adam.mu["embed"].dtype == jnp.float32 and adam.nu["embed"].dtype == jnp.float32
    assert adam.mu["gain"].dtype == jnp.float32  # Adam sees the fp32 master copy

    step = jax.jit(lambda g, s, p: tx.update(g, s, p))
    for seed in range(3):
        updates, state = step(_grads(params, seed), state, params)
        params = optax.apply_updates(params, updates)
    assert all(np.all(np.isfinite(np.asarray(x, np.float32))) for x in jax.tree.leaves(params))
    assert params["hidden"].dtype == jnp.bfloat16  # apply_updates keeps each param's dtype


def test_grad_dtype_rounds_the_gradient_first():
    params = {"w": jnp.ones(4, jnp.float32)}
    tx = with_precision(optax.sgd(1.0), "p=f32,grad=bf16")
    g = {"w": jnp.full(4, 1.0 + 2.0**-10)}  # not a bf16 value: rounds to 1.0
    updates, _ = tx.update(g, tx.init(params), params)
    np.testing.assert_array_equal(np.asarray(updates["w"], np.float32), -1.0)


def test_bad_use():
    tx = with_precision(optax.sgd(1.0), RULES)
    params = hj.cast_to_param(_params(), RULES)
    with pytest.raises(ValueError, match="needs the params"):
        tx.update(_grads(params), tx.init(params))


def test_the_lean_recipe_keeps_about_four_bytes_per_parameter():
    # bf16 params (2 bytes) + 8-bit mu and nu (1 byte each + 4 bytes per 256-value block).
    params = {"w": jnp.zeros((256, 256), jnp.float32), "v": jnp.zeros((512, 128), jnp.float32)}
    tx = with_precision(optax.adam(1e-3), "bf16-lean")
    state = hj.TrainState.create(params, tx, precision="bf16-lean")
    memory = state_bytes(state)
    assert 4.0 < memory["bytes_per_param"] <= 4.1
    fp32 = state_bytes(hj.TrainState.create(params, optax.adam(1e-3)))
    assert 12.0 <= fp32["bytes_per_param"] < 12.01


def test_check_applied_wants_with_precision_only_where_a_policy_sets_optimizer_keys():
    params, plain = _params(), optax.sgd(1.0)
    check_applied(plain, plan(params, "bf16-mixed"))  # no optimizer keys: any optimizer
    check_applied(plain, plan(params, "p=f32,update=nearest"))  # what every optimizer does
    with pytest.raises(ValueError, match=r"for 2 parameters: 'gain' \(.*grad=bf16\), 'hidden'"):
        check_applied(plain, plan(params, RULES))
    # The mark survives Optax's re-wrapping, which returns a GradientTransformationExtraArgs as is.
    tx = optax.with_extra_args_support(with_precision(plain, RULES))
    check_applied(tx, plan(params, RULES))
