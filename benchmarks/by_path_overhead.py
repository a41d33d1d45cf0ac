"""Update time of ``by_path`` against the same transforms in a hand-written multi_transform.

Both run the same three groups (Adam on kernels, SGD with momentum on LayerNorm scales, frozen
embeddings) on the bundled GPT's parameters; the only difference is that ``by_path``
computes the labels from paths at trace time, while the baseline gets a literal label tree. The
target (DESIGN.md) is a median ratio <= 1.02. Variants are interleaved so that machine noise
hits both alike.

    python benchmarks/by_path_overhead.py [--n-layer 4] [--n-embd 128] [--repeats 200]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from hybrid_jax.models import GPT, GPTConfig
from hybrid_jax.optim import by_path
from hybrid_jax.tree import tree_paths


def gpt_params(n_layer: int, d: int) -> dict:
    """The bundled GPT's parameters (vocab 65, context 64), as a plain dict of arrays."""
    config = GPTConfig(vocab_size=65, n_layer=n_layer, n_embd=d)
    return nnx.to_pure_dict(nnx.state(GPT(config, rngs=nnx.Rngs(0)), nnx.Param))


def _group(path: str) -> str:
    # The labels by_path gives these groups, so that both partitions process the groups in the
    # same (sorted) order: XLA schedules them in that order, and a different one alone moves the
    # median by a few percent.
    if "embed" in path:
        return "embed"
    return "kernel$" if path.endswith("kernel") else "(default)"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-layer", type=int, default=4, help="transformer blocks")
    parser.add_argument("--n-embd", type=int, default=128, help="channels")
    parser.add_argument("--repeats", type=int, default=200, help="timed updates per variant")
    args = parser.parse_args(argv)

    params = gpt_params(args.n_layer, args.n_embd)
    transforms = {
        "kernel$": optax.adam(1e-3),
        "(default)": optax.sgd(1e-2, momentum=0.9),
        "embed": optax.set_to_zero(),
    }
    variants = {
        "by_path": by_path(
            [(r"embed", transforms["embed"]), (r"kernel$", transforms["kernel$"])],
            default=transforms["(default)"],
        ),
        "multi_transform": optax.multi_transform(
            transforms, jax.tree_util.tree_map(_group, tree_paths(params))
        ),
    }
    grads = jax.tree_util.tree_map(lambda p: jnp.full_like(p, 1e-3), params)
    steps, states = {}, {}
    for name, tx in variants.items():

        def step(params, state, tx=tx):
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        steps[name] = jax.jit(step, donate_argnums=(0, 1))
        states[name] = (jax.tree_util.tree_map(jnp.copy, params), tx.init(params))
        for _ in range(3):  # compile and warm up
            states[name] = steps[name](*states[name])
        jax.block_until_ready(states[name])

    times = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name in variants:  # interleaved
            start = time.perf_counter()
            states[name] = steps[name](*states[name])
            jax.block_until_ready(states[name])
            times[name].append(time.perf_counter() - start)

    medians = {name: float(np.median(t)) for name, t in times.items()}
    ratio = medians["by_path"] / medians["multi_transform"]
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    print(
        f"backend={jax.default_backend()} device={jax.devices()[0].device_kind} "
        f"params={n_params:,} leaves={len(jax.tree_util.tree_leaves(params))} "
        f"repeats={args.repeats}"
    )
    for name, median in medians.items():
        print(f"{name:16s} median {median * 1e6:9.1f} us")
    print(f"ratio by_path / multi_transform = {ratio:.3f} (target <= 1.02)")
    return {"medians_s": medians, "ratio": ratio}


if __name__ == "__main__":
    main()
