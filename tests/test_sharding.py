"""Sharding over a device mesh: data parallel, FSDP, both (tests/test_distributed.py: processes).

The multi-device checks run in subprocesses: ``XLA_FLAGS=--xla_force_host_platform_device_count=8``
must be set before JAX starts, and this pytest worker has already started it with one device.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jax.sharding import PartitionSpec

from hybrid_jax.app.config import RunConfig
from hybrid_jax.train import TrainState
from hybrid_jax.train.sharding import (
    check_batch,
    fsdp_spec,
    initialize_distributed,
    make_mesh,
    parse_mesh,
    state_shardings,
)

HERE = os.path.dirname(os.path.abspath(__file__))


def _env(devices: int | None = None) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    if devices:  # after conftest.py's compiler flags, which the child keeps
        flags = os.environ.get("XLA_FLAGS", "")
        env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
    return env


# ----------------------------------------------------------------------------------------------
# In this process (one device): the mesh grammar and the sharding rule


@pytest.mark.parametrize(
    "spec, match",
    [
        ("data=4,tensor=2", r"axis 'tensor' is not one of \('data', 'fsdp'\)"),
        ("data=4,data=2", r"names an axis twice"),
        ("data4", r"cannot read 'data4'; write axis=size pairs"),
        ("data=x", r"cannot read 'data=x'"),
        ("data=0", r"data=0: sizes are positive ints, or -1"),
        ("data=-1,fsdp=-1", r"only one axis can be -1"),
    ],
)
def test_a_malformed_mesh_is_an_error_quoting_it(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_mesh(spec)
    with pytest.raises(ValueError, match=match):
        RunConfig(mesh=spec)  # caught when the run is configured, before any device is touched


def test_a_mesh_must_use_every_device_and_says_what_fits():
    one = jax.devices()[:1]
    assert dict(make_mesh(devices=one).shape) == {"data": 1, "fsdp": 1}
    assert dict(make_mesh("fsdp=-1", devices=one).shape) == {"data": 1, "fsdp": 1}
    with pytest.raises(ValueError, match=r"mesh data=2,fsdp=1 needs 2 devices but there are 1"):
        make_mesh("data=2", devices=one)
    with pytest.raises(ValueError, match=r"1 devices cannot be split into groups of 2"):
        make_mesh("data=-1,fsdp=2", devices=one)


@given(
    shape=st.lists(st.integers(1, 300), min_size=0, max_size=3),
    fsdp=st.sampled_from([1, 2, 3, 4, 8]),
)
def test_fsdp_splits_the_largest_dividing_dimension_or_nothing(shape, fsdp):
    spec = tuple(fsdp_spec(shape, fsdp))
    sharded = [i for i, axis in enumerate(spec) if axis == "fsdp"]
    dividing = [size for size in shape if size % fsdp == 0]
    if fsdp == 1 or not dividing:
        assert sharded == []
    else:
        (i,) = sharded  # one axis at most, and only one the size divides
        assert shape[i] % fsdp == 0 and shape[i] == max(dividing)
        assert i == shape.index(max(dividing))  # the first of equals


def test_state_shardings_split_params_and_moments_alike_and_replicate_the_rest():
    state = TrainState.create({"w": jnp.zeros((4, 6)), "b": jnp.zeros(3)}, optax.adam(1e-3))
    shardings = state_shardings(state, make_mesh(devices=jax.devices()[:1]))
    adam = shardings.opt_state[0]
    assert shardings.params["w"].spec == adam.mu["w"].spec == adam.nu["w"].spec
    assert shardings.step.spec == shardings.rng.spec == PartitionSpec()


def test_a_batch_the_mesh_cannot_split_names_the_leaf():
    mesh = make_mesh(devices=jax.devices()[:1])
    check_batch({"x": np.zeros((3, 2))}, mesh)  # one device divides anything
    with pytest.raises(ValueError, match=r"batch leaf 'x' has batch size no leading axis"):
        check_batch({"x": np.float32(1.0)}, mesh)


def test_distributed_needs_all_three_arguments_or_none():
    with pytest.raises(ValueError, match=r"give all of coordinator_address"):
        initialize_distributed("127.0.0.1:1234")
    with pytest.raises(ValueError, match=r"process_id must be in \[0, 2\)"):
        initialize_distributed("127.0.0.1:1234", 2, 2)


# ----------------------------------------------------------------------------------------------
# Eight CPU devices, in a subprocess (tests/_mesh_child.py)


@pytest.fixture(scope="module")
def eight_devices():
    # Over 10 s (about 13 s of CPU): one process builds and compiles the GPT's step on four
    # device layouts and the MLP's on four more, then trains each; every test below reads it.
    result = subprocess.run(
        [sys.executable, os.path.join(HERE, "_mesh_child.py")],
        capture_output=True,
        text=True,
        env=_env(devices=8),
        timeout=300,
        check=False,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert result.returncode == 0 and lines, result.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT ") :])


MESHES = ["data=8", "data=4,fsdp=2", "fsdp=8"]


@pytest.mark.parametrize("mesh", MESHES)
def test_every_mesh_gives_the_single_device_losses(eight_devices, mesh):
    # The GPT in fp16-mixed: fp32 master weights, so sharding changes only the order in which
    # fp32 partial gradients are summed (8 partial sums and an all-reduce instead of one dot).
    # That is a few fp32 ulps per step, which Adam and Muon carry through 20 steps: 4e-6 relative
    # at most in the loss, measured. 5e-5 leaves a margin and is still far below what a real
    # fault gives: a device that skips the all-reduce, or a batch split wrongly, changes the
    # loss by more than 1e-3 within a few steps.
    gpt = eight_devices["gpt"]
    reference, losses = np.array(gpt["None"]["losses"]), np.array(gpt[mesh]["losses"])
    np.testing.assert_allclose(losses, reference, rtol=5e-5)
    assert reference[-1] < reference[0] - 0.01  # it trains: the comparison is not of constants
    assert gpt[mesh]["loss_scale"] == gpt["None"]["loss_scale"]


def test_parameters_and_optimizer_state_are_sharded_as_asked(eight_devices):
    gpt = eight_devices["gpt"]
    kernel = "blocks/0/mlp/fc/kernel"  # 32 x 128
    assert gpt["data=8"]["params"][kernel] == "()"  # data parallel: whole copies
    assert gpt["data=4,fsdp=2"]["params"][kernel] == "(None, 'fsdp')"
    assert gpt["fsdp=8"]["params"][kernel] == "(None, 'fsdp')"
    for mesh in MESHES:
        assert gpt[mesh]["params"]["#devices"] == [8]
        assert gpt[mesh]["loss_scale_spec"]["loss_scale"] == "()"
    # Muon's momentum for the matrix, and AdamW's moments for the embedding, follow the params.
    fsdp = gpt["fsdp=8"]
    moments = {path: spec for path, spec in fsdp["opt_state"].items() if path.endswith(kernel)}
    assert moments and set(moments.values()) == {"(None, 'fsdp')"}, moments
    embedding = [spec for path, spec in fsdp["opt_state"].items() if "tok_embed" in path]
    assert embedding and set(embedding) == {fsdp["params"]["tok_embed/embedding"]}


def test_mixed_dtypes_frozen_groups_and_loss_scales_shard_too(eight_devices):
    runs = eight_devices["frozen_mixed"]
    reference = runs["None"]
    for mesh in MESHES:
        run = runs[mesh]
        assert (
            run["dtypes"]
            == reference["dtypes"]
            == {
                "a/bias": "bfloat16",
                "a/kernel": "bfloat16",
                "b/kernel": "float32",
                "frozen": "float32",
            }
        )
        # bf16 parameters get bf16 gradients, whose per-device partial sums are rounded to bf16
        # before the all-reduce: one bf16 ulp (2^-8) in a gradient moves an Adam update by up to
        # that much, so losses agree to 1e-2 (3.3e-3 measured), not to fp32's few ulps.
        np.testing.assert_allclose(run["losses"], reference["losses"], rtol=1e-2)
        np.testing.assert_array_equal(run["params"]["frozen"], reference["params"]["frozen"])
        assert not any("frozen" in path for path in run["opt_state"])  # no state for it
    assert runs["fsdp=8"]["param_specs"]["a/kernel"] == "(None, 'fsdp')"
    adam = runs["fsdp=8"]["opt_state"]
    assert adam["inner_states/^a//inner_state/0/mu/a/kernel"] == "(None, 'fsdp')"
    assert runs["fsdp=8"]["param_specs"]["frozen"] == "()"  # 4 values do not split 8 ways


def test_bad_meshes_and_batches_are_errors_that_say_how_to_fix_them(eight_devices):
    errors = eight_devices["errors"]
    assert errors["mesh_not_dividing"].startswith(
        "mesh data=3,fsdp=2 needs 6 devices but there are 8"
    )
    assert "'data=8' or 'data=4,fsdp=2' or 'fsdp=8'" in errors["mesh_not_dividing"]
    assert "batch leaf 'x' has batch size 12" in errors["batch_not_divisible"]
    assert "a multiple of 8" in errors["batch_not_divisible"]
    assert errors["run_batch_not_divisible"].startswith(
        "batch size 12 cannot be split over mesh 'data=8'"
    )


def test_a_run_saved_on_one_mesh_resumes_on_another(eight_devices):
    # `hybrid-jax train --resume --mesh data=4,fsdp=2` after a run on data=8: the restore puts
    # every leaf on the new mesh's shardings, and the run goes on as the one-device run does.
    resumed = eight_devices["resume"]
    assert resumed["restored_params"]["blocks/0/mlp/fc/kernel"] == "(None, 'fsdp')"
    reference = eight_devices["gpt"]["None"]["losses"]
    np.testing.assert_allclose(resumed["losses"], reference, rtol=5e-5)  # as on one mesh


def test_gradient_accumulation_keeps_each_devices_micro_batches_on_it(eight_devices):
    # Micro-batches take every n-th example, so each device's come from its own shard: the
    # compiled step all-gathers only the two FSDP weights, as without accumulation. (A contiguous
    # split gathered the batch too: 4 all-gathers.)
    assert eight_devices["accumulation"] == {"1": 2, "4": 2}
