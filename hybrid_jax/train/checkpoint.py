"""Checkpoints of a ``TrainState`` with orbax: atomic, every leaf's dtype kept, resumable onto
another device layout, and safe against a writer killed at any moment."""

from __future__ import annotations

import os
import shutil
from typing import Any

import jax

from hybrid_jax import tree as tree_lib
from hybrid_jax.train.state import TrainState

# Old steps are renamed into this subfolder before they are deleted (see `Checkpointer.__init__`).
# Its name is not a number, so orbax never takes it for a step.
_TRASH = "deleted"
_MAX_LISTED = 5
_FIX = (
    "Build the state with the same model and optimizer settings as the saved run, or point at "
    "another checkpoint folder."
)


class Checkpointer:
    """Saves and restores ``TrainState`` s (plus a JSON dict of metadata) in a folder.

    A thin layer over ``orbax.checkpoint.CheckpointManager``. Each save is written to a temporary
    folder (``<step>.orbax-checkpoint-tmp``) and renamed to ``<step>`` when complete, so a writer
    killed at any moment leaves the previous checkpoints intact and never a listed partial one.
    A new ``Checkpointer`` on the folder removes what a killed writer left behind. Saves are
    asynchronous (the train loop goes on while the state is written); :meth:`wait` blocks until
    the last one is on disk.

    :meth:`restore` puts each leaf on the sharding of the state it is given, so a state saved
    from one device layout (8 devices, FSDP over a mesh) restores onto another (one device, a
    ``(4, 2)`` mesh).

    Args:
      directory: the folder holding one subfolder per saved step.
      max_to_keep: how many of the latest checkpoints to keep.

    Examples:
      >>> import tempfile
      >>> state = TrainState.create({"w": jnp.zeros(3)}, optax.sgd(0.1))
      >>> with Checkpointer(tempfile.mkdtemp()) as ckpt:
      ...     ckpt.save(state, meta={"note": "init"})
      ...     restored, meta = ckpt.restore(state)
      >>> meta, ckpt.all_steps()
      ({'note': 'init'}, [0])
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 3):
        ocp = _orbax()
        self.directory = os.path.abspath(directory)
        self._trash = os.path.join(self.directory, _TRASH)
        self._empty_trash()  # what a writer killed while deleting an old step left
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep,
                create=True,
                # A writer killed mid-save leaves `<step>.orbax-checkpoint-tmp`, which orbax never
                # lists; this removes such folders in a background thread that the first save
                # waits for.
                cleanup_tmp_directories=True,
                # orbax deletes an old step file by file, and a writer killed halfway leaves a
                # partial step that it would still list. A rename is atomic: the step is gone from
                # the listing at once, and `_empty_trash` deletes it at leisure.
                todelete_subdir=_TRASH,
            ),
            # Registered up front so that a fresh manager can read a step's metadata (the
            # shapes and dtypes `restore` checks) before anything was saved or restored.
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler(),
            },
        )

    def save(self, state: TrainState, *, meta: dict[str, Any] | None = None) -> None:
        """Starts saving ``state`` as step ``state.step``.

        Args:
          state: the state to save (its arrays are copied before this returns, so the train
            step may donate them right after).
          meta: a JSON-serialisable dict saved with it (e.g. the run's settings).

        Raises:
          ValueError: step ``state.step`` is already saved (or being saved) in the folder, or
            is older than the latest step there. Nothing is written in either case; check
            :meth:`has` first where a loop may save the same step twice.
        """
        ocp = _orbax()
        step = int(jax.device_get(state.step))
        if self.has(step):
            raise ValueError(
                f"step {step} is already saved in {self.directory}: each step is saved once "
                f"(check `has({step})` before saving where a loop may reach the same step twice)"
            )
        latest = self.latest_step()
        if latest is not None and step < latest:
            raise ValueError(
                f"step {step} is older than the latest checkpoint (step {latest}) in "
                f"{self.directory}, which a resume would pick instead: resume from the latest "
                "step, or save into another folder"
            )
        # The previous save's background thread renames old steps into the trash once it has
        # committed; orbax waits for it anyway before starting this save.
        self._manager.wait_until_finished()
        self._empty_trash()
        # force: our checks above decide; orbax's own policy would skip some steps silently.
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta or {})
            ),
            force=True,
        )

    def has(self, step: int) -> bool:
        """Whether step ``step`` is saved in the folder, or being saved by this ``Checkpointer``."""
        return step in self._manager.all_steps()

    def discard_after(self, step: int) -> None:
        """Deletes every saved step after ``step``, to go back to ``step`` and train on from it
        (:meth:`save` refuses a step older than the latest).

        Newest first, and each step is renamed away at once, so a kill halfway leaves whole
        steps only and a latest step that is an earlier point of the same run.

        Args:
          step: the step to keep, with the ones before it.
        """
        self._manager.wait_until_finished()
        for later in sorted((s for s in self._manager.all_steps() if s > step), reverse=True):
            self._manager.delete(later)
        self._empty_trash()

    def all_steps(self) -> list[int]:
        """The steps in the folder, oldest first: complete ones, plus any this ``Checkpointer``
        is still writing. Another process's unfinished step is never listed."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The latest step on disk (see :meth:`all_steps`), or ``None``."""
        return self._manager.latest_step()

    def restore(self, like: Any, step: int | None = None) -> tuple[TrainState, dict]:
        """Restores step ``step`` (default: the latest) into the structure, dtypes and shardings
        of ``like``.

        Each leaf comes back with the dtype and sharding of the matching leaf of ``like``: a
        ``jax.Array`` gives its own sharding, a ``jax.ShapeDtypeStruct`` the ``sharding`` it
        carries; a leaf without one (a NumPy array, ``jax.eval_shape`` output) goes to this
        process's first device. The layout the checkpoint was saved from does not matter.
        Pending saves of this ``Checkpointer`` are waited for first.

        Args:
          like: a state (or ``jax.ShapeDtypeStruct`` s of one) with the structure to restore
            into: the same model, optimizer and loss scale as the saved run.
          step: which step; default the latest.

        Returns:
          ``(state, meta)``.

        Raises:
          FileNotFoundError: no checkpoint in the folder.
          ValueError: the checkpoint does not fit ``like`` (another model width or depth,
            another optimizer or precision); the message names the folder, the step and the
            leaves that differ.
        """
        ocp = _orbax()
        self._manager.wait_until_finished()  # the latest step may be this process's, in flight
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        target = jax.tree_util.tree_map(_target, like)
        misfits = self._misfits(target, step)
        if misfits:
            raise ValueError(self._misfit_message(step, misfits))
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()
                ),
            )
        except (ValueError, TypeError, KeyError) as e:  # a misfit the metadata did not show
            raise ValueError(self._misfit_message(step, [str(e)])) from e
        return restored.state, dict(restored.meta or {})

    def meta(self, step: int | None = None) -> dict:
        """Only the metadata of step ``step`` (default: the latest), e.g. a run's settings, to
        build the state that :meth:`restore` needs.

        Raises:
          FileNotFoundError: no checkpoint in the folder.
        """
        ocp = _orbax()
        self._manager.wait_until_finished()
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
        self._empty_trash()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _empty_trash(self) -> None:
        if jax.process_index() == 0:
            shutil.rmtree(self._trash, ignore_errors=True)

    def _misfits(self, target: Any, step: int) -> list[str]:
        """The leaves where ``target`` and the saved step differ, from the step's metadata."""
        saved = self._manager.metadata(step).item_metadata["state"]
        saved = getattr(saved, "tree", saved)
        if saved is None:  # no metadata to read: orbax's own checks still run
            return []
        saved, mine = _by_path(saved), _by_path(target)
        found = []
        for path, want in mine.items():  # in the state's leaf order: params before their moments
            have = saved.get(path)
            if have is None:
                found.append(f"{path} is in this run's state but not in the checkpoint")
            elif not isinstance(want, jax.ShapeDtypeStruct):
                continue  # a Python number
            elif getattr(have, "shape", None) is not None and tuple(have.shape) != want.shape:
                found.append(
                    f"{path} has shape {want.shape} here but {tuple(have.shape)} in the checkpoint"
                )
            elif getattr(have, "dtype", None) is not None and have.dtype != want.dtype:
                found.append(
                    f"{path} has dtype {want.dtype} here but {have.dtype} in the checkpoint"
                )
        # orbax's metadata sorts the state's fields by name: list them in the state's order.
        order = {path.split("/")[0]: i for i, path in reversed(list(enumerate(mine)))}
        extra = sorted(
            (path for path in saved if path not in mine),
            key=lambda path: order.get(path.split("/")[0], len(order)),
        )
        return found + [
            f"{path} is in the checkpoint but not in this run's state" for path in extra
        ]

    def _misfit_message(self, step: int, misfits: list[str]) -> str:
        listed = "; ".join(misfits[:_MAX_LISTED])
        if len(misfits) > _MAX_LISTED:
            listed += f"; and {len(misfits) - _MAX_LISTED} more"
        return (
            f"checkpoint {self.directory} step {step} does not fit this run's state: {listed}. "
            + _FIX
        )


def _target(leaf: Any) -> Any:
    """The abstract array a leaf of ``like`` asks for, on its sharding."""
    if not (hasattr(leaf, "shape") and hasattr(leaf, "dtype")):
        return leaf  # a Python number: orbax restores it as one
    sharding = getattr(leaf, "sharding", None)
    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)


def _by_path(tree: Any) -> dict[str, Any]:
    # orbax's metadata tree turns every node into a dict or list; keyed by path strings, a
    # dataclass field, a dict key and a NamedTuple field all read the same.
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {"/".join(tree_lib.key_str(k) for k in keypath): leaf for keypath, leaf in flat}


def _orbax():
    # Imported on first use: orbax is a sizeable share of `import hybrid_jax`, and only runs
    # that checkpoint need it.
    import orbax.checkpoint as ocp

    return ocp
