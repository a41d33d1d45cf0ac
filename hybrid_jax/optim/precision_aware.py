"""``with_precision``: the optimizer honours each parameter's policy (grad, mu, nu, master, update).

A :class:`~hybrid_jax.precision.Policy` may say, besides the three dtypes of mixed precision,
how the optimizer treats its parameter: ``grad`` (the gradient's dtype), ``mu`` and ``nu`` (the
storage of the moments, int8 meaning 8-bit block-wise), ``master`` (an fp32 master copy of a
bf16 parameter) and ``update`` (stochastic or Kahan rounding into a bf16 parameter). So one rule
list, e.g. ``[("embed", "p=f32,c=bf16"), (".*", "p=bf16,mu=bf16,nu=int8,update=sr")]``,
says everything about each parameter's precision, and this wrapper applies its optimizer half.
The train step refuses a plan with optimizer keys unless its optimizer comes from this wrapper
(:func:`check_applied`), so that no key is silently ignored.
"""

from __future__ import annotations

import warnings
from typing import Any

import jax
import optax

from hybrid_jax import tree as tree_lib
from hybrid_jax.optim.moments import with_moment_storage
from hybrid_jax.optim.updates import low_precision_updates
from hybrid_jax.precision import Policy, Precision, dtypes, plan, policies_with_paths


def _policies(params: Any, precision: Precision) -> tuple[list[Policy], Any]:
    """One policy per leaf of ``params``, and ``params``' treedef."""
    flat, treedef = tree_lib.leaves_with_paths(params)
    with warnings.catch_warnings():
        # The optimizer sees only the trainable leaves; rules for frozen ones were already
        # checked against the whole tree when the parameters were cast.
        warnings.simplefilter("ignore", tree_lib.UnusedRuleWarning)
        policies = plan(params, precision)
    flat_policies = [policy for _, policy in policies_with_paths(policies)]
    if len(flat_policies) != len(flat):
        raise ValueError(
            f"the precision plan has {len(flat_policies)} policies for {len(flat)} parameters"
        )
    return flat_policies, treedef


def _moment_spec(dtype: Any) -> str | None:
    if dtype is None:
        return None
    return "8bit" if dtype == dtypes.INT8 else dtypes.short_name(dtype)


def _cast_grads(grad_dtypes: Any) -> optax.GradientTransformation:
    def update_fn(updates, state, params=None):
        del params
        cast = lambda u, dtype: u if dtype is None else u.astype(dtype)
        flat, treedef = jax.tree_util.tree_flatten(updates)
        return jax.tree_util.tree_unflatten(
            treedef, [cast(u, d) for u, d in zip(flat, grad_dtypes, strict=True)]
        ), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


class PrecisionAware(optax.GradientTransformationExtraArgs):
    """What :func:`with_precision` returns: an ``optax.GradientTransformationExtraArgs`` whose
    type tells :func:`check_applied` that the policies' optimizer keys are applied."""

    __slots__ = ()


def _sets_optimizer_keys(policy: Policy) -> bool:
    """Whether ``policy`` asks :func:`with_precision` for anything (``update=nearest`` is what
    every optimizer does by itself)."""
    dtypes_set = (policy.master_dtype, policy.grad_dtype, policy.mu_dtype, policy.nu_dtype)
    return any(d is not None for d in dtypes_set) or policy.update not in (None, "nearest")


def check_applied(optimizer: optax.GradientTransformation, policies: Any) -> None:
    """Raises unless ``optimizer`` applies the optimizer keys of a precision plan.

    A policy's optimizer keys (``master``, ``grad``, ``mu``, ``nu``, ``update``) change the
    optimizer's state (an fp32 master copy, Kahan compensation, 8-bit moments), which
    ``TrainState.create`` builds from the optimizer it is given. So they are applied by wrapping
    that optimizer once, with :func:`with_precision`, never behind its back; a plain optimizer
    would ignore them.

    Args:
      optimizer: the transformation the train step updates with.
      policies: a plan (a tree of ``Policy``, as :func:`~hybrid_jax.precision.plan` returns).

    Raises:
      ValueError: some policies set optimizer keys and ``optimizer`` was not returned by
        :func:`with_precision` (the message lists the parameters and their policies).
    """
    keyed = [(path, p) for path, p in policies_with_paths(policies) if _sets_optimizer_keys(p)]
    if not keyed or isinstance(optimizer, PrecisionAware):
        return
    listed = ", ".join(f"{path!r} ({policy})" for path, policy in keyed[:5])
    more = f" and {len(keyed) - 5} more" if len(keyed) > 5 else ""
    raise ValueError(
        f"the precision plan sets optimizer keys (master, grad, mu, nu, update) for "
        f"{len(keyed)} parameters: {listed}{more}; a plain optimizer would ignore them. Wrap it "
        "as tx = hybrid_jax.optim.with_precision(optimizer, precision), outermost, and pass "
        "that tx to both TrainState.create and make_train_step; or use a policy without "
        "optimizer keys"
    )


