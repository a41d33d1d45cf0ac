"""Bring your own model: precision rules reach the matmuls of a user's standard Flax layers
(``nnx.Linear`` through quantize_matmuls, Linen ``nn.Dense`` through quantize_linen_matmuls)
with the numerics of the bundled GPT's hook, and a layer they cannot reach is an error."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hybrid_jax.diagnostics import audit, expected_from_plan, hlo_dots
from hybrid_jax.models import ScopedDot, quantize_linen_matmuls, quantize_matmuls
from hybrid_jax.precision import (
    PrecisionRules,
    cast_to_compute,
    fp8_dot_general,
    int8_dot_general,
    plan,
)

BF16, E4M3 = np.dtype(jnp.bfloat16), np.dtype(jnp.float8_e4m3fn)
# Linen layers promote input and kernel together: under strict promotion init on fp32 inputs.
X32 = jax.ShapeDtypeStruct((4, 8), jnp.float32)
DIMS = (((1,), (0,)), ((), ()))
X = jax.random.normal(jax.random.key(1), (4, 8), jnp.float32).astype(jnp.bfloat16)
NNX_RULES = PrecisionRules([(r"layers/0/", "fp8-mixed")], default="bf16-mixed")
LINEN_RULES = PrecisionRules([(r"Dense_0/", "fp8-mixed")], default="bf16-mixed")


class NnxMLP(nnx.Module):
    """A user's own NNX model: two ``nnx.Linear`` in a list (paths ``layers/0``, ``layers/1``)."""

    def __init__(self, rngs: nnx.Rngs):
        self.layers = nnx.List([nnx.Linear(8, 16, rngs=rngs), nnx.Linear(16, 4, rngs=rngs)])

    def __call__(self, x):
        return self.layers[1](jax.nn.relu(self.layers[0](x)))


