"""Tests of hybrid_jax.models: the nanoGPT-equivalent GPT and the tiny MLP."""

import dataclasses
import math
import re

import chex
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import hybrid_jax as hj
from hybrid_jax import tree as tree_lib
from hybrid_jax.models import GPT, MLP, GPTConfig, causal_attention, gelu, layer_norm
from hybrid_jax.models.gpt import Linear
from hybrid_jax.optim import recipes

TINY = GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=32)
B, T = 3, 8

_model = GPT(TINY, rngs=nnx.Rngs(0))
GRAPHDEF, PARAMS = nnx.split(_model, nnx.Param)
TOKENS = jax.random.randint(jax.random.key(1), (B, T), 0, TINY.vocab_size)
TARGETS = jax.random.randint(jax.random.key(2), (B, T), 0, TINY.vocab_size)


def _loss(params, tokens, targets, precision=None):
    if precision is not None:
        params = hj.cast_to_compute(params, precision)
    logits = nnx.merge(GRAPHDEF, params)(tokens)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    one_hot = jax.nn.one_hot(targets, logits.shape[-1], dtype=log_probs.dtype)
    return -jnp.mean(jnp.sum(log_probs * one_hot, axis=-1))


FORWARD = jax.jit(lambda params, tokens: nnx.merge(GRAPHDEF, params)(tokens))
BF16_FORWARD = jax.jit(
    lambda params, tokens: nnx.merge(GRAPHDEF, hj.cast_to_compute(params, "bf16-mixed"))(tokens)
)
VALUE_AND_GRAD = jax.jit(jax.value_and_grad(_loss), static_argnums=3)


def _paths(tree):
    return [path for path, _ in tree_lib.leaves_with_paths(tree)[0]]


def _param_paths(config):
    state = nnx.state(nnx.eval_shape(lambda: GPT(config, rngs=nnx.Rngs(0))), nnx.Param)
    return {path: leaf.shape for path, leaf in tree_lib.leaves_with_paths(state)[0]}


# --- Shapes, dtypes, paths, counts ----------------------------------------------------------


@pytest.mark.parametrize("precision", [None, "bf16-mixed"])
def test_logits_are_fp32_for_fp32_and_bf16_params(precision):
    forward = FORWARD if precision is None else BF16_FORWARD
    logits = forward(PARAMS, TOKENS)  # strict promotion: any silent upcast would raise
    assert logits.shape == (B, T, TINY.vocab_size)
    assert logits.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits)))


def test_bf16_logits_close_to_fp32():
    np.testing.assert_allclose(BF16_FORWARD(PARAMS, TOKENS), FORWARD(PARAMS, TOKENS), atol=0.05)


