"""Tests of GPTConfig.attention: the attention cores agree, stay causal, and "auto" picks right.

The cuDNN core runs only on a CUDA GPU. On CPU, ``"xla"`` stands in for it: both call
``jax.nn.dot_product_attention`` with the same ``[B, T, H, D]`` operands, scale and mask, so
checking ``"xla"`` against ``"ops"`` checks the layout the two share.
"""

import dataclasses
import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import hybrid_jax as hj
from hybrid_jax.models import GPT, GPTConfig
from hybrid_jax.models.gpt import resolve_attention

# Head size 12: 1/sqrt(12) is no power of two, so scaling q (ops) and scaling the scores (xla)
# round differently and the comparison sees it.
TINY = GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=24)
B, T = 3, 8
TOKENS = jax.random.randint(jax.random.key(1), (B, T), 0, TINY.vocab_size)
TARGETS = jax.random.randint(jax.random.key(2), (B, T), 0, TINY.vocab_size)


def _graphdef(attention):
    model = GPT(dataclasses.replace(TINY, attention=attention), rngs=nnx.Rngs(0))
    return nnx.split(model, nnx.Param)[0]


GRAPHDEFS = {attention: _graphdef(attention) for attention in ("auto", "ops", "xla")}
# nanoGPT's init (std 0.02) leaves the attention almost uniform; weights ~15x larger give
# peaked attention, where a wrong scale or mask shows.
_params = nnx.state(GPT(TINY, rngs=nnx.Rngs(0)), nnx.Param)
_leaves, _treedef = jax.tree.flatten(_params)
_keys = jax.random.split(jax.random.key(3), len(_leaves))
PARAMS = jax.tree.unflatten(
    _treedef, [p + 0.3 * jax.random.normal(k, p.shape) for p, k in zip(_leaves, _keys, strict=True)]
)


