"""What a training loop does when skipped steps do not stop: roll back once, then fail loudly.

The train step's first line of defence is to skip a step whose gradients or result are not
finite (``metrics["skipped"]``), leaving the state as it was. That cures an occasional overflow;
it cannot cure a run that overflows every step, which would otherwise skip forever (or, with
Optax's ``apply_if_finite`` after ``max_consecutive_errors``, apply the NaN). :class:`SkipGuard`
watches the skips from the host and says when to escalate: after ``max_skips`` skipped steps in a
row, or a skip while the loss scale is already at its floor (it cannot back off further: the
run's DeepSpeed equivalent is ``raise_error_at_min_scale``). The loop then rolls back to its
last checkpoint from before the skips began; if the same trouble comes back before the run gets
past the step where it first escalated, the guard raises :class:`NonFiniteError`. Each rollback
must be followed by progress past the previous failure, so the loop can never cycle.
"""

from __future__ import annotations

from collections.abc import Mapping


class NonFiniteError(RuntimeError):
    """Training cannot go on: steps keep producing NaN or Inf, and rolling back did not help."""


class SkipGuard:
    """Counts skipped steps and decides when a loop must roll back or stop.

    Args:
      max_skips: skipped steps in a row that call for a rollback.
      min_loss_scale: the loss scale's floor (``DynamicLossScale.min_loss_scale``), or ``None``
        when the scale cannot back off (no scaling, a static scale); a skip at the floor calls
        for a rollback at once.

    Examples:
      >>> guard = SkipGuard(max_skips=2)
      >>> guard.observe(0, {"skipped": 1.0, "loss_scale": 1.0}) is None
      True
      >>> guard.observe(1, {"skipped": 1.0, "loss_scale": 1.0})
      '2 steps in a row were skipped (steps 0-1)'
      >>> guard.start_of_trouble()  # roll back to a checkpoint at or before this step
      0
      >>> guard.rolled_back(0)
      >>> guard.observe(0, {"skipped": 1.0, "loss_scale": 1.0}) is None
      True
      >>> guard.observe(1, {"skipped": 1.0, "loss_scale": 1.0})
      Traceback (most recent call last):
      ...
      hybrid_jax.train.guard.NonFiniteError: 2 steps in a row were skipped (steps 0-1), again ...
    """

    def __init__(self, max_skips: int = 20, *, min_loss_scale: float | None = None):
        if not (isinstance(max_skips, int) and max_skips >= 1):
            raise ValueError(f"max_skips must be a positive int, got {max_skips!r}")
        self.max_skips = max_skips
        self.min_loss_scale = min_loss_scale
        self._streak_start: int | None = None
        self._streak = 0
        self._failed_at: int | None = None  # where the last rollback was called for
        self._rolled_back_to: int | None = None

    def observe(self, step: int, metrics: Mapping[str, float]) -> str | None:
        """Takes one step's host metrics (``skipped`` and ``loss_scale``, the scale it used).

        Args:
          step: the index of the step the metrics come from (``state.step`` before it).
          metrics: the step's metrics, as Python numbers.

        Returns:
          ``None`` to go on, or why the loop must roll back now.

        Raises:
          NonFiniteError: a rollback was called for again before the run passed the step where
            the previous one was; the message says what happened twice.
        """
        if not metrics["skipped"]:
            self._streak, self._streak_start = 0, None
            if self._failed_at is not None and step >= self._failed_at:
                self._failed_at = self._rolled_back_to = None  # past it: the rollback worked
            return None
        if self._streak == 0:
            self._streak_start = step
        self._streak += 1
        at_floor = self.min_loss_scale is not None and metrics["loss_scale"] <= self.min_loss_scale
        if self._streak >= self.max_skips:
            reason = (
                f"{self._streak} steps in a row were skipped (steps {self._streak_start}-{step})"
            )
        elif at_floor:
            reason = (
                f"step {step} was skipped with the loss scale at its floor "
                f"{self.min_loss_scale:g}, after {self._streak} skipped step(s) in a row"
            )
        else:
            return None
        if self._failed_at is not None:
            raise NonFiniteError(
                f"{reason}, again after rolling back to step {self._rolled_back_to} (it first "
                f"happened at step {self._failed_at})"
            )
        self._failed_at = step
        return reason

    def start_of_trouble(self) -> int:
        """The first step of the current run of skips: a checkpoint at or before it is good."""
        if self._streak_start is None:
            raise ValueError("no skipped steps to roll back from")
        return self._streak_start

    def rolled_back(self, step: int) -> None:
        """Tells the guard that the loop now continues from a state at ``step``."""
        self._rolled_back_to = step
        self._streak, self._streak_start = 0, None
