"""``make_train_step``: one jitted ``(state, batch) -> (state, metrics)`` doing all of it.

Order inside the step (DESIGN.md): cast the master params to compute precision -> loss terms ->
weighted total x loss scale -> gradients -> unscale -> finite check -> gradient mixing ->
optimizer update in master precision -> keep the old state (and shrink the scale) where the
gradients were not finite.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from hybrid_jax import tree as tree_lib
from hybrid_jax.losses import Sum, Weighting
from hybrid_jax.losses.mixing import term_gradients
from hybrid_jax.losses.weighting import weighted_sum
from hybrid_jax.mixing import EMA
from hybrid_jax.precision import (
    LossScale,
    all_finite,
    cast_to_compute,
    plan,
    select_tree,
)
from hybrid_jax.precision.rules import Precision, policies_with_paths
from hybrid_jax.train.sharding import ShardedStep, replicated
from hybrid_jax.train.state import TrainState, merge_frozen, split_frozen

LossTermsFn = Callable[[Any, Any, jax.Array], Mapping[str, jax.Array]]
Metrics = dict[str, jax.Array]


class _UnitWeights(Weighting):
    """The default weighting: every term with weight 1, whatever the terms are called."""

    def init(self, names):
        return {}, {}

    def __call__(self, terms, params=None, state=None, step=None):
        return weighted_sum(terms, {name: jnp.ones((), jnp.float32) for name in terms})


def _check_param_dtypes(params: Any, policies: Any) -> None:
    flat_policies = [policy for _, policy in policies_with_paths(policies)]
    for (path, leaf), policy in zip(
        tree_lib.leaves_with_paths(params)[0], flat_policies, strict=True
    ):
        if jnp.issubdtype(leaf.dtype, jnp.floating) and leaf.dtype != policy.param_dtype:
            raise TypeError(
                f"parameter {path!r} is stored as {leaf.dtype}, but its precision policy "
                f"({policy}) keeps parameters in {policy.param_dtype}; create the state with "
                "TrainState.create(..., precision=...) so that params are cast once"
            )


def _check_loss_scale(expected: LossScale | None, got: LossScale) -> None:
    if expected is None:
        return
    static = lambda ls: jax.tree_util.tree_structure(ls)
    if static(expected) != static(got):
        raise TypeError(
            f"the step was built for loss_scale={expected!r:.120} but the state holds "
            f"{got!r:.120}; pass the same loss_scale to TrainState.create"
        )


def _global_norm(tree: Any) -> jax.Array:
    """The fp32 L2 norm of all leaves together, whatever their dtypes (strict-promotion safe)."""
    squares = [jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree_util.tree_leaves(tree)]
    return jnp.sqrt(sum(squares, jnp.zeros((), jnp.float32)))


def _split_micro(batch: Any, n: int) -> Any:
    """``n`` micro-batches stacked on a new leading axis; micro-batch ``i`` holds examples
    ``i, i + n, i + 2n, ...``. Strided rather than contiguous: on a mesh, where the batch axis
    is split into contiguous shards, each device's micro-batches then come from its own shard,
    while a contiguous split would all-gather the batch (seen in the compiled HLO)."""

    def split(x):
        if x.shape[0] % n:
            raise ValueError(
                f"grad_accum={n} must divide the batch's leading axis, got a leaf of shape "
                f"{x.shape}"
            )
        return jnp.swapaxes(x.reshape(x.shape[0] // n, n, *x.shape[1:]), 0, 1)

    return jax.tree_util.tree_map(split, batch)


def make_train_step(
    loss_terms_fn: LossTermsFn,
    *,
    optimizer: optax.GradientTransformation,
    weighting: Weighting | None = None,
    precision: Precision = "fp32",
    loss_scale: LossScale | None = None,
    mixer: Any = None,
    grad_accum: int = 1,
    ema: EMA | None = None,
    donate: bool = True,
    mesh: Mesh | None = None,
) -> Callable[[TrainState, Any], tuple[TrainState, Metrics]]:
    """Builds the jitted train step ``(state, batch) -> (state, metrics)``.

    Args:
      loss_terms_fn: ``(compute_params, batch, rng) -> {name: scalar}``; gets the parameters
        already cast to compute precision, and a PRNG key for this step (and micro-batch).
        When ``state.fp8_meta`` holds delayed-scaling amax histories it is called with them
        as a fourth argument, ``(compute_params, batch, rng, fp8_meta)``; their "gradient" is
        their new value, which replaces them (skipped steps keep the old ones).
      optimizer: any ``optax.GradientTransformation``, e.g. ``hybrid_jax.optim.by_path(...)``;
        it updates the master parameters in their param dtype.
      weighting: a :class:`~hybrid_jax.losses.Weighting` (``Weighted``, ``Uncertainty``,
        ``DWA``); default: every term with weight 1.
      precision: a ``Policy``, policy string, ``PrecisionRules`` or plan.
      loss_scale: the kind of loss scale the state must hold (checked at trace time); the
        current scale itself lives in ``state.loss_scale``.
      mixer: how per-term gradients combine. Default (``None`` or ``Sum()``): one gradient of
        the weighted total, nothing extra computed. ``PCGrad()``: per-term gradients from one
        forward and one batched VJP, then projected.
      grad_accum: micro-batches per step; the batch's leading axis is split into this many
        (micro-batch ``i`` takes every ``grad_accum``-th example from the ``i``-th), and
        gradients are averaged (accumulated in fp32 with ``lax.scan``).
      ema: update ``state.ema_params`` (an exponential moving average of the parameters, made
        by ``TrainState.create(..., ema=ema)``) after each applied update; skipped steps leave
        it as it was.
      donate: donate the input state's buffers to the output (the caller must not reuse it).
      mesh: a ``(data, fsdp)`` mesh (:func:`~hybrid_jax.train.sharding.make_mesh`) to run
        data-parallel and FSDP over; ``None``: wherever the inputs are.

    Returns:
      A jitted function. ``metrics`` holds ``loss`` (the weighted total, unscaled, fp32),
      ``loss/<term>``, ``weight/<term>``, ``grad_norm`` (of the unscaled gradients),
      ``loss_scale`` (the scale used this step) and ``skipped`` (1 if the update was skipped).
      A step is skipped when its gradients or the state it would produce hold a NaN or Inf.
      A skipped step leaves params, optimizer state and weighting state bitwise unchanged, lets
      the loss scale back off (when the gradients were at fault), and still advances
      ``state.step`` (so schedules and data move on, while Optax's own step counts inside
      ``opt_state`` do not).

      With ``mesh``, the function is jitted with explicit shardings
      (:func:`~hybrid_jax.train.sharding.state_shardings`, the batch over ``data`` and
      ``fsdp``, metrics replicated); the state must be placed with
      :func:`~hybrid_jax.train.sharding.shard_state` and a batch whose size the batch axes do
      not divide is a ``ValueError``.

    Examples:
      >>> def loss_terms(params, batch, rng):
      ...     return {"mse": jnp.mean((batch["x"] @ params["w"] - batch["y"]) ** 2)}
      >>> tx = optax.sgd(0.1)
      >>> step = make_train_step(loss_terms, optimizer=tx, precision="bf16-mixed")
      >>> state = TrainState.create({"w": jnp.zeros((3, 1))}, tx)
      >>> batch = {"x": jnp.ones((8, 3)), "y": jnp.ones((8, 1))}
      >>> state, metrics = step(state, batch)
      >>> float(metrics["loss"]), int(state.step)
      (1.0, 1)
    """
    if not (isinstance(grad_accum, int) and grad_accum >= 1):
        raise ValueError(f"grad_accum must be a positive int, got {grad_accum!r}")
    weighting = weighting if weighting is not None else _UnitWeights()
    mixer = mixer if mixer is not None else Sum()
    per_term = getattr(mixer, "per_term", True)

    def step_fn(state: TrainState, batch: Any) -> tuple[TrainState, Metrics]:
        _check_loss_scale(loss_scale, state.loss_scale)
        policies = plan(state.params, precision)
        _check_param_dtypes(state.params, policies)
        scale = state.loss_scale
        key = jax.random.fold_in(state.rng, state.step)
        # Gradients, optimizer and update see only the trainable leaves; the rest is constant.
        trainable, frozen = split_frozen(state.params)
        has_fp8_meta = bool(jax.tree_util.tree_leaves(state.fp8_meta))
        if has_fp8_meta and per_term:
            raise ValueError(
                f"{mixer!r} takes per-term gradients, which would each carry a new fp8 amax "
                "history; use current fp8 scaling (no fp8_meta) with gradient mixing"
            )

        def terms_fn(trainable, micro_batch, micro_key, fp8_meta):
            extra = (fp8_meta,) if has_fp8_meta else ()
            compute = cast_to_compute(merge_frozen(trainable, frozen), policies)
            if mesh is not None:
                # FSDP: each layer's weights are gathered whole, in the compute dtype, for the
                # forward and backward; their gradients reduce-scatter back to the shards.
                compute = jax.lax.with_sharding_constraint(compute, replicated(mesh))
            return loss_terms_fn(compute, micro_batch, micro_key, *extra)

        def weight_objective(weight_params, terms):
            total, metrics = weighting(terms, weight_params, state.weight_state, state.step)
            return scale.scale(total), (terms, total, metrics)

        def objective(params, weight_params, fp8_meta, micro_batch, micro_key):
            terms = terms_fn(params, micro_batch, micro_key, fp8_meta)
            return weight_objective(weight_params, terms)

        def micro_grads(micro_batch, micro_key, fp8_meta):
            """Scaled gradients for one micro-batch: (model grads, weight grads), aux, and the
            fp8 amax histories after it (their "gradient" is their new value)."""
            if not per_term:
                grad_fn = jax.grad(objective, argnums=(0, 1, 2), has_aux=True)
                (*grads, new_meta), aux = grad_fn(
                    trainable, state.weight_params, fp8_meta, micro_batch, micro_key
                )
                return tuple(grads), aux, new_meta

            def weights(terms):
                _, metrics = weighting(terms, state.weight_params, state.weight_state, state.step)
                scaled = scale.scale({n: metrics[f"weight/{n}"] for n in terms})
                return jax.lax.stop_gradient(scaled)

            terms, stacked = term_gradients(
                lambda p, b, k: terms_fn(p, b, k, fp8_meta),
                trainable,
                micro_batch,
                micro_key,
                weights=weights,
            )
            # The weighting's own parameters see the terms as constants.
            weight_grads, aux = jax.grad(weight_objective, has_aux=True)(
                state.weight_params, jax.lax.stop_gradient(terms)
            )
            return (stacked, weight_grads), aux, fp8_meta

        if grad_accum == 1:
            grads, (terms, total, metrics), fp8_meta = micro_grads(batch, key, state.fp8_meta)
        else:
            micro = _split_micro(batch, grad_accum)

            def body(carry, xs):
                summed, fp8_meta = carry
                i, micro_batch = xs
                grads, aux, fp8_meta = micro_grads(
                    micro_batch, jax.random.fold_in(key, i), fp8_meta
                )
                add = lambda a, g: a + g.astype(jnp.float32)
                return (jax.tree_util.tree_map(add, summed, (grads, aux)), fp8_meta), None

            shapes = jax.eval_shape(
                micro_grads, jax.tree_util.tree_map(lambda x: x[0], micro), key, state.fp8_meta
            )[:2]
            zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, jnp.float32), shapes)
            (summed, fp8_meta), _ = jax.lax.scan(
                body, (zeros, state.fp8_meta), (jnp.arange(grad_accum), micro)
            )
            mean = jax.tree_util.tree_map(
                lambda s, like: (s / grad_accum).astype(like.dtype), summed, shapes
            )
            grads, (terms, total, metrics) = mean

        model_grads, weight_grads = scale.unscale(grads)
        grads_finite = all_finite((model_grads, weight_grads))
        if per_term:
            model_grads = mixer(model_grads, key)
        # Unscaling computes in fp32; the optimizer gets each gradient in its parameter's dtype,
        # as without a loss scale, so that its state keeps the dtypes it was created with.
        model_grads = jax.tree_util.tree_map(lambda g, p: g.astype(p.dtype), model_grads, trainable)

        # Optax's own code (Adam's bias correction, schedules) mixes int32 and float, which
        # strict promotion refuses; the rest of the step stays under the caller's setting.
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = optimizer.update(model_grads, state.opt_state, trainable)
            params = merge_frozen(optax.apply_updates(trainable, updates), frozen)
            weight_params, weight_opt_state = state.weight_params, state.weight_opt_state
            if weighting.optimizer is not None:
                w_updates, weight_opt_state = weighting.optimizer.update(
                    weight_grads, weight_opt_state, weight_params
                )
                weight_params = optax.apply_updates(weight_params, w_updates)
        weight_state = weighting.update(terms, state.weight_state, state.step)
        # Finite gradients can still give a non-finite result (fp16 params or moments that
        # overflow, an epsilon that underflows): that step is skipped too, so no NaN or Inf
        # ever reaches the state. The loss scale answers only to the gradients, as in jmp.
        finite = grads_finite & all_finite((params, opt_state, weight_params, weight_opt_state))

        new, old = (
            (params, opt_state, weight_params, weight_opt_state, weight_state, fp8_meta),
            (
                state.params,
                state.opt_state,
                state.weight_params,
                state.weight_opt_state,
                state.weight_state,
                state.fp8_meta,
            ),
        )
        if ema is not None:
            if state.ema_params is None:
                raise ValueError(
                    "make_train_step(ema=...) needs a state with EMA parameters: "
                    "TrainState.create(..., ema=ema)"
                )
            new = (*new, ema.update(state.ema_params, params, state.step))
            old = (*old, state.ema_params)
        kept = select_tree(finite, new, old)
        new_state = TrainState(
            step=state.step + 1,
            params=kept[0],
            opt_state=kept[1],
            loss_scale=scale.adjust(grads_finite),
            rng=state.rng,
            weight_params=kept[2],
            weight_opt_state=kept[3],
            weight_state=kept[4],
            fp8_meta=kept[5],
            ema_params=kept[6] if ema is not None else state.ema_params,
        )
        metrics = {
            "loss": total.astype(jnp.float32),
            **metrics,
            "grad_norm": _global_norm(model_grads),
            "loss_scale": jnp.asarray(scale.loss_scale, jnp.float32),
            "skipped": jnp.logical_not(finite).astype(jnp.int32),
        }
        return new_state, metrics

    donate_argnums = (0,) if donate else ()
    if mesh is None:
        return jax.jit(step_fn, donate_argnums=donate_argnums)
    return ShardedStep(step_fn, mesh, donate_argnums=donate_argnums)


def make_eval_step(
    loss_terms_fn: LossTermsFn, *, precision: Precision = "fp32"
) -> Callable[..., dict[str, jax.Array]]:
    """A jitted ``(params, batch, fp8_meta=None) -> {name: scalar}`` evaluating the loss terms
    at compute precision, with a fixed key (evaluation draws no randomness that varies between
    calls). ``fp8_meta``, when given, is passed on to ``loss_terms_fn`` as in the train step."""

    def eval_fn(params, batch, fp8_meta=None):
        extra = () if fp8_meta is None else (fp8_meta,)
        terms = loss_terms_fn(
            cast_to_compute(params, plan(params, precision)),
            batch,
            jax.random.key_data(jax.random.key(0)),
            *extra,
        )
        return {name: jnp.asarray(t, jnp.float32) for name, t in terms.items()}

    return jax.jit(eval_fn)


def evaluate(
    eval_step: Callable, params: Any, batches: Any, fp8_meta: Any = None
) -> dict[str, float]:
    """The mean of each loss term over a fixed set of batches (a pytree with a leading axis)."""
    n = jax.tree_util.tree_leaves(batches)[0].shape[0]
    extra = () if fp8_meta is None else (fp8_meta,)
    sums: dict[str, Any] = {}
    for i in range(n):
        terms = eval_step(params, jax.tree_util.tree_map(lambda x, i=i: x[i], batches), *extra)
        sums = {k: sums.get(k, 0.0) + v for k, v in terms.items()}
    return {k: float(v) / n for k, v in jax.device_get(sums).items()}
