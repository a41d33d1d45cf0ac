"""``hybrid-jax mix``: soups and merges of the parameters of saved runs.

Each run folder is one that ``hybrid-jax train`` wrote (its ``checkpoints/`` hold the settings).
:func:`mix_runs` restores each run's latest parameters, widens them to fp32 (runs may have
trained in different precisions) and mixes them with :mod:`hybrid_jax.mixing`.

Every ingredient and the result are evaluated on one validation set, the **first run's**: its
fixed batches (its ``seed``, ``eval_batches`` and ``eval_batch_size``), under its precision. The
same batches for every run make the losses, and the greedy soup's choices, comparable; a run
trained with other eval settings is measured on the first run's batches, not on the ones its
own training reported. The runs must share the model's shape and the data, so these batches
come from a validation split that none of them trained on.

The result is saved as a checkpoint of the first run's settings at step 0 with a fresh optimizer
state, so ``hybrid-jax train --out <out> --resume`` fine-tunes from it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from hybrid_jax import mixing
from hybrid_jax._table import Table
from hybrid_jax.app.config import RunConfig
from hybrid_jax.app.run import build
from hybrid_jax.precision import cast_to_param
from hybrid_jax.train import Checkpointer, evaluate

MODES = ("uniform", "greedy", "merge", "interpolate")
#: The settings every mixed run must share: the model's shape, and the text (its vocabulary and
#: its validation split).
SHARED_SETTINGS = ("n_layer", "n_head", "n_embd", "block_size", "data")
#: The settings that draw a run's validation batches.
VAL_SET_SETTINGS = ("data", "block_size", "seed", "eval_batches", "eval_batch_size")


def _settings(folder: str) -> RunConfig:
    """The run's settings, resolved (``auto``, default learning rates) as training saves them."""
    with Checkpointer(os.path.join(folder, "checkpoints")) as ckpt:
        return RunConfig(**ckpt.meta()["settings"]).resolved()[0]


def _restore_params(folder: str, config: RunConfig) -> tuple[Any, Any]:
    """The run built from ``config`` and its latest parameters, widened to fp32."""
    with Checkpointer(os.path.join(folder, "checkpoints")) as ckpt:
        run = build(config)
        state, _ = ckpt.restore(run.state)
    widen = lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x
    return run, jax.tree_util.tree_map(widen, state.params)


def _differences(first: RunConfig, other: RunConfig, keys: Sequence[str]) -> list[str]:
    return [
        f"{k} {getattr(first, k)!r} vs {getattr(other, k)!r}"
        for k in keys
        if getattr(first, k) != getattr(other, k)
    ]


def mix_runs(
    folders: Sequence[str],
    mode: str,
    out: str,
    *,
    rules: str | None = None,
    t: float = 0.5,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Mixes the latest parameters of the runs in ``folders``; evaluates and saves the result.

    Args:
      folders: run folders written by ``hybrid-jax train`` (same model shape).
      mode: ``uniform`` (the mean, a uniform soup), ``greedy`` (Wortsman et al. 2022's greedy
        soup: ingredients in order of validation loss, each kept only if the soup does not get
        worse), ``merge`` (each leaf from the run its path rule names) or ``interpolate``
        (``(1 - t) first + t second``).
      out: the folder for the result (``checkpoints/``, ``mix.json``).
      rules: for ``merge``: JSON (inline or a file) ``{"rules": [[pattern, run], ...],
        "default": run}``, a run named by its folder's base name or its index.
      t: for ``interpolate``.
      log: where lines of text go.

    Returns:
      The summary written to ``<out>/mix.json``: each ingredient's and the result's
      validation loss, all on the first run's validation batches (``val_set``: that run and
      its settings that draw them), the mode and what it kept.

    Raises:
      ValueError: an unknown mode, a wrong number of runs, runs that differ in a setting of
        :data:`SHARED_SETTINGS` (the message names the runs and the settings), or bad rules.
      FileNotFoundError: a folder without a checkpoint.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose from {MODES}")
    if mode == "interpolate" and len(folders) != 2:
        raise ValueError(f"mode 'interpolate' mixes exactly two runs, got {len(folders)}")
    if not folders:
        raise ValueError("no runs to mix")
    configs = [_settings(f) for f in folders]
    config = configs[0]
    for folder, other in zip(folders[1:], configs[1:], strict=True):
        if differing := _differences(config, other, SHARED_SETTINGS):
            raise ValueError(
                f"cannot mix {folders[0]} and {folder}: they differ in {', '.join(differing)}; "
                "mix runs of one model shape trained on the same data"
            )
    restored = [_restore_params(f, c) for f, c in zip(folders, configs, strict=True)]
    run = restored[0][0]
    trees = [params for _, params in restored]

    def val_loss(params: Any) -> float:
        params = cast_to_param(params, run.precision)
        return evaluate(run.eval_step, params, run.val_set, run.state.fp8_meta)["lm"]

    names = [os.path.basename(os.path.normpath(f)) for f in folders]
    log(
        f"validation: every run on {names[0]}'s {config.eval_batches} batches of "
        f"{config.eval_batch_size} x {config.block_size} tokens (seed {config.seed}), in "
        f"{config.precision}"
    )
    for name, other in zip(names[1:], configs[1:], strict=True):
        if differing := _differences(config, other, VAL_SET_SETTINGS):
            log(f"  {name} reported its loss on other batches ({', '.join(differing)})")
    losses = [val_loss(tree) for tree in trees]
    info: dict[str, Any] = {}
    if mode == "uniform":
        mixed = mixing.uniform_soup(trees)
    elif mode == "greedy":
        mixed, found = mixing.greedy_soup(trees, val_loss)
        info["kept"] = [names[i] for i in found.kept]
    elif mode == "interpolate":
        mixed = mixing.interpolate(trees[0], trees[1], t)
        info["t"] = t
    else:
        mixed = mixing.merge(dict(zip(names, trees, strict=True)), **_merge_rules(rules, names))
    result_loss = val_loss(mixed)

    state = dataclasses.replace(run.state, params=cast_to_param(mixed, run.precision))
    with Checkpointer(os.path.join(out, "checkpoints")) as ckpt:
        ckpt.save(state, meta={"settings": dataclasses.asdict(config), "mixed_from": folders})
    summary = {
        "mode": mode,
        "runs": list(folders),
        "val_set": {"run": folders[0], **{k: getattr(config, k) for k in VAL_SET_SETTINGS}},
        "val_loss": dict(zip(names, losses, strict=True)),
        "result_val_loss": result_loss,
        **info,
    }
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "mix.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    rows = tuple((n, f"{loss:.4f}") for n, loss in zip(names, losses, strict=True))
    log(str(Table(("run", "val loss"), rows, ((f"{mode} mix", f"{result_loss:.4f}"),))))
    return summary


def _merge_rules(spec: str | None, names: list[str]) -> dict[str, Any]:
    if spec is None:
        raise ValueError("mode 'merge' needs --rules: {\"rules\": [[pattern, run], ...]}")
    if spec.lstrip().startswith("{"):
        raw = json.loads(spec)
    else:
        with open(spec, encoding="utf-8") as f:
            raw = json.load(f)
    by_index = lambda v: names[v] if isinstance(v, int) else v
    try:
        rules = [(pattern, by_index(run)) for pattern, run in raw["rules"]]
        default = raw.get("default")
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise ValueError(
            f'merge rules must be {{"rules": [[pattern, run], ...], "default": run}} with '
            f"runs named {names} or by index: {e!r}"
        ) from None
    return {"rules": rules, "default": None if default is None else by_index(default)}
