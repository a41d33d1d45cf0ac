"""The ``hybrid-jax`` command line: ``train``, ``bench``, ``inspect`` and ``mix``."""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import sys
from typing import Any


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    """The flags that decide a run's model, data, precision and optimizer (train, inspect)."""
    from hybrid_jax.app.config import LOSS_SCALES, MODEL_PRESETS, OPTIMIZERS, RunConfig
    from hybrid_jax.models import ATTENTION, FP8_SCALINGS
    from hybrid_jax.precision import PRESETS

    d = RunConfig()
    p.add_argument(
        "--precision",
        default=d.precision,
        help=f"auto (the fastest on this backend: bf16-mixed on GPU/TPU, fp32 on CPU), a preset "
        f"({', '.join(PRESETS)}), a policy string, or JSON rules (a file or inline) "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--fp8-scaling",
        default=d.fp8_scaling,
        choices=FP8_SCALINGS,
        help="fp8 matmul scales from this step's amax or an amax history (%(default)s)",
    )
    p.add_argument(
        "--loss-scale",
        default=d.loss_scale,
        choices=LOSS_SCALES,
        help="auto: dynamic loss scaling when a policy computes in fp16 (%(default)s)",
    )
    p.add_argument(
        "--optimizer",
        default=d.optimizer,
        choices=OPTIMIZERS,
        help="optimizer recipe (default: %(default)s)",
    )
    p.add_argument(
        "--batch-size", type=int, default=d.batch_size, help="sequences per step (%(default)s)"
    )
    p.add_argument(
        "--model",
        default=d.model,
        choices=tuple(MODEL_PRESETS),
        help="the GPT's shape: nanoGPT's baby GPT, or GPT-2 small/medium (%(default)s); "
        "--n-layer, --n-head, --n-embd and --block-size override it",
    )
    p.add_argument("--block-size", type=int, default=None, help="context length (--model's)")
    p.add_argument("--n-layer", type=int, default=None, help="blocks (--model's)")
    p.add_argument("--n-head", type=int, default=None, help="attention heads (--model's)")
    p.add_argument("--n-embd", type=int, default=None, help="channels (--model's)")
    p.add_argument(
        "--attention",
        default=d.attention,
        choices=ATTENTION,
        help="attention core: auto (cuDNN flash attention on a CUDA GPU with bf16/fp16, else "
        "ops), ops (ours, closed-form backward), xla or cudnn (jax.nn.dot_product_attention) "
        "(%(default)s)",
    )
    p.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help="token ids the model embeds, at least the data's (default: the data's)",
    )
    p.add_argument(
        "--data",
        default=None,
        help="a UTF-8 text file, or a folder of nanoGPT token files (train.bin, val.bin, "
        "optional meta.pkl or meta.json), to train on (default: the bundled Tiny Shakespeare)",
    )
    p.add_argument("--seed", type=int, default=d.seed, help="random seed (%(default)s)")


def _run_config(args: argparse.Namespace, **extra: Any):
    """The RunConfig of every flag named after one of its fields (``--n-layer`` is
    ``n_layer``), plus ``extra``."""
    from hybrid_jax.app.config import RunConfig

    names = {field.name for field in dataclasses.fields(RunConfig)}
    return RunConfig(**{k: v for k, v in vars(args).items() if k in names}, **extra)


