"""Numerics diagnostics of a run: where the numbers of each layer break, in which format.

:func:`diagnose` takes a run's state and one batch and reports, per layer, for the parameters,
the gradients (at the run's loss scale), the activations that enter each matmul and the update
the optimizer would apply: max ``|x|``, the fractions that would underflow or overflow in fp16,
e4m3 and e5m2, the dynamic range, the lowest precision each tolerates
(:func:`~hybrid_jax.diagnostics.numerics_report`), and how many updates the parameter's storage
dtype would round away (:func:`~hybrid_jax.diagnostics.update_stagnation`).
``hybrid-jax train --diagnose`` prints it for the final state and writes it to
``<out>/diagnostics.txt``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hybrid_jax._table import Table
from hybrid_jax.diagnostics import numerics_report, update_stagnation
from hybrid_jax.losses import lm_terms
from hybrid_jax.precision import cast_to_compute
from hybrid_jax.train import TrainState, merge_frozen, split_frozen


@dataclasses.dataclass(frozen=True)
class Diagnosis:
    """The five reports of :func:`diagnose`, each a :class:`~hybrid_jax._table.Table`."""

    params: Table
    gradients: Table
    activation_gradients: Table
    activations: Table
    stagnation: Table
    loss_scale: float

    def __str__(self) -> str:
        return "\n\n".join(
            [
                f"parameters\n{self.params}",
                f"parameter gradients (x loss scale {self.loss_scale:g})\n{self.gradients}",
                "gradients of the activations entering each matmul (x loss scale "
                f"{self.loss_scale:g})\n{self.activation_gradients}",
                f"activations entering each matmul\n{self.activations}",
                f"update stagnation (updates the storage dtype rounds away)\n{self.stagnation}",
            ]
        )


def _run_with_probes(graphdef, params, fp8_meta, tokens, probes, seen):
    """Logits of ``tokens``, each matmul's left operand plus its probe (zero), recorded."""
    model = nnx.merge(graphdef, params, fp8_meta)
    for _, layer in list(nnx.iter_graph(model)):
        matmul, scope = getattr(layer, "dot_general", None), getattr(layer, "scope", None)
        if matmul is None or not scope:
            continue

        def probed(lhs, rhs, dims, *args, _matmul=matmul, _scope=scope, **kwargs):
            if _scope in probes:
                lhs = lhs + probes[_scope].astype(lhs.dtype)
            seen[_scope] = lhs
            return _matmul(lhs, rhs, dims, *args, **kwargs)

        layer.dot_general = nnx.static(probed)
    return model(tokens)


def diagnose(run: Any, state: TrainState, batch: Any) -> Diagnosis:
    """Reports the numerics of ``state``'s parameters, gradients, activations and updates.

    Gradients come in two kinds: with respect to the master parameters, and with respect to the
    activations entering each matmul (the backward pass's own values, the ones fp16 loses
    first: Micikevicius et al. 2018 show most of them below fp16's range without loss scaling).
    Both are computed as the step computes them, from the loss times the loss scale, and then
    unscaled: a value the compute dtype flushed shows as a zero (the ``zeros`` column), and the
    format columns give the fractions of ``gradient x loss scale``.

    Args:
      run: a :class:`~hybrid_jax.app.run.Run` (model, precision, loss, optimizer).
      state: the state to diagnose (e.g. after training).
      batch: ``(tokens, targets)``.

    Returns:
      A :class:`Diagnosis`; ``str()`` of it prints the tables.
    """
    tokens, targets = batch
    trainable, frozen = split_frozen(state.params)

    def objective(trainable, probes):
        params = cast_to_compute(merge_frozen(trainable, frozen), run.precision)
        seen: dict[str, jax.Array] = {}
        logits = _run_with_probes(run.graphdef, params, state.fp8_meta, tokens, probes, seen)
        total = run.weighting(lm_terms(logits, targets), step=state.step)[0]
        # Scaled as the step scales it, so that the backward pass sees the same values.
        return state.loss_scale.scale(total), seen

    @jax.jit
    def measure(trainable, probes):
        grad_fn = jax.grad(objective, argnums=(0, 1), has_aux=True)
        (grads, probe_grads), activations = grad_fn(trainable, probes)
        grads, probe_grads = state.loss_scale.unscale((grads, probe_grads))
        with jax.numpy_dtype_promotion("standard"):  # Optax mixes int32 and float
            updates, _ = run.optimizer.update(grads, state.opt_state, trainable)
        return grads, probe_grads, activations, updates

    shapes = jax.eval_shape(lambda t: objective(t, {})[1], trainable)
    probes = {name: jnp.zeros(s.shape, jnp.float32) for name, s in shapes.items()}
    grads, activation_grads, activations, updates = measure(trainable, probes)
    scale = float(np.asarray(state.loss_scale.loss_scale))
    return Diagnosis(
        params=numerics_report(state.params),
        gradients=numerics_report(grads, scale=scale),
        activation_gradients=numerics_report(activation_grads, scale=scale),
        activations=numerics_report(activations),
        stagnation=update_stagnation(trainable, updates),
        loss_scale=scale,
    )
