"""``hybrid-jax bench``: the same model, data and seed under each precision recipe, side by side.

Every recipe is a :class:`Recipe` (a precision, an optimizer recipe, a loss-scale setting) in
:data:`RECIPES`. :func:`compare` builds a run per recipe with :func:`hybrid_jax.app.run.build`,
compiles each step ahead of time (compile time and XLA's memory analysis come from that), then
trains them **interleaved**: step ``t`` of every recipe, in an order that rotates with ``t``,
before step ``t + 1`` of any, so that the machine's slow and fast moments spread over all
recipes alike. Each step is timed alone (``block_until_ready``); the first steps (warm-up) are
left out and the median of the rest is reported with their count. fp32 is always in the run:
every ratio and gap is to fp32 measured in the same run. A recipe whose loss stops being finite
or does not end below where it started (e.g. every step skipped as non-finite) is reported as
diverged, never dropped.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from hybrid_jax._table import Table
from hybrid_jax.app.config import RunConfig
from hybrid_jax.app.run import build
from hybrid_jax.train import evaluate, state_bytes


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A precision recipe: what :func:`compare` runs under one name.

    Attributes:
      name: the recipe's name (``--recipes``).
      precision: a preset, a policy string, or rules as inline JSON (see
        :func:`hybrid_jax.app.config.load_precision`).
      description: one line for tables and ``--help``.
      optimizer: the optimizer recipe (``adamw`` or ``muon_adamw``).
      loss_scale: ``auto`` (dynamic when a policy computes in fp16), ``dynamic`` or ``none``.
      fp8_scaling: ``current`` or ``delayed`` scaling for fp8 matmuls.
    """

    name: str
    precision: str
    description: str
    optimizer: str = "adamw"
    loss_scale: str = "auto"
    fp8_scaling: str = "current"


_PER_LAYER = json.dumps(
    {
        "rules": [["embed|ln_", "fp32"], ["attn/", "bf16-mixed"], ["mlp/", "fp8-mixed"]],
        "default": "bf16-mixed",
    }
)

#: The recipes ``hybrid-jax bench`` knows, by name.
RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe("fp32", "fp32", "the reference: fp32 everywhere"),
        Recipe("bf16-mixed", "bf16-mixed", "fp32 master weights, bf16 compute"),
        Recipe(
            "fp16-mixed",
            "fp16-mixed",
            "fp32 master weights, fp16 compute, dynamic loss scaling",
            loss_scale="dynamic",
        ),
        Recipe(
            "fp16-naive",
            "p=f16,c=f16,o=f16",
            "fp16 params and Adam state, no master weights, no loss scaling",
            loss_scale="none",
        ),
        Recipe("bf16-pure", "bf16-pure", "bf16 params and state, round-to-nearest updates"),
        Recipe("bf16-pure-sr", "bf16-pure-sr", "bf16 params, stochastically rounded updates"),
        Recipe("bf16-pure-kahan", "bf16-pure-kahan", "bf16 params, Kahan-compensated updates"),
        Recipe("fp8-mixed", "fp8-mixed", "every matmul in fp8 (e4m3, e5m2 grads), current scaling"),
        Recipe("fp8-delayed", "fp8-mixed", "fp8-mixed with delayed scaling", fp8_scaling="delayed"),
        Recipe("int8-qat", "int8-mixed", "every matmul in int8 (W8A8), straight-through grads"),
        Recipe("adam8bit", "p=f32,c=bf16,o=f32,mu=int8,nu=int8", "bf16-mixed, 8-bit Adam moments"),
        Recipe("bf16-lean", "bf16-lean", "bf16 params + stochastic rounding + 8-bit moments"),
        Recipe("per-layer", _PER_LAYER, "embeddings and norms fp32, attention bf16, MLP fp8"),
    )
}

#: The model and schedule of ``--quick``: a small GPT that compiles fast on a 2-core CPU.
QUICK = RunConfig(
    optimizer="adamw",
    steps=150,
    batch_size=8,
    block_size=32,
    n_layer=2,
    n_head=2,
    n_embd=64,
    lr=3e-3,
    min_lr=3e-4,
    warmup_steps=15,
    eval_interval=50,
    eval_batches=4,
    eval_batch_size=32,
)
#: The full setting: nanoGPT's baby GPT (meant for a GPU or TPU).
FULL = RunConfig(optimizer="adamw", steps=2000, eval_interval=250)

