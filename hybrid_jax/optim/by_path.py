"""``by_path``: a different Optax optimizer per parameter group, chosen by path rules."""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import optax

from hybrid_jax import tree as tree_lib
from hybrid_jax._table import Table, format_bytes

DEFAULT_GROUP = "(default)"

Rules = Sequence[tuple[str, "optax.GradientTransformation | str"]]

# `optax.partition` is the newer name of `optax.multi_transform`; older Optax has only the latter.
_partition = getattr(optax, "partition", None) or optax.multi_transform


def _is_transform(x: Any) -> bool:
    return isinstance(x, optax.GradientTransformation)


def _groups(
    rules: Rules,
    default: optax.GradientTransformation | str | None,
    transforms: Mapping[str, optax.GradientTransformation] | None,
) -> tuple[tuple[tree_lib.Rule[Hashable], ...], dict[Hashable, optax.GradientTransformation]]:
    """Compiles rules whose values are group labels, and the transformation of each group."""
    transforms = dict(transforms or {})
    for name, tx in transforms.items():
        if not _is_transform(tx):
            raise TypeError(
                f"transforms[{name!r}] must be an optax.GradientTransformation, got "
                f"{type(tx).__name__}"
            )
    groups: dict[Hashable, optax.GradientTransformation] = {}

    def label_of(value: Any, where: str, own_label: str) -> Hashable:
        if isinstance(value, str):
            if value not in transforms:
                raise ValueError(
                    f"{where} names group {value!r}, which is not in transforms "
                    f"(known groups: {sorted(transforms)})"
                )
            groups[value] = transforms[value]
            return value
        if not _is_transform(value):
            raise TypeError(
                f"{where} must give an optax.GradientTransformation or the name of one in "
                f"transforms, got {type(value).__name__}"
            )
        if own_label in transforms or own_label in groups:
            raise ValueError(f"{where}: group label {own_label!r} is used twice")
        groups[own_label] = value
        return own_label

    compiled = tree_lib.compile_rules(rules, kind="optimizer rule")
    labelled = tuple(
        type(rule)(
            rule.pattern,
            label_of(rule.value, f"optimizer rule {i} ({rule.pattern!r})", rule.pattern),
            rule.regex,
        )
        for i, rule in enumerate(compiled)
    )
    if default is not None:
        label_of(default, "default", DEFAULT_GROUP)
    unused = sorted(set(transforms) - set(groups))
    if unused:
        warnings.warn(
            f"transforms {unused} are named by no rule and optimize nothing",
            tree_lib.UnusedRuleWarning,
            stacklevel=3,
        )
    return labelled, groups


def _label_fn(rules, has_default: bool, strict: bool):
    default = {"default": DEFAULT_GROUP} if has_default else {}

    def labels(tree: Any) -> Any:
        return tree_lib.assign(rules, tree, strict=strict, kind="optimizer rule", **default)

    return labels


