"""The training loop behind ``hybrid-jax train``.

One flat loop, as in nanoGPT's ``train.py``, one line per phase: dispatch step ``t``; read step
``t - 1``'s metrics (after the dispatch, so the host never stalls the device) and roll back to a
checkpoint when the skip guard asks for it; evaluate and checkpoint every ``eval_interval``
steps; stop cleanly on Ctrl-C. What it writes down is :class:`_Journal`'s job, the rollback
:func:`_roll_back`'s, and what it shows :mod:`hybrid_jax.app.progress`'s.
"""

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
from hybrid_jax.app.progress import ProgressBar, Throughput
from hybrid_jax.app.run import Run, build, generate
from hybrid_jax.precision import DynamicLossScale, cast_to_compute
from hybrid_jax.train import (
    Checkpointer,
    NonFiniteError,
    SkipGuard,
    TrainState,
    evaluate,
    merge_frozen,
    split_frozen,
)

# The validation loss nanoGPT's baby GPT reaches in 2000 steps: the summary records when a run
# first gets there, and how long it took.
_NANOGPT_VAL_LOSS = 1.88


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

    Writes into ``out``: ``metrics.jsonl`` (one JSON object per logged step, evaluation and
    rollback), ``checkpoints/`` (orbax, every ``eval_interval`` steps, at the end and on
    Ctrl-C) and ``summary.json``. When ``config.max_skips`` steps in a row are skipped (or the
    loss scale cannot back off further), the run rolls back to the last checkpoint from before
    the trouble; when that happens again, or there is no such checkpoint, it stops with a
    :class:`~hybrid_jax.train.NonFiniteError` naming the non-finite gradients.

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
    start = time.perf_counter()  # time to a loss counts building and compiling too
    out = os.path.abspath(out)
    os.makedirs(out, exist_ok=True)
    run = build(config)
    log(f"precision {run.config.precision}: {run.precision_reason}")
    config = run.config  # "auto" resolved: resuming on another backend is a changed setting
    # Every process runs the same steps; the first one alone writes files and prints.
    main = jax.process_index() == 0
    if not main:
        progress, log = False, lambda text: None
    state, val_loss = run.state, float("nan")
    with contextlib.ExitStack() as stack:
        ckpt = stack.enter_context(Checkpointer(os.path.join(out, "checkpoints")))
        journal = stack.enter_context(
            _Journal(config, out if main else None, append=resume, start=start)
        )
        if resume:
            state, meta = _restore(ckpt, state, journal.settings)
            journal.carry_over(meta)
            log(f"resumed from step {int(state.step)} in {ckpt.directory}")
        first = int(jax.device_get(state.step))
        interrupt = stack.enter_context(_interrupt_flag())
        bar = stack.enter_context(
            ProgressBar(progress, first, config.steps, log, target=config.target_loss)
        )
        guard = SkipGuard(config.max_skips, min_loss_scale=_floor(state.loss_scale))
        timer = Throughput(config.batch_size * config.block_size)

        # previous: (t - 1, its metrics), read after step t's dispatch. end: config.steps, or
        # the step at which the validation loss reached config.target_loss.
        t, previous, end = first, None, config.steps
        batches = stack.enter_context(contextlib.closing(run.train_batches(first)))
        while t < end or previous is not None:
            current = None
            if t < end:
                state, metrics = run.step(state, next(batches))
                current = (t, metrics)
            if previous is not None:
                host = journal.read_step(*previous)
                bar.update(previous[0] + 1, host["loss"], timer.rate())
                if reason := _observe(guard, run, state, previous[0], host):
                    state = _roll_back(ckpt, guard, journal, bar, state, previous[0], reason, run)
                    t, previous = int(jax.device_get(state.step)), None
                    batches.close()  # the batches read ahead are those of the abandoned path
                    batches = stack.enter_context(contextlib.closing(run.train_batches(t)))
                    continue
            if current is None:
                break
            previous = current
            if t == first + 1:  # compilation is left out of the throughput
                jax.block_until_ready(state)
                timer.start()
            timer.count()
            t += 1
            if t % config.eval_interval == 0 or t == config.steps:
                with timer.paused():
                    val_loss = _validation_loss(run, state)
                elapsed = journal.evaluated(t, val_loss)
                bar.evaluated(t, val_loss, elapsed)
                _save(ckpt, state, journal)
                if config.target_loss is not None and val_loss <= config.target_loss:
                    bar.note(f"val loss {val_loss:.4f} <= target {config.target_loss}: stopping")
                    end = t
            if interrupt["stop"]:
                _save(ckpt, state, journal)
                ckpt.wait()
                log(
                    f"interrupted at step {t}: checkpoint saved in {ckpt.directory}; run "
                    "again with --resume to continue"
                )
                raise KeyboardInterrupt
        jax.block_until_ready(state)
        tokens_per_s = timer.rate()
        if first >= end:  # nothing left to train: evaluate what was restored
            val_loss = _validation_loss(run, state)
        _save(ckpt, state, journal)

    summary = journal.summary(val_loss, tokens_per_s, int(jax.device_get(state.step)))
    summary["precision_reason"] = run.precision_reason
    if main:
        with open(os.path.join(out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    if diagnose:
        _write_diagnosis(run, state, out, log)
    if run.tokenizer is None:
        log(f"no sample: {config.data} has no vocabulary (meta.pkl or meta.json with itos)")
    else:
        sample = generate(
            run,
            _eval_params(run, state),
            config.sample_chars,
            seed=config.seed,
            fp8_meta=state.fp8_meta,
        )
        log("---- sample ----")
        log(sample)
        log("----------------")
    log(
        f"wall time {summary['wall_time_s']:.1f} s, {summary['tokens_per_s']:,.0f} tokens/s, "
        f"{summary['skipped_steps']} skipped steps"
    )
    if config.target_loss is not None:
        at, seconds = summary["step_at_target"], summary["time_to_target_s"]
        log(
            f"target val loss {config.target_loss}: "
            + ("not reached" if at is None else f"reached at step {at}, {seconds:.1f} s")
        )
    log(f"final val loss {val_loss:.4f}")
    return summary


def _train_batch(run: Run, t: int) -> Any:
    """Step ``t``'s batch alone (:meth:`Run.train_batches` gives them in order)."""
    return run.sample_train(jax.random.fold_in(run.data_key, t))


def _eval_params(run: Run, state: TrainState) -> Any:
    return state.ema_params if run.config.eval_ema else state.params


def _validation_loss(run: Run, state: TrainState) -> float:
    return evaluate(run.eval_step, _eval_params(run, state), run.val_set, state.fp8_meta)["lm"]


def _save(ckpt: Checkpointer, state: TrainState, journal: _Journal) -> None:
    if not ckpt.has(int(jax.device_get(state.step))):  # else: the final save after a periodic one
        ckpt.save(state, meta=journal.checkpoint_meta())


class _Journal:
    """What a run writes down: ``metrics.jsonl``, and the counters a resumed run carries over
    from its checkpoint (wall time, skipped steps, every evaluation with its elapsed time)."""

    def __init__(self, config: RunConfig, out: str | None, *, append: bool, start: float):
        self.config = config
        self.settings = dataclasses.asdict(config)
        self._path = os.path.join(out, "metrics.jsonl") if out else os.devnull
        self._mode = "a" if append else "w"
        self._start = start
        self._carried = {"wall_time_s": 0.0, "skipped_steps": 0, "evaluations": []}

    def __enter__(self) -> _Journal:
        self._file = open(self._path, self._mode, encoding="utf-8")
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()

    def carry_over(self, meta: dict) -> None:
        self._carried.update({k: meta[k] for k in self._carried if k in meta})

    def record(self, entry: dict[str, Any]) -> None:
        self._file.write(json.dumps(entry) + "\n")
        self._file.flush()

    def read_step(self, t: int, metrics: dict[str, jax.Array]) -> dict[str, float]:
        """Step ``t``'s metrics on the host, written down as step ``t + 1``'s."""
        host = {k: float(v) for k, v in jax.device_get(metrics).items()}
        self._carried["skipped_steps"] += int(host["skipped"])
        self.record({"step": t + 1, **host})
        return host

    def evaluated(self, step: int, val_loss: float) -> float:
        """Writes down an evaluation with the run's elapsed seconds, which it returns."""
        entry = {"step": step, "val_loss": val_loss, "elapsed_s": round(self.wall_time(), 3)}
        self._carried["evaluations"].append(entry)
        self.record(entry)
        return entry["elapsed_s"]

    def wall_time(self) -> float:
        return self._carried["wall_time_s"] + time.perf_counter() - self._start

    def checkpoint_meta(self) -> dict[str, Any]:
        return {"settings": self.settings, **self._carried, "wall_time_s": self.wall_time()}

    def first_at(self, loss: float) -> tuple[int | None, float | None]:
        """The step and elapsed seconds of the first evaluation at or below ``loss``."""
        for entry in self._carried["evaluations"]:
            if entry["val_loss"] <= loss:
                return entry["step"], entry["elapsed_s"]
        return None, None

    def summary(self, val_loss: float, tokens_per_s: float, steps: int) -> dict[str, Any]:
        nanogpt_step, nanogpt_s = self.first_at(_NANOGPT_VAL_LOSS)
        summary = {
            "final_val_loss": val_loss,
            "wall_time_s": self.wall_time(),
            "steps": steps,
            "tokens_per_s": tokens_per_s,
            "skipped_steps": self._carried["skipped_steps"],
            f"first_step_val_loss_le_{_NANOGPT_VAL_LOSS}": nanogpt_step,
            f"time_to_val_loss_{_NANOGPT_VAL_LOSS}_s": nanogpt_s,
        }
        if self.config.target_loss is not None:
            step, seconds = self.first_at(self.config.target_loss)
            summary.update(
                target_loss=self.config.target_loss, step_at_target=step, time_to_target_s=seconds
            )
        return {
            **summary,
            "evaluations": self._carried["evaluations"],
            "backend": jax.default_backend(),
            "device_kind": jax.devices()[0].device_kind,
            "devices": jax.device_count(),
            "processes": jax.process_count(),
            "settings": self.settings,
        }


def _observe(
    guard: SkipGuard, run: Run, state: TrainState, t: int, host: dict[str, float]
) -> str | None:
    """The guard's verdict on step ``t``: ``None``, or why to roll back; a fault it cannot roll
    back from is a ``NonFiniteError`` naming the gradients at fault."""
    try:
        return guard.observe(t, host)
    except NonFiniteError as e:
        raise NonFiniteError(f"{e}; {_nonfinite_leaves(run, state, t)}") from None


def _roll_back(
    ckpt: Checkpointer,
    guard: SkipGuard,
    journal: _Journal,
    bar: ProgressBar,
    state: TrainState,
    t: int,
    reason: str,
    run: Run,
) -> TrainState:
    """The state of the last checkpoint from before the trouble began; the checkpoints of the
    abandoned path are discarded."""
    start = guard.start_of_trouble()
    good = [step for step in ckpt.all_steps() if step <= start]
    if not good:
        raise NonFiniteError(
            f"{reason}, and there is no checkpoint from before step {start} to roll back "
            f"to; {_nonfinite_leaves(run, state, t)}"
        )
    ckpt.discard_after(max(good))
    restored, _ = ckpt.restore(state, step=max(good))
    guard.rolled_back(max(good))
    journal.record({"step": t + 1, "rollback_to": max(good), "reason": reason})
    bar.note(f"{reason}: rolled back to the checkpoint of step {max(good)}")
    return restored


def _nonfinite_leaves(run: Run, state: TrainState, t: int) -> str:
    """Which gradients of step ``t``'s batch are not finite, recomputed from ``state`` (whose
    parameters a skipped step left as they were) at its loss scale, for an error message."""
    batch = _train_batch(run, t)
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


def _write_diagnosis(run: Run, state: TrainState, out: str, log: Callable[[str], None]) -> None:
    from hybrid_jax.app.diagnose import diagnose

    report = str(diagnose(run, state, _train_batch(run, run.config.steps)))
    with open(os.path.join(out, "diagnostics.txt"), "w", encoding="utf-8") as f:
        f.write(report + "\n")
    log(report)


def _floor(loss_scale: Any) -> float | None:
    """The loss scale's floor, if it backs off (``DynamicLossScale``)."""
    if isinstance(loss_scale, DynamicLossScale):
        return float(jax.device_get(loss_scale.min_loss_scale))
    return None


def _restore(ckpt: Checkpointer, like: TrainState, settings: dict) -> tuple[TrainState, dict]:
    """The latest checkpoint, after checking it was trained with these settings."""
    if ckpt.latest_step() is None:
        raise FileNotFoundError(f"--resume: no checkpoint in {ckpt.directory}")
    meta = ckpt.meta()  # settings first: their message says more than a shape mismatch
    # A run may go on for more steps, on another mesh (the restore reshards it), with another
    # patience for skipped steps, or towards another target loss.
    free = ("steps", "mesh", "max_skips", "target_loss")
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
