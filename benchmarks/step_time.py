"""Median train-step time of ``make_train_step`` against a hand-written Optax + NNX step.

Both steps run the default GPT (nanoGPT's baby GPT) on the same batches with the same optimizer
(clipping + Muon/AdamW, or AdamW) and the same loss (cross-entropy + 1e-4 z-loss); the
hand-written one casts, differentiates and updates inline, with no loss scaling, finite check or
skip logic. Their ratio is the library's overhead (target <= 1.02). Variants are interleaved so
that machine noise hits them alike; medians from one run.

    python benchmarks/step_time.py [--precisions fp32,bf16-mixed] [--repeats 50] [--optimizer adamw]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from hybrid_jax.app.config import RunConfig, build_optimizer
from hybrid_jax.app.run import build
from hybrid_jax.losses import cross_entropy, z_loss
from hybrid_jax.precision import cast_to_compute


def hand_written_step(run, tx, precision):
    """The same math as the library step, written inline as a user would."""
    graphdef = run.graphdef

    def loss_fn(params, batch):
        compute = cast_to_compute(params, precision)
        logits = nnx.merge(graphdef, compute)(batch[0])
        return cross_entropy(logits, batch[1]) + jnp.float32(1e-4) * z_loss(logits)

    def step(params, opt_state, batch):
        grads = jax.grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return jax.jit(step, donate_argnums=(0, 1))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precisions", default="fp32,bf16-mixed", help="comma-separated presets")
    parser.add_argument("--optimizer", default="muon_adamw", help="muon_adamw or adamw")
    parser.add_argument("--repeats", type=int, default=50, help="timed steps per variant")
    args = parser.parse_args(argv)

    variants = {}
    for precision in args.precisions.split(","):
        run = build(RunConfig(precision=precision, optimizer=args.optimizer))
        tx = build_optimizer(run.config)  # the same transformation as the library step's
        lib_state = run.state
        hand_state = (jax.tree.map(jnp.copy, run.state.params), tx.init(run.state.params))
        hand = hand_written_step(run, tx, precision)
        keys = [jax.random.fold_in(run.data_key, i) for i in range(args.repeats + 3)]
        batches = [run.sample_train(k) for k in keys]
        jax.block_until_ready(batches)
        variants[f"{precision}/library"] = [run.step, lib_state, "lib"]
        variants[f"{precision}/hand-written"] = [hand, hand_state, "hand"]
        for _ in range(3):  # compile and warm up
            lib_state, _ = run.step(lib_state, batches[0])
            hand_state = hand(*hand_state, batches[0])
        variants[f"{precision}/library"][1] = lib_state
        variants[f"{precision}/hand-written"][1] = hand_state
        jax.block_until_ready((lib_state, hand_state))

    times = {name: [] for name in variants}
    for i in range(args.repeats):
        for name, (fn, state, kind) in variants.items():  # interleaved
            batch = batches[i % len(batches)]
            start = time.perf_counter()
            state = fn(state, batch)[0] if kind == "lib" else fn(*state, batch)
            jax.block_until_ready(state)
            times[name].append(time.perf_counter() - start)
            variants[name][1] = state

    medians = {name: float(np.median(t)) * 1e3 for name, t in times.items()}
    print(
        f"backend={jax.default_backend()} device={jax.devices()[0].device_kind} "
        f"optimizer={args.optimizer} repeats={args.repeats}"
    )
    for name, ms in medians.items():
        print(f"{name:28s} median {ms:8.2f} ms")
    ratios = {}
    for precision in args.precisions.split(","):
        ratios[precision] = medians[f"{precision}/library"] / medians[f"{precision}/hand-written"]
        print(f"{precision}: ratio library/hand-written {ratios[precision]:.3f} (target <= 1.02)")
    return {"median_ms": medians, "ratio": ratios}


if __name__ == "__main__":
    main()
