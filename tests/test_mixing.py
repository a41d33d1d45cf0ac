"""Parameter mixing (hybrid_jax.mixing): EMA, uniform and greedy soups, merge, interpolate.

Numerics are checked against float64 NumPy references, with each tolerance derived next to it;
"bitwise" means the bytes of every leaf are equal.
"""

import dataclasses
import os
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from hybrid_jax import mixing
from hybrid_jax.precision.storage import Int8Weight
from hybrid_jax.tree import UnusedRuleWarning, leaves_with_paths

F32_EPS = 2.0**-23  # fp32 spacing at 1 (one ulp)
BF16_EPS = 2.0**-7


def bits(tree):
    """Every leaf's dtype, shape and bytes: equal iff the trees are bitwise equal."""
    return [
        (path, str(np.asarray(x).dtype), np.shape(x), np.asarray(x).tobytes())
        for path, leaf in leaves_with_paths(tree)[0]
        for x in jax.tree_util.tree_leaves(leaf)
    ]


def gpt_like(fill, n_layer=2, d=4):
    """A nested dict with the paths of the bundled GPT, every float leaf equal to ``fill``."""

    def full(*shape, dtype=jnp.float32):
        return jnp.full(shape, fill, dtype)

    return {
        "tok_embed": {"embedding": full(8, d, dtype=jnp.bfloat16)},
        "blocks": [
            {
                "ln_1": {"scale": full(d)},
                "attn": {"qkv": {"kernel": full(d, 3 * d), "bias": full(3 * d)}},
                "mlp": {"fc": {"kernel": full(d, 4 * d)}, "proj": {"kernel": full(4 * d, d)}},
            }
            for _ in range(n_layer)
        ],
        "ln_f": {"scale": full(d)},
    }


def nnx_state(kernel, bias):
    """A Flax NNX State shaped like that of ``nnx.Linear(2, 3)`` (built without running init)."""
    return nnx.State(
        {"kernel": nnx.Param(jnp.asarray(kernel)), "bias": nnx.Param(jnp.asarray(bias))}
    )


def mixed_tree(seed):
    """Floating leaves of several dtypes, hard values included, plus non-floating leaves."""
    rng = np.random.default_rng(seed)
    f32 = rng.normal(size=6) * 10.0 ** rng.integers(-30, 30, size=6)
    f32[:4] = [-0.0, np.inf, -np.inf, 1e-40]  # signed zero, infinities, a subnormal
    return {
        "f32": jnp.asarray(f32, jnp.float32),
        "bf16": jnp.asarray(rng.normal(size=(2, 3)), jnp.bfloat16),
        "f16": jnp.asarray(rng.normal(size=3), jnp.float16),
        "e4m3": jnp.asarray(rng.normal(size=3), jnp.float8_e4m3fn),
        "count": jnp.asarray(rng.integers(0, 100), jnp.int32),
        "mask": jnp.asarray(rng.random(3) < 0.5),
        "frozen": Int8Weight.quantize(jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)),
    }


# --------------------------------------------------------------------------------------------
# EMA
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Uniform soup
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_soup_of_identical_trees_is_bitwise_the_tree(n):
    tree = mixed_tree(0)
    assert bits(mixing.uniform_soup([tree] * n)) == bits(tree)


def test_soup_means_of_known_values():
    trees = [{"a": jnp.asarray([v, -v], jnp.float32)} for v in (1.0, 2.0, 3.0, 6.0)]
    np.testing.assert_array_equal(mixing.uniform_soup(trees)["a"], [3.0, -3.0])
    bf16 = [{"b": jnp.asarray(v, jnp.bfloat16)} for v in (1.0, 2.0, 4.0)]
    soup = mixing.uniform_soup(bf16)
    assert soup["b"].dtype == jnp.bfloat16
    assert soup["b"] == jnp.asarray(7.0 / 3.0, jnp.bfloat16)  # one rounding, from fp32


def test_soup_matches_float64_mean_and_takes_non_floats_from_the_first():
    trees = [mixed_tree(seed) for seed in range(5)]
    for tree in trees:  # finite values for the float64 comparison
        tree["f32"] = tree["f32"].at[:4].set(jnp.arange(4.0))
    soup = mixing.uniform_soup(trees)
    reference = np.mean([np.float64(t["f32"]) for t in trees], axis=0)
    # A running mean of k terms in fp32 rounds k times, each by at most an ulp of max|x|.
    atol = len(trees) * F32_EPS * np.max(np.abs([np.float64(t["f32"]) for t in trees]))
    np.testing.assert_allclose(np.float64(soup["f32"]), reference, rtol=0, atol=atol)
    # bf16 is averaged in fp32 and rounded once: within half a bf16 ulp (plus the fp32 error).
    reference = np.mean([np.float64(t["bf16"]) for t in trees], axis=0)
    np.testing.assert_allclose(np.float64(soup["bf16"]), reference, rtol=BF16_EPS / 2 + 1e-6)
    for name in ("count", "mask", "frozen"):
        assert bits(soup[name]) == bits(trees[0][name]), name
    chex.assert_trees_all_equal_dtypes(soup, trees[0])
    # Jit-able, and then still the same numbers.
    assert bits(jax.jit(mixing.uniform_soup)(trees[:2])) == bits(mixing.uniform_soup(trees[:2]))


