"""Runs in a subprocess with 8 CPU devices (tests/test_sharding.py): the same runs on one device
and on meshes (8, 1), (4, 2) and (1, 8), each built and compiled once; prints one JSON object
with what the parent checks.

Importing it does nothing (pytest's doctest collection imports every module).
"""

import json
import sys


def _specs(tree):
    import jax

    from hybrid_jax.tree import leaves_with_paths

    leaves = leaves_with_paths(tree)[0]
    return {path: str(tuple(leaf.sharding.spec)) for path, leaf in leaves} | {
        "#devices": sorted({len(leaf.sharding.device_set) for _, leaf in leaves}),
        "#leaves": len(jax.tree_util.tree_leaves(tree)),
    }


def _gpt_config(mesh):
    """The main job's GPT under fp16-mixed (fp32 masters, fp16 compute, a dynamic loss scale)
    and Muon + AdamW (three optimizer groups), tiny."""
    from hybrid_jax.app.config import RunConfig

    return RunConfig(
        precision="fp16-mixed",
        steps=20,
        n_layer=1,
        n_head=2,
        n_embd=32,
        block_size=16,
        batch_size=16,
        eval_batches=1,
        mesh=mesh,
    )


def _train(run, state, steps):
    import jax

    losses = []
    for t in steps:
        state, metrics = run.step(state, run.sample_train(jax.random.fold_in(run.data_key, t)))
        losses.append(float(metrics["loss"]))
    return state, losses


def _gpt(meshes):
    """20 steps of the GPT per mesh; and the run on (8, 1) saves a checkpoint after 10 steps,
    which (4, 2) restores as `hybrid-jax train --resume --mesh ...` does (settings checked,
    leaves resharded) and trains on for steps 10-19. The resume reuses the meshes' runs: no
    build or compile of its own."""
    import dataclasses
    import tempfile

    from hybrid_jax.app.loop import _restore
    from hybrid_jax.app.run import build
    from hybrid_jax.train import Checkpointer

    save_on, resume_on = "data=8", "data=4,fsdp=2"
    assert meshes.index(save_on) < meshes.index(resume_on)
    out, resume = {}, {}
    with tempfile.TemporaryDirectory() as folder:
        for mesh in meshes:
            run = build(_gpt_config(mesh))
            if mesh == resume_on:
                with Checkpointer(folder) as ckpt:
                    restored, _ = _restore(ckpt, run.state, dataclasses.asdict(run.config))
                resume["restored_params"] = _specs(restored.params)
                _, tail = _train(run, restored, range(10, 20))
                resume["losses"] = resume.pop("head") + tail
            state, losses = _train(run, run.state, range(10))
            if mesh == save_on:
                with Checkpointer(folder) as ckpt:
                    ckpt.save(state, meta={"settings": dataclasses.asdict(run.config)})
                resume["head"] = list(losses)
            state, tail = _train(run, state, range(10, 20))
            losses += tail
            entry = {"losses": losses, "loss_scale": float(state.loss_scale.loss_scale)}
            if mesh is not None:
                entry["params"] = _specs(state.params)
                entry["opt_state"] = _specs(state.opt_state)
                entry["loss_scale_spec"] = _specs(state.loss_scale)
            out[str(mesh)] = entry
    return out, resume