def test_shorter_sequences_use_the_first_positions():
    logits = FORWARD(PARAMS, TOKENS[:, :5])
    assert logits.shape == (B, 5, TINY.vocab_size)
    # Causality: the first 5 positions do not depend on the 3 that were cut.
    np.testing.assert_allclose(logits, FORWARD(PARAMS, TOKENS)[:, :5], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("bias", [False, True])
def test_param_paths(tie, bias):
    config = GPTConfig(
        vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=32, bias=bias, tie_embeddings=tie
    )
    c, v = config.n_embd, config.vocab_size
    expected = {"tok_embed/embedding": (v, c), "pos_embed/embedding": (8, c), "ln_f/scale": (c,)}
    for i in range(config.n_layer):
        p = f"blocks/{i}"
        expected |= {
            f"{p}/ln_1/scale": (c,),
            f"{p}/attn/qkv/kernel": (c, 3 * c),
            f"{p}/attn/proj/kernel": (c, c),
            f"{p}/ln_2/scale": (c,),
            f"{p}/mlp/fc/kernel": (c, 4 * c),
            f"{p}/mlp/proj/kernel": (4 * c, c),
        }
        if bias:
            expected |= {
                f"{p}/ln_1/bias": (c,),
                f"{p}/attn/qkv/bias": (3 * c,),
                f"{p}/attn/proj/bias": (c,),
                f"{p}/ln_2/bias": (c,),
                f"{p}/mlp/fc/bias": (4 * c,),
                f"{p}/mlp/proj/bias": (c,),
            }
    if bias:
        expected["ln_f/bias"] = (c,)
    if not tie:
        expected["lm_head/kernel"] = (c, v)  # nanoGPT's head has no bias
    assert _param_paths(config) == expected


def test_num_params_is_nanogpts_for_the_baby_gpt():
    # nanoGPT's shakespeare_char config: 4 layers, 4 heads, 128 channels, context 64, no bias,
    # tied head. Per block: 12 C^2 weights (qkv 3C^2, proj C^2, fc 4C^2, proj 4C^2) + 2 C
    # LayerNorm scales; plus token and position embeddings and the final LayerNorm.
    shapes = _param_paths(GPTConfig(vocab_size=65))
    total = sum(math.prod(shape) for shape in shapes.values())
    v, t, c, n = 65, 64, 128, 4
    assert total == v * c + t * c + n * (12 * c * c + 2 * c) + c == 804_096
    # nanoGPT prints "number of parameters: 0.80M", its count without position embeddings.
    assert f"{(total - t * c) / 1e6:.2f}M" == "0.80M"


def test_num_params_with_bias_and_untied_head():
    config = GPTConfig(vocab_size=65, bias=True, tie_embeddings=False)
    total = sum(math.prod(s) for s in _param_paths(config).values())
    v, t, c, n = 65, 64, 128, 4
    assert total == 2 * v * c + t * c + n * (12 * c * c + 13 * c) + 2 * c


@pytest.mark.parametrize("tie", [True, False])
def test_every_leaf_matches_one_intended_muon_adamw_rule(tie):
    config = GPTConfig(
        vocab_size=11, block_size=8, n_layer=2, n_embd=32, bias=True, tie_embeddings=tie
    )
    paths = list(_param_paths(config))
    kinds = {
        "embedding": recipes.EMBEDDING,
        "head": recipes.HEAD,
        "gain_or_bias": recipes.GAIN_OR_BIAS,
        "hidden_matrix": recipes.HIDDEN_MATRIX,
    }
    for path in paths:
        matched = [kind for kind, pattern in kinds.items() if re.search(pattern, path)]
        if path.endswith("embed/embedding"):
            assert matched == ["embedding"], path
        elif path.startswith("lm_head/"):
            assert matched == ["head"], path
        elif re.search(r"ln_\w+/|/bias$", path):
            assert matched == ["gain_or_bias"], path
        else:
            assert re.fullmatch(r"blocks/\d+/(attn/(qkv|proj)|mlp/(fc|proj))/kernel", path), path
            assert matched == ["hidden_matrix"], path  # Muon
    # The recipe as shipped: strict, so every rule decides a leaf and no leaf matches two.
    rules = tree_lib.compile_rules(recipes.muon_adamw_rules())
    chosen = tree_lib.match_indices(rules, paths, has_default=False, strict=True)
    muon = {
        path
        for path, i in zip(paths, chosen, strict=True)
        if rules[i].pattern == recipes.HIDDEN_MATRIX
    }
    assert muon == {path for path in paths if re.search(recipes.HIDDEN_MATRIX, path)}


# --- Initialisation ---------------------------------------------------------------------------


def test_init_statistics_follow_nanogpt():
    residual_std = 0.02 / math.sqrt(2 * TINY.n_layer)
    for path, leaf in tree_lib.leaves_with_paths(PARAMS)[0]:
        x = np.asarray(leaf)
        if path.endswith("/scale"):
            assert np.all(x == 1), path
        else:  # within 4 standard errors of the sample mean and standard deviation
            std = residual_std if re.search(r"(attn|mlp)/proj/kernel$", path) else 0.02
            assert abs(x.mean()) < 4 * std / math.sqrt(x.size), path
            assert x.std() == pytest.approx(std, rel=4 / math.sqrt(2 * x.size)), path


def test_biases_start_at_zero():
    config = dataclasses.replace(TINY, bias=True)  # TINY's shapes: its initialisers are compiled
    state = nnx.state(GPT(config, rngs=nnx.Rngs(0)), nnx.Param)
    biases = [leaf for path, leaf in tree_lib.leaves_with_paths(state)[0] if "bias" in path]
    assert len(biases) == 6 * TINY.n_layer + 1
    assert all(np.all(np.asarray(b) == 0) for b in biases)


def test_layers_get_different_initial_values():
    a = PARAMS["blocks"][0]["mlp"]["fc"]["kernel"][...]
    b = PARAMS["blocks"][1]["mlp"]["fc"]["kernel"][...]
    assert not np.allclose(a, b)


# --- Causality, precision, derivatives ----------------------------------------------------------

_EMBEDDINGS = nnx.merge(GRAPHDEF, PARAMS).embed(TOKENS[:1])
_HEAD_WEIGHTS = jax.random.normal(jax.random.key(4), (TINY.vocab_size,))


@jax.jit
def _position_jacobian(params, x_1xTxC):
    """d(loss at position t) / d(embedding at position s): its norm per (t, s)."""

    def per_position(x):
        logits = nnx.merge(GRAPHDEF, params).from_embeddings(x)[0]
        return logits @ _HEAD_WEIGHTS  # a scalar "loss" per position, [T]

    jac_TxTxC = jax.jacrev(per_position)(x_1xTxC)[:, 0]
    return jnp.sum(jnp.abs(jac_TxTxC), axis=-1)


def test_causal_mask_by_gradients():
    norms_TxT = np.asarray(_position_jacobian(PARAMS, _EMBEDDINGS))
    future = np.triu(np.ones((T, T), bool), k=1)  # s > t
    assert np.all(norms_TxT[future] == 0.0)  # exactly: no leak from the future
    assert np.all(norms_TxT[~future] > 0.0)  # every past and present position matters


def _jaxpr_eqns(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from _jaxpr_eqns(sub)


def test_bf16_params_give_bf16_matmuls():
    bf16 = hj.cast_to_compute(PARAMS, "bf16-mixed")
    jaxpr = jax.make_jaxpr(lambda p, x: nnx.merge(GRAPHDEF, p)(x))(bf16, TOKENS).jaxpr
    dots = [e for e in _jaxpr_eqns(jaxpr) if e.primitive.name == "dot_general"]
    assert len(dots) == 4 * TINY.n_layer + 2 * TINY.n_layer + 1  # linears, attention, head
    for eqn in dots:
        assert [v.aval.dtype for v in eqn.invars] == [jnp.bfloat16] * 2, eqn


def test_bf16_gradients_under_strict_promotion():
    loss, grads = VALUE_AND_GRAD(PARAMS, TOKENS, TARGETS, "bf16-mixed")
    loss32, grads32 = VALUE_AND_GRAD(PARAMS, TOKENS, TARGETS, None)
    assert loss.dtype == jnp.float32
    chex.assert_trees_all_equal_dtypes(grads, PARAMS)  # grads of the fp32 masters
    np.testing.assert_allclose(loss, loss32, rtol=2e-2)
    cosine = lambda a, b: jnp.vdot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b))
    flat, flat32 = jax.tree.leaves(grads), jax.tree.leaves(grads32)
    assert (
        min(float(cosine(a.ravel(), b.ravel())) for a, b in zip(flat, flat32, strict=True)) > 0.95
    )