def test_soup_errors_name_the_first_mismatching_leaf():
    a, b = gpt_like(1.0), gpt_like(2.0)
    b["blocks"][1]["attn"]["qkv"]["kernel"] = jnp.zeros((4, 8))
    with pytest.raises(ValueError, match=r"trees\[2\].*'blocks/1/attn/qkv/kernel'.*\(4, 12\)"):
        mixing.uniform_soup([a, a, b])
    c = gpt_like(1.0)
    c["ln_f"]["scale"] = c["ln_f"]["scale"].astype(jnp.bfloat16)
    with pytest.raises(ValueError, match=r"'ln_f/scale'.*float32 vs bfloat16"):
        mixing.uniform_soup([a, c])
    d = gpt_like(1.0)
    del d["blocks"][0]["mlp"]["proj"]
    with pytest.raises(ValueError, match=r"lacks leaf 'blocks/0/mlp/proj/kernel'"):
        mixing.uniform_soup([a, d])
    e = {"w": Int8Weight.quantize(jnp.ones((2, 2)))}
    with pytest.raises(ValueError, match=r"'w'.*Int8Weight vs"):
        mixing.uniform_soup([e, {"w": jnp.ones((2, 2))}])
    with pytest.raises(ValueError, match="empty"):
        mixing.uniform_soup([])
    with pytest.raises(TypeError, match="sequence"):
        mixing.uniform_soup(a)  # one tree, not a list of them


# --------------------------------------------------------------------------------------------
# Greedy soup
# --------------------------------------------------------------------------------------------


def square_loss(tree):
    return float(np.sum(np.float64(tree["w"]) ** 2))


def test_greedy_soup_hand_example():
    # Own losses 1, 1, 9, 0.25. Start from #3 (0.5); +#0 -> 0.75 (0.5625, worse: skip);
    # +#1 -> -0.25 (0.0625, kept); +#2 -> 5/6 (0.69, worse: skip).
    trees = [{"w": jnp.asarray([v], jnp.float32)} for v in (1.0, -1.0, 3.0, 0.5)]
    soup, info = mixing.greedy_soup(trees, square_loss)
    assert info.losses == (1.0, 1.0, 9.0, 0.25)
    assert info.order == (3, 0, 1, 2)
    assert info.kept == (1, 3)
    assert info.loss == 0.0625
    np.testing.assert_array_equal(soup["w"], [-0.25])
    assert bits(soup) == bits(mixing.uniform_soup([trees[3], trees[1]]))


def test_greedy_soup_keeps_ties_skips_nan_and_passes_the_key():
    trees = [{"w": jnp.asarray([v], jnp.float32)} for v in (2.0, np.nan, 2.0)]
    calls = []

    def evaluate(tree, key):
        calls.append(key)
        return jnp.sum(tree["w"] ** 2)  # a jax scalar is fine

    key = jax.random.key(0)
    _, info = mixing.greedy_soup(trees, evaluate, key=key)
    assert len(calls) == 2 * len(trees) - 1 and all(k is key for k in calls)
    assert info.order == (0, 2, 1) and info.kept == (0, 2)  # a tie joins; NaN ranks last
    assert info.loss == 4.0
    with pytest.raises(TypeError, match="scalar"):
        mixing.greedy_soup(trees, lambda t: t["w"] ** 2)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.lists(st.floats(-4, 4, width=32), min_size=3, max_size=3), min_size=1, max_size=6),
    st.lists(st.floats(-2, 2, width=32), min_size=3, max_size=3),
)
def test_greedy_soup_is_never_worse_than_its_best_ingredient(ingredients, target):
    target = np.asarray(target, np.float64)
    trees = [
        {"w": jnp.asarray(w, jnp.float32), "b": jnp.asarray(w[:2], jnp.bfloat16)}
        for w in ingredients
    ]

    def evaluate(tree):
        return float(
            np.sum((np.float64(tree["w"]) - target) ** 2)
            + np.sum((np.float64(tree["b"]) - target[:2]) ** 2)
        )

    soup, info = mixing.greedy_soup(trees, evaluate)
    assert info.loss <= min(info.losses)
    assert evaluate(soup) == info.loss  # the loss reported is the soup's
    assert info.losses == tuple(evaluate(t) for t in trees)
    assert info.order[0] in info.kept and list(info.kept) == sorted(set(info.kept))
    assert sorted(info.order) == list(range(len(trees)))
    added = [i for i in info.order if i in info.kept]
    assert bits(soup) == bits(mixing.uniform_soup([trees[i] for i in added]))


