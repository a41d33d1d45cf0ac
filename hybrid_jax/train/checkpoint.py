"""Checkpoints of a ``TrainState`` with orbax: atomic, every leaf's dtype kept, resumable."""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from hybrid_jax.train.state import TrainState


class Checkpointer:
    """Saves and restores ``TrainState`` s (plus a JSON dict of metadata) in a folder.

    A thin layer over ``orbax.checkpoint.CheckpointManager``: each save goes to a temporary folder
    that is committed atomically, so a crash mid-save leaves the previous checkpoint intact and
    never lists a partial one. Saves are asynchronous (the train loop goes on while the state is
    written); :meth:`wait` blocks until the last one is on disk.

    Args:
      directory: the folder holding one subfolder per saved step.
      max_to_keep: how many of the latest checkpoints to keep.

    Examples:
      >>> import tempfile
      >>> state = TrainState.create({"w": jnp.zeros(3)}, optax.sgd(0.1))
      >>> with Checkpointer(tempfile.mkdtemp()) as ckpt:
      ...     started = ckpt.save(state, meta={"note": "init"})
      ...     ckpt.wait()
      ...     restored, meta = ckpt.restore(state)
      >>> meta
      {'note': 'init'}
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 3):
        self.directory = os.path.abspath(directory)
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        )

    def save(self, state: TrainState, *, meta: dict[str, Any] | None = None) -> bool:
        """Starts saving ``state`` as step ``state.step``; returns whether a save was started."""
        step = int(jax.device_get(state.step))
        if step in self._manager.all_steps():
            return False  # already on disk (e.g. the final save right after a periodic one)
        return self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta or {})
            ),
        )

    def latest_step(self) -> int | None:
        """The latest complete step on disk, or ``None``."""
        return self._manager.latest_step()

    def restore(self, like: TrainState, step: int | None = None) -> tuple[TrainState, dict]:
        """Restores step ``step`` (default: the latest) into the structure and dtypes of ``like``.

        Args:
          like: a state (or ``jax.eval_shape`` of one) with the structure to restore into: the
            same model, optimizer and loss scale as the saved run.
          step: which step; default the latest.

        Returns:
          ``(state, meta)``.

        Raises:
          FileNotFoundError: no checkpoint in the folder.
          ValueError: the checkpoint does not fit ``like`` (another model width or depth,
            another optimizer); the message names the folder and the step.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        abstract = jax.eval_shape(lambda: like)
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
                ),
            )
        except (ValueError, TypeError, KeyError) as e:
            raise ValueError(
                f"checkpoint {self.directory} step {step} does not fit this run's state "
                f"(another model, optimizer or loss scale?): {e}"
            ) from e
        return restored.state, dict(restored.meta or {})

    def meta(self, step: int | None = None) -> dict:
        """Only the metadata of step ``step`` (default: the latest), e.g. a run's settings, to
        build the state that :meth:`restore` needs.

        Raises:
          FileNotFoundError: no checkpoint in the folder.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored.meta or {})

    def wait(self) -> None:
        """Blocks until every started save is committed to disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
