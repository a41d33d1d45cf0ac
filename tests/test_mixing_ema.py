"""Exponential moving averages (hybrid_jax.mixing.ema): values, rules, dtypes, jit, donation.

Numerics are checked against float64 NumPy references, with each tolerance derived next to it;
"bitwise" means the bytes of every leaf are equal.
"""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _mixing_trees import BF16_EPS, F32_EPS, bits, mixed_tree, nnx_state

from hybrid_jax import mixing
from hybrid_jax.precision.storage import Int8Weight
from hybrid_jax.tree import UnusedRuleWarning, leaves_with_paths


def ema_reference(trajectory, decay, warmup_steps):
    """Float64 EMA: init from trajectory[0], then update t = 0, 1, ... with the next ones."""
    ema = np.asarray(trajectory[0], np.float64)
    for t, p in enumerate(trajectory[1:]):
        d = decay if warmup_steps <= 1 else min(decay, (1 + t) / (warmup_steps + t))
        ema = d * ema + (1 - d) * np.asarray(p, np.float64)
    return ema


@pytest.mark.parametrize(
    "decay, warmup_steps",
    [(0.99, 10), (0.5, 10), (0.9, 0), (0.999, 3)],  # (0.5, 10): the warm-up ends at t = 8
)
def test_ema_matches_a_float64_reference_over_50_steps(decay, warmup_steps):
    rng = np.random.default_rng(0)
    steps = 50
    # A random walk of O(1) values, as parameters move during training.
    trajectory = np.cumsum(rng.normal(scale=0.1, size=(steps + 1, 64)), axis=0) + 1.0
    trajectory = trajectory.astype(np.float32)
    ema = mixing.ema_init({"w": jnp.asarray(trajectory[0])})
    for t in range(steps):
        ema = mixing.ema_update(
            ema, {"w": jnp.asarray(trajectory[t + 1])}, t, decay=decay, warmup_steps=warmup_steps
        )
    assert ema["w"].dtype == jnp.float32
    reference = ema_reference(trajectory, decay, warmup_steps)
    # Each fp32 step rounds the sum to half an ulp of the EMA (the product's rounding is an ulp
    # of the ~100x smaller increment, the rate 1 - d_t's an ulp of itself), and older errors are
    # damped by d_t < 1: after 50 steps at most ~25 ulps of max|EMA|; 50 leaves a factor 2.
    # (Observed: ~1% of it; using step t + 1 instead of t is off by 500x it.)
    atol = steps * F32_EPS * np.max(np.abs(reference))
    np.testing.assert_allclose(np.asarray(ema["w"], np.float64), reference, rtol=0, atol=atol)


def test_ema_rules_give_per_path_decays_and_exclusions():
    ema = {
        "attn": {"kernel": jnp.zeros(3)},
        "ln": {"scale": jnp.zeros(3)},
        "head": {"bias": jnp.zeros(2)},
    }
    params = jax.tree_util.tree_map(jnp.ones_like, ema)
    rules = [(r"^ln/", 0.5), (r"bias$", None)]
    new = mixing.ema_update(ema, params, 0, decay=0.9, rules=rules)
    np.testing.assert_allclose(new["attn"]["kernel"], 0.1, rtol=1e-6)  # the default decay
    np.testing.assert_allclose(new["ln"]["scale"], 0.5, rtol=0)  # its own decay
    assert np.all(np.asarray(new["head"]["bias"]) == 1.0)  # excluded: a copy of the params

    # The warm-up applies to a rule's decay too: at t = 0, W = 10, d_0 = min(0.999, 1/10).
    new = mixing.ema_update(ema, params, 0, decay=0.9, warmup_steps=10, rules=[("ln", 0.999)])
    np.testing.assert_allclose(new["ln"]["scale"], 0.9, rtol=1e-6)


def test_ema_keeps_dtypes_and_takes_non_floating_leaves_from_params():
    params = mixed_tree(0)
    ema = mixing.ema_init(mixed_tree(1))
    new = mixing.ema_update(ema, params, 3, decay=0.5)
    for path, leaf in leaves_with_paths(new)[0]:
        assert jax.tree_util.tree_map(lambda x: x.dtype, leaf) == jax.tree_util.tree_map(
            lambda x: x.dtype, dict(leaves_with_paths(ema)[0])[path]
        ), path
    # Integers, booleans and the int8 frozen weight are the newest values, never averaged.
    assert bits(new["count"]) == bits(params["count"])
    assert bits(new["mask"]) == bits(params["mask"])
    assert bits(new["frozen"]) == bits(params["frozen"])
    # bf16 stays bf16: within one bf16 rounding of the float64 average of the bf16 values.
    expected = 0.5 * np.float64(ema["bf16"]) + 0.5 * np.float64(params["bf16"])
    got = np.float64(new["bf16"])
    assert new["bf16"].dtype == jnp.bfloat16
    np.testing.assert_allclose(got, expected, rtol=BF16_EPS / 2)