CSV_COLUMNS = (
    "recipe",
    "step_time_ms",
    "step_time_ratio_vs_fp32",
    "timed_steps",
    "tokens_per_s",
    "compile_s",
    "argument_bytes",
    "output_bytes",
    "temp_bytes",
    "state_bytes",
    "state_bytes_per_param",
    "final_val_loss",
    "val_loss_gap",
    "val_loss_gap_pct",
    "skipped_steps",
    "diverged",
    "backend",
    "device_kind",
    "precision",
    "description",
)

_WARMUP_STEPS = 2
_CPU_NOTE = (
    "backend cpu: XLA:CPU computes bf16, fp16 and fp8 matmuls in fp32 with conversions around "
    "them, so low precision is not faster here; the time ratios measure conversion overhead, "
    "not what a GPU or TPU would gain."
)


def parse_recipes(names: str | Sequence[str] | None) -> list[Recipe]:
    """The recipes named (comma-separated or a list), fp32 first; ``None``: all of them.

    Raises:
      ValueError: an unknown name (the message lists the known ones), or an empty list.
    """
    if names is None:
        chosen = list(RECIPES)
    else:
        if isinstance(names, str):
            names = [n.strip() for n in names.split(",")]
        chosen = [n for n in names if n]
        if not chosen:
            raise ValueError(f"no recipes named; known: {', '.join(RECIPES)}")
        unknown = [n for n in chosen if n not in RECIPES]
        if unknown:
            raise ValueError(f"unknown recipes {unknown}; known: {', '.join(RECIPES)}")
    # The reference is always measured in the same run, and first.
    ordered = ["fp32", *dict.fromkeys(n for n in chosen if n != "fp32")]
    return [RECIPES[n] for n in ordered]


@dataclasses.dataclass
class _Entry:
    recipe: Recipe
    run: Any
    state: Any
    step: Callable
    compile_s: float
    memory: Any
    times: list[float] = dataclasses.field(default_factory=list)
    skipped: int = 0
    curve: list[tuple[int, float]] = dataclasses.field(default_factory=list)
    # The recipe's own seconds, its steps and evaluations (not compiling), at each curve point.
    elapsed: list[float] = dataclasses.field(default_factory=list)
    clock: float = 0.0
    finite: bool = True


def _evaluate(entry: _Entry, step: int) -> None:
    """Adds the validation loss at ``step`` to the curve, with the recipe's clock."""
    run, state = entry.run, entry.state
    start = time.perf_counter()
    loss = evaluate(run.eval_step, state.params, run.val_set, state.fp8_meta)["lm"]
    if step:  # the loss before training is a reference point, not part of training
        entry.clock += time.perf_counter() - start
    entry.curve.append((step, loss))
    entry.elapsed.append(entry.clock)


def _prepare(recipe: Recipe, base: RunConfig, log: Callable[[str], None]) -> _Entry:
    config = dataclasses.replace(
        base,
        precision=recipe.precision,
        optimizer=recipe.optimizer,
        loss_scale=recipe.loss_scale,
        fp8_scaling=recipe.fp8_scaling,
    )
    run = build(config)
    batch = run.sample_train(jax.random.fold_in(run.data_key, 0))
    start = time.perf_counter()
    compiled = run.step.lower(run.state, batch).compile()
    compile_s = time.perf_counter() - start
    entry = _Entry(recipe, run, run.state, compiled, compile_s, compiled.memory_analysis())
    _evaluate(entry, 0)
    log(f"  {recipe.name}: compiled in {compile_s:.1f} s")
    return entry


