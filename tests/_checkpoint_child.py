"""The model, data and optimizer of tests/test_checkpoint.py, and the training process that its
fault and fresh-process resume tests start.

As a script (the test starts it with ``sys.executable``):

- ``train FOLDER UNTIL``: resume from the latest checkpoint in FOLDER (or start fresh), train the
  fault test's model up to step UNTIL, saving every step asynchronously and printing
  ``saving <step>`` after each save starts.
- ``resume FOLDER OUT STEPS``: for each recipe, restore ``FOLDER/<recipe>``, train STEPS more
  steps and save the result in ``OUT/<recipe>``.

Batches are a function of the step alone (the data position is ``state.step``), so a resumed run
sees the same data as an uninterrupted one.
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import hybrid_jax as hj
from hybrid_jax.optim import by_path, with_state_dtype
from hybrid_jax.train import Checkpointer, TrainState, make_train_step

TX = by_path(
    [(r"^a/", optax.adam(1e-2)), (r"^b/", with_state_dtype(optax.sgd(0.1, momentum=0.9), "bf16"))]
)

RECIPES = {
    "fp32": ("fp32", hj.NoOpLossScale()),
    "bf16-mixed": ("bf16-mixed", hj.NoOpLossScale()),
    "fp16-mixed": ("fp16-mixed", hj.DynamicLossScale(2.0**15, period=2, min_loss_scale=4.0)),
}

# The fault test's model: big enough that a save takes a while to write (about 1 MB of state).
FAULT_SHAPE = {"width": 256, "depth": 2, "inputs": 64}
FAULT_RECIPE = "fp16-mixed"


def params(width=8, depth=1, inputs=4):
    """An MLP: ``depth`` tanh layers of ``width`` under ``a/``, a linear read-out under ``b/``."""
    rng = np.random.default_rng(0)
    w = lambda *s: jnp.asarray(rng.normal(0, 0.3, s), jnp.float32)
    layers = [
        {"kernel": w(inputs if i == 0 else width, width), "bias": w(width)} for i in range(depth)
    ]
    return {"a": layers, "b": {"kernel": w(width, 2)}}


def terms(params, batch, rng):
    h = batch["x"].astype(params["b"]["kernel"].dtype)
    for layer in params["a"]:
        h = jnp.tanh(h @ layer["kernel"] + layer["bias"])
    out = (h @ params["b"]["kernel"]).astype(jnp.float32)
    noise = jax.random.normal(jax.random.wrap_key_data(rng), out.shape) * 1e-3  # uses the rng
    return {"mse": jnp.mean((out + noise - batch["y"]) ** 2)}


def batch(t, inputs=4):
    """The batch of step ``t``."""
    rng = np.random.default_rng(t)
    return {
        "x": jnp.asarray(rng.normal(size=(8, inputs)), jnp.float32),
        "y": jnp.asarray(rng.normal(size=(8, 2)), jnp.float32),
    }


def fresh(recipe, **shape):
    """Step 0 of a run of ``recipe``."""
    return TrainState.create(params(**shape), TX, loss_scale=RECIPES[recipe][1], rng=7)


def train_step(recipe):
    precision, loss_scale = RECIPES[recipe]
    return make_train_step(terms, optimizer=TX, precision=precision, loss_scale=loss_scale)


def _train(folder, until):
    step_fn = train_step(FAULT_RECIPE)
    # Committed to the device like a restored state, so that a fresh and a resumed run share one
    # compiled step (jit tells the two apart), which the compilation cache then holds.
    state = jax.device_put(fresh(FAULT_RECIPE, **FAULT_SHAPE), jax.devices()[0])
    with Checkpointer(folder) as ckpt:
        if ckpt.latest_step() is not None:
            state, _ = ckpt.restore(state)
        while (t := int(state.step)) < until:
            state, _ = step_fn(state, batch(t, FAULT_SHAPE["inputs"]))
            ckpt.save(state)
            print(f"saving {t + 1}", flush=True)


def _resume(folder, out, steps):
    for recipe in RECIPES:
        step_fn = train_step(recipe)
        with Checkpointer(os.path.join(folder, recipe)) as ckpt:
            state, meta = ckpt.restore(fresh(recipe))
        for _ in range(steps):
            state, _ = step_fn(state, batch(int(state.step)))
        with Checkpointer(os.path.join(out, recipe)) as ckpt:
            ckpt.save(state, meta=meta)


if __name__ == "__main__":
    # As the tests run (conftest.py): an implicit upcast is an error, not a silent difference.
    jax.config.update("jax_numpy_dtype_promotion", "strict")
    command, *args = sys.argv[1:]
    if command == "train":
        _train(args[0], int(args[1]))
    elif command == "resume":
        _resume(args[0], args[1], int(args[2]))
    else:
        raise SystemExit(f"unknown command {command!r}: train or resume")
