"""The training loop behind ``hybrid-jax train``: step, read metrics, evaluate, save, roll back."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp

from hybrid_jax import tree as tree_lib
from hybrid_jax.app.config import RunConfig
from hybrid_jax.app.run import Run, build, generate
from hybrid_jax.precision import DynamicLossScale, cast_to_compute
from hybrid_jax.train import Checkpointer, TrainState, evaluate, merge_frozen, split_frozen
from hybrid_jax.train.guard import NonFiniteError, SkipGuard


@contextlib.contextmanager
def _interrupt_flag() -> Iterator[dict]:
    """Turns Ctrl-C into a flag the loop checks between steps, so a save is never cut short."""
    flag = {"stop": False}
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum, frame):
        del signum, frame
        flag["stop"] = True

    try:
        signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread: leave Ctrl-C alone
        yield flag
        return
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def _to_host(metrics: dict[str, jax.Array]) -> dict[str, float]:
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


def train(
    config: RunConfig,
    out: str | os.PathLike,
    *,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    diagnose: bool = False,
) -> dict[str, Any]:
    """Trains, evaluates, checkpoints and samples; returns (and writes) the run's summary.

    Writes into ``out``: ``metrics.jsonl`` (one JSON object per logged step and evaluation),
    ``checkpoints/`` (orbax, every ``eval_interval`` steps, at the end and on Ctrl-C) and
    ``summary.json``. The host reads step ``t - 1``'s metrics only after dispatching step ``t``,
    so it never stalls the device.

    Args:
      config: the run's settings.
      out: the output folder (created if missing).
      resume: continue from the latest checkpoint in ``out`` (its settings must match).
      progress: show a progress bar with the loss and tokens/s.
      log: where lines of text go (the last one is the final validation loss).
      diagnose: after training, write the numerics diagnostics of the final state (parameters,
        gradients, activations, update stagnation; :func:`hybrid_jax.app.diagnose.diagnose`) to
        ``diagnostics.txt`` in ``out`` and print them.

    Returns:
      The summary: ``final_val_loss``, ``wall_time_s``, ``steps``, ``tokens_per_s``, ...
    """
    out = os.path.abspath(out)
    os.makedirs(out, exist_ok=True)
    run = build(config)
    # Every process runs the same steps; the first one alone writes files and prints.
    main = jax.process_index() == 0
    if not main:
        progress, log = False, lambda text: None
    eval_params = lambda state: state.ema_params if config.eval_ema else state.params
    state = run.state
    settings = dataclasses.asdict(config)
    start_time = time.perf_counter()
    # What a resumed run carries over from the checkpoint's metadata.
    carried = {"wall_time_s": 0.0, "skipped_steps": 0, "first_step_val_loss_le_1.88": None}
    with contextlib.ExitStack() as stack:
        ckpt = stack.enter_context(Checkpointer(os.path.join(out, "checkpoints")))
        if resume:
            state, meta = _restore(ckpt, state, settings)
            carried.update({k: meta[k] for k in carried if k in meta})
            log(f"resumed from step {int(state.step)} in {ckpt.directory}")
        first = int(jax.device_get(state.step))
        metrics_path = os.path.join(out, "metrics.jsonl") if main else os.devnull
        metrics_file = stack.enter_context(
            open(metrics_path, "a" if resume else "w", encoding="utf-8")
        )
        interrupt = stack.enter_context(_interrupt_flag())
        bar = stack.enter_context(_Progress(progress, first, config.steps, log))

        def record(entry: dict[str, Any]) -> None:
            metrics_file.write(json.dumps(entry) + "\n")
            metrics_file.flush()

        def read(metrics: dict[str, jax.Array], step: int) -> dict[str, float]:
            host = _to_host(metrics)
            carried["skipped_steps"] += int(host["skipped"])
            record({"step": step, **host})
            return host

        def save() -> None:
            if ckpt.has(int(jax.device_get(state.step))):
                return  # the final save right after a periodic one
            wall = carried["wall_time_s"] + time.perf_counter() - start_time
            ckpt.save(state, meta={"settings": settings, **carried, "wall_time_s": wall})

        tokens_per_step = config.batch_size * config.block_size
        val_loss, timer = float("nan"), _Throughput(tokens_per_step)
        guard = SkipGuard(config.max_skips, min_loss_scale=_floor(state.loss_scale))

        def check(metrics: dict[str, jax.Array], t: int) -> TrainState | None:
            """Reads step ``t``'s metrics; after too many skips, the state to go on from."""
            host = read(metrics, t + 1)
            bar.update(t + 1, host["loss"], timer.rate())
            try:
                reason = guard.observe(t, host)
            except NonFiniteError as e:
                raise NonFiniteError(f"{e}; {_nonfinite_leaves(run, state, t)}") from None
            if reason is None:
                return None
            start = guard.start_of_trouble()
            good = [step for step in ckpt.all_steps() if step <= start]
            if not good:
                raise NonFiniteError(
                    f"{reason}, and there is no checkpoint from before step {start} to roll back "
                    f"to; {_nonfinite_leaves(run, state, t)}"
                )
            ckpt.discard_after(max(good))  # the abandoned path's checkpoints
            restored, _ = ckpt.restore(state, step=max(good))
            guard.rolled_back(max(good))
            record({"step": t + 1, "rollback_to": max(good), "reason": reason})
            bar.note(f"{reason}: rolled back to the checkpoint of step {max(good)}")
            return restored

        pending, t = None, first
        while True:
            if t < config.steps:
                batch = run.sample_train(jax.random.fold_in(run.data_key, t))
                state, metrics = run.step(state, batch)
            if pending is not None:  # the previous step's metrics, read after this dispatch
                restored = check(*pending)
                if restored is not None:
                    state, pending, t = restored, None, int(jax.device_get(restored.step))
                    continue
            if t >= config.steps:
                break
            pending = (metrics, t)
            if t == first + 1:  # compilation is left out of the throughput
                jax.block_until_ready(state)
                timer.start()
            timer.count()
            done = t + 1
            if done % config.eval_interval == 0 or done == config.steps:
                with timer.paused():
                    val_loss = evaluate(
                        run.eval_step, eval_params(state), run.val_set, state.fp8_meta
                    )["lm"]
                record({"step": done, "val_loss": val_loss})
                bar.note(f"step {done}: val loss {val_loss:.4f}")
                if carried["first_step_val_loss_le_1.88"] is None and val_loss <= 1.88:
                    carried["first_step_val_loss_le_1.88"] = done
                save()
            if interrupt["stop"]:
                save()
                ckpt.wait()
                log(
                    f"interrupted at step {done}: checkpoint saved in {ckpt.directory}; run "
                    "again with --resume to continue"
                )
                raise KeyboardInterrupt
            t += 1
        jax.block_until_ready(state)
        tokens_per_s = timer.rate()
        if first >= config.steps:  # nothing left to train: evaluate what was restored
            val_loss = evaluate(run.eval_step, eval_params(state), run.val_set, state.fp8_meta)[
                "lm"
            ]
        save()

    wall = carried["wall_time_s"] + time.perf_counter() - start_time
    skipped = carried["skipped_steps"]
    sample = generate(
        run, eval_params(state), config.sample_chars, seed=config.seed, fp8_meta=state.fp8_meta
    )
    summary = {
        "final_val_loss": val_loss,
        "wall_time_s": wall,
        "steps": config.steps,
        "tokens_per_s": tokens_per_s,
        "skipped_steps": skipped,
        "first_step_val_loss_le_1.88": carried["first_step_val_loss_le_1.88"],
        "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "devices": jax.device_count(),
        "processes": jax.process_count(),
        "settings": settings,
    }
    if main:
        with open(os.path.join(out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    if diagnose:
        from hybrid_jax.app.diagnose import diagnose as diagnose_state

        batch = run.sample_train(jax.random.fold_in(run.data_key, config.steps))
        report = str(diagnose_state(run, state, batch))
        with open(os.path.join(out, "diagnostics.txt"), "w", encoding="utf-8") as f:
            f.write(report + "\n")
        log(report)
    log("---- sample ----")
    log(sample)
    log("----------------")
    log(f"wall time {wall:.1f} s, {tokens_per_s:,.0f} tokens/s, {skipped} skipped steps")
    log(f"final val loss {val_loss:.4f}")
    return summary


def _floor(loss_scale: Any) -> float | None:
    """The loss scale's floor, if it backs off (``DynamicLossScale``)."""
    if isinstance(loss_scale, DynamicLossScale):
        return float(jax.device_get(loss_scale.min_loss_scale))
    return None


def _nonfinite_leaves(run: Run, state: TrainState, t: int) -> str:
    """Which gradients of step ``t``'s batch are not finite, recomputed from ``state`` (whose
    parameters a skipped step left as they were) at its loss scale, for an error message."""
    batch = run.sample_train(jax.random.fold_in(run.data_key, t))
    trainable, frozen = split_frozen(state.params)

    def scaled_total(trainable):
        compute = cast_to_compute(merge_frozen(trainable, frozen), run.precision)
        terms = run.loss_terms(compute, batch, None, state.fp8_meta)
        total, _ = run.weighting(terms, state.weight_params, state.weight_state, state.step)
        return state.loss_scale.scale(total)

    grads = state.loss_scale.unscale(jax.jit(jax.grad(scaled_total))(trainable))
    finite = jax.device_get(jax.tree.map(lambda g: jnp.isfinite(g).all(), grads))
    bad = [path for path, ok in tree_lib.leaves_with_paths(finite)[0] if not ok]
    if not bad:
        return (
            f"step {t}'s gradients are finite (at loss scale "
            f"{float(jax.device_get(state.loss_scale.loss_scale)):g}), so the update or the "
            "optimizer state was not: a parameter or moment overflowing its dtype (fp16?)"
        )
    shown = ", ".join(bad[:8]) + (f" and {len(bad) - 8} more" if len(bad) > 8 else "")
    return f"non-finite gradients at step {t} in {shown}"


def _restore(ckpt: Checkpointer, like: TrainState, settings: dict) -> tuple[TrainState, dict]:
    """The latest checkpoint, after checking it was trained with these settings."""
    if ckpt.latest_step() is None:
        raise FileNotFoundError(f"--resume: no checkpoint in {ckpt.directory}")
    meta = ckpt.meta()  # settings first: their message says more than a shape mismatch
    # A run may go on for more steps, on another mesh (the restore reshards it), or with
    # another patience for skipped steps.
    free = ("steps", "mesh", "max_skips")
    saved = {k: v for k, v in meta.get("settings", {}).items() if k not in free}
    mine = {k: v for k, v in settings.items() if k not in free}
    if saved != mine:
        changed = ", ".join(
            f"{k}={saved.get(k)!r}" for k in sorted(mine) if saved.get(k) != mine[k]
        )
        raise ValueError(
            f"--resume: the checkpoint in {ckpt.directory} was trained with other settings "
            f"({changed})"
        )
    return ckpt.restore(like)


class _Throughput:
    """Training tokens per second, with evaluation time left out."""

    def __init__(self, tokens_per_step: int):
        self._tokens_per_step = tokens_per_step
        self._since, self._steps, self._paused_s = None, 0, 0.0

    def start(self) -> None:
        self._since, self._steps, self._paused_s = time.perf_counter(), 0, 0.0

    def count(self) -> None:
        self._steps += 1

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self._paused_s += time.perf_counter() - start

    def rate(self) -> float:
        if self._since is None or self._steps < 2:
            return float("nan")
        elapsed = time.perf_counter() - self._since - self._paused_s
        return (self._steps - 1) * self._tokens_per_step / elapsed


class _Progress:
    """A rich progress bar showing the loss and tokens/s; without it, notes go to ``log``."""

    def __init__(self, enabled: bool, first: int, total: int, log: Callable[[str], None]):
        self._bar, self._log = None, log
        if enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(
                TextColumn("train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
            )
            self._task = self._bar.add_task("train", total=total, completed=first, info="")

    def __enter__(self):
        if self._bar:
            self._bar.start()
        return self

    def __exit__(self, *exc):
        if self._bar:
            self._bar.stop()

    def update(self, step: int, loss: float, tokens_per_s: float) -> None:
        if self._bar:
            self._bar.update(
                self._task, completed=step, info=f"loss {loss:.4f}  {tokens_per_s:,.0f} tok/s"
            )

    def note(self, text: str) -> None:
        if self._bar:
            self._bar.console.print(text)
        else:
            self._log(text)
