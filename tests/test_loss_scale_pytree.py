"""``DynamicLossScale`` as a pytree: every field flattens (unlike jmp's), the state rides
through ``jit``, ``tree_map``, ``lax.scan`` and ``fori_loop`` unchanged in type, and a changing
value never retraces.
"""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import jmp
import numpy as np
import pytest
from _loss_scale_runs import assert_same_bits, run_adjust

from hybrid_jax import DynamicLossScale, StaticLossScale, all_finite

# ----------------------------------------------------------------------------------------------
# 1. Every field is a pytree field


def test_flatten_keeps_every_field_unlike_jmp():
    ours = DynamicLossScale(
        2.0**12,
        counter=3,
        period=7,
        factor=3,
        min_loss_scale=2.0**10,
        max_loss_scale=2.0**20,
        backoff=0.25,
    )
    leaves, treedef = jax.tree_util.tree_flatten(ours)
    for back in (jax.tree_util.tree_unflatten(treedef, leaves), jax.jit(lambda x: x)(ours)):
        for field in dataclasses.fields(DynamicLossScale):
            assert_same_bits(getattr(back, field.name), getattr(ours, field.name))

    # jmp keeps period and factor but drops the floor: a round trip resets it to 1 (jmp PR #44).
    theirs = jmp.DynamicLossScale(
        jnp.float32(2.0**10), jnp.int32(3), period=7, factor=2, min_loss_scale=jnp.float32(2.0**10)
    )
    leaves, treedef = jax.tree_util.tree_flatten(theirs)
    assert len(leaves) == 2
    back = jax.tree_util.tree_unflatten(treedef, leaves)
    assert (back.period, back.factor) == (7, 2)
    assert float(back.min_loss_scale) == 1.0
    with jax.numpy_dtype_promotion("standard"):
        assert float(theirs.adjust(jnp.array(False)).loss_scale) == 2.0**10
        assert float(back.adjust(jnp.array(False)).loss_scale) == 2.0**9  # through the floor
    # Ours, at its floor, stays there after the same round trip.
    ours = DynamicLossScale(2.0**10, min_loss_scale=2.0**10)
    leaves, treedef = jax.tree_util.tree_flatten(ours)
    back = jax.tree_util.tree_unflatten(treedef, leaves)
    assert float(back.adjust(jnp.array(False)).loss_scale) == 2.0**10


def test_dynamic_state_survives_tree_map():
    # Only numbers a user writes are validated: JAX rebuilds the class from arrays in tree_map,
    # unflatten and restore, and e.g. a zeros_like of the state (loss_scale 0) must not raise.
    zeros = jax.tree_util.tree_map(jnp.zeros_like, DynamicLossScale(2.0**15, backoff=0.5))
    assert float(zeros.loss_scale) == 0.0 and zeros.backoff == 0.5


# ----------------------------------------------------------------------------------------------
# 2. No retrace while the loss-scale value changes


def test_no_retrace_when_loss_scale_value_changes():
    chex.clear_trace_counter()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(loss_scale, x):
        grads = loss_scale.unscale(loss_scale.scale(x))
        return loss_scale.adjust(all_finite(grads))

    x, bad = jnp.ones(3, jnp.float32), jnp.array([1.0, jnp.inf, 0.0], jnp.float32)
    ls = DynamicLossScale(2.0**15, period=2)  # NumPy fields from a Python float
    seen = []
    for i in range(6):
        ls = step(ls, bad if i == 3 else x)  # then jax.Array fields
        seen.append(float(ls.loss_scale))
    assert seen == [2.0**15, 2.0**16, 2.0**16, 2.0**15, 2.0**15, 2.0**16]
    step(DynamicLossScale(2.0**10, counter=1, period=2), x)  # a fresh Python float again
    step(DynamicLossScale(jnp.float32(2.0**12), counter=jnp.int32(1), period=2), x)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def static_step(loss_scale, x):
        return loss_scale.unscale(loss_scale.scale(x))

    for s in (128.0, jnp.float32(64.0), np.float32(3.0), 7):
        chex.assert_trees_all_equal(static_step(StaticLossScale(s), x), x)


def test_weak_typed_initial_scale_does_not_retrace():
    chex.clear_trace_counter()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(loss_scale):
        return loss_scale.adjust(jnp.array(True))

    ls = DynamicLossScale(jnp.asarray(2.0**15))
    for _ in range(3):
        ls = step(ls)


# ----------------------------------------------------------------------------------------------
# 3. A lax.scan / fori_loop carry


@pytest.mark.parametrize(
    "ls",
    [
        DynamicLossScale(2.0**15, period=2),
        DynamicLossScale(2.0**15, period=2, max_loss_scale=2.0**16, backoff=0.25),
        DynamicLossScale.grad_scaler(growth_interval=2),
    ],
    ids=["default", "max-backoff", "grad_scaler"],
)
def test_scan_carry_is_type_stable(ls):
    finite = np.array([True, True, False, True, True, True, False, True])
    final, _ = run_adjust(ls, finite)  # lax.scan checks the carry type itself
    assert jax.tree_util.tree_structure(final) == jax.tree_util.tree_structure(ls)
    assert jax.tree_util.tree_map(jax.typeof, final) == jax.tree_util.tree_map(jax.typeof, ls)

    eager = ls
    for ok in finite:
        eager = eager.adjust(jnp.array(ok))
    chex.assert_trees_all_equal(final, eager, strict=True)
    looped = jax.jit(
        lambda ls: jax.lax.fori_loop(
            0, len(finite), lambda i, c: c.adjust(jnp.asarray(finite)[i]), ls
        )
    )(ls)
    chex.assert_trees_all_equal(looped, final, strict=True)