def _add_train(commands) -> None:
    from hybrid_jax.app.config import DEFAULT_LR, RunConfig

    d = RunConfig()
    p = commands.add_parser(
        "train",
        help="train the bundled GPT on Tiny Shakespeare (or --data)",
        description="Train a character-level GPT. Defaults: nanoGPT's CPU baby GPT, the "
        "precision that is fastest on this backend, Muon with weight decay on hidden matrices, "
        "Adam without on the rest.",
    )
    _add_run_flags(p)
    p.add_argument("--steps", type=int, default=d.steps, help="training steps (%(default)s)")
    p.add_argument(
        "--lr",
        type=float,
        default=None,
        help="Adam's peak learning rate, cosine to lr/10 (default: "
        + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items())
        + "; Muon has --muon-lr)",
    )
    p.add_argument(
        "--warmup-steps",
        type=int,
        default=d.warmup_steps,
        help="linear warm-up of the learning rates from 0 (%(default)s)",
    )
    p.add_argument(
        "--muon-lr",
        type=float,
        default=d.muon_lr,
        help="Muon's peak learning rate (muon_adamw), on Adam's schedule (%(default)s)",
    )
    p.add_argument(
        "--eval-interval",
        type=int,
        default=d.eval_interval,
        help="steps between validation and checkpoints (%(default)s)",
    )
    p.add_argument(
        "--eval-batches",
        type=int,
        default=d.eval_batches,
        help="fixed validation batches of 64 blocks (%(default)s)",
    )
    p.add_argument(
        "--target-loss",
        type=float,
        default=None,
        help="stop at the first evaluation whose validation loss is at or below this, and "
        "record the time and step it took (summary.json: time_to_target_s, step_at_target)",
    )
    p.add_argument(
        "--muon-ns-steps",
        type=int,
        default=d.muon_ns_steps,
        help="Newton-Schulz iterations of Muon's orthogonalisation (%(default)s)",
    )
    p.add_argument("--out", default="out", help="output folder (%(default)s)")
    p.add_argument(
        "--resume", action="store_true", help="continue from the latest checkpoint in --out"
    )
    p.add_argument(
        "--ema-decay",
        type=float,
        default=d.ema_decay,
        help="keep an fp32 exponential moving average of the parameters with this decay, "
        "e.g. 0.999 (default: none)",
    )
    p.add_argument(
        "--eval-ema",
        action="store_true",
        help="evaluate and sample with the EMA parameters (needs --ema-decay)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--max-skips",
        type=int,
        default=d.max_skips,
        help="non-finite steps in a row (each skipped) before rolling back to the last "
        "checkpoint; if they come back, stop with an error (%(default)s)",
    )
    p.add_argument(
        "--mesh",
        default=None,
        help="shard over a device mesh of all processes' devices: data=N (data parallel), "
        "fsdp=N (parameters and optimizer state sharded) or both, e.g. data=4,fsdp=2; -1 "
        "takes the devices left (default: one device, no sharding)",
    )
    p.add_argument(
        "--distributed",
        action="store_true",
        help="join a multi-process run (jax.distributed.initialize) before anything else; "
        "on TPU pods, SLURM and Open MPI the next three flags are found automatically",
    )
    p.add_argument("--coordinator", default=None, help="host:port of process 0")
    p.add_argument("--num-processes", type=int, default=None, help="processes in the run")
    p.add_argument("--process-id", type=int, default=None, help="this process's index")
    p.add_argument(
        "--diagnose",
        action="store_true",
        help="after training, report per layer the numerics of parameters, gradients and "
        "activations (underflow/overflow in fp16, e4m3, e5m2; the lowest precision each "
        "tolerates) and update stagnation; also written to <out>/diagnostics.txt",
    )


def _add_inspect(commands) -> None:
    p = commands.add_parser(
        "inspect",
        help="show a recipe's precision plan, optimizer groups and memory, before training",
        description="For a model config and a recipe, without training: each parameter's path, "
        "shape, param and compute dtype, optimizer group, parameter and optimizer-state bytes; "
        "the totals (the bytes of the train state's arrays); and XLA's memory analysis of the "
        "compiled train step (temporaries: activations and scratch).",
    )
    _add_run_flags(p)
    p.add_argument(
        "--audit",
        action="store_true",
        help="also list every dot of the compiled step with its operand and result dtypes, "
        "flagging those that differ from what the precision plan asked for",
    )


def _add_bench(commands) -> None:
    from hybrid_jax.app.bench import RECIPES

    listing = "; ".join(f"{r.name}: {r.description}" for r in RECIPES.values())
    p = commands.add_parser(
        "bench",
        help="compare precision recipes side by side (speed, memory, loss)",
        description="Train the same GPT, data and seed under each precision recipe, "
        "interleaved, and report step time (median, ratio to fp32 in the same run), tokens/s, "
        "compile time, XLA memory analysis, training-state bytes per parameter, final "
        "validation loss and its gap to fp32, skipped steps and divergence. Writes a table, "
        f"results.json, results.csv and PNG plots. Recipes: {listing}.",
    )
    p.add_argument(
        "--recipes",
        default=None,
        help="comma-separated recipe names (default: all; fp32 is always included)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="a small GPT for 150 steps (minutes on a 2-core CPU); without it, nanoGPT's baby "
        "GPT for 2000 steps, meant for a GPU or TPU",
    )
    p.add_argument("--steps", type=int, default=None, help="override the number of steps")
    p.add_argument("--out", default="bench", help="output folder (%(default)s)")


