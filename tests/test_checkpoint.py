"""Checkpoints: dtypes kept, resume bit-identical in a fresh process, faults survived, another
device layout restored, clear misfits (RELIABILITY rows 6, 7, 12 and 13).

The model, data and the training process the subprocess tests start live in _checkpoint_child.py.
"""

import contextlib
import dataclasses
import os
import random
import re
import select
import subprocess
import sys
import textwrap
import time

import chex
import jax
import jax.numpy as jnp
import pytest
from _checkpoint_child import (
    FAULT_RECIPE,
    FAULT_SHAPE,
    RECIPES,
    TX,
    batch,
    fresh,
    params,
    train_step,
)

from hybrid_jax.train import Checkpointer, TrainState

CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_checkpoint_child.py")
TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax's name for a step still being written


def _child_env(tmp_path, **extra):
    # One compilation cache for the test's children: only the first compiles the train step.
    return {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        **extra,
    }


@contextlib.contextmanager
def _child(tmp_path, *args, **popen):
    """A running ``_checkpoint_child.py ARGS``, killed on the way out if still running."""
    with open(tmp_path / "child_stderr.txt", "ab") as stderr:  # a file: a pipe could fill up
        child = subprocess.Popen(
            [sys.executable, CHILD, *map(str, args)],
            env=_child_env(tmp_path),
            stderr=stderr,
            **popen,
        )
    try:
        yield child
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()
        for stream in (child.stdin, child.stdout):
            if stream is not None:
                stream.close()


def _stderr(tmp_path):
    return (tmp_path / "child_stderr.txt").read_text()[-3000:]


def _at_step(state, step):
    return dataclasses.replace(state, step=jnp.asarray(step, jnp.int32))


def _leftovers(folder):
    return sorted(n for n in os.listdir(folder) if TMP_SUFFIX in n or n == "deleted")


def test_resume_in_a_fresh_process_is_bit_identical_to_an_uninterrupted_run(tmp_path):
    # RELIABILITY row 7: 6 steps straight vs 3 + save + restore in a fresh process + 3, for
    # fp32, bf16-mixed and fp16-mixed. The data position is the step (batches from state.step).
    half, out = tmp_path / "half", tmp_path / "out"
    straight = {}
    for recipe in RECIPES:
        step, state = train_step(recipe), fresh(recipe)
        for t in range(6):
            state, _ = step(state, batch(int(state.step)))
            if t == 2:  # a snapshot after 3 steps; this run goes on uninterrupted
                with Checkpointer(half / recipe) as ckpt:
                    ckpt.save(state, meta={"recipe": recipe})
        straight[recipe] = state
    with _child(tmp_path, "resume", half, out, 3) as child:
        assert child.wait(timeout=120) == 0, _stderr(tmp_path)

    for recipe in RECIPES:
        with Checkpointer(out / recipe) as ckpt:
            resumed, meta = ckpt.restore(fresh(recipe))
        assert meta == {"recipe": recipe} and int(resumed.step) == 6
        # params, every optimizer state of every group, the loss scale with its counter and
        # minimum, the step (the data position) and the PRNG key: bitwise, and every dtype
        chex.assert_trees_all_equal(resumed, straight[recipe])
        chex.assert_trees_all_equal_dtypes(resumed, straight[recipe])
    assert float(resumed.loss_scale.min_loss_scale) == 4.0  # fp16-mixed: jmp loses it (PR #44)


def test_every_state_leaf_keeps_its_dtype_and_the_loss_scale_floor(tmp_path):
    loss_scale = RECIPES["fp16-mixed"][1]
    state = TrainState.create(params(), TX, loss_scale=loss_scale, precision="bf16-pure")
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(state)
        ckpt.wait()
        restored, _ = ckpt.restore(state)
    chex.assert_trees_all_equal(restored, state)
    chex.assert_trees_all_equal_dtypes(restored, state)
    momentum = restored.opt_state.inner_states["^b/"].inner_state[0].trace["b"]["kernel"]
    assert momentum.dtype == jnp.bfloat16  # the narrowed optimizer state stays narrow
    assert float(restored.loss_scale.min_loss_scale) == 4.0  # jmp loses it (PR #44)


