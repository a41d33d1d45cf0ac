"""``TrainState``: everything a training run carries from one step to the next, as one pytree."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hybrid_jax import tree as tree_lib
from hybrid_jax.losses import Weighted, Weighting
from hybrid_jax.mixing import EMA
from hybrid_jax.precision import LossScale, NoOpLossScale, Precision, cast_to_param


def split_frozen(params: Any) -> tuple[Any, Any]:
    """Splits ``params`` into what the optimizer trains and what stays constant.

    Trainable leaves are floating-point arrays. Integer and boolean leaves and int8-stored
    weights (:class:`~hybrid_jax.precision.storage.Int8Weight`) are frozen: they get no gradient
    and no optimizer state. Each of the two trees has ``None`` where the other has a leaf.

    Returns:
      ``(trainable, frozen)``; :func:`merge_frozen` puts them back together.
    """
    is_leaf = lambda x: x is None or tree_lib.is_leaf(x)
    keep = lambda want: lambda x: x if tree_lib.is_float_leaf(x) == want else None
    trainable = jax.tree_util.tree_map(keep(True), params, is_leaf=is_leaf)
    frozen = jax.tree_util.tree_map(keep(False), params, is_leaf=is_leaf)
    return trainable, frozen


def merge_frozen(trainable: Any, frozen: Any) -> Any:
    """The inverse of :func:`split_frozen`."""
    return jax.tree_util.tree_map(
        lambda t, f: f if t is None else t, trainable, frozen, is_leaf=lambda x: x is None
    )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """The state of a training run: a pytree that ``jax.jit`` donates and orbax checkpoints.

    Attributes:
      step: steps taken (int32), skipped ones included.
      params: the master parameters, in their param dtypes (fp32 unless a policy says otherwise).
      opt_state: the optimizer's state, for the trainable parameters (:func:`split_frozen`).
      loss_scale: a loss scale (``NoOpLossScale``, ``StaticLossScale``, ``DynamicLossScale``).
      rng: a raw ``uint32[2]`` PRNG key; step ``t`` uses ``fold_in(rng, t)``, so a resumed run
        draws the same randomness as an uninterrupted one.
      weight_params: the weighting's learned parameters (``{}`` unless adaptive).
      weight_opt_state: their optimizer's state (``()`` when there is none).
      weight_state: the weighting's non-learned state (``{}`` unless it keeps a history).
      fp8_meta: the amax histories of delayed-scaling fp8 matmuls (``{}`` unless the model has
        them; :class:`~hybrid_jax.models.Fp8Meta`). The step replaces them every step.
      ema_params: an exponential moving average of ``params`` (``None`` unless the step keeps
        one; :class:`~hybrid_jax.mixing.EMA`).
    """

    step: jax.Array
    params: Any
    opt_state: Any
    loss_scale: LossScale
    rng: jax.Array
    weight_params: Any = dataclasses.field(default_factory=dict)
    weight_opt_state: Any = ()
    weight_state: Any = dataclasses.field(default_factory=dict)
    fp8_meta: Any = dataclasses.field(default_factory=dict)
    ema_params: Any = None

    @classmethod
    def create(
        cls,
        params: Any,
        optimizer: optax.GradientTransformation,
        *,
        loss_scale: LossScale | None = None,
        rng: int | jax.Array = 0,
        precision: Precision | None = None,
        weighting: Weighting | None = None,
        loss_names: Sequence[str] | None = None,
        fp8_meta: Any = None,
        ema: EMA | None = None,
    ) -> TrainState:
        """A fresh state at step 0.

        Args:
          params: the initial parameters: a pytree of arrays (``None`` and numbers allowed).
            Split a model's arrays from the rest first (``eqx.partition``, ``nnx.split``).
          optimizer: the transformation the train step uses (its ``init`` makes ``opt_state``).
          loss_scale: the initial loss scale (default: none, ``NoOpLossScale``).
          rng: a seed or a raw PRNG key.
          precision: if given, parameters are first cast to their param dtypes under it (e.g.
            bf16 master weights for ``bf16-pure``).
          weighting: the loss weighting the step uses, if it keeps learned parameters or state.
          loss_names: the loss terms' names, for weightings that learn per term
            (``Weighted`` knows them from its weights).
          fp8_meta: amax histories of delayed-scaling fp8 matmuls, e.g. the third state of
            ``nnx.split(model, nnx.Param, Fp8Meta)``; the loss function then gets them as a
            fourth argument.
          ema: keep an exponential moving average of the parameters (pass the same
            :class:`~hybrid_jax.mixing.EMA` to ``make_train_step``).

        Returns:
          The ``TrainState``.

        Raises:
          TypeError: ``params`` holds a leaf that is not an array (a function of an unsplit
            Equinox module); the message names it and says how to split the model.

        Examples:
          >>> state = TrainState.create({"w": jnp.zeros(3)}, optax.sgd(0.1), rng=0)
          >>> int(state.step), state.rng.dtype
          (0, dtype('uint32'))
        """
        tree_lib.check_array_leaves(params, "TrainState.create(params=...)")
        given = params
        if precision is not None:
            params = cast_to_param(params, precision)
        # A copy of each leaf the cast left as it was: the step donates the state, which must not
        # delete the caller's arrays (a model's variables, reused for a second state or an eval).
        params = jax.tree_util.tree_map(
            lambda p, g: jnp.copy(p) if p is g else p, params, given, is_leaf=tree_lib.is_leaf
        )
        if isinstance(rng, int):
            rng = jax.random.key_data(jax.random.key(rng))
        rng = jnp.asarray(rng)
        if rng.dtype != jnp.uint32:
            raise TypeError(
                f"rng must be a seed or a raw uint32 key (jax.random.key_data), got {rng.dtype}"
            )
        weight_params, weight_opt_state, weight_state = {}, (), {}
        if weighting is not None:
            if loss_names is None:
                if not isinstance(weighting, Weighted):
                    raise ValueError(
                        f"{weighting!r} learns per loss term: pass loss_names=[...] to "
                        "TrainState.create"
                    )
                loss_names = list(weighting.weights)
            weight_params, weight_state = weighting.init(list(loss_names))
            if weighting.optimizer is not None:
                weight_opt_state = weighting.optimizer.init(weight_params)
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=optimizer.init(split_frozen(params)[0]),
            # A copy: the step donates the state, which must not delete the caller's loss scale
            # (often the same object also handed to make_train_step or to the next create).
            loss_scale=jax.tree_util.tree_map(jnp.copy, loss_scale)
            if loss_scale is not None
            else NoOpLossScale(),
            rng=rng,
            weight_params=weight_params,
            weight_opt_state=weight_opt_state,
            weight_state=weight_state,
            fp8_meta={} if fp8_meta is None else fp8_meta,
            ema_params=None if ema is None else ema.init(params),
        )


def state_bytes(state: TrainState) -> dict[str, float]:
    """The bytes a train state holds, from its arrays, and their ratio to the parameter count.

    Args:
      state: a :class:`TrainState` (arrays or ``jax.ShapeDtypeStruct`` leaves).

    Returns:
      ``params``, ``opt_state`` and ``other`` (step, rng, loss scale, loss weighting, fp8
      histories) bytes, ``total``, ``num_params`` (values in the parameters: an int8-stored
      weight counts its codes) and ``bytes_per_param`` (``total / num_params``): 12 for fp32
      AdamW (4 for the weight, 8 for its two moments).

    Examples:
      >>> state = TrainState.create({"w": jnp.zeros(1000)}, optax.adam(1e-3))
      >>> round(state_bytes(state)["bytes_per_param"], 2)
      12.02
    """
    params = tree_lib.nbytes(state.params)
    opt_state = tree_lib.nbytes(state.opt_state)
    total = tree_lib.nbytes(state)
    num_params = sum(
        int(np.prod(x.shape, dtype=np.int64))
        for x in jax.tree_util.tree_leaves(state.params, is_leaf=tree_lib.is_leaf)
    )
    return {
        "params": params,
        "opt_state": opt_state,
        "other": total - params - opt_state,
        "total": total,
        "num_params": num_params,
        "bytes_per_param": total / max(num_params, 1),
    }
