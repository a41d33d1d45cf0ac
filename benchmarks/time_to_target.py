"""Time to val loss 1.88: the default ``hybrid-jax train`` against its fp32 AdamW twin.

The default (``--precision auto``, Muon + Adam) and the twin (``--precision fp32 --optimizer
adamw``: nanoGPT's recipe, the run nanoGPT's PyTorch script makes) train the same baby GPT on
the same batches for 2000 steps, in one process, interleaved step by step
(:func:`hybrid_jax.app.bench.compare`), each step timed alone. For each it prints the median
step time, the elapsed seconds at each evaluation (its own steps and evaluations, compiling
left out), the time to 1.88 and the final validation loss; then the ratios the default is held
to: (default's time to 1.88) / (twin's 2000-step loop time), target <= 0.5, and (default's
median step) / (twin's), target <= 1.2.

    python benchmarks/time_to_target.py [--steps 2000] [--target 1.88] [--json out.json]
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json

from hybrid_jax.app.bench import Recipe, compare
from hybrid_jax.app.config import RunConfig

TWIN = Recipe("fp32", "fp32", "nanoGPT's recipe: fp32, AdamW", optimizer="adamw")
DEFAULT = Recipe("default", "auto", "hybrid-jax train's default", optimizer="muon_adamw")


def time_to(row: dict, target: float) -> tuple[int | None, float | None]:
    """The step and elapsed seconds of the first evaluation at or below ``target``."""
    for (step, loss), seconds in zip(row["val_loss_curve"], row["eval_elapsed_s"], strict=True):
        if loss <= target:
            return step, seconds
    return None, None


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000, help="(%(default)s)")
    parser.add_argument("--target", type=float, default=1.88, help="(%(default)s)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    # As the CLI does: keep freed memory mapped, so large temporaries are not faulted in anew.
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-4, 0)
    libc.mallopt(-1, 1 << 30)

    base = dataclasses.replace(RunConfig(), steps=args.steps)
    rows = compare([TWIN, DEFAULT], base)
    twin, default = rows
    loop_s = {r["recipe"]: r["eval_elapsed_s"][-1] for r in rows}
    print(f"\n{'run':10s} {'step ms':>8s} {'loop s':>7s} {'to target':>16s} {'final':>7s}")
    for r in rows:
        step, seconds = time_to(r, args.target)
        reached = "never" if step is None else f"{seconds:6.1f} s @{step}"
        print(
            f"{r['recipe']:10s} {r['step_time_ms']:8.2f} {loop_s[r['recipe']]:7.1f} "
            f"{reached:>16s} {r['final_val_loss']:7.4f}"
        )
        curve = ", ".join(
            f"{s}: {loss:.3f} @{t:.0f}s"
            for (s, loss), t in zip(r["val_loss_curve"], r["eval_elapsed_s"], strict=True)
        )
        print(f"  {curve}")
    _, default_s = time_to(default, args.target)
    result = {
        "time_to_target_over_twin_loop": None if default_s is None else default_s / loop_s["fp32"],
        "step_time_ratio": default["step_time_ms"] / twin["step_time_ms"],
        "default_final_val_loss": default["final_val_loss"],
        "twin_step_time_ms": twin["step_time_ms"],
        "rows": rows,
    }
    ratio = result["time_to_target_over_twin_loop"]
    print(
        f"\n(default's time to {args.target}) / (twin's {args.steps}-step loop): "
        + ("never reached" if ratio is None else f"{ratio:.3f}")
        + " (target <= 0.5)"
    )
    print(f"default step / twin step: {result['step_time_ratio']:.3f} (target <= 1.2)")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
