"""A precision audit of a compiled step: each layer's dots against the compute dtype its plan asks.

:func:`expected_from_plan` turns a precision plan into ``{layer path: compute dtype}``;
:func:`audit` tabulates the dots :func:`~hybrid_jax.diagnostics.dots.hlo_dots` finds and flags a
layer's forward dots that do not compute in that dtype.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from hybrid_jax._table import Table
from hybrid_jax.diagnostics._common import dtype_label
from hybrid_jax.diagnostics.dots import PASSES, HloDot, hlo_dots
from hybrid_jax.precision import WEIGHT_NAMES, dtypes, is_policy, policies_with_paths


def expected_from_plan(
    plan: Any, weight_names: Sequence[str] = WEIGHT_NAMES
) -> dict[str, np.dtype]:
    """The compute dtype a precision plan asks of each layer: ``{layer path: dtype}``.

    A layer is the path of a weight named ``kernel`` or ``embedding`` without that last
    component (``blocks/0/mlp/fc/kernel`` -> ``blocks/0/mlp/fc``); other leaves (biases,
    LayerNorm scales) have no matmul of their own and are left out. Pass the precision's own plan
    (``hybrid_jax.precision.plan(params, precision)``), not the cast plan
    :func:`~hybrid_jax.models.quantize_matmuls` returns, which gives the carrier dtype (bf16) to
    weights whose matmuls quantize them.

    Args:
      plan: a tree of :class:`~hybrid_jax.precision.Policy` (dicts, lists, an NNX ``State``).
      weight_names: the leaf names that are a layer's matmul weight; the first found wins.

    Returns:
      A dict from layer path to its policy's compute dtype.

    Raises:
      TypeError: a leaf of ``plan`` is not a ``Policy``.

    Examples:
      >>> from hybrid_jax.precision import PrecisionRules
      >>> params = {"mlp": {"fc": {"kernel": jnp.zeros((4, 8)), "bias": jnp.zeros(8)}},
      ...           "tok_embed": {"embedding": jnp.zeros((10, 4))}}
      >>> rules = PrecisionRules([("mlp/", "fp8-mixed")], default="bf16-mixed")
      >>> {k: v.name for k, v in expected_from_plan(rules.plan(params)).items()}
      {'mlp/fc': 'float8_e4m3fn', 'tok_embed': 'bfloat16'}
    """
    expected = {}
    for path, policy in policies_with_paths(plan):
        if not is_policy(policy):
            raise TypeError(
                f"expected_from_plan needs a tree of Policy; the leaf at {path!r} is "
                f"{type(policy).__name__}. Build one with hybrid_jax.precision.plan(params, "
                "precision)"
            )
        layer, _, weight = path.rpartition("/")
        if weight in weight_names and layer and layer not in expected:
            expected[layer] = policy.compute_dtype
    return expected


def _check_expected(expected: Mapping[str, Any]) -> dict[str, np.dtype]:
    if not isinstance(expected, Mapping):
        raise TypeError(
            "expected must map layer paths to compute dtypes ({'blocks/0/mlp/fc': 'bf16'}), got "
            f"{type(expected).__name__}; expected_from_plan(plan) builds it from a precision plan"
        )
    checked = {}
    for layer, dtype in expected.items():
        if is_policy(dtype):
            raise TypeError(
                f"expected[{layer!r}] is a Policy, not a dtype: build the mapping with "
                "expected_from_plan(plan)"
            )
        try:
            checked[str(layer)] = dtypes.parse_dtype(dtype)
        except ValueError as e:
            raise ValueError(f"expected[{layer!r}]: {e}") from None
    return checked


def audit(compiled: Any, expected: Mapping[str, Any]) -> Table:
    """A table of a compiled program's matrix products against the compute dtypes expected.

    One row per dot (:func:`hlo_dots`): its layer, pass, the dtypes its operands have and come
    from, its result (accumulation) dtype and the expected compute dtype of its layer. A
    layer's **forward** dots are flagged ``mismatch`` when they do not compute in the expected
    dtype (:meth:`HloDot.computes_in`): bf16 expected but an operand is f32 (an uncast kernel),
    fp8 expected but no fp8 convert feeds an operand (a silent fallback, flax#4686), int8
    expected but the operands are not s8. On XLA:CPU, which has no bf16 or fp8 GEMM, the dot
    itself reads f32 in both cases; the check is on the source dtypes. Backward dots are listed,
    not checked: their gradient operand's format is the backward dtype (e5m2 for fp8), not the
    layer's compute dtype. Dots without a layer (attention's two products) and the optimizer's
    (Muon's Newton-Schulz products, layer ``optimizer (muon)``, pass ``update``) are listed
    unflagged.

    Rows run forward, backward, then update, layers in the order of ``expected``. The footer names
    expected layers with no dot at all (an embedding only looked up, or a matmul that lost its
    ``op_name``) and counts the mismatches.

    Args:
      compiled: a ``jax.stages.Compiled`` or its ``as_text()``.
      expected: ``{layer path: compute dtype}``, e.g. :func:`expected_from_plan` of a plan.

    Returns:
      A :class:`~hybrid_jax._table.Table` with columns ``dot, layer, pass, operands, source,
      result, shape, expected, mismatch``; ``table.column("mismatch")`` gives the flags.

    Raises:
      TypeError, ValueError: as :func:`hlo_dots`; ``expected`` not a mapping of dtypes.

    Examples:
      >>> def layer(x, w):
      ...   with jax.named_scope("mlp/fc"):
      ...     return x @ w  # fp32: nobody cast to bf16
      >>> compiled = jax.jit(layer).lower(jnp.ones((8, 16)), jnp.ones((16, 32))).compile()
      >>> table = audit(compiled, {"mlp/fc": "bf16"})
      >>> table.column("layer"), table.column("source"), table.column("mismatch")
      (['mlp/fc'], ['f32 x f32'], [True])
    """
    expected = _check_expected(expected)
    dots = hlo_dots(compiled, layers=expected)
    order = {layer: i for i, layer in enumerate(expected)}

    def sort_key(dot: HloDot):
        known = dot.layer in order
        return (
            PASSES.index(dot.pass_),
            dot.layer is None,
            not known,
            order.get(dot.layer, 0),
            dot.layer or "",
            dot.name,
        )

    rows, flagged = [], 0
    for dot in sorted(dots, key=sort_key):
        want = expected.get(dot.layer) if dot.layer is not None else None
        mismatch = dot.pass_ == "forward" and want is not None and not dot.computes_in(want)
        flagged += mismatch
        rows.append(
            (
                dot.name,
                dot.layer or "-",
                dot.pass_,
                " x ".join(dtype_label(d) for d in dot.operand_dtypes),
                " x ".join(dtype_label(d) for d in dot.source_dtypes),
                dtype_label(dot.result_dtype),
                dot.result_shape,
                dtype_label(want),
                mismatch,
            )
        )
    columns = ("dot", "layer", "pass", "operands", "source", "result", "shape", "expected")
    columns += ("mismatch",)
    seen = {dot.layer for dot in dots}
    footer = [
        ("no dot", layer, "", "", "", "", "", dtype_label(dtype), False)
        for layer, dtype in expected.items()
        if layer not in seen
    ]
    footer.append(("total", f"{len(rows)} dots", "", "", "", "", "", "", flagged))
    return Table(columns, tuple(rows), tuple(footer))


def audit_step(step: Any, args: Sequence[Any], expected: Mapping[str, Any]) -> Table:
    """:func:`audit` of a jitted function compiled for ``args``: ``step.lower(*args).compile()``.

    Compiling does not run the step, so donated arguments stay valid.

    Args:
      step: a ``jax.jit``-ed function, e.g. ``hybrid_jax.app.run.build(config).step``.
      args: its positional arguments (``(state, batch)`` for a train step).
      expected: ``{layer path: compute dtype}``, e.g. :func:`expected_from_plan` of a plan.

    Returns:
      The table :func:`audit` gives.

    Raises:
      TypeError: ``step`` is not jitted (has no ``lower``); otherwise as :func:`audit`.
    """
    if not callable(getattr(step, "lower", None)):
        raise TypeError(
            f"audit_step needs a jitted function (jax.jit(f)), got {type(step).__name__}: "
            "its optimized HLO is what the audit reads"
        )
    return audit(step.lower(*args).compile(), expected)
