"""Precision rules reaching the GPT's matmuls (hybrid_jax.models.matmuls) and the train step's
handling of delayed-scaling fp8 histories."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from hybrid_jax.losses import PCGrad, cross_entropy
from hybrid_jax.models import GPT, DelayedFp8DotGeneral, Fp8Meta, GPTConfig, quantize_matmuls
from hybrid_jax.precision import PrecisionRules
from hybrid_jax.precision.matmul import int8_dot_general
from hybrid_jax.train import TrainState, make_train_step

CONFIG = GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=16)
RULES = PrecisionRules(
    [(r"mlp/.*kernel", "fp8-mixed"), (r"attn/qkv/kernel", "p=f32,c=int8,o=f32")],
    default="bf16-mixed",
)


def _model():
    return GPT(CONFIG, rngs=nnx.Rngs(0))


def _batch(seed=0):
    tokens = jax.random.randint(jax.random.key(seed), (4, 9), 0, CONFIG.vocab_size)
    return tokens[:, :-1], tokens[:, 1:]


def test_rules_choose_each_layers_matmul():
    model = _model()
    cast_plan = quantize_matmuls(model, RULES)
    block = model.blocks[0]
    assert block.mlp.fc.dot_general.func.__name__ == "fp8_dot_general"
    assert block.mlp.proj.dot_general.func.__name__ == "fp8_dot_general"
    assert block.attn.qkv.dot_general is int8_dot_general
    assert block.attn.proj.dot_general is jax.lax.dot_general
    assert model.tok_embed.dot_general is jax.lax.dot_general  # the tied head: bf16
    assert model.pos_embed.dot_general is None  # looked up only: no matmul
    # The quantizing matmuls round their weights; the cast leaves them in the carrier dtype.
    compute = lambda path: (
        cast_plan["blocks"][0][path[0]][path[1]]["kernel"].get_value().compute_dtype
    )
    assert compute(("mlp", "fc")) == jnp.bfloat16
    assert compute(("attn", "qkv")) == jnp.bfloat16
    # Rules that leave everything in bf16 give the plain matmul back.
    quantize_matmuls(model, "bf16-mixed")
    assert block.mlp.fc.dot_general is jax.lax.dot_general


def test_quantized_forward_stays_close_to_bf16():
    model = _model()
    tokens = _batch()[0]
    reference = model(tokens)
    quantize_matmuls(model, RULES)
    logits = model(tokens)
    # fp8 keeps 4 significant bits: logits of a tiny random model move by a few percent.
    scale = float(jnp.max(jnp.abs(reference)))
    assert 0 < float(jnp.max(jnp.abs(logits - reference))) < 0.1 * scale


def _delayed_setup(history=4, mixer=None, grad_accum=1, poison=False):
    model = _model()
    cast_plan = quantize_matmuls(model, RULES, fp8_scaling="delayed", history_length=history)
    graphdef, params, fp8 = nnx.split(model, nnx.Param, Fp8Meta)

    def loss_terms(compute_params, batch, rng, fp8_meta):
        del rng
        logits = nnx.merge(graphdef, compute_params, fp8_meta)(batch[0])
        loss = cross_entropy(logits, batch[1])
        return {"lm": loss * jnp.inf if poison else loss}

    tx = optax.adam(1e-3)
    step = make_train_step(
        loss_terms, optimizer=tx, precision=cast_plan, mixer=mixer, grad_accum=grad_accum
    )
    state = TrainState.create(params, tx, precision=cast_plan, fp8_meta=fp8)
    return step, state, params


@pytest.mark.standard_promotion
def test_delayed_scaling_histories_advance_inside_the_step():
    step, state, params = _delayed_setup()
    assert isinstance(state.fp8_meta, nnx.State)
    fc = lambda s: s.fp8_meta["blocks"][0]["mlp"]["fc"]["dot_general"]
    np.testing.assert_array_equal(fc(state)["rhs_history"][...], np.zeros(4))
    # The kernel reaches the matmul in the carrier dtype, bf16: its amax is the bf16 one.
    kernel = params["blocks"][0]["mlp"]["fc"]["kernel"][...].astype(jnp.bfloat16)
    kernel_amax = float(jnp.max(jnp.abs(kernel)))
    state, _ = step(state, _batch(0))
    rhs = np.asarray(fc(state)["rhs_history"][...])
    assert rhs[0] == kernel_amax
    np.testing.assert_array_equal(rhs[1:], 0)
    assert float(fc(state)["grad_history"][...][0]) > 0
    state, _ = step(state, _batch(1))
    rhs2 = np.asarray(fc(state)["rhs_history"][...])
    assert rhs2[1] == rhs[0] and rhs2[0] > 0  # pushed, newest first


@pytest.mark.standard_promotion
def test_a_skipped_step_keeps_the_histories():
    step, state, _ = _delayed_setup(poison=True)
    before = jax.tree_util.tree_map(np.asarray, state.fp8_meta)
    state, metrics = step(state, _batch(0))
    assert int(metrics["skipped"]) == 1
    jax.tree_util.tree_map(np.testing.assert_array_equal, before, state.fp8_meta)


@pytest.mark.standard_promotion
def test_gradient_accumulation_pushes_one_entry_per_micro_batch():
    step, state, _ = _delayed_setup(grad_accum=2)
    state, _ = step(state, _batch(0))
    history = np.asarray(
        state.fp8_meta["blocks"][0]["mlp"]["proj"]["dot_general"]["lhs_history"][...]
    )
    assert np.all(history[:2] > 0) and np.all(history[2:] == 0)


def test_delayed_scaling_refuses_per_term_gradients():
    step, state, _ = _delayed_setup(mixer=PCGrad())
    with pytest.raises(ValueError, match="fp8"):
        step(state, _batch(0))


def test_bad_scaling_name():
    with pytest.raises(ValueError, match="fp8_scaling"):
        quantize_matmuls(_model(), RULES, fp8_scaling="late")


def test_delayed_dot_general_is_a_module_with_three_histories():
    dot = DelayedFp8DotGeneral(history_length=2, forward_dtype="e5m2")
    histories = nnx.state(dot, Fp8Meta)
    assert sorted(histories.keys()) == ["grad_history", "lhs_history", "rhs_history"]
    assert dot.forward_dtype == "e5m2"
