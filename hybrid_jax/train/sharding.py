"""Data parallelism and FSDP over a ``jax.sharding.Mesh``, with ``NamedSharding`` s only.

A mesh has up to two axes: ``data`` and ``fsdp``. The batch is split over both (every device
sees its own examples); parameters, optimizer state and the EMA are split over ``fsdp`` (each
leaf along its largest dimension that the axis size divides) and copied along ``data``. So
``data=8`` is plain data parallelism, ``fsdp=8`` is fully sharded (ZeRO-3 style) and
``data=4,fsdp=2`` is both. XLA's SPMD partitioner inserts the collectives; nothing here moves
data by hand, and the same code runs over several processes once
:func:`initialize_distributed` has joined them.

References:
  Rajbhandari et al., 2020, `ZeRO: Memory Optimizations Toward Training Trillion Parameter
  Models <https://arxiv.org/abs/1910.02054>`_.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from hybrid_jax.tree import path_str

DATA = "data"
FSDP = "fsdp"
AXES = (DATA, FSDP)


def parse_mesh(spec: str | Mapping[str, int]) -> dict[str, int]:
    """Reads ``"data=4,fsdp=2"`` (or a dict) into ``{"data": 4, "fsdp": 2}``.

    One axis may be ``-1``: it takes whatever the device count leaves (see :func:`make_mesh`).

    Raises:
      ValueError: an unknown axis, a repeated one, a size that is not a positive int (or -1),
        or a malformed string; the message quotes it.
    """
    if isinstance(spec, str):
        pairs = []
        for token in spec.split(","):
            name, sep, size = token.partition("=")
            try:
                if not sep:
                    raise ValueError
                pairs.append((name.strip(), int(size)))
            except ValueError:
                raise ValueError(
                    f"mesh {spec!r}: cannot read {token!r}; write axis=size pairs separated by "
                    "commas, e.g. 'data=4,fsdp=2'"
                ) from None
        names = [name for name, _ in pairs]
        if len(set(names)) != len(names):
            raise ValueError(f"mesh {spec!r} names an axis twice")
        spec = dict(pairs)
    shape = dict(spec)
    for name, size in shape.items():
        if name not in AXES:
            raise ValueError(f"mesh axis {name!r} is not one of {AXES} (data parallel and FSDP)")
        if not (isinstance(size, int) and (size >= 1 or size == -1)):
            raise ValueError(f"mesh axis {name}={size!r}: sizes are positive ints, or -1 for one")
    if list(shape.values()).count(-1) > 1:
        raise ValueError(f"mesh {shape}: only one axis can be -1")
    return shape


def make_mesh(
    shape: str | Mapping[str, int] | None = None, *, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """A ``(data, fsdp)`` device mesh over all devices (of every process).

    Args:
      shape: ``"data=4,fsdp=2"``, ``{"data": 4, "fsdp": 2}``, or ``None`` for data parallelism
        over every device. A missing axis has size 1; one axis may be ``-1`` to take the rest.
      devices: the devices to lay out (default ``jax.devices()``: all processes' devices).

    Returns:
      A ``Mesh`` with axes ``("data", "fsdp")``. Devices are laid out by
      ``jax.experimental.mesh_utils`` so that the ``fsdp`` axis, which carries the most traffic,
      gets the closest devices.

    Raises:
      ValueError: the axis sizes do not multiply to the device count (the message gives the
        count and shapes that fit), or ``shape`` is malformed (:func:`parse_mesh`).

    Examples:
      >>> mesh = make_mesh("data=-1", devices=jax.devices()[:1])
      >>> dict(mesh.shape)
      {'data': 1, 'fsdp': 1}
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    sizes = {DATA: 1, FSDP: 1, **parse_mesh(shape if shape is not None else {DATA: -1})}
    if -1 in sizes.values():
        known = math.prod(s for s in sizes.values() if s != -1)
        if n % known:
            raise ValueError(
                f"mesh {_spec(sizes)}: {n} devices cannot be split into groups of {known}; "
                f"choose sizes that divide {n}"
            )
        sizes = {k: (n // known if s == -1 else s) for k, s in sizes.items()}
    if math.prod(sizes.values()) != n:
        raise ValueError(
            f"mesh {_spec(sizes)} needs {math.prod(sizes.values())} devices but there are {n} "
            f"({jax.process_count()} process(es)); choose data x fsdp = {n}, e.g. "
            f"{_examples(n)}, or write -1 for one axis"
        )
    from jax.experimental import mesh_utils

    try:
        grid = mesh_utils.create_device_mesh((sizes[DATA], sizes[FSDP]), devices)
    except (ValueError, AssertionError, NotImplementedError):
        # Topology-aware layout is for TPU and GPU slices; anything else gets the plain order.
        grid = np.asarray(devices).reshape(sizes[DATA], sizes[FSDP])
    return Mesh(grid, AXES)


def _spec(sizes: Mapping[str, int]) -> str:
    return ",".join(f"{k}={v}" for k, v in sizes.items())


def _examples(n: int) -> str:
    both = [f"'data={n // 2},fsdp=2'"] if n % 2 == 0 and n > 2 else []
    return " or ".join([f"'data={n}'", *both, f"'fsdp={n}'"])


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes a batch's leading dimension is split over: ``data`` and ``fsdp``."""
    return tuple(a for a in AXES if a in mesh.axis_names)


def batch_parts(mesh: Mesh) -> int:
    """How many shards a batch is split into: the product of the batch axes' sizes."""
    return math.prod(mesh.shape[a] for a in batch_axes(mesh))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """The leading (example) axis split over ``data`` and ``fsdp``, the rest whole."""
    return NamedSharding(mesh, PartitionSpec(batch_axes(mesh)))


def replicated(mesh: Mesh) -> NamedSharding:
    """A whole copy on every device (scalars, the step, the loss scale, PRNG keys)."""
    return NamedSharding(mesh, PartitionSpec())


def check_batch(batch: Any, mesh: Mesh) -> None:
    """Raises a ``ValueError`` unless every leaf's leading axis divides over the batch axes.

    The message names the leaf, the batch size, the mesh and two ways out.
    """
    parts = batch_parts(mesh)
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(batch)[0]:
        shape = np.shape(leaf)
        if not shape or shape[0] % parts:
            size = shape[0] if shape else "no leading axis"
            raise ValueError(
                f"batch leaf {path_str(keypath) or '<root>'!r} has batch size {size}, which "
                f"cannot be split over the mesh's {' x '.join(batch_axes(mesh))} = {parts} "
                f"devices ({dict(mesh.shape)}); use a batch size that is a multiple of {parts}, "
                "or a mesh with fewer data/fsdp devices"
            )


def fsdp_spec(shape: Sequence[int], fsdp_size: int) -> PartitionSpec:
    """Where one leaf is split: along its largest dimension that ``fsdp_size`` divides (the
    first of equals), or nowhere (scalars, small or oddly sized leaves, ``fsdp_size == 1``).

    Examples:
      >>> tuple(fsdp_spec((65, 128), 4)), tuple(fsdp_spec((3,), 2))
      ((None, 'fsdp'), ())
    """
    if fsdp_size == 1:
        return PartitionSpec()
    fits = [(size, -i) for i, size in enumerate(shape) if size % fsdp_size == 0]
    if not fits:
        return PartitionSpec()
    _, neg_axis = max(fits)
    spec = [None] * len(shape)
    spec[-neg_axis] = FSDP
    return PartitionSpec(*spec)


def param_shardings(tree: Any, mesh: Mesh) -> Any:
    """A tree of ``NamedSharding`` like ``tree``: each leaf split over ``fsdp`` by
    :func:`fsdp_spec`, copied along ``data``. Leaves of equal shape get the same sharding, so a
    parameter, its Adam moments and its EMA line up without communication."""
    fsdp_size = mesh.shape.get(FSDP, 1)
    return jax.tree_util.tree_map(
        lambda x: NamedSharding(mesh, fsdp_spec(np.shape(x), fsdp_size)), tree
    )


def state_shardings(state: Any, mesh: Mesh) -> Any:
    """The shardings of a :class:`~hybrid_jax.train.TrainState` (arrays or
    ``jax.ShapeDtypeStruct`` s): parameters, optimizer state (every group's; frozen groups hold
    none) and EMA parameters by :func:`param_shardings`; the step, PRNG key, loss scale, loss
    weighting and fp8 amax histories replicated.

    Examples:
      >>> import optax
      >>> from hybrid_jax.train import TrainState
      >>> state = TrainState.create({"w": jnp.zeros((4, 2))}, optax.adam(1e-3))
      >>> mesh = make_mesh(devices=jax.devices()[:1])
      >>> tuple(state_shardings(state, mesh).params["w"].spec)  # one device: nothing to split
      ()
    """
    whole = replicated(mesh)
    shardings = jax.tree_util.tree_map(lambda _: whole, state)
    sharded = {
        name: param_shardings(getattr(state, name), mesh)
        for name in ("params", "opt_state", "ema_params")
    }
    return dataclasses.replace(shardings, **sharded)


def shard_state(state: Any, mesh: Mesh) -> Any:
    """``state`` placed on ``mesh`` as :func:`state_shardings` says (every process passes the
    same values; each keeps its own shards)."""
    return jax.device_put(state, state_shardings(state, mesh))


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """Joins this process to a multi-process JAX run (``jax.distributed.initialize``).

    Call it first, before anything touches a device. On TPU pods, SLURM and Open MPI, JAX
    finds every argument itself (call it without any); elsewhere give all three. CPU processes
    talk through gloo, so two processes on one machine (``127.0.0.1:port``) stand in for two
    hosts. Afterwards ``jax.devices()`` lists every process's devices and :func:`make_mesh`
    spans them all.

    Args:
      coordinator_address: ``host:port`` of process 0, reachable from every process.
      num_processes: how many processes take part.
      process_id: this process's index, ``0 <= process_id < num_processes``.

    Raises:
      ValueError: only some of the three arguments given, or a ``process_id`` out of range.
    """
    given = [a is not None for a in (coordinator_address, num_processes, process_id)]
    if any(given) and not all(given):
        raise ValueError(
            "give all of coordinator_address, num_processes and process_id, or none of them "
            "(on TPU pods, SLURM and Open MPI JAX detects them)"
        )
    if all(given) and not 0 <= process_id < num_processes:
        raise ValueError(f"process_id must be in [0, {num_processes}), got {process_id}")
    # CPU collectives across processes need gloo; GPU and TPU backends ignore the setting.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)


class ShardedStep:
    """A ``(state, batch) -> (state, metrics)`` function jitted with explicit shardings.

    ``in_shardings`` are :func:`state_shardings` of the state it is called with and
    :func:`batch_sharding`; ``out_shardings`` give the new state the same shardings and
    replicate the metrics, so every process can read them. One compiled function per state
    structure and shapes, built on first use (as ``jax.jit`` caches per input).

    Args:
      fn: the step, e.g. the function :func:`~hybrid_jax.train.make_train_step` jits.
      mesh: a ``(data, fsdp)`` mesh.
      donate_argnums: as ``jax.jit``'s.
    """

    def __init__(self, fn, mesh: Mesh, *, donate_argnums: Sequence[int] = ()):
        self.mesh = mesh
        self._fn, self._donate_argnums = fn, tuple(donate_argnums)
        self._jitted: dict[Any, Any] = {}

    def _jit_for(self, state: Any):
        leaves, treedef = jax.tree_util.tree_flatten(state)
        key = treedef, tuple((np.shape(x), np.result_type(x)) for x in leaves)
        if key not in self._jitted:
            shardings = state_shardings(state, self.mesh)
            self._jitted[key] = jax.jit(
                self._fn,
                in_shardings=(shardings, batch_sharding(self.mesh)),
                out_shardings=(shardings, replicated(self.mesh)),
                donate_argnums=self._donate_argnums,
            )
        return self._jitted[key]

    def __call__(self, state: Any, batch: Any) -> Any:
        check_batch(batch, self.mesh)
        return self._jit_for(state)(state, batch)

    def lower(self, state: Any, batch: Any) -> Any:
        """``jax.jit(...).lower`` for these arguments (for ``.compile()`` and HLO audits)."""
        check_batch(batch, self.mesh)
        return self._jit_for(state).lower(state, batch)
