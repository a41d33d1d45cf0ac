"""Automatic precision search: the leanest rule list whose measured loss stays within a budget.

Given a budget on the validation-loss increase over fp32, :func:`precision_search` measures how
sensitive each layer group is (the loss when *only* that group is lowered to each candidate
recipe), gives every group the candidate that saves the most memory within the budget, then
trains the combined rule list and, while its loss is over budget, moves the group that costs
the most loss back one step towards fp32. What it returns was measured, not predicted: the
rule list's own run is within the budget (or it is all fp32).

Memory is what a run holds: by default the training state's bytes plus the compiled step's
temporaries (XLA's memory analysis), so a candidate is cheaper when it narrows the stored
parameters, the optimizer's moments or the activations, and dearer when its update needs more
scratch; ``memory="state"`` counts the state alone.

Every measuring run is the base run with only its precision changed: its optimizer, loss
scaling, fp8 scaling, model, data, schedule and seed are the base's.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from hybrid_jax.app.bench import Recipe, compare
from hybrid_jax.app.config import RunConfig

#: The GPT's layer groups: name -> path pattern.
GPT_GROUPS = {
    "embeddings": r"embed",
    "attention": r"attn/",
    "mlp": r"mlp/",
    "norms": r"ln_",
}
#: Candidate recipes per group, as policies.
CANDIDATES = ("bf16-mixed", "fp8-mixed", "int8-mixed", "bf16-pure-sr", "bf16-lean")


def _rules_json(choice: Mapping[str, str], groups: Mapping[str, str]) -> str:
    rules = [[groups[g], policy] for g, policy in choice.items() if policy != "fp32"]
    return json.dumps({"rules": rules, "default": "fp32"})


def _recipe(name: str, precision: str, description: str, base: RunConfig) -> Recipe:
    # compare runs ``base`` with the recipe's optimizer, loss scaling and fp8 scaling in place
    # of the base's own; a Recipe's defaults (AdamW) would silently change the measured run.
    return Recipe(
        name,
        precision,
        description,
        optimizer=base.optimizer,
        loss_scale=base.loss_scale,
        fp8_scaling=base.fp8_scaling,
    )


MEMORY_MEASURES = ("total", "state")


def _memory_fn(measure: str) -> Callable[[Mapping[str, Any]], float]:
    if measure == "state":
        return lambda row: row["state_bytes"]
    return lambda row: row["state_bytes"] + (row["temp_bytes"] or 0)


@dataclasses.dataclass(frozen=True)
class SearchResult:
    """What :func:`precision_search` found.

    Attributes:
      rules: the proposed rule list, ``[(pattern, policy), ...]`` (default fp32).
      choice: group name -> chosen policy (``"fp32"``: left alone).
      loss_gap_pct: the proposed rules' measured validation-loss increase over fp32, in %.
      memory_bytes, fp32_memory_bytes: state plus step temporaries, proposed and fp32.
      sensitivity: ``{group: {policy: loss gap %}}``, each group lowered alone.
      budget_pct: the budget.
    """

    rules: list[tuple[str, str]]
    choice: dict[str, str]
    loss_gap_pct: float
    memory_bytes: float
    fp32_memory_bytes: float
    sensitivity: dict[str, dict[str, float]]
    budget_pct: float

    def __str__(self) -> str:
        lines = ["sensitivity (val-loss gap to fp32, %, each group lowered alone):"]
        for group, gaps in self.sensitivity.items():
            lines.append(f"  {group}: " + ", ".join(f"{p} {g:+.2f}" for p, g in gaps.items()))
        saved = 1 - self.memory_bytes / self.fp32_memory_bytes
        lines += [
            f"proposed (measured gap {self.loss_gap_pct:+.2f}% within budget "
            f"{self.budget_pct:.2f}%; memory {self.memory_bytes / 2**20:.2f} MiB vs fp32 "
            f"{self.fp32_memory_bytes / 2**20:.2f} MiB, {100 * saved:.1f}% less):",
            "rules = [",
            *(f"    ({pattern!r}, {policy!r})," for pattern, policy in self.rules),
            "]  # default: fp32",
        ]
        return "\n".join(lines)


def precision_search(
    base: RunConfig,
    *,
    budget_pct: float = 1.0,
    groups: Mapping[str, str] = GPT_GROUPS,
    candidates: Sequence[str] = CANDIDATES,
    memory: str = "total",
    log: Callable[[str], None] = print,
) -> SearchResult:
    """Proposes the rule list with the least memory whose loss increase is within a budget.

    Args:
      base: the run every measurement varies (e.g. :data:`hybrid_jax.app.bench.QUICK`): each
        measuring run is ``base`` with only its precision replaced, so its optimizer, loss
        scaling, fp8 scaling, model, data, schedule and seed are the base's.
      budget_pct: the largest allowed validation-loss increase over fp32, in percent.
      groups: layer groups, name -> path pattern (first match wins, in this order).
      candidates: policies (presets or strings) a group may be lowered to.
      memory: what to minimise: ``"total"``, the train state plus the compiled step's
        temporaries (XLA's memory analysis: activations and the optimizer's scratch), or
        ``"state"``, the train state alone (what stays allocated between steps).
      log: where progress lines go.

    Returns:
      A :class:`SearchResult`; ``str()`` of it ends with the rule list, ready to paste.

    Raises:
      ValueError: a negative budget, no groups or candidates, an unknown ``memory``, or a base
        that evaluates an EMA of its parameters (``eval_ema``).
    """
    if memory not in MEMORY_MEASURES:
        raise ValueError(f"memory must be one of {MEMORY_MEASURES}, got {memory!r}")
    _memory = _memory_fn(memory)
    if budget_pct < 0:
        raise ValueError(f"budget_pct must be >= 0, got {budget_pct}")
    if not groups or not candidates:
        raise ValueError("precision_search needs at least one group and one candidate")
    if base.eval_ema:
        # compare evaluates the trained parameters, never their EMA: the search would measure
        # another loss than the base run reports.
        raise ValueError(
            "precision_search measures the trained parameters, not their EMA: use a base run "
            "with eval_ema=False"
        )
    recipes = [_recipe("fp32", "fp32", "the reference", base)]
    for group in groups:
        for policy in candidates:
            precision = _rules_json({group: policy}, groups)
            recipes.append(
                _recipe(f"{group}:{policy}", precision, f"only {group} in {policy}", base)
            )
    log(f"measuring {len(recipes) - 1} single-group variants")
    rows = {r["recipe"]: r for r in compare(recipes, base, log=log)}
    sensitivity = {g: {p: rows[f"{g}:{p}"]["val_loss_gap_pct"] for p in candidates} for g in groups}

    # Per group, the candidates within budget that save memory, cheapest first; fp32 is always
    # the last resort.
    fp32_memory = _memory(rows["fp32"])
    ladders = {}
    for group in groups:
        fitting = [
            p
            for p in candidates
            if not rows[f"{group}:{p}"]["diverged"]
            and sensitivity[group][p] <= budget_pct
            and _memory(rows[f"{group}:{p}"]) < fp32_memory
        ]
        fitting.sort(key=lambda p: _memory(rows[f"{group}:{p}"]))
        ladders[group] = [*fitting, "fp32"]
    choice = {g: ladder[0] for g, ladder in ladders.items()}

    while True:
        proposed = _recipe("proposed", _rules_json(choice, groups), "the proposed rules", base)
        log(f"verifying {choice}")
        result = {r["recipe"]: r for r in compare([recipes[0], proposed], base, log=log)}
        gap = result["proposed"]["val_loss_gap_pct"]
        if (gap <= budget_pct and not result["proposed"]["diverged"]) or all(
            p == "fp32" for p in choice.values()
        ):
            break
        # Over budget together: the lowered group that costs the most loss steps back.
        worst = max(
            (g for g in groups if choice[g] != "fp32"), key=lambda g: sensitivity[g][choice[g]]
        )
        ladder = ladders[worst]
        choice[worst] = ladder[ladder.index(choice[worst]) + 1]
    rules = [(groups[g], p) for g, p in choice.items() if p != "fp32"]
    return SearchResult(
        rules=rules,
        choice=choice,
        loss_gap_pct=gap,
        memory_bytes=_memory(result["proposed"]),
        fp32_memory_bytes=_memory(result["fp32"]),
        sensitivity=sensitivity,
        budget_pct=budget_pct,
    )
