"""An ``nnx.Optimizer`` for mixed precision: a user's own NNX model, trained in one call a step.

:class:`Trainer` is the last mile between an NNX model and the pure train step: it installs the
matmuls its precision asks for (:func:`~hybrid_jax.models.quantize_matmuls`), splits the model
into a :class:`~hybrid_jax.train.TrainState`, builds the jitted
:func:`~hybrid_jax.train.make_train_step` (cast to compute precision, loss scaling, non-finite
step skipping, per-path optimizers) and writes the updated master weights back into the model
after every step, so the model object stays the one to call, inspect and save.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from hybrid_jax.losses import Mixer, Weighting
from hybrid_jax.mixing import EMA
from hybrid_jax.models.matmuls import Fp8Meta, quantize_matmuls
from hybrid_jax.optim import with_precision
from hybrid_jax.precision import DynamicLossScale, LossScale, NoOpLossScale
from hybrid_jax.precision.rules import Precision, computes_in
from hybrid_jax.train import TrainState, make_eval_step, make_train_step

LossFn = Callable[[nnx.Module, Any], "jax.Array | dict[str, jax.Array]"]
"""``(model, batch) -> loss``: a scalar, or ``{name: scalar}`` loss terms for a weighting."""


class Trainer:
    """Trains an NNX model's ``nnx.Param`` state with a precision plan, loss scale and skip logic.

    Like ``nnx.Optimizer``, it holds the optimizer state next to the model and updates the
    model in place; unlike it, the whole step (the cast to compute dtypes, the loss, its
    gradient, the loss scale, the finite check and the update of fp32 master weights) is one
    jitted function, and a step whose gradients overflow leaves the model as it was.

    The model is called inside the step with its parameters cast to their compute dtypes (the
    master weights stay in their param dtypes), on a copy merged from the split state: a model
    that changes other state while it runs (``nnx.BatchStat``, a dropout ``nnx.Rngs``) is
    refused, because those changes would be lost.

    Args:
      model: an NNX module; its ``nnx.Param`` state is trained. Layers whose weights compute in
        fp8 or int8 get their quantized matmul installed in place (``nnx.Linear``,
        ``nnx.LinearGeneral``, the bundled GPT's layers).
      loss_fn: ``(model, batch) -> loss``, a scalar or a dict of scalar loss terms; traced
        once per batch shape.
      optimizer: any Optax transformation, e.g. ``hybrid_jax.optim.muon_adamw()`` or
        ``by_path(...)``; wrapped in :func:`~hybrid_jax.optim.with_precision` when the
        precision sets optimizer keys (low-precision moments, stochastic rounding).
      precision: a preset or policy string, a ``Policy``, or ``PrecisionRules`` over the
        model's parameter paths (``"layers/0/kernel"``).
      loss_scale: the initial loss scale; default dynamic (``2**15``) when a policy computes
        in fp16, otherwise none.
      weighting: how dict loss terms add up (default: each with weight 1).
      mixer: gradient mixing of the terms, e.g. ``hybrid_jax.losses.PCGrad()``.
      fp8_scaling: ``"current"`` or ``"delayed"`` (amax histories kept in the state).
      ema: keep an exponential moving average of the parameters in ``state.ema_params``.
      seed: the seed of the state's PRNG key.

    Attributes:
      model: the model, holding the latest master weights after each :meth:`step`.
      state: the :class:`~hybrid_jax.train.TrainState` (checkpoint it with
        :class:`~hybrid_jax.train.Checkpointer`).
      plan: the precision plan, a tree of ``Policy`` shaped like ``nnx.state(model, nnx.Param)``.

    Examples:
      >>> import optax
      >>> model = nnx.Linear(4, 2, rngs=nnx.Rngs(0))
      >>> loss_fn = lambda model, batch: jnp.mean((model(batch["x"]) - batch["y"]) ** 2)
      >>> trainer = Trainer(model, loss_fn, optax.adam(1e-2), precision="bf16-mixed")
      >>> batch = {"x": jnp.ones((8, 4)), "y": jnp.zeros((8, 2))}
      >>> metrics = trainer.step(batch)
      >>> int(trainer.state.step), model.kernel.dtype, int(metrics["skipped"])
      (1, dtype('float32'), 0)
    """

    def __init__(
        self,
        model: nnx.Module,
        loss_fn: LossFn,
        optimizer: optax.GradientTransformation,
        *,
        precision: Precision = "fp32",
        loss_scale: LossScale | None = None,
        weighting: Weighting | None = None,
        mixer: Mixer | None = None,
        fp8_scaling: str = "current",
        ema: EMA | None = None,
        seed: int = 0,
    ):
        if not isinstance(model, nnx.Module):
            raise TypeError(f"model must be an nnx.Module, got {type(model).__name__}")
        _refuse_changing_state(model)
        self.plan = quantize_matmuls(model, precision, fp8_scaling=fp8_scaling)
        # Anything else (constant buffers) rides along as it is.
        graphdef, params, fp8_meta, rest = nnx.split(model, nnx.Param, Fp8Meta, ...)
        if loss_scale is None:
            fp16 = computes_in(self.plan, jnp.float16)
            loss_scale = DynamicLossScale(2.0**15) if fp16 else NoOpLossScale()
        optimizer = with_precision(optimizer, precision, seed=seed)

        def loss_terms(compute_params, batch, rng, meta=fp8_meta):
            del rng  # the model's own randomness would be state, which is refused above
            loss = loss_fn(nnx.merge(graphdef, compute_params, meta, rest), batch)
            return loss if isinstance(loss, dict) else {"loss": loss}

        self.model = model
        self.state = TrainState.create(
            params,
            optimizer,
            loss_scale=loss_scale,
            rng=seed,
            precision=self.plan,
            weighting=weighting,
            fp8_meta=fp8_meta,
            ema=ema,
        )
        self._step = make_train_step(
            loss_terms,
            optimizer=optimizer,
            weighting=weighting,
            precision=self.plan,
            loss_scale=loss_scale,
            mixer=mixer,
            ema=ema,
        )
        self._eval = make_eval_step(loss_terms, precision=self.plan)
        self._sync()

    def step(self, batch: Any) -> dict[str, jax.Array]:
        """One train step on ``batch``; returns its metrics (``loss``, ``loss/<term>``,
        ``grad_norm``, ``loss_scale``, ``skipped``, ...: see
        :func:`~hybrid_jax.train.make_train_step`).

        The step donates the previous state: arrays read from the model before the step are
        deleted by it (read them again from ``trainer.model``).
        """
        self.state, metrics = self._step(self.state, batch)
        self._sync()
        return metrics

    def evaluate(self, batch: Any) -> dict[str, jax.Array]:
        """The loss terms on ``batch`` at compute precision, without updating anything."""
        meta = self.state.fp8_meta if jax.tree_util.tree_leaves(self.state.fp8_meta) else None
        return self._eval(self.state.params, batch, meta)

    def _sync(self) -> None:
        # nnx.update writes the new arrays into the existing Variables: the user's model object,
        # and any reference they hold to its submodules, sees them.
        nnx.update(self.model, self.state.params, self.state.fp8_meta)

    def __repr__(self) -> str:
        return f"Trainer({type(self.model).__name__}, step={int(self.state.step)})"


def _refuse_changing_state(model: nnx.Module) -> None:
    changing = [
        (path, node)
        for path, node in nnx.iter_graph(model)
        if isinstance(node, nnx.BatchStat | nnx.RngState | nnx.Intermediate)
    ]
    if changing:
        path, node = changing[0]
        where = "/".join(str(k) for k in path)
        raise ValueError(
            f"Trainer trains nnx.Param state, but the model also holds {type(node).__name__} "
            f"state at {where!r} ({len(changing)} such variables), which changes as the model "
            "runs: those changes would be lost. Split the model yourself and carry that state "
            "through hybrid_jax.train.make_train_step, or build the model without it (e.g. "
            "dropout given rngs at call time)"
        )
