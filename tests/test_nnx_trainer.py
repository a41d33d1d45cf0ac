"""Tests of hybrid_jax.models.Trainer: a user's NNX model trained with a precision plan, a hybrid
optimizer, a loss scale and step skipping, without hand-building a TrainState."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from hybrid_jax.losses import Weighted
from hybrid_jax.models import Fp8Meta, Trainer, quantize_matmuls
from hybrid_jax.optim import by_path, muon
from hybrid_jax.precision import DynamicLossScale, PrecisionRules, cast_to_compute
from hybrid_jax.train import TrainState, make_train_step

RULES = PrecisionRules([(r"layers/0/", "fp8-mixed")], default="bf16-mixed")
BATCH = {
    "x": jax.random.normal(jax.random.key(1), (16, 8)),
    "y": jax.random.normal(jax.random.key(2), (16, 4)),
}


class MLP(nnx.Module):
    """A user's own model: paths ``layers/0/kernel``, ``layers/1/bias``, ..."""

    def __init__(self, rngs: nnx.Rngs):
        self.layers = nnx.List([nnx.Linear(8, 32, rngs=rngs), nnx.Linear(32, 4, rngs=rngs)])

    def __call__(self, x):
        return self.layers[1](jax.nn.relu(self.layers[0](x)))


def mse(model, batch):
    # Flax layers compute in the promoted dtype of input and kernel: feed the compute dtype.
    x = batch["x"].astype(model.layers[0].kernel.dtype)
    return jnp.mean(jnp.square(model(x).astype(jnp.float32) - batch["y"]))


def test_trainer_steps_are_the_hand_built_steps():
    """Three steps of the Trainer equal three steps of quantize_matmuls + TrainState +
    make_train_step written out, bitwise: the convenience adds nothing to the numerics."""
    tx = by_path([(r"layers/1/kernel", muon(2e-2))], default=optax.adamw(1e-2))
    trainer = Trainer(MLP(nnx.Rngs(0)), mse, tx, precision=RULES)

    model = MLP(nnx.Rngs(0))
    cast_plan = quantize_matmuls(model, RULES)
    graphdef, params = nnx.split(model, nnx.Param)
    loss_terms = lambda p, batch, rng: {"loss": mse(nnx.merge(graphdef, p), batch)}
    state = TrainState.create(params, tx, precision=cast_plan)
    step = make_train_step(loss_terms, optimizer=tx, precision=cast_plan)
    for _ in range(3):
        metrics = trainer.step(BATCH)
        state, want = step(state, BATCH)
        chex.assert_trees_all_equal(metrics, want)
    chex.assert_trees_all_equal(nnx.state(trainer.model, nnx.Param), state.params)
    assert trainer.model.layers[0].dot_general.dot.func.__name__ == "fp8_dot_general"
    assert trainer.model.layers[0].kernel.dtype == jnp.float32  # master weights stay fp32
    assert float(metrics["loss"]) < float(trainer.evaluate(BATCH)["loss"]) + 1.0
    assert repr(trainer) == "Trainer(MLP, step=3)"


def test_trainer_lowers_the_loss_and_updates_the_model_in_place():
    model = MLP(nnx.Rngs(0))
    layer = model.layers[1]  # a reference the user kept
    trainer = Trainer(model, mse, optax.adam(1e-2), precision="bf16-mixed")
    before = float(trainer.evaluate(BATCH)["loss"])
    for _ in range(20):
        trainer.step(BATCH)
    assert float(trainer.evaluate(BATCH)["loss"]) < 0.7 * before
    np.testing.assert_array_equal(layer.kernel[...], trainer.state.params["layers"][1]["kernel"])
    # The model computes like the trained state at compute precision (both jitted: XLA keeps
    # fused bf16 elementwise work in fp32, which op-by-op execution would round).
    graphdef = nnx.graphdef(model)
    loss = jax.jit(lambda p: mse(nnx.merge(graphdef, cast_to_compute(p, trainer.plan)), BATCH))
    np.testing.assert_array_equal(loss(trainer.state.params), trainer.evaluate(BATCH)["loss"])


def test_fp16_overflow_is_skipped_and_the_model_kept():
    """fp16 compute gets a dynamic loss scale by default; a step whose gradients overflow leaves
    every parameter bitwise as it was and halves the scale."""
    model = MLP(nnx.Rngs(0))
    trainer = Trainer(model, mse, optax.adam(1e-2), precision="fp16-mixed")
    assert isinstance(trainer.state.loss_scale, DynamicLossScale)
    before = jax.tree_util.tree_map(np.asarray, nnx.state(model, nnx.Param))
    metrics = trainer.step({"x": BATCH["x"].at[0, 0].set(jnp.inf), "y": BATCH["y"]})
    assert int(metrics["skipped"]) == 1
    chex.assert_trees_all_equal(nnx.state(model, nnx.Param), before)
    assert float(trainer.state.loss_scale.loss_scale) == 2.0**14
    assert int(trainer.step(BATCH)["skipped"]) == 0


def test_loss_terms_and_weighting():
    def terms(model, batch):
        y = model(batch["x"].astype(model.layers[0].kernel.dtype)).astype(jnp.float32)
        return {"mse": jnp.mean(jnp.square(y - batch["y"])), "l1": jnp.mean(jnp.abs(y))}

    trainer = Trainer(
        MLP(nnx.Rngs(0)), terms, optax.sgd(1e-2), weighting=Weighted({"mse": 1.0, "l1": 0.5})
    )
    metrics = trainer.step(BATCH)
    np.testing.assert_allclose(
        metrics["loss"], metrics["loss/mse"] + 0.5 * metrics["loss/l1"], rtol=1e-6
    )


def test_delayed_fp8_histories_follow_the_steps():
    model = MLP(nnx.Rngs(0))
    trainer = Trainer(model, mse, optax.adam(1e-2), precision=RULES, fp8_scaling="delayed")
    histories = lambda: jax.tree_util.tree_leaves(nnx.state(model, Fp8Meta))
    assert histories() and not any(bool(h.any()) for h in histories())
    trainer.step(BATCH)
    assert any(bool(h.any()) for h in histories())  # the model holds the state's new amaxes
    chex.assert_trees_all_equal(nnx.state(model, Fp8Meta), trainer.state.fp8_meta)


def test_state_that_changes_as_the_model_runs_is_refused():
    class WithBatchNorm(nnx.Module):
        def __init__(self, rngs):
            self.dense = nnx.Linear(8, 4, rngs=rngs)
            self.norm = nnx.BatchNorm(4, rngs=rngs)

        def __call__(self, x):
            return self.norm(self.dense(x))

    with pytest.raises(ValueError, match=r"BatchStat state at 'norm/mean'"):
        Trainer(WithBatchNorm(nnx.Rngs(0)), mse, optax.sgd(0.1))
    with pytest.raises(TypeError, match=r"nnx\.Module"):
        Trainer({"w": jnp.ones(3)}, mse, optax.sgd(0.1))
