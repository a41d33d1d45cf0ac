"""Leaf paths and rule matching (hybrid_jax.tree); RELIABILITY rows 9 and 10."""

import dataclasses
import re
import typing
import warnings

import flax.struct
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings

from hybrid_jax import tree as tree_lib
from hybrid_jax.precision import Int8Weight
from hybrid_jax.tree import UnusedRuleWarning, assign, compile_rules, tree_paths


class Pair(typing.NamedTuple):
    first: jnp.ndarray
    second: jnp.ndarray


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Registered:
    weight: jnp.ndarray
    n: int = dataclasses.field(default=3, metadata={"static": True})


@flax.struct.dataclass
class FlaxStruct:
    kernel: jnp.ndarray


def paths(tree):
    return [path for path, _ in tree_lib.leaves_with_paths(tree)[0]]


def test_paths_of_every_container_kind():
    tree = {
        "dict": {"a": 1.0},
        "ints": {7: 2.0},
        "list": [1.0, (2.0, 3.0)],
        "nt": Pair(jnp.ones(1), jnp.ones(1)),
        "dc": Registered(jnp.ones(2)),
        "fs": FlaxStruct(jnp.ones(1)),
        "none": None,  # no leaf, no path
    }
    assert sorted(paths(tree)) == sorted(
        [
            "dict/a",
            "ints/7",
            "list/0",
            "list/1/0",
            "list/1/1",
            "nt/first",
            "nt/second",
            "dc/weight",
            "fs/kernel",
        ]
    )


class _Block(nnx.Module):
    def __init__(self, rngs):
        self.qkv = nnx.Linear(4, 12, rngs=rngs)
        self.ln = nnx.LayerNorm(4, rngs=rngs)


class _Net(nnx.Module):
    def __init__(self, rngs):
        self.tok_embed = nnx.Embed(10, 4, rngs=rngs)
        self.blocks = nnx.List([_Block(rngs) for _ in range(2)])


def test_nnx_state_paths_are_the_state_keys():
    state = nnx.state(_Net(nnx.Rngs(0)), nnx.Param)
    # NNX keeps arrays in Variable.value; the path drops that step, matching the State's keys.
    expected = sorted("/".join(map(str, key)) for key, _ in nnx.to_flat_state(state))
    assert sorted(paths(state)) == expected
    assert "blocks/0/qkv/kernel" in expected and "tok_embed/embedding" in expected


def test_tree_paths_keeps_the_structure():
    tree = {"b": [Pair(1.0, 2.0)], "a": {"x": 3.0}}
    got = tree_paths(tree)
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(tree)
    assert got == {"b": [Pair("b/0/first", "b/0/second")], "a": {"x": "a/x"}}


def test_first_matching_rule_wins(gpt_tree):
    rules = [(r"attn/", "attention"), (r"kernel$", "matrix"), (r".*", "other")]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every rule decides some leaf: nothing to report
        labels = assign(rules, gpt_tree)
    assert labels["blocks"][0]["attn"]["qkv"]["kernel"] == "attention"
    assert labels["blocks"][0]["mlp"]["fc"]["kernel"] == "matrix"
    assert labels["ln_f"]["scale"] == "other"


def test_re_search_matches_anywhere_anchor_to_avoid_it():
    tree = {"ln_f": {"weight": 1.0}, "w": 2.0}
    # Documented surprise: "w" is searched, not matched whole, so it also takes ln_f/weight.
    assert assign([("w", "hit")], tree) == {"ln_f": {"weight": "hit"}, "w": "hit"}
    assert assign([(r"(^|/)w$", "hit")], tree, default="miss") == {
        "ln_f": {"weight": "miss"},
        "w": "hit",
    }


def test_unmatched_leaf_is_an_error_naming_path_and_patterns(gpt_tree):
    rules = [(r"embed", 1), (r"attn/", 2), (r"mlp/", 3), (r"lm_head", 4)]
    with pytest.raises(ValueError) as err:
        assign(rules, gpt_tree)
    message = str(err.value)
    assert "ln_f/scale" in message and "blocks/1/ln_2/bias" in message
    assert "'attn/'" in message and "default=" in message
    assert assign(rules, gpt_tree, default=0)["ln_f"]["scale"] == 0


def test_misspelled_pattern_on_the_gpt_tree_warns_or_errors(gpt_tree):
    rules = [(r"atn/", "bf16"), (r".", "f32")]  # "atn" is a typo for "attn"
    with pytest.warns(UnusedRuleWarning, match=r"rule 0 \('atn/'\) matches no leaf"):
        assign(rules, gpt_tree)
    with pytest.raises(ValueError, match=r"'atn/'\) matches no leaf"):
        assign(rules, gpt_tree, strict=True)