def _row(entry: _Entry, base: RunConfig, reference: dict | None) -> dict[str, Any]:
    timed = entry.times[_WARMUP_STEPS:] or entry.times
    step_s = statistics.median(timed)
    final = entry.curve[-1][1]
    diverged = not (entry.finite and math.isfinite(final)) or final >= entry.curve[0][1]
    memory = entry.memory
    memory_of_state = state_bytes(entry.state)
    row = {
        "recipe": entry.recipe.name,
        "step_time_ms": 1e3 * step_s,
        "step_time_ratio_vs_fp32": None,
        "timed_steps": len(timed),
        "tokens_per_s": base.batch_size * entry.run.config.block_size / step_s,
        "compile_s": entry.compile_s,
        "argument_bytes": getattr(memory, "argument_size_in_bytes", None),
        "output_bytes": getattr(memory, "output_size_in_bytes", None),
        "temp_bytes": getattr(memory, "temp_size_in_bytes", None),
        "state_bytes": memory_of_state["total"],
        "state_bytes_per_param": memory_of_state["bytes_per_param"],
        "final_val_loss": final,
        "val_loss_gap": None,
        "val_loss_gap_pct": None,
        "skipped_steps": entry.skipped,
        "diverged": diverged,
        "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "precision": entry.recipe.precision,
        "description": entry.recipe.description,
        "val_loss_curve": entry.curve,
        "eval_elapsed_s": entry.elapsed,
    }
    reference = reference or row  # fp32 is its own reference: ratio 1, gap 0
    row["step_time_ratio_vs_fp32"] = row["step_time_ms"] / reference["step_time_ms"]
    gap = final - reference["final_val_loss"]
    row["val_loss_gap"] = gap
    row["val_loss_gap_pct"] = 100 * gap / reference["final_val_loss"]
    return row


