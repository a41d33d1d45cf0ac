"""Precision rules that reach the matmuls: per-layer fp8 and int8 ``dot_general`` for NNX models.

A precision rule such as ``(r"blocks/.*/mlp/.*kernel", "fp8-mixed")`` casts those kernels; with
:func:`quantize_matmuls` it also makes the layers that own them multiply in fp8 (activations in
e4m3, gradients in e5m2) or int8, while every other layer keeps its ``lax.dot_general``. A layer
takes part when it has a ``dot_general`` attribute and a ``kernel`` or ``embedding`` parameter
(the bundled GPT's ``Linear`` and its tied-head ``Embed``); the rule for that parameter decides.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
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

    Examples:
      >>> dot = DelayedFp8DotGeneral(history_length=4)
      >>> dot(jnp.ones((2, 3)), jnp.ones((3, 4)), (((1,), (0,)), ((), ()))).shape
      (2, 4)
      >>> dot.rhs_history[...].shape
      (4,)
    """

    def __init__(
        self, history_length: int = 16, forward_dtype: Any = "e4m3", backward_dtype: Any = "e5m2"
    ):
        meta = fp8_meta(history_length)
        self.lhs_history = Fp8Meta(meta["lhs"])
        self.rhs_history = Fp8Meta(meta["rhs"])
        self.grad_history = Fp8Meta(meta["grad"])
        self.forward_dtype = dtypes.short_name(dtypes.parse_dtype(forward_dtype))
        self.backward_dtype = dtypes.short_name(dtypes.parse_dtype(backward_dtype))

    def __call__(
        self,
        lhs: jax.Array,
        rhs: jax.Array,
        dimension_numbers: Any,
        precision: Any = None,
        preferred_element_type: Any = None,
    ) -> jax.Array:
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


def _matmul_layers(model: nnx.Module) -> list[tuple[str, nnx.Module, str]]:
    """``(layer path, layer, weight name)`` of every layer with a ``dot_general`` hook."""
    layers = []
    for path, node in nnx.iter_graph(model):
        if not (isinstance(node, nnx.Module) and getattr(node, "dot_general", None) is not None):
            continue
        weights = [n for n in WEIGHT_NAMES if isinstance(getattr(node, n, None), nnx.Param)]
        if weights:
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

    For every layer with a ``dot_general`` hook, the policy of its ``kernel`` (or ``embedding``)
    decides: compute e4m3 or e5m2 installs an fp8 matmul (current scaling, or with
    ``fp8_scaling="delayed"`` a :class:`DelayedFp8DotGeneral` with its own :class:`Fp8Meta`
    histories), int8 installs :func:`~hybrid_jax.precision.matmul.int8_dot_general`, any other
    dtype restores :func:`jax.lax.dot_general`. The model is changed in place, as NNX modules are.

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
      ValueError: an unknown ``fp8_scaling``, or a plan that does not fit the model.

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
        # A module holding histories is data (its state is split out); a function is static.
        if compute in dtypes.QUANTIZED and compute != dtypes.INT8 and fp8_scaling == "delayed":
            layer.dot_general = nnx.data(DelayedFp8DotGeneral(history_length, compute))
        else:
            layer.dot_general = nnx.static(dot_general_for(compute))
        if compute in dtypes.QUANTIZED:
            quantized.add(path)

    def for_cast(kp, policy):
        if tree_lib.path_str(kp) in quantized:
            return dataclasses.replace(policy, compute_dtype=policy.carrier_dtype)
        return policy

    return jax.tree_util.tree_map_with_path(for_cast, policies, is_leaf=is_policy)
