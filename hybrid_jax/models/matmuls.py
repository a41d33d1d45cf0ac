"""Precision rules that reach the matmuls: per-layer fp8 and int8 ``dot_general`` for NNX models.

A precision rule such as ``(r"blocks/.*/mlp/.*kernel", "fp8-mixed")`` casts those kernels; with
:func:`quantize_matmuls` it also makes the layers that own them multiply in fp8 (activations in
e4m3, gradients in e5m2) or int8, while every other layer keeps its ``lax.dot_general``. A layer
takes part when it has a ``dot_general`` attribute and a ``kernel`` or ``embedding`` parameter:
the bundled GPT's ``Linear`` and its tied-head ``Embed``, and a user's own ``nnx.Linear`` and
``nnx.LinearGeneral``; ``nnx.Einsum`` takes part through its ``einsum_op`` (:class:`ScopedEinsum`).
The rule for that parameter decides. A layer with a ``kernel`` but no such hook (``nnx.Conv``)
cannot be reached: a rule asking it for fp8 or int8 is an error, never a silent bf16 matmul.
Linen models: :mod:`hybrid_jax.models.linen_matmuls`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from hybrid_jax import tree as tree_lib
from hybrid_jax.precision import (
    WEIGHT_NAMES,
    Precision,
    dot_general_for,
    dtypes,
    fp8_dot_general_delayed,
    fp8_meta,
    is_policy,
    plan,
    policies_with_paths,
)

FP8_SCALINGS = ("current", "delayed")


class Fp8Meta(nnx.Variable):
    """The amax history of one operand of a delayed-scaling fp8 matmul.

    Not a parameter: the optimizer never sees it. ``nnx.split(model, nnx.Param, Fp8Meta)``
    separates these histories, which live in ``TrainState.fp8_meta`` and which the train step
    replaces with their new values every step.
    """


class DelayedFp8DotGeneral(nnx.Module):
    """A ``dot_general`` with delayed fp8 scaling that owns its amax histories.

    Args:
      history_length: steps of amax history per operand.
      forward_dtype, backward_dtype: the fp8 formats of the operands and of the gradient.
      scope: a ``jax.named_scope`` to run under (the layer's path, so that the compiled HLO
        names the layer), or None.

    Examples:
      >>> dot = DelayedFp8DotGeneral(history_length=4)
      >>> dot(jnp.ones((2, 3)), jnp.ones((3, 4)), (((1,), (0,)), ((), ()))).shape
      (2, 4)
      >>> dot.rhs_history[...].shape
      (4,)
    """

    def __init__(
        self,
        history_length: int = 16,
        forward_dtype: Any = "e4m3",
        backward_dtype: Any = "e5m2",
        scope: str | None = None,
    ):
        meta = fp8_meta(history_length)
        self.lhs_history = Fp8Meta(meta["lhs"])
        self.rhs_history = Fp8Meta(meta["rhs"])
        self.grad_history = Fp8Meta(meta["grad"])
        self.forward_dtype = dtypes.short_name(dtypes.parse_dtype(forward_dtype))
        self.backward_dtype = dtypes.short_name(dtypes.parse_dtype(backward_dtype))
        self.scope = scope

    def __call__(
        self,
        lhs: jax.Array,
        rhs: jax.Array,
        dimension_numbers: Any,
        precision: Any = None,
        preferred_element_type: Any = None,
        out_sharding: Any = None,
    ) -> jax.Array:
        _check_no_out_sharding(out_sharding, self.scope)
        with _named_scope(self.scope):
            return self._dot(lhs, rhs, dimension_numbers, precision, preferred_element_type)

    def _dot(self, lhs, rhs, dimension_numbers, precision, preferred_element_type):
        meta = {
            "lhs": self.lhs_history[...],
            "rhs": self.rhs_history[...],
            "grad": self.grad_history[...],
        }
        return fp8_dot_general_delayed(
            lhs,
            rhs,
            dimension_numbers,
            precision,
            preferred_element_type,
            meta=meta,
            forward_dtype=self.forward_dtype,
            backward_dtype=self.backward_dtype,
        )


def _named_scope(scope: str | None) -> Any:
    return jax.named_scope(scope) if scope else contextlib.nullcontext()


def _check_no_out_sharding(out_sharding: Any, scope: str | None) -> None:
    # Flax layers forward `out_sharding` (None unless the caller shards the output); the fp8 and
    # int8 matmuls place their result like `lax.dot_general` does and cannot honour one.
    if out_sharding is not None:
        raise ValueError(
            f"layer {scope!r}: a quantized matmul cannot take out_sharding={out_sharding!r}; "
            "call the layer without out_sharding or give its kernel a non-quantized policy"
        )


@dataclasses.dataclass(frozen=True)
class ScopedDot:
    """A Flax layer's ``dot_general``: ``dot`` under the layer path's ``jax.named_scope``.

    Flax's own layers open no name scope of their path, so without one the compiled HLO could not
    tell which layer a dot belongs to (:func:`hybrid_jax.diagnostics.audit`). Frozen and compared
    by value, so that two splits of one model give equal graph definitions (no retrace).

    Args:
      dot: a function with ``lax.dot_general``'s signature, e.g. from
        :func:`~hybrid_jax.precision.dot_general_for`.
      scope: the layer's path, e.g. ``"layers/0"``.

    Examples:
      >>> dot = ScopedDot(jax.lax.dot_general, "fc")
      >>> dot(jnp.ones((2, 3)), jnp.ones((3, 4)), (((1,), (0,)), ((), ()))).shape
      (2, 4)
    """

    dot: Any
    scope: str

    def __call__(
        self,
        lhs: jax.Array,
        rhs: jax.Array,
        dimension_numbers: Any,
        precision: Any = None,
        preferred_element_type: Any = None,
        out_sharding: Any = None,
    ) -> jax.Array:
        # Only what the caller gave: a user's own `dot_general` may not take every keyword.
        kwargs = {"precision": precision}
        if preferred_element_type is not None:
            kwargs["preferred_element_type"] = preferred_element_type
        if self.dot is jax.lax.dot_general:
            kwargs["out_sharding"] = out_sharding
        else:
            _check_no_out_sharding(out_sharding, self.scope)
        with jax.named_scope(self.scope):
            return self.dot(lhs, rhs, dimension_numbers, **kwargs)


@dataclasses.dataclass(frozen=True)
class ScopedEinsum:
    """An ``nnx.Einsum``'s ``einsum_op``: :func:`jax.numpy.einsum` whose products run through
    ``dot`` under the layer path's name scope (a :class:`ScopedDot`).

    ``jnp.einsum`` lowers a two-operand einsum to one ``dot_general`` (possibly with the operands
    swapped, which fp8's per-tensor and int8's per-channel scales do not mind). Frozen and
    compared by value, as :class:`ScopedDot`.

    Examples:
      >>> op = ScopedEinsum(jax.lax.dot_general, "mix")
      >>> op("bi,io->bo", jnp.ones((2, 3)), jnp.ones((3, 4))).shape
      (2, 4)
    """

    dot: Any
    scope: str

    def __call__(self, subscripts: str, *operands: jax.Array, **kwargs: Any) -> jax.Array:
        return jnp.einsum(
            subscripts, *operands, _dot_general=ScopedDot(self.dot, self.scope), **kwargs
        )


def unreachable_error(weight_path: str, layer_path: str, kind: str, compute: Any) -> ValueError:
    """The error for a rule that asks a layer without a ``dot_general`` hook for fp8 or int8."""
    return ValueError(
        f"the precision rules ask {dtypes.short_name(compute)} compute of {weight_path!r}, but "
        f"its layer {layer_path or '<model>'!r} ({kind}) has no dot_general hook through which "
        "a quantized matmul can run, so it would silently multiply in the carrier dtype. Only "
        "Linear/LinearGeneral/Einsum (NNX), Dense/DenseGeneral (Linen) and layers with a "
        "`dot_general` attribute can quantize; put a rule such as "
        f"(r'^{re.escape(weight_path)}$', 'bf16-mixed') ahead of the others, or replace the layer"
    )


# Flax's own layers with a `dot_general` hook. Their matmul runs under a ScopedDot, which opens
# the name scope and takes `out_sharding`; nnx.LinearGeneral's `dot_general=None` means lax's.
_FLAX_HOOKED = (nnx.Linear, nnx.LinearGeneral)


def _matmul_layers(model: nnx.Module) -> list[tuple[str, nnx.Module, str]]:
    """``(layer path, layer, weight name)`` of every layer with a matmul weight.

    A layer whose ``dot_general`` is None (the GPT's position embedding) is only looked up and
    left out; a layer with a ``kernel`` and no hook at all is listed, for the caller to refuse.
    """
    layers = []
    for path, node in nnx.iter_graph(model):
        if not isinstance(node, nnx.Module):
            continue
        weights = [n for n in WEIGHT_NAMES if isinstance(getattr(node, n, None), nnx.Param)]
        hooked = isinstance(node, (*_FLAX_HOOKED, nnx.Einsum)) or (
            getattr(node, "dot_general", None) is not None
        )
        if weights and (hooked or (weights[0] == "kernel" and not hasattr(node, "dot_general"))):
            layers.append(("/".join(str(k) for k in path), node, weights[0]))
    return layers


def quantize_matmuls(
    model: nnx.Module,
    precision: Precision,
    *,
    fp8_scaling: str = "current",
    history_length: int = 16,
) -> Any:
    """Gives each layer the matmul its weight's compute dtype asks for; returns the cast plan.

    For every layer with a ``dot_general`` hook (the GPT's layers, ``nnx.Linear``,
    ``nnx.LinearGeneral``; ``nnx.Einsum`` through its ``einsum_op``), the policy of its
    ``kernel`` (or ``embedding``) decides: compute e4m3 or e5m2 installs an fp8 matmul (current
    scaling, or with ``fp8_scaling="delayed"`` a :class:`DelayedFp8DotGeneral` with its own
    :class:`Fp8Meta` histories), int8 installs
    :func:`~hybrid_jax.precision.matmul.int8_dot_general`, any other dtype restores
    :func:`jax.lax.dot_general`. Flax's own layers get it wrapped in a :class:`ScopedDot` (their
    path as a name scope, for the audit; an Einsum's in a :class:`ScopedEinsum`). The model is
    changed in place, as NNX modules are.

    The returned plan is the one to train with (``make_train_step(precision=plan)``): it is
    ``precision``'s plan with the compute dtype of each weight whose matmul now quantizes replaced
    by the policy's carrier dtype, since the matmul rounds that weight itself (a per-tensor int8
    cast first would undo the per-channel scales of the int8 matmul).

    Args:
      model: an NNX module, e.g. :class:`~hybrid_jax.models.GPT`.
      precision: a policy, policy string, ``PrecisionRules`` or plan for ``nnx.state(model,
        nnx.Param)``.
      fp8_scaling: ``"current"`` (per-tensor amax of this step, stateless) or ``"delayed"``.
      history_length: the amax history length for delayed scaling.

    Returns:
      A plan (a tree of ``Policy`` shaped like the model's ``nnx.Param`` state).

    Raises:
      ValueError: an unknown ``fp8_scaling``, a plan that does not fit the model, fp8/int8
        asked of a ``kernel`` whose layer has no ``dot_general`` hook (``nnx.Conv``) or whose
        ``dot_general_cls`` would override it, or delayed fp8 scaling asked of an
        ``nnx.Einsum`` (its ``einsum_op`` is static and cannot hold amax histories); the
        message names the path and the layer's kind.

    Examples:
      >>> from hybrid_jax.models import GPT, GPTConfig
      >>> from hybrid_jax.precision import PrecisionRules
      >>> model = GPT(GPTConfig(vocab_size=8, n_layer=1, n_head=1, n_embd=8), rngs=nnx.Rngs(0))
      >>> rules = PrecisionRules([(r"mlp/.*kernel", "fp8-mixed")], default="bf16-mixed")
      >>> cast_plan = quantize_matmuls(model, rules)
      >>> model.blocks[0].mlp.fc.dot_general.func.__name__
      'fp8_dot_general'
      >>> cast_plan["blocks"][0]["mlp"]["fc"]["kernel"].get_value()  # rounded by the matmul
      Policy.parse('p=f32,c=bf16,o=f32')
    """
    if fp8_scaling not in FP8_SCALINGS:
        raise ValueError(f"fp8_scaling must be one of {FP8_SCALINGS}, got {fp8_scaling!r}")
    params = nnx.state(model, nnx.Param)
    policies = plan(params, precision)
    by_path = dict(policies_with_paths(policies))
    quantized = set()
    for layer_path, layer, weight in _matmul_layers(model):
        path = f"{layer_path}/{weight}" if layer_path else weight
        if path not in by_path:
            raise ValueError(f"the precision plan has no policy for {path!r}")
        compute = by_path[path].compute_dtype
        delayed = (
            compute in dtypes.QUANTIZED and compute != dtypes.INT8 and fp8_scaling == "delayed"
        )
        if isinstance(layer, nnx.Einsum):
            if delayed:
                raise ValueError(
                    f"{path!r}: delayed fp8 scaling cannot reach an nnx.Einsum layer (its "
                    "einsum_op is static and holds no amax history); use fp8_scaling='current' "
                    "or an nnx.Linear/LinearGeneral layer"
                )
            layer.einsum_op = nnx.static(ScopedEinsum(dot_general_for(compute), layer_path))
            if compute in dtypes.QUANTIZED:
                quantized.add(path)
            continue
        flax_layer = isinstance(layer, _FLAX_HOOKED)
        if compute in dtypes.QUANTIZED and (
            not (flax_layer or hasattr(layer, "dot_general"))
            or getattr(layer, "dot_general_cls", None) is not None  # would win over ours
        ):
            raise unreachable_error(path, layer_path, type(layer).__qualname__, compute)
        if not (flax_layer or hasattr(layer, "dot_general")):
            continue  # no hook, and none needed: the kernel is cast, the matmul is lax's
        scope = layer_path if flax_layer else None
        # A module holding histories is data (its state is split out); a function is static.
        if delayed:
            dot = DelayedFp8DotGeneral(history_length, compute, scope=scope)
            layer.dot_general = nnx.data(dot)
        else:
            dot = dot_general_for(compute)
            layer.dot_general = nnx.static(ScopedDot(dot, scope) if flax_layer else dot)
        if compute in dtypes.QUANTIZED:
            quantized.add(path)

    def for_cast(kp, policy):
        if tree_lib.path_str(kp) in quantized:
            return dataclasses.replace(policy, compute_dtype=policy.carrier_dtype)
        return policy

    return jax.tree_util.tree_map_with_path(for_cast, policies, is_leaf=is_policy)