def _frozen_mixed(meshes):
    """A dict MLP with bf16 and fp32 params, Adam and SGD-momentum groups and a frozen group
    (no state), under a dynamic loss scale, through make_train_step directly."""
    import jax.numpy as jnp
    import numpy as np
    import optax

    import hybrid_jax as hj
    from hybrid_jax.optim import by_path
    from hybrid_jax.train import TrainState, make_train_step
    from hybrid_jax.train.sharding import make_mesh, shard_state

    def fresh_params():  # new arrays per run: the step donates the state it is given
        rng = np.random.default_rng(0)
        w = lambda *s: jnp.asarray(rng.normal(0, 0.3, s), jnp.float32)
        return {"a": {"kernel": w(8, 64), "bias": w(64)}, "b": {"kernel": w(64, 4)}, "frozen": w(4)}

    precision = hj.PrecisionRules([("^a/", "p=bf16,c=bf16,o=f32")], default="bf16-mixed")
    tx = by_path(
        [
            ("^a/", optax.adam(1e-2)),
            ("^b/", optax.sgd(0.1, momentum=0.9)),
            ("^frozen", optax.set_to_zero()),
        ]
    )

    def terms(p, batch, key):
        del key
        h = jnp.tanh(batch["x"].astype(jnp.bfloat16) @ p["a"]["kernel"] + p["a"]["bias"])
        out = (h @ p["b"]["kernel"]).astype(jnp.float32) + jnp.sum(p["frozen"]).astype(jnp.float32)
        return {"mse": jnp.mean((out - batch["y"]) ** 2)}

    data = np.random.default_rng(1)
    batches = [
        {"x": data.normal(size=(16, 8)).astype("f4"), "y": data.normal(size=(16, 4)).astype("f4")}
        for _ in range(20)
    ]
    out = {}
    for spec in meshes:
        mesh = None if spec is None else make_mesh(spec)
        step = make_train_step(
            terms,
            optimizer=tx,
            precision=precision,
            loss_scale=hj.DynamicLossScale(2.0**10),
            mesh=mesh,
        )
        state = TrainState.create(
            fresh_params(), tx, precision=precision, loss_scale=hj.DynamicLossScale(2.0**10)
        )
        if mesh is not None:
            state = shard_state(state, mesh)
        losses = []
        for batch in batches:
            state, metrics = step(state, batch)
            losses.append(float(metrics["loss"]))
        entry = {
            "losses": losses,
            "params": {
                k: np.asarray(v, np.float32).tolist()
                for k, v in hj.tree.leaves_with_paths(state.params)[0]
            },
            "dtypes": {k: str(v.dtype) for k, v in hj.tree.leaves_with_paths(state.params)[0]},
        }
        if mesh is not None:
            entry["param_specs"] = _specs(state.params)
            entry["opt_state"] = _specs(state.opt_state)
        out[str(spec)] = entry
    return out


def _accumulation_collectives():
    """How many all-gathers the compiled (4, 2) step of an MLP does, without and with gradient
    accumulation: micro-batches must come from each device's own shard of the batch."""
    import re

    import jax.numpy as jnp
    import numpy as np
    import optax

    from hybrid_jax.train import TrainState, make_train_step
    from hybrid_jax.train.sharding import make_mesh, shard_state

    mesh = make_mesh("data=4,fsdp=2")
    rng = np.random.default_rng(0)
    params = {"w1": rng.normal(size=(64, 256)), "w2": rng.normal(size=(256, 8))}
    params = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}
    batch = {
        "x": rng.normal(size=(64, 64)).astype("f4"),
        "y": rng.normal(size=(64, 8)).astype("f4"),
    }

    def terms(p, b, key):
        del key
        return {"mse": jnp.mean((jnp.tanh(b["x"] @ p["w1"]) @ p["w2"] - b["y"]) ** 2)}

    counts = {}
    for accum in (1, 4):
        tx = optax.adam(1e-3)
        step = make_train_step(terms, optimizer=tx, grad_accum=accum, mesh=mesh)
        state = shard_state(TrainState.create(params, tx), mesh)
        hlo = step.lower(state, batch).compile().as_text()
        counts[accum] = len(re.findall(r"= \S+ all-gather(-start)?\(", hlo))
    return counts


def _errors():
    """The messages a bad mesh or batch gets."""
    import numpy as np

    from hybrid_jax.app.config import RunConfig
    from hybrid_jax.app.run import build
    from hybrid_jax.train.sharding import check_batch, make_mesh

    messages = {}
    for name, call in {
        "mesh_not_dividing": lambda: make_mesh("data=3,fsdp=2"),
        "batch_not_divisible": lambda: check_batch({"x": np.zeros((12, 3))}, make_mesh("fsdp=8")),
        "run_batch_not_divisible": lambda: build(
            RunConfig(batch_size=12, mesh="data=8", n_layer=1, n_embd=16, n_head=1)
        ),
    }.items():
        try:
            call()
            messages[name] = None
        except ValueError as e:
            messages[name] = str(e)
    return messages


if __name__ == "__main__":
    meshes = [None, "data=8", "data=4,fsdp=2", "fsdp=8"]
    parts = sys.argv[1:] or ["gpt", "frozen_mixed", "errors", "accumulation"]
    result = {}
    if "errors" in parts:
        result["errors"] = _errors()
    if "accumulation" in parts:
        result["accumulation"] = _accumulation_collectives()
    if "frozen_mixed" in parts:
        result["frozen_mixed"] = _frozen_mixed(meshes)
    if "gpt" in parts:  # with the resume on another mesh
        result["gpt"], result["resume"] = _gpt(meshes)
    print("RESULT " + json.dumps(result))
