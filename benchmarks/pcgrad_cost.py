"""Step-time cost of PCGrad over the plain weighted sum, for 2 and 4 loss terms.

The model is a stand-in for the bundled GPT at nanoGPT's "baby GPT" size (4 layers, 4 heads,
128 channels, context 64, batch 12, 65-token vocabulary, tied embeddings; ~0.8M parameters),
written here in plain JAX so that the benchmark needs nothing beyond ``hybrid_jax.losses``. The
data are random tokens: only the time matters.

Each variant is one jitted train step (forward, gradients, AdamW update, donated state):

- ``plain-N``: one ``jax.grad`` of the weighted total of N terms (what the default ``Sum``
  mixer costs: nothing beyond the plain backward pass);
- ``pcgrad-N``: ``term_gradients`` (one forward, one VJP vmapped over the N terms) and
  ``PCGrad`` with a fresh key each step.

The variants run interleaved (one block of ``--steps`` steps each, in turn, ``--repeats`` times)
so that machine noise hits them alike; the table gives the median ms per step and its ratio to
the plain step with the same terms, from this one run.

    python benchmarks/pcgrad_cost.py --steps 20 --repeats 7
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hybrid_jax.losses import PCGrad, Weighted, cross_entropy, term_gradients, z_loss

# ----------------------------------------------------------------------------------------------
# A compact GPT (nanoGPT's architecture: pre-LayerNorm blocks, GELU MLP, tied embeddings)


def init_gpt(key, vocab=65, block=64, n_layer=4, n_embd=128):
    keys = iter(jax.random.split(key, 2 + 4 * n_layer))

    def normal(shape, std=0.02):
        return std * jax.random.normal(next(keys), shape, jnp.float32)

    ones, proj_std = jnp.ones(n_embd, jnp.float32), 0.02 / math.sqrt(2 * n_layer)
    blocks = [
        {
            "ln_1": ones,
            "qkv": normal((n_embd, 3 * n_embd)),
            "proj": normal((n_embd, n_embd), proj_std),
            "ln_2": ones,
            "fc": normal((n_embd, 4 * n_embd)),
            "out": normal((4 * n_embd, n_embd), proj_std),
        }
        for _ in range(n_layer)
    ]
    return {
        "wte": normal((vocab, n_embd)),
        "wpe": normal((block, n_embd)),
        "blocks": blocks,
        "ln_f": ones,
    }


def _layer_norm(x_BxTxC, scale_C):
    x = x_BxTxC.astype(jnp.float32)  # statistics in fp32
    x = (x - x.mean(-1, keepdims=True)) * jax.lax.rsqrt(x.var(-1, keepdims=True) + 1e-5)
    return (x * scale_C.astype(jnp.float32)).astype(x_BxTxC.dtype)


def gpt_logits(params, tokens_BxT, n_head=4):
    B, T = tokens_BxT.shape
    x = params["wte"][tokens_BxT] + params["wpe"][:T]
    causal_TxT = jnp.tril(jnp.ones((T, T), bool))
    for blk in params["blocks"]:
        C = x.shape[-1]
        q, k, v = jnp.split(_layer_norm(x, blk["ln_1"]) @ blk["qkv"], 3, axis=-1)
        q, k, v = (t.reshape(B, T, n_head, C // n_head) for t in (q, k, v))
        att = jnp.einsum("bthd,bshd->bhts", q, k).astype(jnp.float32) / math.sqrt(C // n_head)
        att = jax.nn.softmax(jnp.where(causal_TxT, att, -jnp.inf), axis=-1).astype(x.dtype)
        x = x + jnp.einsum("bhts,bshd->bthd", att, v).reshape(B, T, C) @ blk["proj"]
        x = x + jax.nn.gelu(_layer_norm(x, blk["ln_2"]) @ blk["fc"]) @ blk["out"]
    return _layer_norm(x, params["ln_f"]) @ params["wte"].T  # [B, T, vocab]


# ----------------------------------------------------------------------------------------------
# Loss terms: 2 (lm, z_loss) or 4 (+ second-half lm, and a skip-one-token auxiliary)


def make_terms_fn(n_terms, compute_dtype):
    def terms_fn(params, batch):
        compute = jax.tree.map(lambda p: p.astype(compute_dtype), params)
        tokens = batch[:, :-1]
        logits = gpt_logits(compute, tokens)
        terms = {"lm": cross_entropy(logits, batch[:, 1:]), "z_loss": z_loss(logits)}
        if n_terms == 4:
            T = tokens.shape[1]
            late = jnp.broadcast_to(jnp.arange(T) >= T // 2, batch[:, 1:].shape)
            terms["lm_late"] = cross_entropy(logits, batch[:, 1:], mask=late)
            terms["skip"] = cross_entropy(logits[:, :-1], batch[:, 2:])  # predict t+2
        return terms

    return terms_fn


WEIGHTS = {"lm": 1.0, "z_loss": 1e-4, "lm_late": 0.5, "skip": 0.1}


def make_step(n_terms, mixer, tx, compute_dtype):
    terms_fn = make_terms_fn(n_terms, compute_dtype)
    weighting = Weighted({name: WEIGHTS[name] for name in list(WEIGHTS)[:n_terms]})

    def step(params, opt_state, batch, key):
        if mixer == "plain":
            (loss, _), grads = jax.value_and_grad(
                lambda p: weighting(terms_fn(p, batch)), has_aux=True
            )(params)
        else:
            terms, stacked = term_gradients(
                terms_fn, params, batch, weights=weighting.weight_values()
            )
            grads = PCGrad()(stacked, key)
            loss, _ = weighting(terms)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="steps per timed block")
    parser.add_argument("--repeats", type=int, default=7, help="timed blocks per variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps after compiling")
    parser.add_argument("--batch-size", type=int, default=12, help="sequences per step")
    parser.add_argument("--block-size", type=int, default=64, help="tokens per sequence")
    parser.add_argument(
        "--compute-dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="dtype of the forward and backward (params and losses stay fp32)",
    )
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed for params and data")
    args = parser.parse_args(argv)

    key = jax.random.key(args.seed)
    params0 = init_gpt(key, block=args.block_size)
    n_params = sum(x.size for x in jax.tree.leaves(params0))
    tx = optax.adamw(1e-3)
    rng = np.random.default_rng(args.seed)
    batch = jnp.asarray(rng.integers(0, 65, (args.batch_size, args.block_size + 1)), jnp.int32)
    dtype = jnp.dtype(args.compute_dtype)

    variants = {}
    for n_terms in (2, 4):
        for mixer in ("plain", "pcgrad"):
            name = f"{mixer}-{n_terms}"
            step = make_step(n_terms, mixer, tx, dtype)
            params = jax.tree.map(jnp.copy, params0)
            state = [params, tx.init(params)]
            t0 = time.perf_counter()
            compiled = step.lower(*state, batch, key).compile()
            compile_s = time.perf_counter() - t0
            for i in range(args.warmup):
                *state, loss = compiled(*state, batch, jax.random.fold_in(key, i))
            jax.block_until_ready(loss)
            variants[name] = {"fn": compiled, "state": state, "compile_s": compile_s, "ms": []}

    step_index = 0
    for _ in range(args.repeats):
        for v in variants.values():  # interleaved: noise hits every variant alike
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step_index += 1
                *v["state"], loss = v["fn"](*v["state"], batch, jax.random.fold_in(key, step_index))
            jax.block_until_ready((v["state"], loss))
            v["ms"].append(1e3 * (time.perf_counter() - t0) / args.steps)

    print(
        f"device: {jax.devices()[0].device_kind}, compute {dtype.name}, {n_params / 1e6:.2f}M "
        f"params, batch {args.batch_size}x{args.block_size}, {args.repeats} blocks of "
        f"{args.steps} steps"
    )
    print(f"{'variant':<10} {'median ms':>10} {'min ms':>8} {'vs plain':>9} {'compile s':>10}")
    for name, v in variants.items():
        median = statistics.median(v["ms"])
        plain = statistics.median(variants["plain-" + name.split("-")[1]]["ms"])
        print(
            f"{name:<10} {median:>10.2f} {min(v['ms']):>8.2f} {median / plain:>8.2f}x "
            f"{v['compile_s']:>10.1f}"
        )


if __name__ == "__main__":
    main()
