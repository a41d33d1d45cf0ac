"""Model soups (hybrid_jax.mixing.soups): the uniform mean and the greedy soup.

Numerics are checked against float64 NumPy references, with each tolerance derived next to it;
"bitwise" means the bytes of every leaf are equal.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _mixing_trees import BF16_EPS, F32_EPS, bits, gpt_like, mixed_tree
from hypothesis import given, settings
from hypothesis import strategies as st

from hybrid_jax import mixing
from hybrid_jax.precision.storage import Int8Weight


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


# --- Greedy soup -----------------------------------------------------------------------------


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