def _bench(args: argparse.Namespace) -> int:
    from hybrid_jax.app import bench

    _keep_freed_memory()
    try:
        bench.main(args.recipes, quick=args.quick, steps=args.steps, out=args.out)
    except (ValueError, OSError) as e:
        print(f"hybrid-jax bench: error: {e}", file=sys.stderr)
        return 2
    return 0


def _add_mix(commands) -> None:
    from hybrid_jax.app.mix_runs import MODES

    p = commands.add_parser(
        "mix",
        help="soups and merges of saved runs' parameters",
        description="Mix the latest parameters of runs saved by 'hybrid-jax train': a uniform "
        "or greedy soup (Wortsman et al. 2022), a path-wise merge, or an interpolation of two. "
        "Prints each run's and the result's validation loss, all on the FIRST run's "
        "validation batches (its seed, eval_batches and eval_batch_size) in its precision, so "
        "that every run is measured alike; the runs must share the model shape and data. "
        "Saves the result as a checkpoint of the first run's settings that 'hybrid-jax train "
        "--out OUT --resume' fine-tunes, and OUT/mix.json.",
    )
    p.add_argument(
        "runs",
        nargs="+",
        help="run folders (each with checkpoints/); the first one's validation batches and "
        "settings are used",
    )
    p.add_argument("--mode", choices=MODES, default="uniform", help="(%(default)s)")
    p.add_argument(
        "--rules",
        default=None,
        help='merge: JSON, inline or a file: {"rules": [["attn/", "runA"], ["mlp/", 1]], '
        '"default": "runA"}; runs by folder name or index',
    )
    p.add_argument("--t", type=float, default=0.5, help="interpolate: weight of the second run")
    p.add_argument("--out", default="mixed", help="output folder (%(default)s)")


def _mix(args: argparse.Namespace) -> int:
    from hybrid_jax.app.mix_runs import mix_runs

    try:
        mix_runs(args.runs, args.mode, args.out, rules=args.rules, t=args.t)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"hybrid-jax mix: error: {e}", file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hybrid-jax",
        description="Mixed- and low-precision training with hybrid optimizers in JAX.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_train(commands)
    _add_bench(commands)
    _add_inspect(commands)
    _add_mix(commands)
    return parser


def _keep_freed_memory() -> None:
    """Stops glibc from mapping fresh pages for XLA:CPU's per-step temporary buffer.

    XLA:CPU allocates its temporaries (tens of MiB for the default GPT step) on every call; above
    glibc's mmap threshold each allocation is a fresh mapping that page-faults in afresh, a
    sizeable share of a small model's step (``benchmarks/step_time.py``). Keeping freed memory in
    the heap makes the next step reuse it. A process-wide setting, so the command line makes it,
    not the library; glibc only, silently skipped elsewhere.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-4, 0)  # M_MMAP_MAX: never serve malloc from a fresh mmap
    libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: do not return freed memory to the system


def _train(args: argparse.Namespace) -> int:
    from hybrid_jax.app.loop import train
    from hybrid_jax.train import NonFiniteError

    _keep_freed_memory()
    try:
        explicit = (args.coordinator, args.num_processes, args.process_id)
        if args.distributed or any(a is not None for a in explicit):
            from hybrid_jax.train import initialize_distributed

            initialize_distributed(*explicit)
        config = _run_config(args)
        train(
            config,
            args.out,
            resume=args.resume,
            progress=not args.no_progress,
            diagnose=args.diagnose,
        )
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"hybrid-jax train: error: {e}", file=sys.stderr)
        return 2
    except NonFiniteError as e:
        print(f"hybrid-jax train: training failed: {e}", file=sys.stderr)
        return 1
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from hybrid_jax.app.inspection import inspect_run

    try:
        print(inspect_run(_run_config(args), audit=args.audit))
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"hybrid-jax inspect: error: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    commands = {"train": _train, "bench": _bench, "inspect": _inspect, "mix": _mix}
    return commands[args.command](args)


def run() -> None:
    """The console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    run()
