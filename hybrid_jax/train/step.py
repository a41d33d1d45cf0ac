"""``make_train_step``: one jitted ``(state, batch) -> (state, metrics)`` doing all of it.

Order inside the step: cast the master params to compute precision -> loss terms -> weighted
total x loss scale -> gradients -> unscale -> finite check -> gradient mixing -> optimizer
update in master precision -> keep the old state (and shrink the scale) where the gradients were
not finite.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from hybrid_jax import tree as tree_lib
from hybrid_jax.losses import Mixer, Sum, Weighting, term_gradients, weighted_sum
from hybrid_jax.mixing import EMA
from hybrid_jax.optim import check_applied
from hybrid_jax.precision import (
    LossScale,
    Precision,
    all_finite,
    cast_to_compute,
    plan,
    policies_with_paths,
    select_tree,
)
from hybrid_jax.train.sharding import ShardedStep, replicated
from hybrid_jax.train.state import TrainState, merge_frozen, split_frozen

LossTermsFn = Callable[[Any, Any, jax.Array], Mapping[str, jax.Array]]
Metrics = dict[str, jax.Array]
# (trainable, batch, key, fp8_meta) -> {name: scalar}: the loss terms at compute precision.
_TermsFn = Callable[[Any, Any, jax.Array, Any], Mapping[str, jax.Array]]
# (weight_params, terms) -> (scaled total, (terms, total, metrics)).
_ObjectiveFn = Callable[[Any, Mapping[str, jax.Array]], tuple[jax.Array, Any]]


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
        if tree_lib.is_float_leaf(leaf) and leaf.dtype != policy.param_dtype:
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


def _total_grads(
    terms_fn: _TermsFn,
    objective: _ObjectiveFn,
    loss_scale: LossScale,
    trainable: Any,
    weight_params: Any,
    batch: Any,
    key: jax.Array,
    fp8_meta: Any,
) -> tuple[Any, Any, Any]:
    """One ``jax.grad`` of the scaled total: ``((model grads, weight grads), aux, fp8_meta)``,
    the amax histories after the batch being their own "gradient"."""
    del loss_scale  # already in the objective

    def scaled_total(trainable, weight_params, fp8_meta):
        return objective(weight_params, terms_fn(trainable, batch, key, fp8_meta))

    grad_fn = jax.grad(scaled_total, argnums=(0, 1, 2), has_aux=True)
    (*grads, fp8_meta), aux = grad_fn(trainable, weight_params, fp8_meta)
    return tuple(grads), aux, fp8_meta


def _per_term_grads(
    terms_fn: _TermsFn,
    objective: _ObjectiveFn,
    loss_scale: LossScale,
    trainable: Any,
    weight_params: Any,
    batch: Any,
    key: jax.Array,
    fp8_meta: Any,
) -> tuple[Any, Any, Any]:
    """As :func:`_total_grads`, with the model's gradients one per term, stacked (weighted and
    scaled, for a mixer); ``fp8_meta`` passes through unchanged."""

    def weights(terms):
        _, (_, _, metrics) = objective(weight_params, terms)
        return jax.lax.stop_gradient(loss_scale.scale({n: metrics[f"weight/{n}"] for n in terms}))

    terms, stacked = term_gradients(
        lambda p, b, k: terms_fn(p, b, k, fp8_meta), trainable, batch, key, weights=weights
    )
    # The weighting's own parameters see the terms as constants.
    weight_grads, aux = jax.grad(objective, has_aux=True)(
        weight_params, jax.lax.stop_gradient(terms)
    )
    return (stacked, weight_grads), aux, fp8_meta


def _accumulated_grads(
    grad_fn: Callable[[Any, jax.Array, Any], tuple[Any, Any, Any]],
    batch: Any,
    key: jax.Array,
    fp8_meta: Any,
    n: int,
) -> tuple[Any, Any, Any]:
    """``grad_fn(batch, key, fp8_meta)`` averaged over ``n`` micro-batches (gradients and aux
    summed in fp32 by ``lax.scan``, micro-batch ``i`` with key ``fold_in(key, i)``); the amax
    histories run through the micro-batches in turn."""
    if n == 1:
        return grad_fn(batch, key, fp8_meta)
    micro = _split_micro(batch, n)

    def body(carry, xs):
        summed, fp8_meta = carry
        i, micro_batch = xs
        grads, aux, fp8_meta = grad_fn(micro_batch, jax.random.fold_in(key, i), fp8_meta)
        add = lambda a, g: a + g.astype(jnp.float32)
        return (jax.tree_util.tree_map(add, summed, (grads, aux)), fp8_meta), None

    shapes = jax.eval_shape(grad_fn, jax.tree_util.tree_map(lambda x: x[0], micro), key, fp8_meta)
    shapes = shapes[:2]
    zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, jnp.float32), shapes)
    (summed, fp8_meta), _ = jax.lax.scan(body, (zeros, fp8_meta), (jnp.arange(n), micro))
    grads, aux = jax.tree_util.tree_map(lambda s, like: (s / n).astype(like.dtype), summed, shapes)
    return grads, aux, fp8_meta


def _apply(
    optimizer: optax.GradientTransformation, grads: Any, opt_state: Any, params: Any
) -> tuple[Any, Any]:
    """One optimizer update: ``(new params, new opt_state)``."""
    # Optax's own code (Adam's bias correction, schedules) mixes int32 and float, which strict
    # promotion refuses; the rest of the step stays under the caller's setting.
    with jax.numpy_dtype_promotion("standard"):
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state


def _updated(
    state: TrainState,
    optimizer: optax.GradientTransformation,
    weighting: Weighting,
    ema: EMA | None,
    grads: tuple[Any, Any],
    terms: Mapping[str, jax.Array],
    fp8_meta: Any,
) -> TrainState:
    """The candidate next state, from the unscaled (model, weighting) gradients: parameters,
    optimizer states, weighting state, amax histories and EMA updated as if the step were not
    skipped (``step`` and ``loss_scale`` are left to the caller)."""
    model_grads, weight_grads = grads
    trainable, frozen = split_frozen(state.params)
    params, opt_state = _apply(optimizer, model_grads, state.opt_state, trainable)
    params = merge_frozen(params, frozen)
    weight_params, weight_opt_state = state.weight_params, state.weight_opt_state
    if weighting.optimizer is not None:
        weight_params, weight_opt_state = _apply(
            weighting.optimizer, weight_grads, weight_opt_state, weight_params
        )
    ema_params = (
        state.ema_params if ema is None else ema.update(state.ema_params, params, state.step)
    )
    return dataclasses.replace(
        state,
        params=params,
        opt_state=opt_state,
        weight_params=weight_params,
        weight_opt_state=weight_opt_state,
        weight_state=weighting.update(terms, state.weight_state, state.step),
        fp8_meta=fp8_meta,
        ema_params=ema_params,
    )


def make_train_step(
    loss_terms_fn: LossTermsFn,
    *,
    optimizer: optax.GradientTransformation,
    weighting: Weighting | None = None,
    precision: Precision = "fp32",
    loss_scale: LossScale | None = None,
    mixer: Mixer | None = None,
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
        it updates the master parameters in their param dtype. Where the precision plan sets
        optimizer keys (``master``, ``grad``, ``mu``, ``nu``, ``update``), it must be the one
        :func:`~hybrid_jax.optim.with_precision` returns (the same one ``TrainState.create``
        got), which applies them.
      weighting: a :class:`~hybrid_jax.losses.Weighting` (``Weighted``, ``Uncertainty``,
        ``DWA``); default: every term with weight 1.
      precision: a ``Policy``, policy string, ``PrecisionRules`` or plan.
      loss_scale: the kind of loss scale the state must hold (checked at trace time); the
        current scale itself lives in ``state.loss_scale``.
      mixer: how per-term gradients combine (a :class:`~hybrid_jax.losses.Mixer`). Default
        (``None`` or ``Sum()``): one gradient of the weighted total, nothing extra computed.
        ``PCGrad()``: per-term gradients from one forward and one batched VJP, then projected.
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

    Raises:
      ValueError: ``grad_accum`` is not a positive int; or, when the step is traced, the
        plan sets optimizer keys that ``optimizer`` does not apply, the state lacks the EMA
        parameters ``ema`` needs, or a per-term ``mixer`` meets delayed-scaling fp8 histories.
      TypeError: ``mixer`` has no bool ``per_term`` or cannot be called; or, when the step is
        traced, a parameter is not stored in its policy's param dtype, or the state holds
        another kind of loss scale than ``loss_scale``.

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
    if not (callable(mixer) and isinstance(getattr(mixer, "per_term", None), bool)):
        raise TypeError(
            f"mixer must be a Mixer: callable on stacked per-term gradients, with a bool "
            f"attribute per_term (False: one gradient of the weighted total); got {mixer!r}"
        )

    def _check_state(state: TrainState) -> Any:
        """Trace-time checks of the state against the step; returns the precision plan."""
        _check_loss_scale(loss_scale, state.loss_scale)
        policies = plan(state.params, precision)
        _check_param_dtypes(state.params, policies)
        check_applied(optimizer, policies)
        if mixer.per_term and jax.tree_util.tree_leaves(state.fp8_meta):
            raise ValueError(
                f"{mixer!r} takes per-term gradients, which would each carry a new fp8 amax "
                "history; use current fp8 scaling (no fp8_meta) with gradient mixing"
            )
        if ema is not None and state.ema_params is None:
            raise ValueError(
                "make_train_step(ema=...) needs a state with EMA parameters: "
                "TrainState.create(..., ema=ema)"
            )
        return policies

    def step_fn(state: TrainState, batch: Any) -> tuple[TrainState, Metrics]:
        policies = _check_state(state)
        key = jax.random.fold_in(state.rng, state.step)
        scale = state.loss_scale
        # Gradients, optimizer and update see only the trainable leaves; the rest is constant.
        trainable, frozen = split_frozen(state.params)

        def terms_fn(trainable, batch, key, fp8_meta):
            compute = cast_to_compute(merge_frozen(trainable, frozen), policies)
            if mesh is not None:
                # FSDP: each layer's weights are gathered whole, in the compute dtype, for the
                # forward and backward; their gradients reduce-scatter back to the shards.
                compute = jax.lax.with_sharding_constraint(compute, replicated(mesh))
            extra = (fp8_meta,) if jax.tree_util.tree_leaves(fp8_meta) else ()
            return loss_terms_fn(compute, batch, key, *extra)

        def objective(weight_params, terms):
            total, metrics = weighting(terms, weight_params, state.weight_state, state.step)
            return scale.scale(total), (terms, total, metrics)

        grad_fn = functools.partial(
            _per_term_grads if mixer.per_term else _total_grads,
            terms_fn,
            objective,
            scale,
            trainable,
            state.weight_params,
        )
        grads, (terms, total, metrics), fp8_meta = _accumulated_grads(
            grad_fn, batch, key, state.fp8_meta, grad_accum
        )
        model_grads, weight_grads = scale.unscale(grads)
        grads_finite = all_finite((model_grads, weight_grads))
        if mixer.per_term:
            model_grads = mixer(model_grads, key)
        # Unscaling computes in fp32; the optimizer gets each gradient in its parameter's dtype,
        # as without a loss scale, so that its state keeps the dtypes it was created with.
        model_grads = jax.tree_util.tree_map(lambda g, p: g.astype(p.dtype), model_grads, trainable)
        new = _updated(
            state, optimizer, weighting, ema, (model_grads, weight_grads), terms, fp8_meta
        )
        # Finite gradients can still give a non-finite result (fp16 params or moments that
        # overflow, an epsilon that underflows): that step is skipped too, so no NaN or Inf
        # ever reaches the state. The loss scale answers only to the gradients, as in jmp.
        finite = grads_finite & all_finite(
            (new.params, new.opt_state, new.weight_params, new.weight_opt_state)
        )
        new_state = dataclasses.replace(
            select_tree(finite, new, state),
            step=state.step + 1,
            loss_scale=scale.adjust(grads_finite),
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
