"""Bring your own Equinox model: its arrays, split off with ``eqx.partition``, train like any
parameter tree. Path rules read its field names and list indices (``layers/0/weight``), and the
``None`` that ``eqx.partition`` leaves where the static parts were passes through the casts, the
per-path optimizers, the EMA, the loss scale and the finite checks."""

import itertools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hybrid_jax as hj
from hybrid_jax.tree import leaves_with_paths

eqx = pytest.importorskip("equinox")

F32, BF16, F16 = np.dtype(jnp.float32), np.dtype(jnp.bfloat16), np.dtype(jnp.float16)
SIZES = (4, 16, 16, 2)
RULES = hj.PrecisionRules([("layers/0", "fp32"), (".*", "bf16-mixed")])
HIDDEN = r"^layers/1/weight$"  # Muon's: the one matrix between two hidden layers


class MLP(eqx.Module):
    """A user's own Equinox model: ``eqx.nn.Linear`` layers in a list and a function field.

    ``eqx.nn.Linear`` computes in whatever its input and weight promote to, so each layer casts
    its input to its weight's dtype: a layer the rules keep in fp32 computes in fp32, the others
    in bf16 (and strict dtype promotion never meets a bf16 weight times an fp32 input).
    """

    layers: list[eqx.nn.Linear]
    activation: Callable

    def __init__(self, sizes, key):
        keys = jax.random.split(key, len(sizes) - 1)
        self.layers = [
            eqx.nn.Linear(m, n, key=k)
            for (m, n), k in zip(itertools.pairwise(sizes), keys, strict=True)
        ]
        self.activation = jax.nn.gelu

    def __call__(self, x):
        for layer in self.layers[:-1]:
            x = self.activation(layer(x.astype(layer.weight.dtype)))
        last = self.layers[-1]
        return last(x.astype(last.weight.dtype)).astype(jnp.float32)


def split(model):
    return eqx.partition(model, eqx.is_inexact_array)


# The static half (the activation, the layers' sizes) is the same for every copy of the model.
_, STATIC = split(MLP(SIZES, jax.random.key(0)))


def fresh_params():
    """New arrays each time: a train step donates the state it is given."""
    return split(MLP(SIZES, jax.random.key(0)))[0]


def loss_terms(params, batch, rng):
    del rng
    model = eqx.combine(params, STATIC)
    y = jax.vmap(model)(batch["x"])
    return {"mse": jnp.mean(jnp.square(y - batch["y"]))}


def make_batch(seed, n=64):
    x = jax.random.normal(jax.random.key(seed), (n, SIZES[0]), jnp.float32)
    return {"x": x, "y": jnp.stack([jnp.sin(2 * x[:, 0]), x[:, 1] * x[:, 2]], axis=1)}


def hybrid_rules():
    """Muon on the hidden matrix, AdamW on the input and output layers and the biases."""
    return [(HIDDEN, hj.optim.muon(0.05, consistent_rms=0.2)), (".*", optax.adamw(3e-2))]


def test_paths_are_field_names_and_list_indices():
    params, static = split(eqx.nn.MLP(4, 2, 8, depth=2, key=jax.random.key(0)))
    paths = [path for path, _ in leaves_with_paths(params)[0]]
    assert paths == [f"layers/{i}/{name}" for i in range(3) for name in ("weight", "bias")]
    # The activations went to the static half, the arrays to params: None marks each gap.
    assert params.activation is None and static.activation is not None
    assert static.layers[0].weight is None
    assert hj.tree.tree_paths(params).layers[2].bias == "layers/2/bias"


def test_rules_pick_each_leafs_dtypes():
    params = fresh_params()
    compute = hj.cast_to_compute(params, RULES)
    dtypes = {path: x.dtype for path, x in leaves_with_paths(compute)[0]}
    assert dtypes == {
        "layers/0/weight": F32,
        "layers/0/bias": F32,
        **{f"layers/{i}/{name}": BF16 for i in (1, 2) for name in ("weight", "bias")},
    }
    # Master weights stay fp32; the None where the activation was passes through every cast.
    master = hj.cast_to_param(params, RULES)
    assert {x.dtype for x in jax.tree_util.tree_leaves(master)} == {F32}
    for tree in (compute, master, RULES.plan(params)):
        assert tree.activation is None
        assert jax.tree_util.tree_structure(tree) == jax.tree_util.tree_structure(params)
    table = RULES.summary(params)
    assert [row[0] for row in table.rows] == [p for p, _ in leaves_with_paths(params)[0]]
    assert [row[3] for row in table.rows] == ["layers/0"] * 2 + [".*"] * 4
    # The model rebuilt from cast params runs the first layer in fp32, the rest in bf16.
    y = eqx.combine(compute, STATIC)(jnp.ones(SIZES[0]))
    assert y.shape == (SIZES[-1],) and y.dtype == F32


