"""Dtype names and Policy: parsing (differential against jmp), presets, casts; RELIABILITY row 8."""

import dataclasses
import itertools

import chex
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import jmp
import numpy as np
import pytest
from hypothesis import given, settings

import hybrid_jax as hj
from hybrid_jax.precision import dtypes
from hybrid_jax.precision.dtypes import parse_dtype

# Every dtype name jmp documents, and its keys in long and short form.
_JMP_NAMES = [
    "full",
    "f32",
    "float32",
    "half",
    "f16",
    "float16",
    "bf16",
    "bfloat16",
    "f64",
    "float64",
]
_JMP_ACCEPTED = [
    *_JMP_NAMES,
    "p=f32,c=bf16,o=f32",
    "params=float32,compute=bfloat16,output=float32",
    "p=f32,c=f16,o=f32",
    "params=full,compute=half,output=full",
    "c=f16",
    "c=bf16",
    "c=half",
    "p=f16,c=f16",
    "p=f16,c=bf16",
    "p=bf16",
    "params=bfloat16",
    "o=f16",
    "output=bf16",
    "compute=float16,output=float32",
    "p=f64,c=f32",
    "o=f32,c=bf16,p=f32",
    "p=full,o=half",
    "p=float16,c=float32,o=bfloat16",
    "params=f32,c=bf16",
    "c=f32,o=bf16",
    "p=half,c=half,o=half",
    "compute=bfloat16",
    "p=f32",
    "p=bf16,c=f32,o=f16",
]


@pytest.mark.parametrize("spec", _JMP_ACCEPTED)
def test_parse_gives_jmps_dtypes_for_every_string_jmp_accepts(spec):
    ours, theirs = hj.Policy.parse(spec), jmp.get_policy(spec)
    for field in ("param_dtype", "compute_dtype", "output_dtype"):
        assert getattr(ours, field) == np.dtype(getattr(theirs, field)), (spec, field)


def test_the_table_is_long_enough():
    assert len(_JMP_ACCEPTED) >= 30


# RELIABILITY row 8: each bad string is one ValueError quoting the bad token and the grammar.
_REJECTED = {
    "": "the string is empty",
    "f": "unknown dtype 'f'",
    "float": "unknown dtype 'float'",
    "c=f16=f32": "item 'c=f16=f32' is not of the form key=dtype",
    "c=bf16,": "an empty item (a stray comma?)",
    ",c=bf16": "an empty item (a stray comma?)",
    " c=bf16": "unknown key ' c'",
    "c=bf16 ": "unknown dtype 'bf16 '",
    "P=F32": "unknown key 'P'",
    "p=F32": "unknown dtype 'F32'",
    "x=f32": "unknown key 'x'",
    "param=f32": "unknown key 'param'",
    "p=e4m3": "param_dtype cannot be e4m3",
    "p=bf16,update=up": "update='up' is not a rounding",
    "p=f32,update=sr": "update=stochastic needs params in bf16",
    "p=bf16,master=f32,update=kahan": "exclude each other",
    "master=f32": "a master copy must be wider than bf16/f16 params",
    "p=bf16,mu=e4m3": "mu_dtype cannot be e4m3",
    "p=bf16,nu=int8,nu=bf16": "sets nu_dtype a second time",
    "int32": "unknown dtype 'int32'",
    "c=f32;o=f32": "item 'c=f32;o=f32' is not of the form key=dtype",
    "p=f32,c": "item 'c' is not of the form key=dtype",
}


@pytest.mark.parametrize(("spec", "expected"), list(_REJECTED.items()))
def test_bad_strings_are_one_clear_value_error(spec, expected):
    with pytest.raises(ValueError) as err:
        hj.Policy.parse(spec)
    message = str(err.value)
    assert expected in message
    assert repr(spec) in message and "Grammar:" in message
    with pytest.raises(Exception):  # noqa: B017 - jmp rejects them all too, some with raw errors
        jmp.get_policy(spec)


