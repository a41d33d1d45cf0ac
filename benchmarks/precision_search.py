"""Automatic precision search on the small GPT: the leanest rule list within a loss budget.

Measures each layer group's sensitivity (embeddings, attention, MLP, norms; the validation-loss
change when only that group is lowered to bf16-mixed, fp8-mixed, int8-mixed, bf16-pure-sr or
bf16-lean), picks the candidate that saves the most memory (train state + XLA temporaries) per
group within the budget, then verifies the combined rules with their own run, stepping back
the costliest group until the measured gap fits. Prints the sensitivities and the rule list.
Every run trains with the chosen optimizer: rules found under AdamW need not suit Muon.

    python benchmarks/precision_search.py [--budget 1.0] [--steps 150] [--memory total|state]
        [--optimizer adamw|muon_adamw]
"""

from __future__ import annotations

import argparse
import dataclasses

from hybrid_jax.app.bench import QUICK
from hybrid_jax.app.config import OPTIMIZERS
from hybrid_jax.app.search import precision_search


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=1.0, help="loss increase, %% of fp32")
    parser.add_argument("--steps", type=int, default=QUICK.steps, help="steps per run")
    parser.add_argument(
        "--memory", choices=("total", "state"), default="total", help="what to minimise"
    )
    parser.add_argument(
        "--optimizer", choices=OPTIMIZERS, default=QUICK.optimizer, help="of every run"
    )
    args = parser.parse_args(argv)
    base = dataclasses.replace(
        QUICK, steps=args.steps, eval_interval=args.steps, optimizer=args.optimizer
    )
    result = precision_search(
        base, budget_pct=args.budget, memory=args.memory, log=lambda line: None
    )
    print(result)


if __name__ == "__main__":
    main()