def compare(
    recipes: Sequence[Recipe],
    base: RunConfig,
    *,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Trains ``base`` under each recipe, interleaved, and returns one result row per recipe.

    Args:
      recipes: the recipes, fp32 first (:func:`parse_recipes` orders them so).
      base: the model, data, schedule and seed every recipe shares.
      log: where progress lines go.

    Returns:
      One dict per recipe with the columns of :data:`CSV_COLUMNS`, ``val_loss_curve``
      (``[(step, val_loss), ...]``) and ``eval_elapsed_s`` (the recipe's own seconds of steps
      and evaluations, compilation left out, at each point of the curve).
    """
    if not recipes or recipes[0].name != "fp32":
        raise ValueError("the first recipe must be fp32, the reference (use parse_recipes)")
    log(f"compiling {len(recipes)} recipes")
    entries = [_prepare(r, base, log) for r in recipes]
    batches = [
        entries[0].run.sample_train(jax.random.fold_in(entries[0].run.data_key, t))
        for t in range(base.steps)
    ]
    log(f"training {base.steps} steps of each, interleaved")
    for t, batch in enumerate(batches):
        n = len(entries)
        for entry in (entries[(t + i) % n] for i in range(n)):  # the order rotates with t
            start = time.perf_counter()
            entry.state, metrics = entry.step(entry.state, batch)
            jax.block_until_ready(entry.state)
            entry.times.append(time.perf_counter() - start)
            entry.clock += entry.times[-1]
            metrics = jax.device_get(metrics)
            entry.skipped += int(metrics["skipped"])
            entry.finite = entry.finite and bool(np.isfinite(metrics["loss"]))
        done = t + 1
        if done % base.eval_interval == 0 or done == base.steps:
            for entry in entries:
                _evaluate(entry, done)
            log(
                f"  step {done}: "
                + ", ".join(f"{e.recipe.name} {e.curve[-1][1]:.3f}" for e in entries)
            )
    rows = []
    for entry in entries:
        rows.append(_row(entry, base, rows[0] if rows else None))
    return rows


def table(rows: Sequence[dict[str, Any]]) -> Table:
    """The terminal table of :func:`compare`'s rows."""
    fmt = lambda v, spec: "-" if v is None else format(v, spec)
    mib = lambda b: "-" if b is None else f"{b / 2**20:.1f}"
    body = tuple(
        (
            r["recipe"],
            fmt(r["step_time_ms"], ".2f"),
            fmt(r["step_time_ratio_vs_fp32"], ".2f"),
            fmt(r["tokens_per_s"], ",.0f"),
            fmt(r["compile_s"], ".1f"),
            mib(r["temp_bytes"]),
            fmt(r["state_bytes_per_param"], ".2f"),
            fmt(r["final_val_loss"], ".4f"),
            fmt(r["val_loss_gap_pct"], "+.2f"),
            r["skipped_steps"],
            "yes" if r["diverged"] else "no",
        )
        for r in rows
    )
    columns = (
        "recipe",
        "step ms",
        "x fp32",
        "tok/s",
        "compile s",
        "temp MiB",
        "B/param",
        "val loss",
        "gap %",
        "skipped",
        "diverged",
    )
    return Table(columns, body)


def notes(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The lines printed under the table: how it was measured, and the CPU caveat."""
    first = rows[0]
    lines = [
        f"{first['timed_steps']} timed steps per recipe (median; {_WARMUP_STEPS} warm-up steps "
        f"left out), interleaved; {first['backend']} / {first['device_kind']}"
    ]
    if first["backend"] == "cpu":
        lines.append(_CPU_NOTE)
    return lines


def write_outputs(rows: Sequence[dict[str, Any]], out: str | os.PathLike) -> list[str]:
    """Writes ``results.json``, ``results.csv`` and the PNG plots into ``out``; returns paths."""
    os.makedirs(out, exist_ok=True)
    paths = [os.path.join(out, name) for name in ("results.json", "results.csv")]
    with open(paths[0], "w", encoding="utf-8") as f:
        json.dump(list(rows), f, indent=2)
    with open(paths[1], "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return paths + _plots(rows, out)


def plots(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The bench's figures, by file stem: ``val_loss`` (the curve of each recipe) and
    ``time_memory`` (step time, state bytes per parameter, XLA's memory analysis).

    ``matplotlib.figure.Figure`` objects made without pyplot, so that no backend is switched:
    a notebook shows them inline (``display(fig)``), :func:`write_outputs` saves them.
    """
    from matplotlib.figure import Figure

    names = [r["recipe"] for r in rows]
    loss_fig = Figure(figsize=(8, 5))
    ax = loss_fig.subplots()
    for r in rows:
        steps, losses = zip(*r["val_loss_curve"], strict=True)
        style = "--" if r["diverged"] else "-"
        ax.plot(steps, losses, style, marker="o", markersize=3, label=r["recipe"])
    ax.set(xlabel="step", ylabel="validation loss", title="Validation loss per recipe")
    finite = [v for r in rows for _, v in r["val_loss_curve"] if math.isfinite(v)]
    if finite:
        ax.set_ylim(min(finite) * 0.97, max(finite) * 1.03)
    ax.legend(fontsize=8)

    cost_fig = Figure(figsize=(16, 4.5))
    left, middle, right = cost_fig.subplots(1, 3)
    left.bar(names, [r["step_time_ms"] for r in rows])
    left.set(ylabel="median step time (ms)", title=f"Step time ({rows[0]['backend']})")
    middle.bar(names, [r["state_bytes_per_param"] for r in rows])
    middle.set(ylabel="bytes per parameter", title="Training state (params + optimizer)")
    mib = lambda key: [(r[key] or 0) / 2**20 for r in rows]
    right.bar(names, mib("argument_bytes"), label="arguments")
    right.bar(names, mib("temp_bytes"), bottom=mib("argument_bytes"), label="temporaries")
    right.set(ylabel="MiB", title="XLA memory analysis of the step")
    right.legend(fontsize=8)
    for ax in (left, middle, right):
        ax.tick_params(axis="x", labelrotation=60, labelsize=8)
    for fig in (loss_fig, cost_fig):
        fig.tight_layout()
    return {"val_loss": loss_fig, "time_memory": cost_fig}


def _plots(rows: Sequence[dict[str, Any]], out: str | os.PathLike) -> list[str]:
    paths = []
    for stem, fig in plots(rows).items():
        paths.append(os.path.join(out, f"{stem}.png"))
        fig.savefig(paths[-1], dpi=120)
    return paths


def main(
    recipes: str | None = None,
    *,
    quick: bool = False,
    steps: int | None = None,
    out: str = "bench",
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """What ``hybrid-jax bench`` does: compare, print the table, write the files.

    Args:
      recipes: comma-separated recipe names (default: all of :data:`RECIPES`).
      quick: the small setting (:data:`QUICK`) instead of the full one (:data:`FULL`).
      steps: overrides the setting's number of steps.
      out: the output folder.
      log: where lines of text go.

    Returns:
      The result rows.
    """
    base = QUICK if quick else FULL
    if steps is not None:
        base = dataclasses.replace(
            base,
            steps=steps,
            eval_interval=min(base.eval_interval, steps),
            warmup_steps=min(base.warmup_steps, max(steps // 10, 1)),
        )
    rows = compare(parse_recipes(recipes), base, log=log)
    log(str(table(rows)))
    for line in notes(rows):
        log(line)
    for path in write_outputs(rows, out):
        log(f"wrote {path}")
    return rows