def test_repeated_key_is_rejected_where_jmp_keeps_the_last():
    # A deliberate deviation from jmp (RELIABILITY row 8): "p=f32,p=bf16" is surely a typo.
    assert jmp.get_policy("p=f32,p=bf16").param_dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="sets param_dtype a second time"):
        hj.Policy.parse("p=f32,p=bf16")
    with pytest.raises(ValueError, match="sets compute_dtype a second time"):
        hj.Policy.parse("c=f16,compute=f16")


def test_presets():
    expected = {
        "fp32": ("f32", "f32", "f32"),
        "bf16-mixed": ("f32", "bf16", "f32"),
        "fp16-mixed": ("f32", "f16", "f32"),
        "bf16-pure": ("bf16", "bf16", "bf16"),
        "fp8-mixed": ("f32", "e4m3", "f32"),
    }
    for name, names in expected.items():
        policy = hj.Policy.parse(name)
        assert (policy.param_dtype, policy.compute_dtype, policy.output_dtype) == tuple(
            map(parse_dtype, names)
        )
        assert policy.carrier_dtype == jnp.bfloat16


def test_every_documented_dtype_name():
    groups = {
        jnp.float32: ["float32", "f32", "fp32", "full"],
        jnp.bfloat16: ["bfloat16", "bf16"],
        jnp.float16: ["float16", "f16", "fp16", "half"],  # half: f16 off TPU, as jmp
        jnp.float8_e4m3fn: ["float8_e4m3fn", "fp8_e4m3", "e4m3"],
        jnp.float8_e5m2: ["float8_e5m2", "fp8_e5m2", "e5m2"],
        jnp.int8: ["int8"],
        jnp.float64: ["float64", "f64"],
    }
    for dtype, names in groups.items():
        for name in names:
            assert parse_dtype(name) == np.dtype(dtype), name
        assert parse_dtype(dtype) == np.dtype(dtype)


def test_unknown_dtype_lists_the_accepted_names():
    with pytest.raises(ValueError, match="unknown dtype 'fp4'; accepted names: f32, float32"):
        parse_dtype("fp4")
    with pytest.raises(ValueError, match="unsupported dtype int32"):
        parse_dtype(jnp.int32)
    with pytest.raises(ValueError, match="unknown dtype 'fp4'"):
        hj.Policy("f32", "fp4", "f32")


_POLICIES = st.builds(
    hj.Policy,
    st.sampled_from(sorted(dtypes.FLOATING, key=str)),
    st.sampled_from(sorted(dtypes.FLOATING | dtypes.QUANTIZED, key=str)),
    st.sampled_from(sorted(dtypes.FLOATING, key=str)),
    st.sampled_from(sorted(dtypes.FLOATING, key=str)),
)


@settings(max_examples=200, deadline=None)
@given(_POLICIES)
def test_str_parses_back_to_an_equal_policy(policy):
    again = hj.Policy.parse(str(policy))
    assert again == policy and hash(again) == hash(policy)
    assert eval(repr(policy), {"Policy": hj.Policy}) == policy


def test_policy_is_frozen_hashable_and_a_valid_static_argument():
    policy = hj.Policy.parse("bf16-mixed")
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.compute_dtype = jnp.float16
    assert len({policy, hj.Policy("f32", "bf16", "f32"), hj.Policy.parse("p=f32,c=bf16")}) == 2

    cast = jax.jit(lambda x, p: p.cast_to_compute(x), static_argnums=1)
    assert cast(jnp.ones(2), policy).dtype == jnp.bfloat16