def test_mixed_precision_rules_run_under_strict_promotion():
    rules = hj.PrecisionRules([(r"embed|ln_", "fp32")], default="bf16-mixed")
    params = hj.cast_to_compute(PARAMS, rules)
    logits = jax.jit(lambda p, x: nnx.merge(GRAPHDEF, p)(x))(params, TOKENS)
    assert logits.dtype == jnp.float32


def _reference_logits(params, tokens):
    """nanoGPT's forward written plainly, differentiated by autodiff: the model must agree."""
    c, h = TINY.n_embd, TINY.n_head
    emb = params["tok_embed"]["embedding"][...]
    x = emb[tokens] + params["pos_embed"]["embedding"][...][: tokens.shape[1]]

    def ln(x, p):
        mean = x.mean(-1, keepdims=True)
        var = ((x - mean) ** 2).mean(-1, keepdims=True)
        return (x - mean) / jnp.sqrt(var + 1e-5) * p["scale"][...]

    b, t = tokens.shape
    for blk in params["blocks"].values():
        q, k, v = jnp.split(ln(x, blk["ln_1"]) @ blk["attn"]["qkv"]["kernel"][...], 3, axis=-1)
        heads = lambda z: z.reshape(b, t, h, c // h).transpose(0, 2, 1, 3)
        att = heads(q) @ heads(k).transpose(0, 1, 3, 2) / math.sqrt(c // h)
        att = jnp.where(jnp.tril(jnp.ones((t, t), bool)), att, -jnp.inf)
        y = (jax.nn.softmax(att, -1) @ heads(v)).transpose(0, 2, 1, 3).reshape(b, t, c)
        x = x + y @ blk["attn"]["proj"]["kernel"][...]
        hid = jax.nn.gelu(ln(x, blk["ln_2"]) @ blk["mlp"]["fc"]["kernel"][...], approximate=False)
        x = x + hid @ blk["mlp"]["proj"]["kernel"][...]
    return ln(x, params["ln_f"]) @ emb.T


def test_matches_a_plain_reference_in_values_and_gradients():
    def ref_loss(params):
        logits = _reference_logits(params, TOKENS)
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(log_probs, TARGETS[..., None], -1)), logits

    (_, ref_logits), ref_grads = jax.jit(jax.value_and_grad(ref_loss, has_aux=True))(PARAMS)
    np.testing.assert_allclose(FORWARD(PARAMS, TOKENS), ref_logits, rtol=1e-5, atol=1e-5)
    _, grads = VALUE_AND_GRAD(PARAMS, TOKENS, TARGETS, None)
    chex.assert_trees_all_close(grads, ref_grads, rtol=1e-4, atol=1e-6)


def test_gelu_is_exact_erf_gelu_with_its_derivative():
    x = jnp.concatenate([jnp.linspace(-8.0, 8.0, 1001), jnp.array([0.0, -0.0, 1e-30])])
    ref = lambda x: jax.nn.gelu(x, approximate=False)
    derivative = lambda f: jax.vmap(jax.grad(f))

    @jax.jit
    def everything(x):
        tangent = jax.jvp(gelu, (x,), (jnp.ones_like(x),))[1]  # forward mode works (custom_jvp)
        return (
            gelu(x),
            ref(x),
            derivative(gelu)(x),
            derivative(ref)(x),
            tangent,
            (derivative(jax.grad(gelu))(x)),
        )

    y, y_ref, grad, grad_ref, tangent, second = everything(x)
    np.testing.assert_allclose(y, y_ref, atol=1e-6)
    np.testing.assert_allclose(grad, grad_ref, atol=1e-6)
    np.testing.assert_allclose(tangent, grad)
    assert float(grad[-3]) == 0.5  # at x = 0
    assert bool(jnp.all(jnp.isfinite(second)))


@pytest.mark.parametrize("with_bias", [False, True])
def test_layer_norm_derivatives_match_autodiff(with_bias):
    keys = jax.random.split(jax.random.key(5), 4)
    x = 3 * jax.random.normal(keys[0], (6, 16)) + 2
    scale, bias = jax.random.normal(keys[1], (16,)), jax.random.normal(keys[2], (16,))
    weights = jax.random.normal(keys[3], (6, 16))

    def reference(x, scale, bias):
        mean = x.mean(-1, keepdims=True)
        y = (x - mean) / jnp.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + 1e-5) * scale
        return y + bias if with_bias else y

    args = (x, scale, bias if with_bias else None)
    argnums = (0, 1, 2) if with_bias else (0, 1)
    grad = lambda f: jax.grad(lambda *a: jnp.sum(jnp.tanh(f(*a)) * weights), argnums)
    got, want = jax.jit(lambda *a: (grad(layer_norm)(*a), grad(reference)(*a)))(*args)
    chex.assert_trees_all_close(got, want, atol=2e-5)
    np.testing.assert_allclose(layer_norm(*args), reference(*args), atol=2e-6)