def by_path(
    rules: Rules,
    default: optax.GradientTransformation | str | None = None,
    *,
    transforms: Mapping[str, optax.GradientTransformation] | None = None,
    strict: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """Applies a different Optax transformation to each group of parameters, chosen by path.

    Each leaf's path (``blocks/0/attn/qkv/kernel``; see :mod:`hybrid_jax.tree`) is searched by
    the rules' regular expressions in order; the first rule that matches decides the leaf's group.
    The result is ``optax.partition`` (``optax.multi_transform`` in older Optax) with labels
    computed from paths at trace time, so it costs nothing per step beyond the transformations
    themselves, works on any pytree (dicts, Linen ``{"params": ...}``, Flax NNX ``State``) and
    composes with Optax wrappers (``MultiSteps``, ``inject_hyperparams``, ``apply_if_finite``).

    A group given ``optax.set_to_zero()`` is frozen: its updates are zero and it keeps no
    optimizer state.

    Args:
      rules: ``[(pattern, transformation_or_group_name), ...]`` in priority order. A
        transformation forms a group labelled by its pattern; a string names a group of
        ``transforms`` (several rules may share one group, and so one optimizer state).
      default: the transformation (or group name) of leaves no rule matches. Without it, such
        leaves are an error naming them: every leaf lands in exactly one group.
      transforms: named groups, ``{name: transformation}``, for rules that give names.
      strict: make a rule that decides no leaf, or a leaf two rules match, an error (otherwise
        an unused rule is a :class:`~hybrid_jax.tree.UnusedRuleWarning`).

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Raises:
      ValueError: a rule names an unknown group, a leaf matches no rule and there is no default,
        or (``strict``) a rule decides nothing; raised by ``init``/``update`` for tree problems.
      TypeError: a rule's value is neither a transformation nor a group name.

    Examples:
      >>> params = {"embed": jnp.ones((4, 2)), "fc": {"kernel": jnp.ones((2, 2)),
      ...                                             "bias": jnp.ones(2)}}
      >>> tx = by_path([(r"embed", optax.set_to_zero()), (r"kernel$", optax.sgd(0.5))],
      ...              default=optax.adam(1e-3))
      >>> state = tx.init(params)
      >>> updates, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
      >>> float(updates["embed"].sum()), float(updates["fc"]["kernel"][0, 0])
      (0.0, -0.5)
    """
    compiled, groups = _groups(rules, default, transforms)
    return _partition(groups, _label_fn(compiled, default is not None, strict))


def group_labels(
    rules: Rules,
    params: Any,
    default: optax.GradientTransformation | str | None = None,
    *,
    transforms: Mapping[str, optax.GradientTransformation] | None = None,
    strict: bool = False,
) -> Any:
    """The group label of each leaf of ``params`` under ``rules``, as :func:`by_path` assigns it.

    Labels are the group names given in ``transforms``, the pattern of a rule that gives a
    transformation directly, or ``"(default)"``.
    """
    compiled, _ = _groups(rules, default, transforms)
    return _label_fn(compiled, default is not None, strict)(params)


def describe(
    rules: Rules,
    params: Any,
    default: optax.GradientTransformation | str | None = None,
    *,
    transforms: Mapping[str, optax.GradientTransformation] | None = None,
) -> Table:
    """A table of which group optimizes each parameter, and the optimizer-state bytes it costs.

    The state is measured with ``jax.eval_shape`` of the transformation's ``init``, so nothing is
    allocated; ``params`` may hold ``jax.ShapeDtypeStruct`` leaves. A state leaf is charged to the
    parameter whose path ends its own path (Adam's ``mu/blocks/0/...``); state that belongs to no
    single parameter (step counters) is charged to its group's line.

    Args:
      rules, default, transforms: as for :func:`by_path`.
      params: the parameter tree (arrays or shapes).

    Returns:
      A :class:`~hybrid_jax._table.Table` with one row per leaf (path, shape, size, group, state
      bytes), then one line per group and a total. ``str()`` prints it; notebooks render HTML.

    Raises:
      TypeError: ``params`` holds a leaf that is not an array (a function of an unsplit
        Equinox module); the message names it and says how to split the model.

    Examples:
      >>> params = {"embed": jnp.ones((4, 2)), "fc": {"kernel": jnp.ones((2, 2))}}
      >>> print(describe([(r"embed", optax.set_to_zero())], params, default=optax.adam(1e-3)))
      path       shape   size  group      state
      ---------  ------  ----  ---------  -----
      embed      (4, 2)  8     embed      0 B
      fc/kernel  (2, 2)  4     (default)  32 B
      ---------  ------  ----  ---------  -----
      (default)          4     1 leaf     36 B
      embed              8     1 leaf     0 B
      total              12    2 leaves   36 B
    """
    tree_lib.check_array_leaves(params, "describe(params=...)")
    tx = by_path(rules, default, transforms=transforms)
    labels = group_labels(rules, params, default, transforms=transforms)
    leaves, _ = tree_lib.leaves_with_paths(params)
    label_of = dict(zip([p for p, _ in leaves], jax.tree_util.tree_leaves(labels), strict=True))
    state = jax.eval_shape(tx.init, params)

    per_leaf = {path: 0 for path, _ in leaves}
    overhead: dict[Hashable, int] = {}
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        owner = tree_lib.owner(tree_lib.path_str(keypath), per_leaf)
        if owner is not None:
            per_leaf[owner] += tree_lib.nbytes(leaf)
        else:  # PartitionState.inner_states[group]: the group is the second key
            group = keypath[1].key if len(keypath) > 1 else DEFAULT_GROUP
            overhead[group] = overhead.get(group, 0) + tree_lib.nbytes(leaf)

    rows, summary = [], {}
    for path, leaf in leaves:
        shape = tuple(np.shape(leaf))
        size = int(np.prod(shape, dtype=np.int64))
        group = label_of[path]
        rows.append((path, shape, size, str(group), format_bytes(per_leaf[path])))
        n, total_size, nbytes = summary.get(group, (0, 0, overhead.get(group, 0)))
        summary[group] = (n + 1, total_size + size, nbytes + per_leaf[path])
    footer = [
        (str(g), "", size, _leaves(n), format_bytes(nbytes))
        for g, (n, size, nbytes) in sorted(summary.items(), key=lambda kv: str(kv[0]))
    ]
    total_bytes = tree_lib.nbytes(state)
    total_size = sum(size for _, size, _ in summary.values())
    footer.append(("total", "", total_size, _leaves(len(leaves)), format_bytes(total_bytes)))
    return Table(("path", "shape", "size", "group", "state"), tuple(rows), tuple(footer))


def _leaves(n: int) -> str:
    return f"{n} leaf" if n == 1 else f"{n} leaves"
