"""Precision rules that reach the matmuls of a user's Linen model: fp8 and int8 ``nn.Dense``.

The Linen counterpart of :func:`~hybrid_jax.models.quantize_matmuls`. Linen modules are
rebuilt at every ``apply``, so there is nothing to install: :func:`quantize_linen_matmuls` reads
the plan once and returns a method interceptor (``flax.linen.intercept_methods``) under which
each ``nn.Dense`` and ``nn.DenseGeneral`` whose kernel's compute dtype is e4m3, e5m2 or int8 runs
with the matching ``dot_general``. Every ``Dense``/``DenseGeneral`` runs under a
``jax.named_scope`` of its layer path, so that the compiled HLO names it (the audit). The
numerics are those of the NNX hook: the same :func:`~hybrid_jax.precision.dot_general_for`.
Delayed fp8 scaling needs amax histories carried between steps, which an interceptor has nowhere
to keep, so it is NNX-only.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import jax
from flax import linen as nn

from hybrid_jax import tree as tree_lib
from hybrid_jax.models.matmuls import FP8_SCALINGS, ScopedDot, unreachable_error
from hybrid_jax.precision import (
    Precision,
    dot_general_for,
    dtypes,
    is_policy,
    plan,
    policies_with_paths,
)

# The Linen layers whose matmul goes through a `dot_general` field.
LINEN_LAYERS = (nn.Dense, nn.DenseGeneral)


class LinenMatmuls(NamedTuple):
    """What :func:`quantize_linen_matmuls` gives: the cast plan and the interceptor to apply under.

    Attributes:
      plan: the plan to cast with (``cast_to_compute(variables, plan)``), shaped like the
        variables: the precision's plan, with the compute dtype of each kernel whose matmul
        quantizes replaced by its carrier dtype (the matmul rounds that kernel itself).
      intercept: ``with intercept(): model.apply(...)`` runs the quantized matmuls. Enter it
        inside the function that ``jax.jit`` traces (or around the call that traces it).
    """

    plan: Any
    intercept: Callable[[], contextlib.AbstractContextManager]


@contextlib.contextmanager
def _dot_general(module: nn.Module, dot: Any) -> Iterator[None]:
    # A bound Linen module is a frozen dataclass rebuilt at each apply; swapping its field for
    # the duration of one call is what `clone(dot_general=...)` would do, without a new scope.
    saved = module.dot_general, module.dot_general_cls
    object.__setattr__(module, "dot_general", dot)
    object.__setattr__(module, "dot_general_cls", None)
    try:
        yield
    finally:
        object.__setattr__(module, "dot_general", saved[0])
        object.__setattr__(module, "dot_general_cls", saved[1])


def quantize_linen_matmuls(
    variables: Any, precision: Precision, *, fp8_scaling: str = "current"
) -> LinenMatmuls:
    """Makes each Linen ``Dense``/``DenseGeneral`` multiply in its kernel's compute dtype.

    The rules match the paths of ``variables`` as :func:`~hybrid_jax.precision.plan` renders them:
    ``"params/Dense_0/kernel"`` for the dict ``model.init`` returns, ``"Dense_0/kernel"`` for its
    ``"params"`` collection alone. Pass the tree you will pass to ``apply``.

    Args:
      variables: the model's variables (``model.init(...)``) or their ``"params"`` collection.
      precision: a policy, policy string, ``PrecisionRules`` or plan for ``variables``.
      fp8_scaling: ``"current"`` only (per-tensor amax of this step); see the module docstring.

    Returns:
      A :class:`LinenMatmuls` ``(plan, intercept)``.

    Raises:
      ValueError: ``fp8_scaling`` other than ``"current"``. Under ``intercept()``, when the model
        runs: fp8/int8 asked of the ``kernel`` of a module that is not ``Dense``/``DenseGeneral``
        (``nn.Conv``, ``nn.Einsum``, a custom layer), or a ``Dense`` whose kernel has no policy
        (variables other than those planned); the message names the path and the module's kind.

    Examples:
      >>> import flax.linen as nn
      >>> from hybrid_jax.precision import PrecisionRules, cast_to_compute
      >>> model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(2)])
      >>> x = jnp.ones((4, 3), jnp.bfloat16)
      >>> variables = model.init(jax.random.key(0), x)
      >>> rules = PrecisionRules([("layers_0/", "fp8-mixed")], default="bf16-mixed")
      >>> matmuls = quantize_linen_matmuls(variables, rules)
      >>> matmuls.plan["params"]["layers_0"]["kernel"]  # rounded by the matmul
      Policy.parse('p=f32,c=bf16,o=f32')
      >>> with matmuls.intercept():
      ...   y = model.apply(cast_to_compute(variables, matmuls.plan), x)
      >>> y.dtype
      dtype(bfloat16)
    """
    if fp8_scaling not in FP8_SCALINGS:
        raise ValueError(f"fp8_scaling must be one of {FP8_SCALINGS}, got {fp8_scaling!r}")
    if fp8_scaling != "current":
        raise ValueError(
            "quantize_linen_matmuls supports fp8_scaling='current' only: delayed scaling keeps "
            "amax histories between steps, which Linen layers have nowhere to hold. Use "
            "fp8_scaling='current', or an NNX model with hybrid_jax.models.quantize_matmuls"
        )
    policies = plan(variables, precision)
    by_path = dict(policies_with_paths(policies))
    prefix = "params/" if isinstance(variables, Mapping) and "params" in variables else ""
    quantized = {p for p, policy in by_path.items() if _quantized(p, policy.compute_dtype)}

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name == "setup" or module.scope is None:
            return next_fun(*args, **kwargs)
        layer = prefix + "/".join(module.path)
        kernel = f"{layer}/kernel" if module.path else f"{prefix}kernel"
        is_layer = isinstance(module, LINEN_LAYERS)
        if kernel not in by_path:
            if is_layer:
                raise ValueError(
                    f"the precision plan has no policy for {kernel!r} ({type(module).__name__}); "
                    "pass quantize_linen_matmuls the same variables that you pass to apply "
                    f"(the plan's paths start {next(iter(by_path), '')!r})"
                )
            return next_fun(*args, **kwargs)
        compute = by_path[kernel].compute_dtype
        if kernel in quantized and not is_layer:
            raise unreachable_error(kernel, layer, type(module).__name__, compute)
        if not is_layer or (kernel not in quantized and module.dot_general_cls is not None):
            return next_fun(*args, **kwargs)
        if kernel in quantized:
            dot = dot_general_for(compute)
        else:  # the layer's own matmul, only named: the audit then finds every layer's dots
            dot = module.dot_general or jax.lax.dot_general
        scope = layer.rstrip("/") or type(module).__name__  # the model itself is a Dense
        with _dot_general(module, ScopedDot(dot, scope)):
            return next_fun(*args, **kwargs)

    def for_cast(kp, policy):
        if tree_lib.path_str(kp) in quantized:
            return dataclasses.replace(policy, compute_dtype=policy.carrier_dtype)
        return policy

    cast_plan = jax.tree_util.tree_map_with_path(for_cast, policies, is_leaf=is_policy)
    return LinenMatmuls(cast_plan, lambda: nn.intercept_methods(interceptor))


def _quantized(path: str, compute: Any) -> bool:
    return path.rpartition("/")[2] == "kernel" and compute in dtypes.QUANTIZED
