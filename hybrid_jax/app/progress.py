"""What the training loop shows while it runs: tokens per second and a progress bar."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator


class Throughput:
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


class ProgressBar:
    """A rich progress bar showing the loss, tokens/s, the last validation loss and when the
    target loss was reached; without it, notes go to ``log``."""

    def __init__(
        self,
        enabled: bool,
        first: int,
        total: int,
        log: Callable[[str], None],
        *,
        target: float | None = None,
    ):
        self._bar, self._log, self._target = None, log, target
        self._val, self._reached = "", ""
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
            info = f"loss {loss:.4f}  {tokens_per_s:,.0f} tok/s{self._val}{self._reached}"
            self._bar.update(self._task, completed=step, info=info)

    def evaluated(self, step: int, val_loss: float, elapsed_s: float) -> None:
        """Notes an evaluation; the first at or below the target stays on the bar."""
        self._val = f"  val {val_loss:.4f}"
        if self._target is not None and not self._reached and val_loss <= self._target:
            self._reached = f"  target {self._target} at step {step}, {elapsed_s:.0f} s"
        self.note(f"step {step}: val loss {val_loss:.4f} ({elapsed_s:.1f} s)")

    def note(self, text: str) -> None:
        if self._bar:
            self._bar.console.print(text)
        else:
            self._log(text)