def test_layer_norm_keeps_the_input_dtype():
    def value_and_grads(x, scale):
        y, vjp = jax.vjp(layer_norm, x, scale)
        return y, vjp(jnp.ones_like(y))

    shapes = jax.eval_shape(
        value_and_grads, jnp.ones((2, 4), jnp.bfloat16), jnp.ones(4, jnp.float32)
    )
    y, (dx, dscale) = shapes
    assert (y.dtype, dx.dtype, dscale.dtype) == (jnp.bfloat16, jnp.bfloat16, jnp.float32)


def test_causal_attention_derivatives_match_autodiff():
    keys = jax.random.split(jax.random.key(6), 4)
    q, k, v, dy = (jax.random.normal(key, (2, 3, 7, 4)) for key in keys)

    def reference(q, k, v):
        scores = jnp.einsum("bhqd,bhkd->bhqk", q, k)
        scores = jnp.where(jnp.tril(jnp.ones((7, 7), bool)), scores, -jnp.inf)
        return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(scores, axis=-1), v)

    value_and_vjp = lambda f, *a: (f(*a), jax.vjp(f, *a)[1](dy))
    got, want = jax.jit(
        lambda *a: (value_and_vjp(causal_attention, *a), value_and_vjp(reference, *a))
    )(q, k, v)
    chex.assert_trees_all_close(got, want, atol=1e-5)


