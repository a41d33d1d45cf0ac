"""Sweeps the default run's schedule: when does it first reach val loss 1.88, where does it end?

Each point is the default ``hybrid-jax train`` (nanoGPT's baby GPT, Muon + Adam, ``auto``
precision, 2000 steps) with some :class:`~hybrid_jax.app.config.RunConfig` fields changed: the
peak learning rates of Adam (``lr``, cosine to ``lr / 10``) and Muon (``muon_lr``), the warm-up
and the Newton-Schulz iterations. For each it reports the first evaluation at or below 1.88
(step and elapsed seconds), the final validation loss, and the median seconds per 250 steps
between evaluations. The step at 1.88 and the final loss do not depend on the machine's load;
the seconds do, so with ``--jobs 2`` (two runs at once on two cores) compare steps, not times.

    python benchmarks/schedule_sweep.py [--jobs 2] [--points 'muon_lr=2e-2;lr=2e-3,muon_lr=2e-2']

The table it printed is in ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import itertools
import multiprocessing
import statistics
import tempfile

# The points of the sweep that chose today's defaults; "" is the default itself.
POINTS = (
    "",
    "muon_lr=2e-2",
    "muon_lr=3e-2",
    "lr=2e-3",
    "lr=3e-3",
    "lr=2e-3,muon_lr=2e-2",
    "warmup_steps=50",
    "muon_ns_steps=3",
)


def parse_point(text: str) -> dict[str, float | int]:
    """``"lr=2e-3,muon_lr=2e-2"`` -> ``{"lr": 0.002, "muon_lr": 0.02}`` (fields of RunConfig)."""
    from hybrid_jax.app.config import RunConfig

    fields = {f.name: f.type for f in dataclasses.fields(RunConfig)}
    point = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, value = item.partition("=")
        if name not in fields:
            raise ValueError(f"{name!r} in point {text!r} is not a RunConfig field")
        point[name] = int(value) if fields[name] in ("int", int) else float(value)
    return point


def train_point(text: str) -> dict:
    """Trains one point (in a worker process) and returns what the table shows."""
    from hybrid_jax.app.config import RunConfig
    from hybrid_jax.app.loop import train

    point = parse_point(text)
    if "lr" in point:
        point.setdefault("min_lr", point["lr"] / 10)  # as the CLI does
    with tempfile.TemporaryDirectory() as out:
        summary = train(RunConfig(**point), out, progress=False, log=lambda line: None)
    evaluations = summary["evaluations"]
    gaps = [b["elapsed_s"] - a["elapsed_s"] for a, b in itertools.pairwise(evaluations)]
    return {
        "point": text or "(default)",
        "step_at_1.88": summary["first_step_val_loss_le_1.88"],
        "s_at_1.88": summary["time_to_val_loss_1.88_s"],
        "final_val_loss": summary["final_val_loss"],
        "s_per_eval_interval": statistics.median(gaps) if gaps else float("nan"),
        "curve": [(e["step"], round(e["val_loss"], 4)) for e in evaluations],
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (%(default)s)")
    parser.add_argument(
        "--points", default=None, help="';'-separated points (default: the sweep above)"
    )
    args = parser.parse_args(argv)
    points = POINTS if args.points is None else tuple(args.points.split(";"))
    for text in points:
        parse_point(text)  # a typo fails now, not after an hour
    context = multiprocessing.get_context("spawn")  # a fresh JAX per run
    with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=context) as pool:
        rows = []
        for row in pool.map(train_point, points):
            rows.append(row)
            print(row, flush=True)
    print("\n| point | first eval <= 1.88 (step) | its elapsed s | final val loss | s / eval |")
    print("|---|---|---|---|---|")
    for r in rows:
        s = "never" if r["s_at_1.88"] is None else f"{r['s_at_1.88']:.1f}"
        print(
            f"| {r['point']} | {r['step_at_1.88'] or 'never'} | {s} | "
            f"{r['final_val_loss']:.4f} | {r['s_per_eval_interval']:.1f} |"
        )
    return rows


if __name__ == "__main__":
    main()