class LinenMLP(nn.Module):
    """A user's own Linen model: ``Dense_0`` then ``Dense_1``."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(4)(nn.relu(nn.Dense(16)(x)))


def _loss(y):
    return jnp.mean(jnp.square(y.astype(jnp.float32)))


def _check_audit(compiled, expected, fp8_layer, bf16_layer):
    table = audit(compiled, expected)
    assert not any(table.column("mismatch"))
    assert table.footer[-1][-1] == 0
    dots = hlo_dots(compiled, layers=expected)
    [fp8] = [d for d in dots if d.layer == fp8_layer and d.pass_ == "forward"]
    assert fp8.source_dtypes == (E4M3, E4M3)
    [bf16] = [d for d in dots if d.layer == bf16_layer and d.pass_ == "forward"]
    assert bf16.source_dtypes == (BF16, BF16)
    # Backward: e5m2 gradients times the e4m3 operands kept from the forward.
    backward = [d for d in dots if d.layer == fp8_layer and d.pass_ == "backward"]
    assert backward and all("float8_e5m2" in {s.name for s in d.source_dtypes} for d in backward)


def test_nnx_linear_rules_reach_the_compiled_matmul():
    model = NnxMLP(nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    expected = expected_from_plan(plan(params, NNX_RULES))
    assert expected == {"layers/0": E4M3, "layers/1": BF16}
    cast_plan = quantize_matmuls(model, NNX_RULES)
    assert cast_plan["layers"][0]["kernel"].get_value().compute_dtype == BF16
    graphdef = nnx.graphdef(model)

    def loss(params, x):
        return _loss(nnx.merge(graphdef, cast_to_compute(params, cast_plan))(x))

    compiled = jax.jit(jax.value_and_grad(loss)).lower(params, X).compile()
    _check_audit(compiled, expected, "layers/0", "layers/1")


def test_nnx_linear_computes_what_the_gpt_hook_computes():
    model = NnxMLP(nnx.Rngs(0))
    rules = PrecisionRules(
        [(r"layers/0/", "fp8-mixed"), (r"layers/1/", "p=f32,c=int8,o=f32")], default="bf16-mixed"
    )
    cast_plan = quantize_matmuls(model, rules)
    nnx.update(model, cast_to_compute(nnx.state(model, nnx.Param), cast_plan))
    first, second = model.layers
    assert first.dot_general == ScopedDot(first.dot_general.dot, "layers/0")
    h = first(X)
    np.testing.assert_array_equal(h, fp8_dot_general(X, first.kernel[...], DIMS) + first.bias[...])
    y = second(h)
    want = int8_dot_general(h, second.kernel[...], DIMS) + second.bias[...]
    np.testing.assert_array_equal(y, want)
    # Rules that leave everything in bf16 give lax's matmul back.
    quantize_matmuls(model, "bf16-mixed")
    assert first.dot_general.dot is jax.lax.dot_general


def test_nnx_linear_takes_delayed_scaling():
    model = NnxMLP(nnx.Rngs(0))
    quantize_matmuls(model, NNX_RULES, fp8_scaling="delayed", history_length=2)
    assert model.layers[0].dot_general.scope == "layers/0"
    params = nnx.state(model, nnx.Param)
    y = model(X.astype(jnp.float32))
    assert y.shape == (4, 4) and bool(jnp.all(jnp.isfinite(y)))
    assert nnx.state(model, nnx.Param) == params


class _WithEinsum(nnx.Module):
    """An ``nnx.Einsum`` after an ``nnx.Linear``: paths ``proj/kernel``, ``mix/kernel``."""

    def __init__(self, rngs):
        self.proj = nnx.Linear(8, 8, rngs=rngs)
        self.mix = nnx.Einsum("bi,io->bo", (8, 4), (4,), rngs=rngs)

    def __call__(self, x):
        return self.mix(jax.nn.relu(self.proj(x)))


def test_nnx_einsum_computes_in_fp8_and_int8_through_its_einsum_op():
    model = _WithEinsum(nnx.Rngs(0))
    rules = PrecisionRules([(r"mix/", "fp8-mixed")], default="bf16-mixed")
    cast_plan = quantize_matmuls(model, rules)
    assert cast_plan["mix"]["kernel"].get_value().compute_dtype == BF16  # the matmul rounds it
    params = nnx.state(model, nnx.Param)
    graphdef = nnx.graphdef(model)
    loss = lambda params, x: _loss(nnx.merge(graphdef, cast_to_compute(params, cast_plan))(x))
    compiled = jax.jit(jax.value_and_grad(loss)).lower(params, X).compile()
    _check_audit(compiled, expected_from_plan(plan(params, rules)), "mix", "proj")
    # The same numbers as the hook's matmul, in fp8 and in int8.
    nnx.update(model, cast_to_compute(params, cast_plan))
    h = jax.nn.relu(model.proj(X))
    kernel, bias = model.mix.kernel[...], model.mix.bias[...]
    np.testing.assert_array_equal(model.mix(h), fp8_dot_general(h, kernel, DIMS) + bias)
    quantize_matmuls(model, PrecisionRules([(r"mix/", "p=f32,c=int8")], default="bf16-mixed"))
    np.testing.assert_array_equal(model.mix(h), int8_dot_general(h, kernel, DIMS) + bias)
    with pytest.raises(ValueError, match=r"'mix/kernel': delayed fp8 scaling cannot reach"):
        quantize_matmuls(model, rules, fp8_scaling="delayed")


class _WithConv(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(3, 4, kernel_size=(3,), rngs=rngs)


def test_nnx_layer_without_a_hook_is_refused():
    model = _WithConv(nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"'conv.*\(Conv\) has no dot_general hook"):
        quantize_matmuls(model, "fp8-mixed")
    quantize_matmuls(model, "bf16-mixed")  # nothing to quantize: no error


def test_linen_dense_rules_reach_the_compiled_matmul():
    model = LinenMLP()
    variables = model.init(jax.random.key(0), jnp.zeros(X32.shape))
    expected = expected_from_plan(plan(variables, LINEN_RULES))
    assert expected == {"params/Dense_0": E4M3, "params/Dense_1": BF16}
    matmuls = quantize_linen_matmuls(variables, LINEN_RULES)
    assert matmuls.plan["params"]["Dense_0"]["kernel"].compute_dtype == BF16

    def loss(variables, x):
        with matmuls.intercept():
            return _loss(model.apply(cast_to_compute(variables, matmuls.plan), x))

    compiled = jax.jit(jax.value_and_grad(loss)).lower(variables, X).compile()
    _check_audit(compiled, expected, "params/Dense_0", "params/Dense_1")


def test_linen_dense_computes_what_the_gpt_hook_computes():
    model = nn.DenseGeneral(4)
    params = model.init(jax.random.key(0), jnp.zeros(X32.shape))[
        "params"
    ]  # the params collection alone
    for rule, dot in (("fp8-mixed", fp8_dot_general), ("p=f32,c=int8,o=f32", int8_dot_general)):
        matmuls = quantize_linen_matmuls(params, PrecisionRules([("kernel", rule)], default=rule))
        cast = cast_to_compute(params, matmuls.plan)
        with matmuls.intercept():
            y = model.apply({"params": cast}, X)
        np.testing.assert_array_equal(y, dot(X, cast["kernel"], DIMS) + cast["bias"])
        assert model.dot_general is None  # the module's field is restored after the call


def test_linen_refuses_what_it_cannot_reach():
    variables = LinenMLP().init(jax.random.key(0), jnp.zeros(X32.shape))
    with pytest.raises(ValueError, match="fp8_scaling='current' only"):
        quantize_linen_matmuls(variables, LINEN_RULES, fp8_scaling="delayed")
    # A Conv's kernel asked for fp8: named by path and kind, when the model runs.
    conv = nn.Conv(4, kernel_size=(3,))
    x = jnp.ones((1, 6, 3), jnp.bfloat16)
    conv_vars = conv.init(jax.random.key(0), x.astype(jnp.float32))
    matmuls = quantize_linen_matmuls(conv_vars, "fp8-mixed")
    refused = r"'params/kernel'.*\(Conv\) has no dot_general hook"
    with pytest.raises(ValueError, match=refused), matmuls.intercept():
        conv.apply(cast_to_compute(conv_vars, matmuls.plan), x)
    # A Dense the plan does not know would silently miss every rule: an error instead.
    matmuls = quantize_linen_matmuls(variables["params"], LINEN_RULES)
    other = nn.Sequential([nn.Dense(4)])
    other_vars = cast_to_compute(other.init(jax.random.key(0), jnp.zeros(X32.shape)), "bf16-mixed")
    unknown = r"no policy for 'layers_0/kernel' \(Dense\)"
    with pytest.raises(ValueError, match=unknown), matmuls.intercept():
        other.apply(other_vars, X)