def test_shadowed_rule_is_reported_as_deciding_nothing(gpt_tree):
    rules = [(r"kernel", "a"), (r"attn/qkv/kernel", "b"), (r".", "c")]
    with pytest.warns(UnusedRuleWarning, match=r"rule 1 .* only leaves that earlier rules take"):
        assign(rules, gpt_tree)


def test_strict_lists_a_leaf_and_both_rules_it_matches():
    tree = {"attn": {"kernel": 1.0}, "mlp": {"bias": 2.0}}
    rules = [(r"attn", "a"), (r"kernel", "b"), (r"bias", "c")]
    with pytest.raises(ValueError) as err:
        assign(rules, tree, strict=True)
    message = str(err.value)
    assert "leaf 'attn/kernel' matches rule 0 ('attn'), rule 1 ('kernel')" in message
    # Without strict the first match wins and rule 1, which decides nothing, is reported.
    with pytest.warns(UnusedRuleWarning, match="rule 1"):
        assert assign(rules, tree)["attn"]["kernel"] == "a"
    # Disjoint rules plus a default are strict-clean.
    assert assign([(r"attn", "a")], tree, default="z", strict=True) == {
        "attn": {"kernel": "a"},
        "mlp": {"bias": "z"},
    }


@pytest.mark.parametrize(
    ("rules", "error", "match"),
    [
        ([("blocks/(", 1)], ValueError, r"rule 0: pattern 'blocks/\(' is not a valid regular"),
        ([(3, 1)], TypeError, r"rule 0: the pattern must be a string"),
        ([("a", 1, 2)], TypeError, r"rule 0 must be a \(pattern, value\) pair"),
        ({"a": 1}, TypeError, r"ordered list of \(pattern, value\) pairs, got dict"),
        ("a", TypeError, r"ordered list of \(pattern, value\) pairs, got str"),
    ],
)
def test_bad_rules_are_clear_errors(rules, error, match):
    with pytest.raises(error, match=match):
        compile_rules(rules)


def test_assign_works_under_jit_on_traced_leaves():
    @jax.jit
    def scaled(tree):
        factors = assign([(r"^a", 2.0)], tree, default=1.0)
        return jax.tree_util.tree_map(lambda f, x: f * x, factors, tree)

    out = scaled({"a": jnp.ones(2), "b": jnp.ones(2)})
    assert out["a"].tolist() == [2.0, 2.0] and out["b"].tolist() == [1.0, 1.0]


_names = st.text(alphabet="abcxyz_0123456789", min_size=1, max_size=6)
_trees = st.recursive(
    st.just(0.0),
    lambda children: (
        st.dictionaries(_names, children, min_size=1, max_size=4)
        | st.lists(children, min_size=1, max_size=3)
    ),
    max_leaves=20,
)


@settings(max_examples=60, deadline=None)
@given(_trees)
def test_paths_are_unique_and_an_anchored_rule_picks_exactly_its_leaf(tree):
    leaf_paths = paths(tree)
    assert len(set(leaf_paths)) == len(leaf_paths)
    target = leaf_paths[len(leaf_paths) // 2]
    labels = assign([("^" + re.escape(target) + "$", "hit")], tree, default="miss")
    hits = [
        p
        for p, label in zip(leaf_paths, jax.tree_util.tree_leaves(labels), strict=True)
        if label == "hit"
    ]
    assert hits == [target]


_FLOAT_DTYPES = ["float64", "float32", "bfloat16", "float16", "float8_e4m3fn", "float8_e5m2"]
_OTHER_DTYPES = ["complex64", "complex128", "int8", "int32", "uint8", "bool"]


@pytest.mark.parametrize("dtype", _FLOAT_DTYPES + _OTHER_DTYPES)
def test_is_float_leaf_is_the_dtype_being_real_floating(dtype):
    want = dtype in _FLOAT_DTYPES
    dtype = jnp.dtype(dtype)
    leaves = [
        np.zeros(2, dtype),
        np.zeros((), dtype)[()],  # a NumPy scalar
        jax.ShapeDtypeStruct((2, 3), dtype),
    ]
    # Without jax_enable_x64 a jax array of a 64-bit dtype would be narrowed.
    if dtype not in (jnp.float64, jnp.complex128):
        leaves.append(jnp.zeros(2, dtype))
        # A traced leaf is asked the same question.
        assert jax.jit(tree_lib.is_float_leaf)(jnp.zeros(2, dtype)) == want
    assert [tree_lib.is_float_leaf(x) for x in leaves] == [want] * len(leaves)


@pytest.mark.parametrize("leaf", [1.0, 1, True, 1j, None, "w"])
def test_python_values_are_not_float_leaves(leaf):
    assert not tree_lib.is_float_leaf(leaf)


def test_a_compound_leaf_is_not_a_float_leaf():
    assert not tree_lib.is_float_leaf(Int8Weight.quantize(jnp.ones((2, 3))))