@pytest.fixture(scope="module")
def trained():
    """Ten steps of bf16-mixed (first layer fp32) with Muon + AdamW by path and an EMA."""
    tx = hj.optim.by_path(hybrid_rules())
    ema = hj.mixing.EMA(decay=0.5)
    step = hj.make_train_step(loss_terms, optimizer=tx, precision=RULES, ema=ema)
    state = hj.TrainState.create(fresh_params(), tx, precision=RULES, ema=ema)
    batch, losses = make_batch(1), []
    for _ in range(10):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return state, losses


def test_per_path_optimizers_lower_the_loss(trained):
    state, losses = trained
    assert all(b < a for a, b in itertools.pairwise(losses)), losses
    assert losses[-1] < 0.6 * losses[0], losses
    labels = hj.optim.group_labels(hybrid_rules(), fresh_params())
    assert labels.layers[1].weight == HIDDEN
    assert {labels.layers[i].weight for i in (0, 2)} == {".*"}
    # Master params and their EMA keep the model's structure (None included) and fp32.
    structure = jax.tree_util.tree_structure(fresh_params())
    assert jax.tree_util.tree_structure(state.params) == structure
    assert jax.tree_util.tree_structure(state.ema_params) == structure
    assert {x.dtype for x in jax.tree_util.tree_leaves((state.params, state.ema_params))} == {F32}
    ema_w, w = state.ema_params.layers[1].weight, state.params.layers[1].weight
    assert not np.array_equal(ema_w, w)  # the EMA lags behind
    assert int(state.step) == 10


def _sgd_step_result(precision):
    tx = optax.sgd(0.1)
    step = hj.make_train_step(loss_terms, optimizer=tx, precision=precision, donate=False)
    state = hj.TrainState.create(fresh_params(), tx, precision=precision)
    new, metrics = step(state, make_batch(2))
    update = jax.tree_util.tree_map(jnp.subtract, new.params, state.params)
    return float(metrics["loss"]), update


def test_bf16_mixed_step_matches_the_fp32_step():
    # One SGD step, so that the update is the gradient itself (Adam's first update is about
    # lr * sign(g), which turns a rounding error in a near-zero gradient into a 2 * lr jump).
    # bf16 keeps 8 significant bits, a relative spacing of 2**-8 = 0.4%; each rounding (weights,
    # activations, matmul results, forward and backward) errs by half that. The update is held
    # to 4 * 2**-8 norm-wise (measured: 0.37%, one spacing: the roundings of three layers mostly
    # cancel); the loss, a mean over 128 squared errors whose roundings average out, to one
    # spacing (measured: 0.01%). The error must not be 0: layers 1 and 2 did compute in bf16.
    loss32, update32 = _sgd_step_result("fp32")
    loss16, update16 = _sgd_step_result(RULES)
    assert loss16 == pytest.approx(loss32, rel=2**-8)
    flat32, flat16 = (
        jnp.concatenate([x.ravel() for x in jax.tree_util.tree_leaves(u)])
        for u in (update32, update16)
    )
    assert flat16.dtype == F32  # applied to fp32 master weights
    error = float(jnp.linalg.norm(flat16 - flat32) / jnp.linalg.norm(flat32))
    assert 0 < error < 4 * 2**-8, error


def test_fp16_dynamic_loss_scale_skips_an_inf_step():
    tx = hj.optim.by_path(hybrid_rules())
    loss_scale = hj.DynamicLossScale(jnp.asarray(2.0**15, jnp.float32))
    step = hj.make_train_step(
        loss_terms, optimizer=tx, precision="fp16-mixed", loss_scale=loss_scale, donate=False
    )
    state = hj.TrainState.create(fresh_params(), tx, loss_scale=loss_scale)
    state, metrics = step(state, make_batch(1))  # one real step: the optimizer state is not 0
    assert int(metrics["skipped"]) == 0
    batch = make_batch(1)
    batch["x"] = batch["x"].at[3, 0].set(jnp.inf)
    skipped, metrics = step(state, batch)
    assert int(metrics["skipped"]) == 1
    for kept in ("params", "opt_state"):
        same = jax.tree_util.tree_map(np.array_equal, getattr(skipped, kept), getattr(state, kept))
        assert all(jax.tree_util.tree_leaves(same)), kept
    assert float(skipped.loss_scale.loss_scale) == 2.0**14  # backed off
    assert int(skipped.step) == int(state.step) + 1
    resumed, metrics = step(skipped, make_batch(1))
    assert int(metrics["skipped"]) == 0
    assert not np.array_equal(resumed.params.layers[1].weight, state.params.layers[1].weight)


def test_an_unsplit_model_is_refused_with_the_fix():
    model = MLP(SIZES, jax.random.key(0))
    with pytest.raises(TypeError, match=r"(?s)activation: .*eqx\.partition\(model"):
        hj.TrainState.create(model, optax.sgd(0.1))
    with pytest.raises(TypeError, match=r"(?s)activation: .*eqx\.partition\(model"):
        hj.optim.describe(hybrid_rules(), model)
    # The summary shows the arrays and skips the function.
    assert len(RULES.summary(model).rows) == 6