# --------------------------------------------------------------------------------------------
# Merge
# --------------------------------------------------------------------------------------------


def test_merge_takes_each_leaf_from_the_tree_its_rule_names():
    trees = {"A": gpt_like(1.0), "B": gpt_like(2.0), "base": gpt_like(3.0)}
    merged = mixing.merge(trees, [(r"/attn/", "A"), (r"/mlp/", "B")], default="base")
    assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(trees["A"])
    chex.assert_trees_all_equal_dtypes(merged, trees["A"])
    sources = dict(leaves_with_paths(trees["A"])[0]), dict(leaves_with_paths(trees["B"])[0])
    for path, leaf in leaves_with_paths(merged)[0]:
        expected = 1.0 if "/attn/" in path else 2.0 if "/mlp/" in path else 3.0
        assert np.all(np.float32(leaf) == expected), path
        if expected == 1.0:
            assert leaf is sources[0][path]  # taken as is, not copied
    assert "blocks/0/attn/qkv/kernel" in dict(leaves_with_paths(merged)[0])

    # The first matching rule wins.
    merged = mixing.merge(trees, [(r"^blocks/0/", "A"), (r"kernel$", "B")], default="base")
    assert merged["blocks"][0]["mlp"]["fc"]["kernel"][0, 0] == 1.0
    assert merged["blocks"][1]["mlp"]["fc"]["kernel"][0, 0] == 2.0
    assert merged["blocks"][1]["attn"]["qkv"]["bias"][0] == 3.0


def test_merge_errors_and_warnings():
    trees = {"A": gpt_like(1.0), "B": gpt_like(2.0)}
    with pytest.raises(ValueError, match=r"blocks/0/mlp/fc/kernel"):
        mixing.merge(trees, [(r"attn|embed|ln", "A")])  # the MLP matches no rule
    with pytest.raises(ValueError, match=r"merge rule 1 .*'C'.*\['A', 'B'\]"):
        mixing.merge(trees, [("attn", "A"), ("mlp", "C")], default="B")
    with pytest.raises(ValueError, match=r"default='nope'"):
        mixing.merge(trees, [("attn", "A")], default="nope")
    with pytest.warns(UnusedRuleWarning, match="mpl"):
        mixing.merge(trees, [("attn", "A"), ("mpl", "B")], default="B")
    with pytest.raises(ValueError, match="mpl"):
        mixing.merge(trees, [("attn", "A"), ("mpl", "B")], default="B", strict=True)
    bad = gpt_like(2.0)
    bad["blocks"][0]["ln_1"]["scale"] = jnp.zeros(5)
    with pytest.raises(ValueError, match=r"trees\['B'\].*'blocks/0/ln_1/scale'"):
        mixing.merge({"A": trees["A"], "B": bad}, [("attn", "A")], default="B")
    with pytest.raises(TypeError, match="mapping"):
        mixing.merge([trees["A"]], [("attn", 0)])


def test_merge_flax_nnx_state():
    a = nnx_state(np.ones((2, 3), np.float32), np.ones(3, np.float32))
    b = nnx_state(np.zeros((2, 3), np.float32), np.zeros(3, np.float32))
    merged = mixing.merge({"a": a, "b": b}, [("kernel", "a")], default="b")
    assert type(merged) is type(a)
    np.testing.assert_array_equal(merged["kernel"][...], a["kernel"][...])
    np.testing.assert_array_equal(merged["bias"][...], b["bias"][...])


# --------------------------------------------------------------------------------------------
# Interpolation
# --------------------------------------------------------------------------------------------


def test_interpolate_ends_are_exact_in_every_dtype():
    a, b = mixed_tree(0), mixed_tree(1)
    # Magnitudes 1e-30..1e30 make a + (b - a) != b in fp32 for many elements.
    for t0, t1 in [(0.0, 1.0), (0, 1), (jnp.float32(0), jnp.float32(1))]:
        assert bits(mixing.interpolate(a, b, t0)) == bits(a)
        assert bits(mixing.interpolate(a, b, t1)) == bits(b)
    jitted = jax.jit(mixing.interpolate)
    assert bits(jitted(a, b, jnp.float32(0))) == bits(a)
    assert bits(jitted(a, b, jnp.float32(1))) == bits(b)


