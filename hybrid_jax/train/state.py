"""``TrainState``: everything a training run carries from one step to the next, as one pytree."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from hybrid_jax.losses import Weighted, Weighting
from hybrid_jax.precision import LossScale, NoOpLossScale, cast_to_param
from hybrid_jax.precision.rules import Precision


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """The state of a training run: a pytree that ``jax.jit`` donates and orbax checkpoints.

    Attributes:
      step: steps taken (int32), skipped ones included.
      params: the master parameters, in their param dtypes (fp32 unless a policy says otherwise).
      opt_state: the optimizer's state.
      loss_scale: a loss scale (``NoOpLossScale``, ``StaticLossScale``, ``DynamicLossScale``).
      rng: a raw ``uint32[2]`` PRNG key; step ``t`` uses ``fold_in(rng, t)``, so a resumed run
        draws the same randomness as an uninterrupted one.
      weight_params: the weighting's learned parameters (``{}`` unless adaptive).
      weight_opt_state: their optimizer's state (``()`` when there is none).
      weight_state: the weighting's non-learned state (``{}`` unless it keeps a history).
      fp8_meta: the amax histories of delayed-scaling fp8 matmuls (``{}`` unless the model has
        them; :class:`~hybrid_jax.models.Fp8Meta`). The step replaces them every step.
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
    ) -> TrainState:
        """A fresh state at step 0.

        Args:
          params: the initial parameters.
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

        Returns:
          The ``TrainState``.

        Examples:
          >>> state = TrainState.create({"w": jnp.zeros(3)}, optax.sgd(0.1), rng=0)
          >>> int(state.step), state.rng.dtype
          (0, dtype('uint32'))
        """
        if precision is not None:
            params = cast_to_param(params, precision)
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
            opt_state=optimizer.init(params),
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
        )