@pytest.mark.parametrize(
    ("saved", "wanted", "message"),
    [
        ({"width": 8}, {"width": 16}, r"params/a/0/kernel has shape \(4, 16\) here but \(4, 8\)"),
        ({}, {"depth": 2}, r"params/a/1/kernel is in this run's state but not in the checkpoint"),
        ({"depth": 2}, {}, r"params/a/1/kernel is in the checkpoint but not in this run's state"),
        ({}, {"precision": "bf16-pure"}, r"params/a/0/bias has dtype bfloat16 here but float32"),
    ],
    ids=["width", "deeper", "shallower", "dtype"],
)
def test_restoring_into_another_model_is_an_error_naming_the_path(saved, wanted, message, tmp_path):
    # RELIABILITY row 12.
    make = lambda width=8, depth=1, precision=None: TrainState.create(
        params(width=width, depth=depth), TX, precision=precision
    )
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(make(**saved))
        ckpt.wait()
        with pytest.raises(ValueError, match=r"step 0 does not fit this run's state") as error:
            ckpt.restore(make(**wanted))
    assert str(tmp_path) in str(error.value)
    assert "same model and optimizer settings as the saved run" in str(error.value)
    assert re.search(message, str(error.value)), str(error.value)


def test_no_checkpoint_is_a_file_not_found_error(tmp_path):
    with Checkpointer(tmp_path) as ckpt, pytest.raises(FileNotFoundError, match="no checkpoint"):
        ckpt.restore(fresh("fp32"))


def test_saving_a_step_twice_is_an_error_without_debris(tmp_path):
    # RELIABILITY row 6, last clause; also while the first save of the step is still in flight.
    state = fresh("fp32")
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(state)
        assert ckpt.has(0) and not ckpt.has(1)
        twice = rf"step 0 is already saved in {re.escape(str(tmp_path))}"
        with pytest.raises(ValueError, match=twice):
            ckpt.save(state)  # in flight
        ckpt.wait()
        with pytest.raises(ValueError, match=twice):
            ckpt.save(state)  # on disk
        ckpt.save(_at_step(state, 2))
        with pytest.raises(ValueError, match=r"step 1 is older than the latest checkpoint"):
            ckpt.save(_at_step(state, 1))
        ckpt.wait()
        assert ckpt.all_steps() == [0, 2]
    assert sorted(os.listdir(tmp_path)) == ["0", "2"]


def test_discarding_later_steps_goes_back_to_an_earlier_one(tmp_path):
    # What a rollback does: drop the abandoned path's checkpoints, then train on and save again.
    state = fresh("fp32")
    with Checkpointer(tmp_path) as ckpt:
        for t in range(3):
            ckpt.save(_at_step(state, t))
        ckpt.discard_after(0)
        assert ckpt.all_steps() == [0] and not ckpt.has(1)
        ckpt.save(_at_step(state, 1))
        ckpt.wait()
    assert sorted(os.listdir(tmp_path)) == ["0", "1"]


def test_a_new_checkpointer_never_lists_and_then_removes_a_killed_writers_leftovers(tmp_path):
    # What a writer SIGKILLed mid-save (an unfinished step) or while emptying its trash (old
    # steps, renamed away) leaves; the fault test below makes the first kind for real.
    state = fresh("fp32")
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(state)
    for leftover in (f"1{TMP_SUFFIX}", "deleted/0"):
        os.makedirs(tmp_path / leftover / "state")
        (tmp_path / leftover / "state" / "junk").write_bytes(b"\0" * 100)
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.all_steps() == [0] and ckpt.latest_step() == 0
        ckpt.save(_at_step(state, 1))
        ckpt.wait()
        assert ckpt.all_steps() == [0, 1]
    assert _leftovers(tmp_path) == []
    with Checkpointer(tmp_path) as ckpt:
        restored, _ = ckpt.restore(state)
    assert int(restored.step) == 1