def test_interpolate_values_and_dtypes():
    a = {"w": jnp.asarray([0.0, 2.0, -4.0]), "h": jnp.asarray([0.0, 2.0], jnp.bfloat16)}
    b = {"w": jnp.asarray([1.0, 4.0, 4.0]), "h": jnp.asarray([1.0, 4.0], jnp.bfloat16)}
    mid = mixing.interpolate(a, b, 0.5)
    np.testing.assert_array_equal(mid["w"], [0.5, 3.0, 0.0])
    np.testing.assert_array_equal(np.float32(mid["h"]), [0.5, 3.0])
    assert mid["h"].dtype == jnp.bfloat16

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(2, 100)).astype(np.float32)
    for t in (0.1, 0.5, 0.7, 1.5):  # 1.5 extrapolates
        got = mixing.interpolate({"x": jnp.asarray(x)}, {"x": jnp.asarray(y)}, t)["x"]
        reference = (1 - t) * np.float64(x) + t * np.float64(y)
        # Rounding t, b - a, the product and the sum: a few ulps of the largest term.
        atol = 4 * F32_EPS * max(np.abs(x).max(), np.abs(y).max()) * max(1.0, abs(t))
        np.testing.assert_allclose(np.float64(got), reference, rtol=0, atol=atol)
    # Symmetric: (a, t) and (b, 1 - t) give the same bits.
    assert bits(mixing.interpolate(a, b, 0.25)) == bits(mixing.interpolate(b, a, 0.75))


def test_interpolate_takes_non_floating_leaves_from_the_nearer_end():
    a, b = mixed_tree(0), mixed_tree(1)
    for t, source in [(0.3, a), (0.7, b)]:
        out = mixing.interpolate(a, b, t)
        traced = jax.jit(mixing.interpolate)(a, b, jnp.float32(t))
        for name in ("count", "mask", "frozen"):
            assert bits(out[name]) == bits(source[name]), name
            assert bits(traced[name]) == bits(source[name]), name
        chex.assert_trees_all_equal_dtypes(out, a)
    with pytest.raises(ValueError, match="scalar"):
        mixing.interpolate(a, b, jnp.ones(2))
    with pytest.raises(ValueError, match=r"'f16'"):
        mixing.interpolate(a, {**b, "f16": b["f16"].astype(jnp.float32)}, 0.5)


def test_plain_python_number_leaves():
    a, b = {"x": 1.0, "n": 3, "flag": True}, {"x": 3.0, "n": 5, "flag": False}
    assert mixing.ema_update(mixing.ema_init(a), b, 0, decay=0.5)["x"] == 2.0
    assert mixing.uniform_soup([a, b]) == {"x": 2.0, "n": 3, "flag": True}
    assert mixing.interpolate(a, b, 0.75) == {"x": 2.5, "n": 5, "flag": False}
    assert mixing.merge({"a": a, "b": b}, [("x", "a")], default="b") == {**b, "x": 1.0}


# --------------------------------------------------------------------------------------------
# Sharding
# --------------------------------------------------------------------------------------------


def test_sharded_leaves_keep_their_sharding():
    # A fresh interpreter with 4 CPU devices: the device count is fixed when JAX starts.
    script = textwrap.dedent(
        """
        import jax, jax.numpy as jnp
        from jax.sharding import NamedSharding, PartitionSpec as P
        from hybrid_jax import mixing

        mesh = jax.make_mesh((4,), ("d",))
        s = NamedSharding(mesh, P("d"))
        a = {"w": jax.device_put(jnp.arange(8.0), s),
             "h": jax.device_put(jnp.arange(8.0).astype(jnp.bfloat16), s)}
        b = jax.tree_util.tree_map(lambda x: x + jnp.asarray(1, x.dtype), a)
        outs = [
            mixing.ema_init(a, dtype=jnp.float32),
            mixing.ema_update(a, b, 3, warmup_steps=10),
            jax.jit(mixing.ema_update)(a, b, jnp.int32(3)),
            mixing.uniform_soup([a, b]),
            mixing.merge({"a": a, "b": b}, [("w", "a"), ("h", "b")]),
            mixing.interpolate(a, b, 0.3),
        ]
        for out in outs:
            for x in jax.tree_util.tree_leaves(out):
                assert x.sharding.is_equivalent_to(s, x.ndim), x.sharding
        print("ok")
        """
    )
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]
