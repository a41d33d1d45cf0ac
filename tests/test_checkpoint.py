"""Checkpoints: dtypes kept, resume bit-identical (RELIABILITY rows 7 and 13), clear misfits."""

import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hybrid_jax as hj
from hybrid_jax.optim import by_path, with_state_dtype
from hybrid_jax.train import Checkpointer, TrainState, make_train_step


def _params(width=8):
    rng = np.random.default_rng(0)
    w = lambda *s: jnp.asarray(rng.normal(0, 0.3, s), jnp.float32)
    return {"a": {"kernel": w(4, width), "bias": w(width)}, "b": {"kernel": w(width, 2)}}


def _terms(params, batch, rng):
    x = batch["x"].astype(params["a"]["kernel"].dtype)
    h = jnp.tanh(x @ params["a"]["kernel"] + params["a"]["bias"])
    out = (h @ params["b"]["kernel"]).astype(jnp.float32)
    noise = jax.random.normal(jax.random.wrap_key_data(rng), out.shape) * 1e-3  # uses the rng
    return {"mse": jnp.mean((out + noise - batch["y"]) ** 2)}


def _batch(t):
    rng = np.random.default_rng(t)
    return {
        "x": jnp.asarray(rng.normal(size=(8, 4)), jnp.float32),
        "y": jnp.asarray(rng.normal(size=(8, 2)), jnp.float32),
    }


_TX = by_path(
    [(r"^a/", optax.adam(1e-2)), (r"^b/", with_state_dtype(optax.sgd(0.1, momentum=0.9), "bf16"))]
)

_RECIPES = {
    "fp32": ("fp32", hj.NoOpLossScale()),
    "bf16-mixed": ("bf16-mixed", hj.NoOpLossScale()),
    "fp16-mixed": ("fp16-mixed", hj.DynamicLossScale(2.0**15, period=2, min_loss_scale=4.0)),
}


@pytest.mark.parametrize("recipe", list(_RECIPES))
def test_resume_is_bit_identical_to_an_uninterrupted_run(recipe, tmp_path):
    precision, loss_scale = _RECIPES[recipe]
    step = make_train_step(_terms, optimizer=_TX, precision=precision, loss_scale=loss_scale)
    fresh = lambda: TrainState.create(_params(), _TX, loss_scale=loss_scale, rng=7)

    straight = fresh()
    for t in range(6):
        straight, _ = step(straight, _batch(t))

    half = fresh()
    for t in range(3):
        half, _ = step(half, _batch(t))
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(half, meta={"recipe": recipe})
    del half
    with Checkpointer(tmp_path) as ckpt:  # a new manager, as after a restart
        resumed, meta = ckpt.restore(fresh())
    assert meta == {"recipe": recipe} and int(resumed.step) == 3
    for t in range(3, 6):
        resumed, _ = step(resumed, _batch(t))

    chex.assert_trees_all_equal(resumed, straight)  # params, every state, scale, step, rng
    chex.assert_trees_all_equal_dtypes(resumed, straight)


def test_every_state_leaf_keeps_its_dtype_and_the_loss_scale_floor(tmp_path):
    loss_scale = hj.DynamicLossScale(2.0**3, min_loss_scale=4.0, period=5)
    state = TrainState.create(_params(), _TX, loss_scale=loss_scale, precision="bf16-pure")
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(state)
        ckpt.wait()
        restored, _ = ckpt.restore(state)
    chex.assert_trees_all_equal(restored, state)
    chex.assert_trees_all_equal_dtypes(restored, state)
    momentum = restored.opt_state.inner_states["^b/"].inner_state[0].trace["b"]["kernel"]
    assert momentum.dtype == jnp.bfloat16  # the narrowed optimizer state stays narrow
    assert float(restored.loss_scale.min_loss_scale) == 4.0  # jmp loses it (PR #44)


def test_restoring_into_another_model_is_an_error_naming_the_checkpoint(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(TrainState.create(_params(width=8), _TX))
        ckpt.wait()
        with pytest.raises(ValueError, match=r"step 0 does not fit this run's state"):
            ckpt.restore(TrainState.create(_params(width=16), _TX))
    with Checkpointer(tmp_path / "empty") as ckpt, pytest.raises(FileNotFoundError):
        ckpt.restore(TrainState.create(_params(), _TX))


def test_a_writer_killed_mid_save_leaves_the_last_complete_checkpoint(tmp_path):
    # RELIABILITY row 6, in small: a process saves step 0, then is SIGKILLed while saving step 1.
    script = textwrap.dedent(f"""
        import os, signal, threading
        import jax.numpy as jnp, optax
        from hybrid_jax.train import Checkpointer, TrainState
        state = TrainState.create({{"w": jnp.zeros((256, 256))}}, optax.adam(1e-3))
        ckpt = Checkpointer({str(tmp_path)!r})
        ckpt.save(state)
        ckpt.wait()
        state = TrainState(**{{**state.__dict__, "step": state.step + 1}})
        threading.Timer(0.01, lambda: os.kill(os.getpid(), signal.SIGKILL)).start()
        ckpt.save(state)
        ckpt.wait()
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, check=False)
    assert result.returncode == -9, result.stderr.decode()[-2000:]
    like = TrainState.create({"w": jnp.zeros((256, 256))}, optax.adam(1e-3))
    with Checkpointer(tmp_path) as ckpt:
        latest = ckpt.latest_step()
        assert latest in (0, 1)  # step 1 is listed only if its commit finished before the kill
        restored, _ = ckpt.restore(like)
    assert int(restored.step) == latest
