"""Host batches put on the device ahead of the step that needs them, by a background thread.

A batch gathered on the host (:func:`~hybrid_jax.data.sample_batch_host`) costs a memmap read
and a host-to-device copy. Done between two steps, both stall the device; done by a thread
while the device runs the previous steps, neither does (JAX dispatches steps asynchronously, so
the main thread is free to hand over the batch and go on).
"""

from __future__ import annotations

import queue
import threading
import weakref
from collections.abc import Iterable, Iterator
from typing import Any

import jax

# How often a producer blocked on a full queue looks whether the consumer has closed.
_POLL_SECONDS = 0.05


def prefetch(
    batches: Iterable[Any], depth: int = 2, sharding: jax.sharding.Sharding | None = None
) -> Prefetcher:
    """Iterates over ``batches`` on the device, ``depth`` batches ahead of the consumer.

    A daemon thread pulls each host batch (any pytree of arrays, e.g. ``(x, y)``) from
    ``batches``, puts it on the device, waits until the copy is done, and queues it; at most
    ``depth`` batches wait in the queue, so the host stays a bounded distance ahead. An
    exception in ``batches`` or in the copy is raised again by the consumer's ``next``, with its
    original traceback. :meth:`Prefetcher.close` (or leaving the ``with`` block) stops the
    thread and closes ``batches`` when it has a ``close`` (a generator); a Prefetcher dropped
    without ``close`` stops its thread when it is garbage collected.

    With ``sharding``, every leaf becomes a global array through
    ``jax.make_array_from_process_local_data``: in one process that is ``jax.device_put`` to
    ``sharding``; over several processes, each process gives its own rows of the global batch
    (its share along the axes that ``sharding`` splits over processes).

    Args:
      batches: host batches, e.g. a generator of :func:`~hybrid_jax.data.sample_batch_host`
        calls.
      depth: the most batches kept ready on the device, at least 1 (2 hides one slow batch).
      sharding: where each leaf goes, e.g. a ``NamedSharding`` over a mesh; ``None`` for the
        default device.

    Returns:
      A :class:`Prefetcher`: an iterator of device batches and a context manager.

    Raises:
      ValueError: ``depth`` is not a positive integer.

    Examples:
      >>> import numpy as np
      >>> batches = (np.full((2, 3), i, np.int32) for i in range(3))
      >>> with prefetch(batches, depth=2) as device_batches:
      ...     [(type(x).__name__, int(x[0, 0])) for x in device_batches]
      [('ArrayImpl', 0), ('ArrayImpl', 1), ('ArrayImpl', 2)]
    """
    return Prefetcher(batches, depth, sharding)


class Prefetcher(Iterator[Any]):
    """The iterator :func:`prefetch` returns: device batches, produced by a background thread."""

    def __init__(
        self,
        batches: Iterable[Any],
        depth: int = 2,
        sharding: jax.sharding.Sharding | None = None,
    ):
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth must be a positive integer, got {depth!r}")
        self._ready: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._finished = False
        # The thread holds no reference to self, so an unclosed Prefetcher is still collected,
        # and its finalizer stops the thread.
        self._thread = threading.Thread(
            target=_produce,
            args=(iter(batches), self._ready, self._stop, sharding),
            name="hybrid_jax.data.prefetch",
            daemon=True,
        )
        self._thread.start()
        weakref.finalize(self, self._stop.set)

    def __next__(self) -> Any:
        if self._finished:
            raise StopIteration
        item = self._ready.get()
        if isinstance(item, _End):
            self.close()
            if item.error is not None:
                raise item.error
            raise StopIteration
        return item

    def close(self) -> None:
        """Stops the thread and waits for it: at most the batch it is producing, then it ends."""
        self._finished = True
        self._stop.set()
        # Emptied, so that a producer blocked on the full queue sees the stop at its next poll.
        while True:
            try:
                self._ready.get_nowait()
            except queue.Empty:
                break
        self._thread.join()

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class _End:
    def __init__(self, error: BaseException | None = None):
        self.error = error


def _produce(batches, ready, stop, sharding):
    try:
        for batch in batches:
            if stop.is_set() or not _put(ready, _to_device(batch, sharding), stop):
                return
        _put(ready, _End(), stop)
    # Any error, even a BaseException, goes to the consumer: otherwise it would wait forever.
    except BaseException as e:
        _put(ready, _End(e), stop)
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()


def _to_device(batch, sharding):
    if sharding is None:
        arrays = jax.device_put(batch)
    else:
        put = lambda x: jax.make_array_from_process_local_data(sharding, x)
        arrays = jax.tree.map(put, batch)
    # Ready means copied: a batch still in flight would make the step wait after all.
    return jax.block_until_ready(arrays)


def _put(ready, item, stop) -> bool:
    while not stop.is_set():
        try:
            ready.put(item, timeout=_POLL_SECONDS)
            return True
        except queue.Full:
            continue
    return False
