"""PrecisionRules: per-leaf plans, summaries and the casts they drive."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import hybrid_jax as hj
from hybrid_jax.precision import plan


def _dtype_names(tree):
    return jax.tree_util.tree_map(lambda x: x.dtype.name, tree)


_RULES = hj.PrecisionRules(
    [(r"embed", "fp32"), (r"(^|/)ln_", "fp32"), (r"mlp/", "fp8-mixed")], default="bf16-mixed"
)


def test_plan_is_shaped_like_the_tree_and_follows_first_match(gpt_tree):
    policies = _RULES.plan(gpt_tree)
    assert jax.tree_util.tree_structure(
        policies, is_leaf=lambda x: isinstance(x, hj.Policy)
    ) == jax.tree_util.tree_structure(gpt_tree)
    assert policies["tok_embed"]["embedding"] == hj.Policy.parse("fp32")
    assert policies["blocks"][1]["ln_2"]["scale"] == hj.Policy.parse("fp32")
    assert policies["blocks"][0]["mlp"]["fc"]["kernel"] == hj.Policy.parse("fp8-mixed")
    assert policies["blocks"][0]["attn"]["qkv"]["kernel"] == hj.Policy.parse("bf16-mixed")
    assert policies["lm_head"]["kernel"] == hj.Policy.parse("bf16-mixed")


def test_cast_to_compute_gives_each_leaf_its_dtype_under_jit(gpt_tree):
    out = jax.jit(lambda t: hj.cast_to_compute(t, _RULES))(gpt_tree)
    names = _dtype_names(out)
    assert names["tok_embed"]["embedding"] == "float32"
    assert names["blocks"][0]["ln_1"]["bias"] == "float32"
    assert names["blocks"][0]["mlp"]["fc"]["kernel"] == "bfloat16"  # fp8 values, bf16 carrier
    assert names["blocks"][0]["attn"]["proj"]["kernel"] == "bfloat16"
    # The fp8 leaf holds values of the scaled e4m3 grid: at most 16 distinct magnitudes / octave.
    fc = np.asarray(out["blocks"][0]["mlp"]["fc"]["kernel"].astype(jnp.float32))
    ref = hj.precision.quantize_dequantize(gpt_tree["blocks"][0]["mlp"]["fc"]["kernel"], "e4m3")
    np.testing.assert_array_equal(fc, np.asarray(ref.astype(jnp.float32)))
    # Back to the param dtype: f32 everywhere.
    assert set(jax.tree_util.tree_leaves(_dtype_names(hj.cast_to_param(out, _RULES)))) == {
        "float32"
    }


def test_policy_string_plan_and_rules_are_interchangeable(gpt_tree):
    via_rules = hj.cast_to_compute(gpt_tree, _RULES)
    via_plan = hj.cast_to_compute(gpt_tree, _RULES.plan(gpt_tree))
    chex.assert_trees_all_equal(via_rules, via_plan)
    uniform = hj.PrecisionRules([], default="bf16-mixed")
    chex.assert_trees_all_equal(
        hj.cast_to_compute(gpt_tree, uniform), hj.cast_to_compute(gpt_tree, "bf16-mixed")
    )
    chex.assert_trees_all_equal(
        hj.cast_to_output(gpt_tree, hj.Policy.parse("c=bf16")),
        hj.Policy.parse("c=bf16").cast_to_output(gpt_tree),
    )
    assert plan(gpt_tree, "fp32")["ln_f"]["bias"] == hj.Policy.parse("fp32")


def test_a_plan_that_does_not_fit_the_tree_is_an_error_naming_paths(gpt_tree):
    policies = _RULES.plan(gpt_tree)
    del gpt_tree["lm_head"]
    with pytest.raises(ValueError, match=r"policies without a leaf \['lm_head/kernel'\]"):
        hj.cast_to_compute(gpt_tree, policies)


def test_rules_on_nnx_state_cast_its_variables():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Embed(10, 4, rngs=rngs)
            self.fc = nnx.Linear(4, 4, rngs=rngs)

    state = nnx.state(Net(nnx.Rngs(0)), nnx.Param)
    rules = hj.PrecisionRules([(r"^embed/", "fp32"), (r"^fc/", "bf16-mixed")], strict=True)
    out = hj.cast_to_compute(state, rules)
    assert type(out) is type(state)
    assert out["embed"]["embedding"][...].dtype == jnp.float32
    assert out["fc"]["kernel"][...].dtype == jnp.bfloat16
    assert "fc/kernel" in str(rules.summary(state))


def test_summary_lists_every_leaf_with_bytes_at_rest_and_a_total(gpt_tree):
    table = hj.PrecisionRules([(r"embed", "bf16-pure")], default="fp32").summary(gpt_tree)
    paths = table.column("path")
    assert len(paths) == len(jax.tree_util.tree_leaves(gpt_tree))
    embed_row = table.rows[paths.index("tok_embed/embedding")]
    n_embed = 11 * 8 + 6 * 8
    n_total = sum(x.size for x in jax.tree_util.tree_leaves(gpt_tree))
    assert table.footer[-1][2] == n_total
    # Embeddings at rest in bf16 (2 bytes), the rest in f32 (4 bytes).
    expected_bytes = 2 * n_embed + 4 * (n_total - n_embed)
    assert table.footer[-1][-1] == f"{expected_bytes / 1024:.1f} KiB"
    assert embed_row[3:] == ("embed", "bf16", "bf16", "bf16", "176 B")
    text, html = str(table), table._repr_html_()
    assert text.splitlines()[0].split() == list(table.columns)
    assert "total" in text.splitlines()[-1]
    assert html.startswith("<table>") and "<tfoot>" in html and "blocks/0/attn/qkv/kernel" in html


def test_summary_works_on_shapes_alone_and_shows_non_float_leaves_as_they_are():
    shapes = jax.eval_shape(
        lambda: {"w": jnp.zeros((1000, 1000)), "step": jnp.zeros((), jnp.int32)}
    )
    table = hj.PrecisionRules([(r"w", "bf16-pure")], default="fp32").summary(shapes)
    assert table.rows[0][4:] == ("int32", "int32", "int32", "4 B")
    assert table.rows[1][1:3] == ((1000, 1000), 1_000_000)
    assert table.rows[1][-1] == "1.9 MiB"


def test_bad_rules_are_errors_that_name_the_rule(gpt_tree):
    bad_policy = r"precision rule 1 \('mlp/'\): cannot parse policy 'bf17'"
    with pytest.raises(ValueError, match=bad_policy):
        hj.PrecisionRules([(r"attn", "bf16-mixed"), (r"mlp/", "bf17")])
    with pytest.raises(ValueError, match=r"precision rule 0: pattern 'mlp/\[' is not a valid"):
        hj.PrecisionRules([(r"mlp/[", "bf16-mixed")])
    with pytest.raises(TypeError, match=r"precision rule 0 \('mlp'\): a policy is a Policy or"):
        hj.PrecisionRules([(r"mlp", jnp.bfloat16)])
    with pytest.raises(ValueError, match="match no precision rule") as err:
        hj.PrecisionRules([(r"attn", "bf16-mixed")]).plan(gpt_tree)
    assert "21 leaves match" in str(err.value) and "blocks/0/ln_1/bias" in str(err.value)


def test_unused_rules_warn_and_strict_rules_raise(gpt_tree):
    rules = [(r"atention", "bf16-mixed")]  # misspelled
    with pytest.warns(hj.UnusedRuleWarning, match="'atention'"):
        hj.PrecisionRules(rules, default="fp32").plan(gpt_tree)
    with pytest.raises(ValueError, match=r"'atention'.*matches no leaf"):
        hj.PrecisionRules(rules, default="fp32", strict=True).plan(gpt_tree)


def test_rules_are_hashable_and_a_valid_static_argument(gpt_tree):
    again = hj.PrecisionRules(
        [(r"embed", "fp32"), (r"(^|/)ln_", "p=f32,c=f32,o=f32"), (r"mlp/", "fp8-mixed")],
        default="params=float32,compute=bfloat16,output=float32",
    )
    assert again == _RULES and hash(again) == hash(_RULES)
    cast = jax.jit(hj.cast_to_compute, static_argnums=1)
    chex.assert_trees_all_equal(cast(gpt_tree, _RULES), hj.cast_to_compute(gpt_tree, _RULES))