def _reference(recipe, shape):
    """The states of an uninterrupted run, step by step, on the host."""
    step, state = train_step(recipe), fresh(recipe, **shape)
    while True:
        yield jax.device_get(state)
        state, _ = step(state, batch(int(state.step), shape["inputs"]))


def test_killing_the_trainer_at_random_moments_of_its_saves_never_loses_or_corrupts(tmp_path):
    # Over 10 s: eleven trainer processes, each about 2 s from start to its first save (the
    # import of JAX and orbax; the train step comes from the test's compilation cache).
    # RELIABILITY row 6 (issue 8): SIGKILL a training process at random moments during its
    # checkpoint writes, 10 times; every time the latest complete checkpoint restores, bitwise
    # equal to an uninterrupted run at that step, and training resumes from it.
    folder = tmp_path / "ckpt"
    reference, states = _reference(FAULT_RECIPE, FAULT_SHAPE), []

    def at(step):  # the uninterrupted run's state at `step`, computed as far as needed
        while len(states) <= step:
            states.append(next(reference))
        return states[step]

    like = fresh(FAULT_RECIPE, **FAULT_SHAPE)
    moments, latest, killed_mid_write = random.Random(0), 0, 0
    for _ in range(10):
        with _child(tmp_path, "train", folder, 10**6, stdout=subprocess.PIPE) as trainer:
            ready, _, _ = select.select([trainer.stdout], [], [], 120)
            assert ready and trainer.stdout.readline().startswith(b"saving"), _stderr(tmp_path)
            time.sleep(moments.uniform(0.0, 0.3))  # into its later saves
            trainer.kill()
            assert trainer.wait() == -9
        killed_mid_write += any(TMP_SUFFIX in name for name in os.listdir(folder))

        with Checkpointer(folder) as ckpt:
            steps = ckpt.all_steps()
            assert steps == sorted(int(name) for name in os.listdir(folder) if name.isdigit())
            assert ckpt.latest_step() == (steps[-1] if steps else None)
            for step in steps:  # every listed step is complete, not just the latest
                restored, _ = ckpt.restore(like, step)
                chex.assert_trees_all_equal(restored, at(step))
                chex.assert_trees_all_equal_dtypes(restored, at(step))
        assert (steps[-1] if steps else 0) >= latest  # nothing committed is ever lost
        latest = steps[-1] if steps else 0

    until = latest + 5  # the last run resumes and finishes
    with _child(tmp_path, "train", folder, until, stdout=subprocess.DEVNULL) as trainer:
        assert trainer.wait(timeout=120) == 0, _stderr(tmp_path)
    with Checkpointer(folder) as ckpt:
        assert ckpt.latest_step() == until
        final, _ = ckpt.restore(like)
    chex.assert_trees_all_equal(final, at(until))
    assert _leftovers(folder) == []  # the last run cleaned what the killed ones left
    print(f"{killed_mid_write} of 10 kills left an unfinished step; resumed to step {latest}")
    assert killed_mid_write > 0, "no kill landed during a write: the test tests nothing"