def test_only_compute_may_be_quantized():
    assert hj.Policy("f32", "int8", "f32").compute_dtype == jnp.int8
    for bad in [("e4m3", "f32", "f32"), ("f32", "f32", "e4m3"), ("f32", "e5m2", "f32", "e5m2")]:
        with pytest.raises(ValueError, match="only compute_dtype may be fp8 or int8"):
            hj.Policy(*bad)
    # A quantized compute's output defaults to the carrier that holds its values.
    assert hj.Policy.parse("c=e4m3").output_dtype == jnp.bfloat16
    assert hj.Policy.parse("c=e4m3,carrier=f32").output_dtype == jnp.float32


def _mixed_tree():
    return {
        "f32": jnp.linspace(-3, 3, 7, dtype=jnp.float32),
        "f16": jnp.ones(3, jnp.float16),
        "bf16": jnp.full((2, 2), 0.1, jnp.bfloat16),
        "np": np.arange(4, dtype=np.float32) / 3,
        "int": jnp.arange(3),
        "bool": jnp.array([True, False]),
        "py_float": 0.5,
        "none": None,
    }


def _dtypes(tree):
    return jax.tree_util.tree_map(lambda x: getattr(x, "dtype", type(x)), tree)


@pytest.mark.parametrize(
    "spec", ["p=f32,c=bf16,o=f32", "p=f32,c=f16,o=f32", "half", "p=bf16,c=f32", "f64", "full"]
)
@pytest.mark.parametrize("which", ["param", "compute", "output"])
@pytest.mark.filterwarnings("ignore:Explicitly requested dtype float64")  # no x64: jmp alike
def test_casts_match_jmp(spec, which):
    ours = getattr(hj, f"cast_to_{which}")(_mixed_tree(), spec)
    theirs = getattr(jmp.get_policy(spec), f"cast_to_{which}")(_mixed_tree())
    assert _dtypes(ours) == _dtypes(theirs)
    chex.assert_trees_all_equal(ours, theirs)
    method = getattr(hj.Policy.parse(spec), f"cast_to_{which}")(_mixed_tree())
    chex.assert_trees_all_equal(method, ours)


def test_casts_leave_integers_booleans_and_python_scalars_untouched():
    tree = _mixed_tree()
    out = hj.cast_to_compute(tree, "bf16-mixed")
    for key in ("int", "bool", "py_float", "none"):
        assert out[key] is tree[key]
    assert {out[k].dtype for k in ("f32", "f16", "bf16", "np")} == {np.dtype(jnp.bfloat16)}


def test_casts_leave_complex_alone_and_give_abstract_leaves_the_abstract_cast():
    tree = {
        "c": jnp.ones(2, jnp.complex64),
        "w": jax.ShapeDtypeStruct((4, 3), jnp.float32),
        "n": jax.ShapeDtypeStruct((), jnp.int32),
    }
    out = hj.cast_to_compute(tree, "bf16-mixed")
    assert out["c"] is tree["c"] and out["n"] is tree["n"]
    assert out["w"] == jax.ShapeDtypeStruct((4, 3), jnp.bfloat16)
    stored = hj.cast_to_param(tree, hj.Policy("int8", "bf16", "f32"))["w"]
    assert stored.codes == jax.ShapeDtypeStruct((4, 3), jnp.int8)


_BIG = float(np.float32(3e38))  # below bf16's largest finite value, so nothing rounds to inf
_finite_f32 = st.floats(min_value=-_BIG, max_value=_BIG, width=32).filter(
    lambda v: v == 0 or abs(v) >= 1.2e-38
)  # normal range: the bound below is relative


@settings(max_examples=100, deadline=None)
@given(st.lists(_finite_f32, min_size=1, max_size=64))
def test_f32_to_bf16_round_trip_is_within_half_a_bf16_ulp(values):
    x = np.asarray(values, np.float32)
    back = np.asarray(hj.cast_to_param(hj.cast_to_compute(x, "bf16-mixed"), "bf16-mixed"))
    assert back.dtype == np.float32
    # bf16 keeps 8 significant bits: round to nearest is within 2^-8 of |x| (relative).
    np.testing.assert_array_less(np.abs(back.astype(np.float64) - x), 2.0**-8 * np.abs(x) + 1e-45)