@functools.cache
def _logits_and_grads(attention, precision):
    graphdef = GRAPHDEFS[attention]

    def loss(params):
        if precision is not None:
            params = hj.cast_to_compute(params, precision)
        logits = nnx.merge(graphdef, params)(TOKENS)
        log_probs = jnp.take_along_axis(jax.nn.log_softmax(logits), TARGETS[..., None], -1)
        return -jnp.mean(log_probs), logits

    # fp32 products in fp32 on every backend (GPUs default to TF32's 10-bit mantissa), so that
    # the comparisons see the cores, not the matrix unit.
    with jax.default_matmul_precision("highest"):
        (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(PARAMS)
    return logits, grads


@functools.cache
def _forward(attention):
    return jax.jit(lambda params, tokens: nnx.merge(GRAPHDEFS[attention], params)(tokens))


def _assert_close(got, want, tol):
    """Leaf by leaf, the largest difference within ``tol`` of the largest ``want`` entry."""
    got_leaves = jax.tree_util.tree_leaves_with_path(got)
    for (path, g), w in zip(got_leaves, jax.tree.leaves(want), strict=True):
        scale = float(jnp.max(jnp.abs(w)))
        err = float(jnp.max(jnp.abs(g - w)))
        assert err <= tol * scale, f"{jax.tree_util.keystr(path)}: {err:.3g} > {tol} * {scale:.3g}"


# --- The XLA core agrees with ops -------------------------------------------------------------


def test_xla_matches_ops_in_fp32_logits_and_gradients():
    # The same math rounded in fp32 (2^-24) in another order: q scaled before the product or
    # the scores after it, a closed-form backward pass or autodiff. Measured: 4e-7 of the
    # largest entry for the logits, 1e-6 for the gradients; 1e-5 leaves room for other CPUs'
    # kernels and is far below what a wrong scale, mask or head layout gives (1e-1 to 1).
    got_logits, got_grads = _logits_and_grads("xla", None)
    want_logits, want_grads = _logits_and_grads("ops", None)
    _assert_close(got_logits, want_logits, 1e-5)
    _assert_close(got_grads, want_grads, 1e-5)


# jax.nn.dot_product_attention's bf16 backward does not lower under strict promotion (jax 0.10:
# the transposed product mixes fp32 cotangents with bf16 operands); its forward is checked
# under strict below.
@pytest.mark.standard_promotion
def test_xla_matches_ops_with_bf16_compute():
    # Both cores keep the scores and the softmax in fp32 but round q, k, v, the probabilities
    # and the products' outputs to bf16 (8 significant bits: 2^-9 relative each time), and
    # their backward passes round in different places. That puts them as far apart as bf16 is
    # from fp32 here (measured: 0.5% and 1.7% for logits and gradients between the cores, 1.3%
    # and 1.8% from fp32). 4e-2 leaves twice that, and still fails a scale off by 10% (10% in
    # the gradients) or a missing mask (O(1)).
    got_logits, got_grads = _logits_and_grads("xla", "bf16-mixed")
    want_logits, want_grads = _logits_and_grads("ops", "bf16-mixed")
    _assert_close(got_logits, want_logits, 4e-2)
    _assert_close(got_grads, want_grads, 4e-2)


def test_xla_forward_with_bf16_compute_runs_under_strict_promotion():
    bf16 = hj.cast_to_compute(PARAMS, "bf16-mixed")
    logits = _forward("xla")(bf16, TOKENS)
    assert logits.dtype == jnp.float32
    _assert_close(logits, _logits_and_grads("ops", None)[0], 4e-2)  # bf16 against fp32


# --- Causality --------------------------------------------------------------------------------


@pytest.mark.parametrize("attention", ["ops", "xla"])
def test_a_future_token_changes_no_earlier_logits(attention):
    t = 5
    changed = TOKENS.at[:, t].set((TOKENS[:, t] + 1) % TINY.vocab_size)
    before = np.asarray(_forward(attention)(PARAMS, TOKENS))
    after = np.asarray(_forward(attention)(PARAMS, changed))
    # Exactly: a masked score is a zero probability, and adding zeros changes nothing.
    np.testing.assert_array_equal(after[:, :t], before[:, :t])
    assert np.all(np.any(after[:, t:] != before[:, t:], axis=-1))  # every later position sees it


# --- Choosing the core ------------------------------------------------------------------------


def _custom_vjp_calls(attention, params):
    # ops.causal_attention is the model's only custom VJP (GELU and LayerNorm are custom JVPs).
    jaxpr = jax.make_jaxpr(lambda p: nnx.merge(GRAPHDEFS[attention], p)(TOKENS))(params)
    return str(jaxpr).count("custom_vjp_call")


@pytest.mark.parametrize("backend", ["cpu", "gpu", "tpu"])
def test_auto_runs_ops_where_cudnn_does_not_apply(monkeypatch, backend):
    # A device without a CUDA compute capability: a CPU, a TPU, or this CPU posing as a GPU.
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    monkeypatch.setattr(jax, "devices", lambda: [types.SimpleNamespace()])
    bf16 = hj.cast_to_compute(PARAMS, "bf16-mixed")
    assert _custom_vjp_calls("auto", bf16) == _custom_vjp_calls("ops", bf16) == TINY.n_layer
    assert _custom_vjp_calls("xla", bf16) == 0


@pytest.mark.parametrize(
    ("capability", "dtype", "seq_len", "head_size", "expected"),
    [
        ("9.0", jnp.bfloat16, 1024, 64, "cudnn"),  # H100, H200: GPT-2's heads and context
        ("8.0", jnp.float16, 64, 128, "cudnn"),  # A100
        ("9.0", jnp.bfloat16, 64, 256, "cudnn"),  # Hopper takes heads up to 256 ...
        ("8.0", jnp.bfloat16, 64, 256, "ops"),  # ... Ampere up to 128
        ("9.0", jnp.bfloat16, 64, 12, "ops"),  # not a multiple of 8
        ("9.0", jnp.float32, 64, 64, "ops"),  # cuDNN's flash attention is fp16/bf16 only
        ("7.5", jnp.bfloat16, 64, 64, "ops"),  # before Ampere
        ("gfx90a", jnp.bfloat16, 64, 64, "ops"),  # a ROCm GPU
    ],
)
def test_auto_takes_cudnn_where_it_applies(
    monkeypatch, capability, dtype, seq_len, head_size, expected
):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(
        jax, "devices", lambda: [types.SimpleNamespace(compute_capability=capability)]
    )
    assert resolve_attention("auto", dtype, seq_len, head_size) == expected
    if expected == "cudnn":
        assert resolve_attention("cudnn", dtype, seq_len, head_size) == "cudnn"
        # JAX's cuDNN gradient refuses odd lengths (seen on an H200): "auto" leaves them to ops.
        assert resolve_attention("auto", dtype, seq_len - 1, head_size) == "ops"
    else:
        with pytest.raises(ValueError, match="attention='cudnn' needs a CUDA GPU"):
            resolve_attention("cudnn", dtype, seq_len, head_size)


# --- Errors -----------------------------------------------------------------------------------


def test_an_unknown_attention_is_an_error_naming_the_choices():
    choices = "'auto', 'ops', 'xla', 'cudnn'"
    with pytest.raises(ValueError, match=f"GPTConfig.attention must be one of {choices}, got 'x'"):
        GPTConfig(vocab_size=11, attention="x")
    # Set per layer after construction, it fails when the layer is traced.
    model = nnx.merge(GRAPHDEFS["ops"], PARAMS)
    model.blocks[0].attn.attention = "flash"
    graphdef, params = nnx.split(model, nnx.Param)
    with pytest.raises(ValueError, match=f"one of {choices}, got 'flash'"):
        jax.eval_shape(lambda p: nnx.merge(graphdef, p)(TOKENS), params)


def test_cudnn_on_cpu_is_an_error_that_says_what_it_needs(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    graphdef = _graphdef("cudnn")
    bf16 = hj.cast_to_compute(PARAMS, "bf16-mixed")
    with pytest.raises(ValueError, match=r"needs a CUDA GPU .* on cpu"):
        jax.eval_shape(lambda p: nnx.merge(graphdef, p)(TOKENS), bf16)