_MESH_SCRIPT = """
import sys
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P, SingleDeviceSharding
sys.path.insert(0, {tests!r})
import chex
from _checkpoint_child import fresh
from hybrid_jax.train import Checkpointer

assert jax.device_count() == 8, jax.devices()
mesh8 = Mesh(np.array(jax.devices()), ("d",))
mesh42 = Mesh(np.array(jax.devices()).reshape(4, 2), ("x", "y"))

def spec(x, mesh):
    # Shard each axis over one mesh axis where it divides, in order; replicate the rest.
    axes, names = [], list(mesh.axis_names)
    for n in x.shape:
        axes.append(names.pop(0) if names and n % mesh.shape[names[0]] == 0 else None)
    return NamedSharding(mesh, P(*axes))

on = lambda tree, mesh: jax.tree.map(lambda x: jax.device_put(x, spec(x, mesh)), tree)
one = SingleDeviceSharding(jax.devices()[0])
# Distinct values in every leaf, so a misplaced shard shows.
state = jax.tree.map(
    lambda x: x + np.arange(x.size, dtype=x.dtype).reshape(x.shape), fresh("fp16-mixed", width=16)
)

def check(saved, like, folder):
    with Checkpointer(folder) as ckpt:
        ckpt.save(saved)
        ckpt.wait()
        restored, _ = ckpt.restore(like)
    chex.assert_trees_all_equal(jax.device_get(restored), jax.device_get(state))
    chex.assert_trees_all_equal_dtypes(restored, state)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(like)):
        assert got.sharding.is_equivalent_to(want.sharding, got.ndim), (got.sharding, want.sharding)

sharded = on(state, mesh8)
assert any(len(x.sharding.device_set) == 8 for x in jax.tree.leaves(sharded))
check(sharded, jax.device_put(state, one), {folder!r} + "/8_to_1")
check(sharded, on(state, mesh42), {folder!r} + "/8_to_4x2")
abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        on(state, mesh42))
check(sharded, abstract, {folder!r} + "/8_to_4x2_abstract")
check(jax.device_put(state, one), sharded, {folder!r} + "/1_to_8")
with Checkpointer({folder!r} + "/1_to_8") as ckpt:  # no sharding given: the first device
    restored, _ = ckpt.restore(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                            state))
assert all(x.sharding == one for x in jax.tree.leaves(restored))
print("ok")
"""


def test_a_state_saved_on_8_devices_restores_onto_1_device_and_a_4x2_mesh(tmp_path):
    # Eight CPU devices exist only if XLA_FLAGS says so before JAX starts: a fresh process.
    script = _MESH_SCRIPT.format(tests=os.path.dirname(CHILD), folder=str(tmp_path))
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        env=_child_env(
            tmp_path,
            XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8",
        ),
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


# RELIABILITY row 13: every optimizer-state leaf's dtype, per recipe, against what the recipe
# says, and the same after a checkpoint round trip.
def _expected_state_dtype(recipe, path):
    if path.endswith("count"):  # Optax's step counters, the stochastic-rounding counter
        return jnp.int32
    if path.endswith("ns_coeffs"):  # Muon's Newton-Schulz constants
        return jnp.float32
    if recipe == "bf16-pure":  # no master weights: Optax keeps the moments in the params' bf16
        return jnp.bfloat16
    if recipe == "bf16-lean":  # 8-bit moments (uint8 codes, fp32 block scales) where they fit
        return jnp.uint8 if path.endswith("/codes") else jnp.float32
    return jnp.float32  # fp32 master weights: fp32 moments


@pytest.mark.parametrize("recipe", ["fp32", "bf16-mixed", "fp16-mixed", "bf16-pure", "bf16-lean"])
def test_every_optimizer_state_dtype_is_the_recipes_and_survives_a_round_trip(recipe, tmp_path):
    from hybrid_jax.app.config import RunConfig
    from hybrid_jax.app.run import build
    from hybrid_jax.tree import leaves_with_paths

    state = build(RunConfig(precision=recipe, n_layer=1, n_head=2, n_embd=64, block_size=16)).state
    leaves = leaves_with_paths(state.opt_state)[0]
    wrong = [
        (path, leaf.dtype)
        for path, leaf in leaves
        if leaf.dtype != _expected_state_dtype(recipe, path)
    ]
    assert not wrong, wrong
    if recipe == "bf16-lean":
        assert any(path.endswith("/codes") for path, _ in leaves)  # the 64x256 MLP matrices
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(state)
        restored, _ = ckpt.restore(state)
    chex.assert_trees_all_equal_dtypes(restored, state)
    chex.assert_trees_all_equal(restored, state)