def test_ema_in_fp32_for_bf16_params():
    params = {"w": jnp.asarray([1.0, 2.0, 3.0], jnp.bfloat16)}
    cfg = mixing.EMA(decay=0.999, dtype=jnp.float32)
    ema = cfg.init(params)
    assert ema["w"].dtype == jnp.float32
    moved = {"w": jnp.asarray([2.0, 2.0, 2.0], jnp.bfloat16)}
    for t in range(3):
        ema = cfg.update(ema, moved, t)
    assert ema["w"].dtype == jnp.float32
    # In fp32 the three 0.1% steps register (a bf16 EMA would round 1.001 back to 1.0).
    expected = 2.0 + (np.array([1.0, 2.0, 3.0]) - 2.0) * 0.999**3
    np.testing.assert_allclose(ema["w"], expected, rtol=4 * F32_EPS)
    bf16_ema = mixing.ema_update(mixing.ema_init(params), moved, 0)
    assert bits(bf16_ema["w"][:1]) == bits(params["w"][:1])


def test_ema_jits_once_with_a_traced_step_and_scans():
    cfg = mixing.EMA(decay=0.99, warmup_steps=10, rules=[("^f16$", None)])
    params = mixed_tree(0)
    ema = cfg.init(mixed_tree(1))

    @jax.jit
    @chex.assert_max_traces(n=1)
    def update(ema, params, step):
        return cfg.update(ema, params, step)

    eager = ema
    for t in range(4):
        ema = update(ema, params, jnp.asarray(t, jnp.int32))
        eager = cfg.update(eager, params, t)
    # Jit may fuse e + w * (p - e) into one FMA: allow one rounding difference.
    for path, x in leaves_with_paths(eager)[0]:
        if path in ("f32", "bf16", "f16"):
            y = dict(leaves_with_paths(ema)[0])[path]
            eps = float(jnp.finfo(x.dtype).eps)
            finite = np.isfinite(np.float64(x))
            np.testing.assert_allclose(
                np.float64(y)[finite], np.float64(x)[finite], rtol=eps, err_msg=path
            )

    # The output has the dtypes and shapes of the EMA, so it can be a lax.scan carry.
    def body(ema, t):
        return cfg.update(ema, params, t), None

    final, _ = jax.lax.scan(body, cfg.init(params), jnp.arange(5))
    chex.assert_trees_all_equal_dtypes(final, params)


def test_ema_copies_so_params_and_ema_can_be_donated_together():
    def params():
        return {"w": jnp.arange(4.0), "frozen": Int8Weight.quantize(jnp.ones((2, 2)))}

    def shared_buffers(a, b):
        pointers = {x.unsafe_buffer_pointer() for x in jax.tree_util.tree_leaves(a)}
        return [x for x in jax.tree_util.tree_leaves(b) if x.unsafe_buffer_pointer() in pointers]

    # A train step donates its state; a buffer held twice fails with "Attempt to donate the same
    # buffer twice". Donation consumes the arrays, hence fresh params for each case.
    donate = jax.jit(lambda state: state, donate_argnums=0)
    p = params()
    ema = mixing.ema_init(p)
    assert bits(ema) == bits(p) and not shared_buffers(p, ema)
    donate({"params": p, "ema": ema})
    # What an eager update takes from the params (the excluded leaf, the frozen int8 weight) is
    # copied too.
    p = params()
    ema = mixing.ema_update(mixing.ema_init(p), p, 1, rules=[("w", None)])
    assert bits(ema) == bits(p) and not shared_buffers(p, ema)
    donate({"params": p, "ema": ema})


def test_ema_config_is_frozen_hashable_and_validated():
    a = mixing.EMA(decay=0.99, rules=[("bias", None), ("ln", 0.5)])
    b = mixing.EMA(decay=0.99, rules=(("bias", None), ("ln", 0.5)))
    assert a == b and hash(a) == hash(b)
    assert a.rules == (("bias", None), ("ln", 0.5))
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.decay = 0.5
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        mixing.EMA(decay=1.5)
    with pytest.raises(ValueError, match="EMA rule 1"):
        mixing.EMA(rules=[("a", 0.5), ("b", 2.0)])
    with pytest.raises(TypeError, match="EMA rule 0"):
        mixing.EMA(rules=[("a", "fast")])
    with pytest.raises(ValueError, match="warmup_steps"):
        mixing.EMA(warmup_steps=-1)
    with pytest.raises(TypeError, match="floating"):
        mixing.EMA(dtype=jnp.int8)


def test_ema_unused_rule_warns_and_mismatch_names_the_leaf():
    ema = {"w": jnp.zeros(2)}
    with pytest.warns(UnusedRuleWarning, match="nothing"):
        mixing.ema_update(ema, ema, 0, rules=[("nothing", 0.5)])
    with pytest.raises(ValueError, match=r"'w'.*shape \(2,\) vs \(3,\)"):
        mixing.ema_update(ema, {"w": jnp.zeros(3)}, 0)


def test_ema_on_flax_nnx_state():
    state = nnx_state(np.arange(6.0, dtype=np.float32).reshape(2, 3), np.zeros(3, np.float32))
    ema = mixing.ema_init(state)
    target = jax.tree_util.tree_map(jnp.ones_like, state)
    new = mixing.ema_update(ema, target, 0, decay=0.5, rules=[("bias", None)])
    assert type(new) is type(state)
    np.testing.assert_allclose(new["kernel"][...], 0.5 * state["kernel"][...] + 0.5, rtol=1e-6)
    np.testing.assert_array_equal(new["bias"][...], 1.0)