def test_causal_attention_keeps_the_input_dtype():
    q = jax.ShapeDtypeStruct((2, 3, 7, 4), jnp.bfloat16)
    y = jax.eval_shape(causal_attention, q, q, q)
    grads = jax.eval_shape(lambda y, *a: jax.vjp(causal_attention, *a)[1](y), y, q, q, q)
    assert y.dtype == jnp.bfloat16
    assert [g.dtype for g in grads] == [jnp.bfloat16] * 3


# --- The dot_general hook and errors -----------------------------------------------------------


def test_dot_general_hook_runs_every_linear_and_the_head():
    calls = []

    def recording_dot(lhs, rhs, dimension_numbers, **kwargs):
        calls.append((lhs.shape, rhs.shape, dimension_numbers))
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, **kwargs)

    model = GPT(TINY, rngs=nnx.Rngs(0), dot_general=recording_dot)
    jax.eval_shape(model, TOKENS)  # traces the forward once, computes nothing
    c, n = TINY.n_embd, B * T
    matmul, head = (((1,), (0,)), ((), ())), (((1,), (1,)), ((), ()))
    block = [((n, c), (c, 3 * c)), ((n, c), (c, c)), ((n, c), (c, 4 * c)), ((n, 4 * c), (4 * c, c))]
    expected = [(*shapes, matmul) for shapes in block] * TINY.n_layer
    assert calls == [*expected, ((n, c), (TINY.vocab_size, c), head)]  # the tied head last


def test_linear_returns_what_its_dot_general_returns():
    double = lambda lhs, rhs, dims: 2 * jax.lax.dot_general(lhs, rhs, dims)
    x = jnp.ones((2, 4))
    plain = Linear(4, 3, bias=False, std=1.0, rngs=nnx.Rngs(0))
    doubled = Linear(4, 3, bias=False, std=1.0, dot_general=double, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(doubled(x), 2 * plain(x))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"vocab_size": 0}, "vocab_size must be a positive integer, got 0"),
        ({"vocab_size": 11, "n_layer": 2.0}, "n_layer must be a positive integer, got 2.0"),
        ({"vocab_size": 11, "n_head": 3}, "n_head=3 must divide n_embd=128"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=re.escape(match)):
        GPTConfig(**kwargs)


def test_input_errors():
    model = nnx.merge(GRAPHDEF, PARAMS)
    with pytest.raises(ValueError, match="exceeds the model's block_size 8"):
        model(jnp.zeros((1, 9), jnp.int32))
    with pytest.raises(
        ValueError, match=r"integer ids shaped \[batch, time\], got float32\[1, 4\]"
    ):
        model(jnp.zeros((1, 4), jnp.float32))
    with pytest.raises(TypeError, match="config must be a GPTConfig, got dict"):
        GPT({"vocab_size": 11}, rngs=nnx.Rngs(0))


# --- MLP --------------------------------------------------------------------------------------


def test_mlp_paths_shapes_and_dtypes():
    model = MLP((4, 16, 3), rngs=nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    shapes = {path: leaf.shape for path, leaf in tree_lib.leaves_with_paths(state)[0]}
    assert shapes == {
        "layers/0/kernel": (4, 16),
        "layers/0/bias": (16,),
        "layers/1/kernel": (16, 3),
        "layers/1/bias": (3,),
    }
    graphdef, params = nnx.split(model, nnx.Param)
    x = jnp.ones((5, 4), jnp.bfloat16)
    bf16 = hj.cast_to_compute(params, "bf16")
    y = jax.eval_shape(lambda p, x: nnx.merge(graphdef, p)(x), bf16, x)  # traced under strict
    assert (y.shape, y.dtype) == ((5, 3), jnp.bfloat16)


def test_mlp_errors():
    with pytest.raises(ValueError, match=r"two or more positive integer widths.*\(4,\)"):
        MLP((4,), rngs=nnx.Rngs(0))
