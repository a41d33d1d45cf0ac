"""Train-state bytes and XLA's step memory of every bench recipe at GPT-2 sizes, before training.

For each recipe of ``hybrid-jax bench`` and each model (baby, gpt2-124m, gpt2-350m), this is
``hybrid-jax inspect --model M --precision R``: the train state is built abstractly
(``jax.eval_shape``: nothing is allocated), its bytes counted from the arrays' shapes, and the
train step compiled once (on this machine's backend; a CPU compile gives the memory analysis of
the CPU program) for its arguments and temporaries. State bytes per parameter depend on the
recipe, not on the model's size (up to the leaves too small for 8-bit moments), which the table
shows by putting the three sizes side by side.

    python benchmarks/memory_at_scale.py [--recipes fp32,bf16-mixed] [--models baby,gpt2-124m]
        [--batch-size 8] [--block-size 1024] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

from hybrid_jax import Table
from hybrid_jax._table import format_bytes
from hybrid_jax.app.bench import RECIPES
from hybrid_jax.app.config import RunConfig
from hybrid_jax.app.inspection import inspect_run
from hybrid_jax.data import GPT2_VOCAB_SIZE


def measure(recipe, model: str, batch_size: int, block_size: int) -> dict:
    config = RunConfig(
        model=model,
        precision=recipe.precision,
        optimizer=recipe.optimizer,
        fp8_scaling=recipe.fp8_scaling,
        loss_scale=recipe.loss_scale,
        batch_size=batch_size,
        # The baby GPT keeps its own context; the GPT-2 sizes get GPT-2's vocabulary.
        block_size=None if model == "baby" else block_size,
        vocab_size=None if model == "baby" else GPT2_VOCAB_SIZE,
        eval_batches=1,
    )
    start = time.perf_counter()
    found = inspect_run(config)
    return {
        "recipe": recipe.name,
        "model": model,
        "num_params": found.memory["num_params"],
        "state_bytes": found.memory["total"],
        "bytes_per_param": found.memory["bytes_per_param"],
        **found.step_memory,
        "seconds": time.perf_counter() - start,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated recipes")
    parser.add_argument("--models", default="baby,gpt2-124m,gpt2-350m", help="comma-separated")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per step (8)")
    parser.add_argument("--block-size", type=int, default=1024, help="GPT-2 context (1024)")
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    models = args.models.split(",")
    rows = []
    for name in args.recipes.split(","):
        for model in models:
            rows.append(measure(RECIPES[name], model, args.batch_size, args.block_size))
            r = rows[-1]
            print(
                f"{name} {model}: {r['bytes_per_param']:.2f} B/param, "
                f"temp {format_bytes(r['temp_bytes'] or 0)} ({r['seconds']:.0f} s)",
                flush=True,
            )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=2)
    by = {(r["recipe"], r["model"]): r for r in rows}
    big = [m for m in models if m != "baby"]
    columns = (
        "recipe",
        *(f"B/param {m}" for m in models),
        *(f"{label} {m}" for m in big for label in ("state", "step temp")),
    )
    body = []
    for name in args.recipes.split(","):
        cells = [name, *(f"{by[name, m]['bytes_per_param']:.2f}" for m in models)]
        for m in big:
            r = by[name, m]
            cells += [format_bytes(r["state_bytes"]), format_bytes(r["temp_bytes"] or 0)]
        body.append(tuple(cells))
    params = ", ".join(f"{m} {by[rows[0]['recipe'], m]['num_params']:,}" for m in models)
    print(Table(columns, tuple(body)))
    print(f"parameters: {params}; batch {args.batch_size} x {args.block_size} for GPT-2 sizes")
    return rows


if __name__ == "__main__":
    main()
