"""Per-parameter precision: path rules that give each leaf a Policy, and the casts they drive."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, TypeVar

import jax
import numpy as np

from hybrid_jax import tree as tree_lib
from hybrid_jax._table import Table, format_bytes
from hybrid_jax.precision import dtypes
from hybrid_jax.precision.policy import Policy, cast_floating, cast_leaf
from hybrid_jax.precision.storage import Int8Weight

T = TypeVar("T")


@dataclasses.dataclass(frozen=True, init=False)
class PrecisionRules:
    """Chooses a ``Policy`` for each leaf of a parameter tree by ordered path rules.

    Each rule is ``(pattern, policy)``: ``pattern`` a regular expression searched in the leaf's
    path (``re.search``; see :mod:`hybrid_jax.tree`), ``policy`` a :class:`Policy` or any string
    :meth:`Policy.parse` accepts. The first matching rule decides a leaf. Frozen and hashable, so
    it can be a static argument of ``jax.jit``.

    Args:
      rules: ``[(pattern, policy_or_string), ...]`` in priority order.
      default: the policy of leaves no rule matches; without one such leaves are an error.
      strict: make a rule that decides no leaf, or a leaf two rules match, an error (otherwise an
        unused rule is a :class:`~hybrid_jax.tree.UnusedRuleWarning`).

    Examples:
      >>> rules = PrecisionRules([(r"embed", "fp32"), (r"mlp/", "fp8-mixed")], default="bf16-mixed")
      >>> params = {"embed": jnp.zeros((8, 4)), "mlp": {"kernel": jnp.zeros((4, 4))}}
      >>> rules.plan(params)["mlp"]["kernel"]
      Policy.parse('p=f32,c=e4m3,o=f32')
      >>> print(rules.summary(params))
      path        shape   size  rule   param  compute  output  bytes
      ----------  ------  ----  -----  -----  -------  ------  -----
      embed       (8, 4)  32    embed  f32    f32      f32     128 B
      mlp/kernel  (4, 4)  16    mlp/   f32    e4m3     f32     64 B
      ----------  ------  ----  -----  -----  -------  ------  -----
      total               48                                  192 B
    """

    rules: tuple[tree_lib.Rule[Policy], ...]
    default: Policy | None
    strict: bool

    def __init__(
        self,
        rules: Sequence[tuple[str, Policy | str]],
        default: Policy | str | None = None,
        strict: bool = False,
    ):
        compiled = tree_lib.compile_rules(rules, kind="precision rule")
        checked = []
        for i, rule in enumerate(compiled):
            try:
                policy = Policy.parse(rule.value)
            except (TypeError, ValueError) as e:
                raise type(e)(f"precision rule {i} ({rule.pattern!r}): {e}") from None
            checked.append(dataclasses.replace(rule, value=policy))
        object.__setattr__(self, "rules", tuple(checked))
        object.__setattr__(self, "default", None if default is None else Policy.parse(default))
        object.__setattr__(self, "strict", bool(strict))

    def _indices(self, tree: Any) -> tuple[list[tuple[str, Any]], list[int], Any]:
        flat, treedef = tree_lib.leaves_with_paths(tree)
        indices = tree_lib.match_indices(
            self.rules,
            [path for path, _ in flat],
            has_default=self.default is not None,
            strict=self.strict,
            kind="precision rule",
        )
        return flat, indices, treedef

    def _policy(self, index: int) -> Policy:
        return self.default if index < 0 else self.rules[index].value

    def plan(self, tree: Any) -> Any:
        """A tree shaped like ``tree`` whose leaves are the ``Policy`` of each leaf.

        Raises:
          ValueError: a leaf no rule matches (without a default), or under ``strict`` an unused or
            overlapping rule; the message names the paths and patterns.
        """
        _, indices, treedef = self._indices(tree)
        return jax.tree_util.tree_unflatten(treedef, [self._policy(i) for i in indices])

    def summary(self, tree: Any) -> Table:
        """A table of each leaf's path, shape, deciding rule, three dtypes and bytes at rest.

        Bytes at rest count the param dtype; leaves that are not floating keep their own dtype
        (casts leave them alone). Works on arrays and on ``jax.ShapeDtypeStruct`` leaves, so
        ``jax.eval_shape`` of an initialiser can be summarised without allocating. Leaves that
        are not arrays (Python numbers, an Equinox module's activation function) have no row.
        """
        flat, indices, _ = self._indices(tree)
        rows, total_size, total_bytes = [], 0, 0
        for (path, leaf), index in zip(flat, indices, strict=True):
            if not hasattr(leaf, "dtype"):
                continue
            shape, leaf_dtype = tuple(np.shape(leaf)), np.dtype(leaf.dtype)
            policy = self._policy(index)
            if tree_lib.is_float_leaf(leaf) or isinstance(leaf, Int8Weight):
                names = [
                    dtypes.short_name(d)
                    for d in (policy.param_dtype, policy.compute_dtype, policy.output_dtype)
                ]
                stored = policy.param_dtype
            else:
                names, stored = [leaf_dtype.name] * 3, None
            stored, int8_storage = stored or leaf_dtype, stored == dtypes.INT8
            size = int(np.prod(shape, dtype=np.int64))
            nbytes = size * stored.itemsize
            if int8_storage:  # an Int8Weight: its per-channel fp32 scales too
                nbytes += 4 * (shape[-1] if len(shape) >= 2 else 1)
            total_size, total_bytes = total_size + size, total_bytes + nbytes
            rule = "(default)" if index < 0 else self.rules[index].pattern
            rows.append((path, shape, size, rule, *names, format_bytes(nbytes)))
        columns = ("path", "shape", "size", "rule", "param", "compute", "output", "bytes")
        total = ("total", "", total_size, "", "", "", "", format_bytes(total_bytes))
        return Table(columns, tuple(rows), (total,))


Precision = Policy | PrecisionRules | str | Any
"""A ``Policy`` (every leaf), a policy string, ``PrecisionRules``, or a plan (a tree of
``Policy`` shaped like the parameters, as ``PrecisionRules.plan`` gives)."""


def plan(tree: Any, precision: Precision) -> Any:
    """The plan of ``precision`` for ``tree``: a tree of ``Policy`` shaped like ``tree``."""
    if isinstance(precision, (Policy, str)):
        policy = Policy.parse(precision)
        return jax.tree_util.tree_map(lambda _: policy, tree, is_leaf=tree_lib.is_leaf)
    if isinstance(precision, PrecisionRules):
        return precision.plan(tree)
    return precision


def is_policy(x: Any) -> bool:
    """Whether ``x`` is a :class:`Policy`: the leaves of a plan (``is_leaf`` for tree maps)."""
    return isinstance(x, Policy)


def policies_with_paths(plan_tree: Any) -> list[tuple[str, Policy]]:
    """``[(path, policy), ...]`` of a plan (a tree of ``Policy``), in leaf order.

    Examples:
      >>> policies_with_paths(plan({"fc": {"kernel": jnp.ones(2)}}, "bf16-mixed"))
      [('fc/kernel', Policy.parse('p=f32,c=bf16,o=f32'))]
    """
    flat = jax.tree_util.tree_flatten_with_path(plan_tree, is_leaf=is_policy)[0]
    return [(tree_lib.path_str(keypath), policy) for keypath, policy in flat]


def computes_in(plan_tree: Any, dtype: Any) -> bool:
    """Whether a leaf of a plan (a tree of ``Policy``) computes in ``dtype``, e.g. whether a
    model needs a loss scale (fp16).

    Examples:
      >>> computes_in(plan({"w": jnp.ones(2)}, "fp16-mixed"), jnp.float16)
      True
    """
    return any(p.compute_dtype == np.dtype(dtype) for _, p in policies_with_paths(plan_tree))


def _cast(tree: T, precision: Precision, field: str) -> T:
    storage = field == "param_dtype"
    if isinstance(precision, (Policy, str)):
        policy = Policy.parse(precision)
        return cast_floating(tree, getattr(policy, field), policy.carrier_dtype, storage=storage)
    policies = plan(tree, precision)
    plan_paths = [path for path, _ in policies_with_paths(policies)]
    tree_paths = [path for path, _ in tree_lib.leaves_with_paths(tree)[0]]
    if plan_paths != tree_paths:
        missing = sorted(set(tree_paths) - set(plan_paths))[:5]
        extra = sorted(set(plan_paths) - set(tree_paths))[:5]
        raise ValueError(
            f"the precision plan does not fit the tree: leaves without a policy {missing}, "
            f"policies without a leaf {extra} ({len(tree_paths)} leaves, {len(plan_paths)} "
            "policies)"
        )
    return jax.tree_util.tree_map(
        lambda p, x: cast_leaf(x, getattr(p, field), p.carrier_dtype, storage=storage),
        policies,
        tree,
        is_leaf=is_policy,
    )


def cast_to_param(tree: T, precision: Precision) -> T:
    """Casts each floating leaf of ``tree`` to its param dtype under ``precision``.

    Args:
      tree: any pytree; integer, boolean and non-array leaves pass through.
      precision: a ``Policy`` or policy string (every leaf), ``PrecisionRules``, or a plan.

    Returns:
      A tree like ``tree`` with floating leaves cast.
    """
    return _cast(tree, precision, "param_dtype")


def cast_to_compute(tree: T, precision: Precision) -> T:
    """Casts each floating leaf of ``tree`` to its compute dtype under ``precision``.

    A compute dtype of fp8 or int8 is a scaled quantize-dequantize with a straight-through
    gradient, carried in the policy's ``carrier_dtype``. Pure and jit-able.

    Args:
      tree: any pytree; integer, boolean and non-array leaves pass through.
      precision: a ``Policy`` or policy string (every leaf), ``PrecisionRules``, or a plan.

    Returns:
      A tree like ``tree`` with floating leaves cast.

    Examples:
      >>> rules = PrecisionRules([(r"embed", "fp32")], default="bf16-mixed")
      >>> params = {"embed": jnp.ones(2), "w": jnp.ones(2), "step": jnp.array(3)}
      >>> jax.tree.map(lambda x: x.dtype.name, cast_to_compute(params, rules))
      {'embed': 'float32', 'step': 'int32', 'w': 'bfloat16'}
    """
    return _cast(tree, precision, "compute_dtype")


def cast_to_output(tree: T, precision: Precision) -> T:
    """Casts each floating leaf of ``tree`` to its output dtype under ``precision``."""
    return _cast(tree, precision, "output_dtype")
