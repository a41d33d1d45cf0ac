"""Speed of the GPT: forward, forward+backward, optimizer updates, and all in one step.

The model is split once (``nnx.split``); every timed function is a plain ``jax.jit`` over pure
pytrees that merges inside, as a train step does. For ``bf16-mixed`` the fp32 master
parameters are cast with ``hybrid_jax.cast_to_compute`` inside the jitted function and the
gradients are taken with respect to the fp32 masters. The loss is
``hybrid_jax.losses.cross_entropy``; the optimizer is nanoGPT's AdamW (lr 1e-3, betas
(0.9, 0.99), weight decay 0.1). The two ``muon_adamw update`` cases are the default run's
optimizer alone (Adam on embeddings and gains, Muon on the hidden matrices) with Optax's Muon,
which orthogonalises leaf by leaf, and with ``hj.optim.muon``, which batches equal shapes; the
``eval batch`` case is one of ``hybrid-jax train``'s 25 validation batches. All variants run
interleaved, after warm-up, with ``block_until_ready``; the table gives the median and 10th
percentile of the wall time per call (the machine may be shared: compare ratios within one
run), the compile time, XLA's temporary buffer and the minor page faults per call.

``--textbook`` adds the same network written the obvious way (``jax.nn.gelu``, LayerNorm and
softmax attention differentiated by autodiff), to show what the model's closed-form derivatives
buy. ``--hlo`` prints what the optimized HLO of the fp32 forward+backward contains: dots that
run in a library (YNNPACK fusions, Eigen) or as XLA-emitted loops, transposes and copies.

    python benchmarks/model_speed.py [--batch-size 12] [--repeats 100] [--textbook] [--hlo]

On XLA:CPU the temporary buffer is allocated on every call; glibc serves blocks above
32 MiB with a fresh ``mmap``, so a larger buffer is page-faulted in on every call (the
``faults/call`` column). ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=4000000000`` in the
environment keeps freed memory mapped and removes that cost; try it to see how much it is.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import re
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import hybrid_jax as hj
from hybrid_jax.data import load_dataset, sample_batch
from hybrid_jax.models import GPT, GPTConfig

PRECISIONS = ("fp32", "bf16-mixed")


def textbook_logits(params, tokens_BxT, n_head):
    """The GPT written plainly (3-D activations, autodiff everywhere), for comparison."""
    emb_VxC = params["tok_embed"]["embedding"][...]
    b, t = tokens_BxT.shape
    x = emb_VxC[tokens_BxT] + params["pos_embed"]["embedding"][...][:t]
    c = x.shape[-1]

    def ln(x, p):
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + 1e-5) * p["scale"][...].astype(jnp.float32)
        return y.astype(x.dtype)

    for blk in params["blocks"].values():
        qkv = ln(x, blk["ln_1"]) @ blk["attn"]["qkv"]["kernel"][...]
        q, k, v = jnp.split(qkv.reshape(b, t, 3 * n_head, c // n_head), 3, axis=2)
        y = jax.nn.dot_product_attention(q, k, v, is_causal=True)
        x = x + y.reshape(b, t, c) @ blk["attn"]["proj"]["kernel"][...]
        h = jax.nn.gelu(ln(x, blk["ln_2"]) @ blk["mlp"]["fc"]["kernel"][...], approximate=False)
        x = x + h @ blk["mlp"]["proj"]["kernel"][...]
    return (ln(x, params["ln_f"]) @ emb_VxC.T).astype(jnp.float32)


def build(args):
    config = GPTConfig(
        vocab_size=65,
        block_size=args.block_size,
        n_layer=args.n_layer,
        n_head=args.n_head,
        n_embd=args.n_embd,
    )
    graphdef, params = nnx.split(GPT(config, rngs=nnx.Rngs(0)), nnx.Param)
    tx = optax.adamw(1e-3, b1=0.9, b2=0.99, weight_decay=0.1)
    data = load_dataset(block_size=args.block_size)
    x, y = jax.jit(sample_batch, static_argnums=(2, 3))(
        jnp.asarray(data.train), jax.random.key(0), args.batch_size, args.block_size
    )

    def models(precision):
        def cast(params):
            return params if precision == "fp32" else hj.cast_to_compute(params, precision)

        yield "", lambda p, x: nnx.merge(graphdef, cast(p))(x)
        if args.textbook:
            yield "textbook ", lambda p, x: textbook_logits(cast(p), x, config.n_head)

    def adamw(params, opt_state, grads):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), params)
    cases = {
        "adamw update": Case(
            jax.jit(adamw, donate_argnums=(0, 1)), (params, tx.init(params)), (grads,)
        )
    }
    # Muon + Adam as `hybrid-jax train` builds it, with Optax's leaf-by-leaf Muon and ours.
    for name, muon in (
        ("optax.contrib.muon", optax.contrib.muon),
        ("hj.optim.muon", hj.optim.muon),
    ):
        (adam_rule, adam), (hidden, _) = hj.optim.muon_adamw_rules(3e-3, muon_learning_rate=1e-2)
        rules = [(adam_rule, adam), (hidden, muon(1e-2, weight_decay=0.1, consistent_rms=0.2))]
        muon_tx = hj.optim.by_path(rules)

        def update(params, opt_state, grads, muon_tx=muon_tx):
            with jax.numpy_dtype_promotion("standard"):  # Optax's `beta ** count`
                updates, opt_state = muon_tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        cases[f"muon_adamw update ({name})"] = Case(
            jax.jit(update, donate_argnums=(0, 1)), (params, muon_tx.init(params)), (grads,)
        )
    for precision in PRECISIONS:
        for prefix, logits_fn in models(precision):

            def loss(p, x, y, logits_fn=logits_fn):
                return hj.losses.cross_entropy(logits_fn(p, x), y)

            def step(p, opt_state, x, y, loss=loss):
                value, g = jax.value_and_grad(loss)(p, x, y)
                p, opt_state = adamw(p, opt_state, g)
                return p, opt_state, value

            tag = f"{prefix}{precision}"
            cases[f"{tag} forward"] = Case(jax.jit(logits_fn), (), (params, x))
            if not prefix:  # one of hybrid-jax train's 25 validation batches: 64 x context
                x_eval = jnp.tile(x, (64 // args.batch_size + 1, 1))[:64]
                cases[f"{tag} eval batch (64 x {args.block_size})"] = Case(
                    jax.jit(logits_fn), (), (params, x_eval)
                )
            cases[f"{tag} fwd+bwd"] = Case(jax.jit(jax.value_and_grad(loss)), (), (params, x, y))
            cases[f"{tag} step"] = Case(
                jax.jit(step, donate_argnums=(0, 1)), (params, tx.init(params)), (x, y)
            )
    return params, cases


class Case:
    """A jitted function and its arguments; a donated ``carry`` is threaded between calls."""

    def __init__(self, fn, carry, args):
        self.fn, self.carry, self.args = fn, jax.tree.map(jnp.copy, carry), args

    def __call__(self):
        out = self.fn(*self.carry, *self.args)
        if self.carry:
            self.carry = tuple(out[: len(self.carry)])
        return out

    def compile(self):
        return self.fn.lower(*self.carry, *self.args).compile()


def hlo_summary(text: str) -> dict:
    """Counts of what XLA:CPU emitted for the entry computation of an optimized HLO module."""
    entry = text[text.index("\nENTRY") :]
    counts = collections.Counter()
    bodies = {}
    for m in re.finditer(r"\n(%[\w.\-]+) [^\n]*\{\n(.*?)\n\}", text, re.S):
        bodies[m.group(1)] = m.group(2)
    for line in entry.splitlines()[1:]:
        m = re.match(r"\s*(?:ROOT )?%[\w.\-]+ = \S+ ([\w\-]+)\(", line)
        if not m or m.group(1) in ("parameter", "constant", "bitcast", "tuple"):
            continue
        op = m.group(1)
        counts["ops"] += 1
        body = ""
        calls = re.search(r"calls=(%[\w.\-]+)", line)
        if calls:
            body = bodies.get(calls.group(1), "")
        has = lambda name, body=body: re.search(rf"= \S+ {name}\(", body) is not None
        if op == "dot":
            counts["dots: library (Eigen)"] += 1
        elif op == "fusion" and has("dot"):
            library = "__ynn_fusion" in line or "kind=kCustom" in line
            counts["dots: library (YNNPACK)" if library else "dots: XLA-emitted loops"] += 1
        if op in ("transpose", "copy") or (op == "fusion" and (has("transpose") or has("copy"))):
            counts["transposes and copies"] += 1
    return dict(counts)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=12, help="sequences per batch")
    parser.add_argument("--block-size", type=int, default=64, help="context length")
    parser.add_argument("--n-layer", type=int, default=4, help="transformer blocks")
    parser.add_argument("--n-head", type=int, default=4, help="attention heads")
    parser.add_argument("--n-embd", type=int, default=128, help="channels")
    parser.add_argument("--repeats", type=int, default=100, help="timed calls per case")
    parser.add_argument("--warmup", type=int, default=5, help="untimed calls per case")
    parser.add_argument("--textbook", action="store_true", help="also time a plain version")
    parser.add_argument("--hlo", action="store_true", help="summarise the optimized HLO")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args(argv)

    params, runners = build(args)
    for name, runner in runners.items():
        start = time.perf_counter()
        compiled = runner.compile()
        runner.compile_s = time.perf_counter() - start
        runner.temp_bytes = compiled.memory_analysis().temp_size_in_bytes
        runner.hlo = compiled.as_text() if args.hlo and name == "fp32 fwd+bwd" else None
        for _ in range(args.warmup):
            jax.block_until_ready(runner())

    for runner in runners.values():  # page faults per call, each case on its own
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(5):
            jax.block_until_ready(runner())
        runner.faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5

    times = {name: [] for name in runners}
    for _ in range(args.repeats):  # interleaved, so that machine noise hits every case alike
        for name, runner in runners.items():
            start = time.perf_counter()
            jax.block_until_ready(runner())
            times[name].append(time.perf_counter() - start)

    n_params = sum(x.size for x in jax.tree.leaves(params))
    print(
        f"backend={jax.default_backend()} device={jax.devices()[0].device_kind} "
        f"jax={jax.__version__} params={n_params:,} batch={args.batch_size}x{args.block_size} "
        f"repeats={args.repeats}"
    )
    header = f"{'case':28s} {'median ms':>10s} {'p10 ms':>8s} {'vs fp32':>8s} {'compile s':>10s}"
    print(header + f" {'temp MiB':>9s} {'faults/call':>12s}")
    results = []
    for name, runner in runners.items():
        median, p10 = float(np.median(times[name])), float(np.percentile(times[name], 10))
        reference = name.replace("bf16-mixed", "fp32")
        ratio = median / float(np.median(times[reference])) if reference in times else math.nan
        print(
            f"{name:28s} {median * 1e3:10.2f} {p10 * 1e3:8.2f} {ratio:8.2f} "
            f"{runner.compile_s:10.2f} {runner.temp_bytes / 2**20:9.2f} {runner.faults:12.0f}"
        )
        results.append(
            dict(
                case=name,
                median_s=median,
                p10_s=p10,
                ratio_to_fp32=ratio,
                compile_s=runner.compile_s,
                temp_bytes=runner.temp_bytes,
                faults=runner.faults,
            )
        )
    if args.hlo:
        print("optimized HLO of fp32 fwd+bwd:", hlo_summary(runners["fp32 fwd+bwd"].hlo))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": vars(args), "results": results}, f, indent=1)
    return {"results": results}


if __name__ == "__main__":
    main()
