"""Int8 storage of frozen weights (hybrid_jax.precision.storage) and the QLoRA pattern."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import hybrid_jax as hj
from hybrid_jax.precision.storage import Int8Weight
from hybrid_jax.train import split_frozen, state_bytes


@settings(max_examples=20, deadline=None)
@given(
    hnp.arrays(
        np.float32,
        st.sampled_from([(5,), (3, 4), (2, 3, 6)]),  # few shapes: each one compiles
        elements=st.floats(-1e4, 1e4, width=32),
    )
)
def test_round_trip_within_half_a_channel_step(x):
    w = Int8Weight.quantize(jnp.asarray(x))
    assert w.codes.dtype == jnp.int8 and w.shape == x.shape
    back = np.asarray(w.dequantize(jnp.float32), np.float64)
    # Each output channel (index of the last axis) has its own grid of step amax / 127.
    axes = tuple(range(x.ndim - 1)) if x.ndim >= 2 else (0,)
    step = np.max(np.abs(np.float64(x)), axis=axes, keepdims=True) / 127
    assert np.all(np.abs(back - x) <= step / 2 * (1 + 1e-6) + 1e-30)


def test_bad_input():
    with pytest.raises(TypeError, match="floating"):
        Int8Weight.quantize(jnp.arange(3))


def _model_params():
    rng = np.random.default_rng(0)
    w = lambda *shape: jnp.asarray(rng.normal(0, 0.02, shape), jnp.float32)
    base = {f"layer{i}": {"kernel": w(64, 64)} for i in range(3)}
    # QLoRA-style trainable parts: low-rank adapters and a norm gain.
    adapters = {"lora_a": w(64, 4), "lora_b": w(4, 64), "ln": {"scale": jnp.ones(64)}}
    return {"base": base, "adapters": adapters}


QLORA = hj.PrecisionRules([(r"^base/", "p=int8,c=bf16")], default="p=bf16,c=bf16,o=bf16")


def _loss_terms(params, batch, rng):
    del rng
    h = batch
    for i in range(3):
        kernel = params["base"][f"layer{i}"]["kernel"]
        h = jnp.tanh(h @ kernel + (h @ params["adapters"]["lora_a"]) @ params["adapters"]["lora_b"])
    return {"mse": jnp.mean(jnp.square(h * params["adapters"]["ln"]["scale"] - 1.0))}


@pytest.mark.standard_promotion
def test_qlora_pattern_trains_the_adapters_only_and_saves_memory():
    params = _model_params()
    tx = optax.adam(1e-2)
    state = hj.TrainState.create(params, tx, precision=QLORA)
    assert isinstance(state.params["base"]["layer0"]["kernel"], Int8Weight)
    # The optimizer sees only the trainable leaves: no moments for the frozen base.
    trainable, _ = split_frozen(state.params)
    assert trainable["base"]["layer0"]["kernel"] is None
    assert len(jax.tree_util.tree_leaves(state.opt_state)) == 1 + 2 * 3  # count, mu/nu x 3

    step = hj.make_train_step(_loss_terms, optimizer=tx, precision=QLORA)
    batch = jnp.asarray(np.random.default_rng(1).normal(size=(8, 64)), jnp.bfloat16)
    codes = np.asarray(state.params["base"]["layer1"]["kernel"].codes)
    lora = np.asarray(state.params["adapters"]["lora_a"], np.float32)
    losses = []
    for _ in range(5):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    np.testing.assert_array_equal(state.params["base"]["layer1"]["kernel"].codes, codes)
    assert state.params["adapters"]["lora_a"].dtype == jnp.bfloat16
    assert not np.array_equal(np.asarray(state.params["adapters"]["lora_a"], np.float32), lora)
    assert losses[-1] < losses[0]

    # Memory, from the arrays: the int8 base costs 1 byte + a 4-byte scale per 64 values, the
    # bf16 adapters 2 bytes + bf16 Adam moments (Optax keeps moments in the param dtype).
    lean = state_bytes(state)
    reference = state_bytes(hj.TrainState.create(params, tx))  # fp32 everything
    base_values = 3 * 64 * 64
    assert lean["num_params"] == reference["num_params"] == base_values + 2 * 64 * 4 + 64
    base_bytes = sum(
        state.params["base"][f"layer{i}"]["kernel"].nbytes for i in range(3)
    )  # codes + scales
    assert base_bytes == base_values + 3 * 64 * 4
    assert lean["bytes_per_param"] < 1.3 < 12 <= reference["bytes_per_param"]
