"""Model merging (hybrid_jax.mixing.merging): path-wise merge and interpolation.

Numerics are checked against float64 NumPy references, with each tolerance derived next to it;
"bitwise" means the bytes of every leaf are equal.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _mixing_trees import F32_EPS, bits, gpt_like, mixed_tree, nnx_state

from hybrid_jax import mixing
from hybrid_jax.tree import UnusedRuleWarning, leaves_with_paths


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


# --- Interpolation ---------------------------------------------------------------------------


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