def with_precision(
    inner: optax.GradientTransformation,
    precision: Precision,
    *,
    seed: int = 0,
    block_size: int = 256,
    min_size: int = 4096,
) -> optax.GradientTransformationExtraArgs:
    """Wraps ``inner`` so that each leaf's policy decides its gradient, moments and rounding.

    Per leaf, from its policy:

    * ``grad_dtype``: the gradient is rounded to it before ``inner`` sees it.
    * ``mu_dtype``, ``nu_dtype``: ``inner``'s first and second moments are stored so
      (:func:`~hybrid_jax.optim.moments.with_moment_storage`; int8 is 8-bit block-wise with
      ``block_size`` values per fp32 scale, leaves under ``min_size`` values stay fp32).
    * ``master_dtype`` f32: an fp32 master copy in the optimizer state; ``update`` stochastic or
      kahan: the rounding into a bf16/fp16 parameter
      (:func:`~hybrid_jax.optim.updates.low_precision_updates`).

    Fields left ``None`` leave ``inner`` as it is, so a policy without optimizer keys changes
    nothing. The wrapper must be the outermost transformation (nothing may change its updates
    before ``optax.apply_updates``).

    Args:
      inner: any Optax transformation, e.g. ``optax.adamw(...)`` or ``by_path(...)``.
      precision: a policy, policy string, ``PrecisionRules`` or plan for the parameters.
      seed: the seed of stochastic rounding's random bits.
      block_size, min_size: for 8-bit moments.

    Returns:
      A :class:`PrecisionAware` ``optax.GradientTransformationExtraArgs``; its ``update`` needs
      ``params``.

    Examples:
      >>> tx = with_precision(optax.adam(1e-3), "p=bf16,c=bf16,o=bf16,nu=bf16,update=kahan")
      >>> state = tx.init({"w": jnp.ones(3, jnp.bfloat16)})
      >>> state.compensation["w"].dtype, state.inner_state[0].nu["w"].dtype
      (dtype(bfloat16), dtype(bfloat16))

    References:
      Zamirai et al., 2020, `Revisiting BFloat16 Training <https://arxiv.org/abs/2010.06192>`_;
      Dettmers et al., 2021, `8-bit Optimizers via Block-wise Quantization
      <https://arxiv.org/abs/2110.02861>`_.
    """
    inner = optax.with_extra_args_support(inner)

    def build(params):
        policies, treedef = _policies(params, precision)
        unflatten = lambda leaves: jax.tree_util.tree_unflatten(treedef, leaves)
        tx = inner
        grad_dtypes = [p.grad_dtype for p in policies]
        if any(d is not None for d in grad_dtypes):
            tx = optax.chain(_cast_grads(grad_dtypes), tx)
        mu = [_moment_spec(p.mu_dtype) for p in policies]
        nu = [_moment_spec(p.nu_dtype) for p in policies]
        if any(s is not None for s in mu + nu):
            tx = with_moment_storage(
                tx, mu=unflatten(mu), nu=unflatten(nu), block_size=block_size, min_size=min_size
            )
        rounding = [
            "master" if p.master_dtype is not None else (p.update or "nearest") for p in policies
        ]
        if any(r != "nearest" for r in rounding):
            tx = low_precision_updates(tx, unflatten(rounding), seed=seed)
        return optax.with_extra_args_support(tx)

    def init_fn(params):
        return build(params).init(params)

    def update_fn(updates, state, params=None, **extra_args):
        if params is None:
            raise ValueError(
                "with_precision needs the params: call tx.update(grads, state, params)"
            )
        return build(params).update(updates, state, params, **extra_args)

    return PrecisionAware(init_fn, update_fn)