def test_quantized_compute_cast_is_carried_in_bf16_with_a_straight_through_gradient():
    x = jnp.asarray(np.random.default_rng(0).normal(0, 0.02, (64,)), jnp.float32)
    policy = hj.Policy.parse("fp8-mixed")

    def loss(x):
        return jnp.sum(policy.cast_to_compute(x).astype(jnp.float32) * jnp.arange(64.0))

    y = jax.jit(policy.cast_to_compute)(x)
    assert y.dtype == jnp.bfloat16
    grad = jax.jit(jax.grad(loss))(x)
    assert grad.dtype == jnp.float32
    np.testing.assert_array_equal(grad, np.arange(64.0, dtype=np.float32))


def test_all_combinations_of_keys_and_aliases_agree_with_jmp():
    keys = {
        "param_dtype": ["p", "params"],
        "compute_dtype": ["c", "compute"],
        "output_dtype": ["o", "output"],
    }
    for (pk, ck), (pv, cv) in itertools.product(
        itertools.product(keys["param_dtype"], keys["compute_dtype"]),
        [("f32", "bf16"), ("float16", "float32"), ("bfloat16", "half")],
    ):
        spec = f"{pk}={pv},{ck}={cv}"
        theirs = jmp.get_policy(spec)
        assert hj.Policy.parse(spec).compute_dtype == np.dtype(theirs.compute_dtype), spec
        assert hj.Policy.parse(spec).output_dtype == np.dtype(theirs.output_dtype), spec


def test_optimizer_keys_extend_the_grammar_and_round_trip():
    lean = hj.Policy.parse("p=bf16,c=fp8_e4m3,master=none,mu=bf16,nu=int8,update=sr")
    assert (lean.param_dtype, lean.compute_dtype, lean.output_dtype) == (
        jnp.bfloat16,
        jnp.float8_e4m3fn,
        jnp.bfloat16,  # a quantized compute's output follows the carrier
    )
    assert (lean.master_dtype, lean.mu_dtype, lean.nu_dtype) == (None, jnp.bfloat16, jnp.int8)
    assert lean.update == "stochastic"
    assert str(lean) == "p=bf16,c=e4m3,o=bf16,mu=bf16,nu=int8,update=stochastic"
    for spec in [
        "p=bf16,master=f32",
        "p=f16,c=f16,update=kahan,grad=f16",
        "bf16-lean",
        "bf16-pure-sr",
        "p=int8,c=bf16",
    ]:
        policy = hj.Policy.parse(spec)
        assert hj.Policy.parse(str(policy)) == policy
    # jmp's strings keep meaning what they meant: no optimizer fields appear.
    assert (
        str(hj.Policy.parse("params=float32,compute=bfloat16,output=float32"))
        == "p=f32,c=bf16,o=f32"
    )


def test_int8_params_are_stored_as_int8_weights():
    from hybrid_jax.precision.storage import Int8Weight

    tree = {"w": jnp.array([[0.5, -0.01], [0.25, 0.02]]), "b": jnp.ones(2)}
    rules = hj.PrecisionRules([("w", "p=int8,c=bf16")], default="fp32")
    stored = hj.cast_to_param(tree, rules)
    assert isinstance(stored["w"], Int8Weight) and stored["b"].dtype == jnp.float32
    assert hj.cast_to_param(stored, rules)["w"] is stored["w"]  # idempotent
    compute = hj.cast_to_compute(stored, rules)
    assert compute["w"].dtype == jnp.bfloat16
    np.testing.assert_allclose(compute["w"], tree["w"], rtol=2**-8, atol=0.5 * 0.5 / 127)
    # The summary counts codes and per-channel scales: 4 bytes + 2 x 4 bytes.
    assert "12 B" in str(rules.summary(stored))
