"""Leaf paths and path rules: the one matcher shared by precision, optimizer and merge rules.

A leaf's path is its keys joined by ``/``: a dict key as ``str(key)``, a sequence index as its
number, an attribute as its name. Flax NNX keeps each array in the ``value`` attribute of a
``Variable``; that last step is dropped, so NNX ``State`` gives the same strings as its own keys
(``blocks/0/attn/qkv/kernel``). An Equinox module's fields are attributes and its lists and tuples
sequences, so the arrays of ``eqx.nn.MLP`` read ``layers/0/weight``, ``layers/0/bias``, ...
(the step dropped for NNX is any last attribute named ``value``: an Equinox field of that name
reads as its module's path).

Rules and casts take any pytree (a leaf that is not a floating array passes through a cast), but
optimizer states and train states hold arrays only: a model whose pytree also holds functions
(an Equinox module's activation) is split first, ``params, static = eqx.partition(model,
eqx.is_inexact_array)``, and rebuilt in the loss function with ``eqx.combine(params, static)``.
``params`` has ``None`` where ``static`` has a leaf; to JAX ``None`` is an empty subtree, which
paths, rules, casts, optimizers and the train step pass through untouched.

A rule list is an ordered sequence of ``(pattern, value)`` pairs. Each pattern is a regular
expression matched with :func:`re.search` against the path, and the **first** rule that matches a
leaf decides it. ``re.search`` finds a match anywhere in the path, so ``"w"`` matches
``"ln_f/weight"``: anchor patterns (``r"(^|/)w$"``) when that matters.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
import warnings
from collections.abc import Callable, Collection, Sequence
from typing import Any, Generic, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

V = TypeVar("V")

_NO_DEFAULT: Any = object()
_MAX_LISTED = 20


class CompoundLeaf:
    """A pytree node that paths and rules treat as one leaf.

    Subclasses hold several arrays that together are one parameter, such as an int8 weight's
    codes and scales: the parameter has one path (``blocks/0/mlp/fc/kernel``, not
    ``.../kernel/codes``), one rule decides it, and a cast treats it as a whole.
    """


def is_leaf(x: Any) -> bool:
    """Whether :func:`leaves_with_paths` stops at ``x``: a :class:`CompoundLeaf`."""
    return isinstance(x, CompoundLeaf)


def is_float_leaf(x: Any) -> bool:
    """Whether ``x`` is a floating-point array leaf: the leaves precision casts, trains and stores.

    True for a ``jax.Array`` (a tracer too), a NumPy array or scalar, or a ``jax.ShapeDtypeStruct``
    whose dtype is a real floating dtype: f64, f32, bf16, f16 and the fp8 formats. False for
    complex dtypes (a cast to a real format would drop the imaginary part), integers and booleans,
    Python numbers (weakly typed configuration, which jmp's casts also leave alone) and a
    :class:`CompoundLeaf` (an int8-stored weight is frozen, and casts handle it by its type).

    Examples:
      >>> import jax.numpy as jnp
      >>> [is_float_leaf(x) for x in (jnp.ones(2, jnp.bfloat16), np.float32(1.0),
      ...                            jax.ShapeDtypeStruct((2,), jnp.float8_e4m3fn))]
      [True, True, True]
      >>> [is_float_leaf(x) for x in (jnp.ones(2, jnp.complex64), jnp.arange(2), 1.0, None)]
      [False, False, False, False]
    """
    # jnp.issubdtype, unlike NumPy, files ml_dtypes' bf16 and fp8 under floating.
    return isinstance(
        x, (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct)
    ) and jnp.issubdtype(x.dtype, jnp.floating)


def check_array_leaves(tree: Any, what: str) -> None:
    """Raises a ``TypeError`` naming the leaves of ``tree`` that a jitted function cannot take.

    Arrays (NumPy, JAX, tracers, ``jax.ShapeDtypeStruct``), numbers and :class:`CompoundLeaf` s
    pass. Anything else (a function, a string) is the static part of a model that was not split
    from its arrays; the message says how to split an Equinox or Flax NNX model.

    Args:
      tree: the pytree to check.
      what: what the tree is called in the message (``"TrainState.create(params=...)"``).

    Examples:
      >>> check_array_leaves({"w": jnp.ones(2), "lr": 0.1, "skip": None}, "params")
      >>> check_array_leaves({"w": jnp.ones(2), "act": lambda x: x}, "params")
      Traceback (most recent call last):
      ...
      TypeError: params must hold only arrays, but 1 leaf is not:
        act: function
      ...
    """
    bad = [
        f"{path}: {type(leaf).__name__}"
        for path, leaf in leaves_with_paths(tree)[0]
        if not _is_array_like(leaf)
    ]
    if bad:
        raise TypeError(
            f"{what} must hold only arrays, but {_count(bad, 'leaf is', 'leaves are')} not:\n"
            + _listing(bad)
            + "\nPass the model's arrays alone and rebuild the model inside the loss function: "
            "for Equinox, `params, static = eqx.partition(model, eqx.is_inexact_array)` and "
            "`eqx.combine(params, static)`; for Flax NNX, `graphdef, params = nnx.split(model, "
            "nnx.Param)` and `nnx.merge(graphdef, params)`."
        )


def _is_array_like(x: Any) -> bool:
    array_types = (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct, numbers.Number)
    return isinstance(x, (*array_types, CompoundLeaf)) or hasattr(x, "__jax_array__")


class UnusedRuleWarning(UserWarning):
    """A rule decided no leaf: it matches nothing, or only leaves an earlier rule took."""


def key_str(key: Any) -> str:
    """The path component of one JAX key-path entry (dict key, index or attribute)."""
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    if isinstance(key, jax.tree_util.GetAttrKey):
        return key.name
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return str(key.key)
    return str(key)


def path_str(keypath: Sequence[Any]) -> str:
    """Joins a JAX key path into a ``/``-separated string.

    Args:
      keypath: a key path as given by :func:`jax.tree_util.tree_flatten_with_path`.

    Returns:
      The path string, e.g. ``"blocks/0/mlp/fc/kernel"``.
    """
    keys = list(keypath)
    # Flax NNX Variables hold their array in `.value`; drop that step so NNX State paths read
    # like the State's own keys.
    if keys and isinstance(keys[-1], jax.tree_util.GetAttrKey) and keys[-1].name == "value":
        keys = keys[:-1]
    return "/".join(key_str(k) for k in keys)


def leaves_with_paths(tree: Any) -> tuple[list[tuple[str, Any]], Any]:
    """Flattens ``tree`` into ``[(path, leaf), ...]`` in leaf order, and its treedef.

    A :class:`CompoundLeaf` is one leaf.
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    return [(path_str(kp), leaf) for kp, leaf in flat], treedef


def nbytes(tree: Any) -> int:
    """The bytes of the array leaves of ``tree`` (arrays or ``jax.ShapeDtypeStruct`` s).

    Examples:
      >>> nbytes({"w": jax.ShapeDtypeStruct((3, 4), "float32"), "step": 0})
      48
    """
    return sum(
        math.prod(x.shape) * np.dtype(x.dtype).itemsize
        for x in jax.tree_util.tree_leaves(tree)
        if hasattr(x, "dtype") and hasattr(x, "shape")
    )


def tree_paths(tree: Any) -> Any:
    """A tree shaped like ``tree`` whose leaves are the leaves' path strings.

    Examples:
      >>> tree_paths({"blocks": [{"w": 1.0}], "ln_f": {"scale": 2.0}})
      {'blocks': [{'w': 'blocks/0/w'}], 'ln_f': {'scale': 'ln_f/scale'}}
    """
    flat, treedef = leaves_with_paths(tree)
    return jax.tree_util.tree_unflatten(treedef, [path for path, _ in flat])


@dataclasses.dataclass(frozen=True)
class Rule(Generic[V]):
    """One compiled ``(pattern, value)`` pair."""

    pattern: str
    value: V
    regex: re.Pattern = dataclasses.field(compare=False, repr=False)


def compile_rules(rules: Sequence[tuple[str, V]], *, kind: str = "rule") -> tuple[Rule[V], ...]:
    """Checks and compiles an ordered rule list.

    Args:
      rules: ``[(pattern, value), ...]``, each pattern a regular expression.
      kind: what the rules are called in error messages (``"precision rule"``, ...).

    Returns:
      A tuple of :class:`Rule`.

    Raises:
      TypeError: ``rules`` is not a sequence of pairs, or a pattern is not a string.
      ValueError: a pattern is not a valid regular expression.
    """
    if isinstance(rules, (str, bytes, dict)) or not isinstance(rules, Sequence):
        raise TypeError(
            f"{kind}s must be an ordered list of (pattern, value) pairs, got "
            f"{type(rules).__name__}: {rules!r:.200}"
        )
    compiled = []
    for i, item in enumerate(rules):
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise TypeError(f"{kind} {i} must be a (pattern, value) pair, got {item!r:.200}")
        pattern, value = item
        if not isinstance(pattern, str):
            raise TypeError(
                f"{kind} {i}: the pattern must be a string (a regular expression), "
                f"got {type(pattern).__name__}: {pattern!r:.200}"
            )
        try:
            regex = re.compile(pattern)
        except re.error as e:
            raise ValueError(
                f"{kind} {i}: pattern {pattern!r} is not a valid regular expression: {e}"
            ) from None
        compiled.append(Rule(pattern, value, regex))
    return tuple(compiled)


def match_indices(
    rules: Sequence[Rule],
    paths: Sequence[str],
    *,
    has_default: bool,
    strict: bool = False,
    kind: str = "rule",
) -> list[int]:
    """For each path, the index of the first rule that matches it (``-1``: the default).

    Args:
      rules: compiled rules, from :func:`compile_rules`.
      paths: the leaves' path strings.
      has_default: whether leaves that no rule matches may fall back on a default.
      strict: make unused rules, and leaves matched by more than one rule, errors.
      kind: what the rules are called in messages.

    Returns:
      One rule index per path, ``-1`` for a leaf left to the default.

    Raises:
      ValueError: a leaf no rule matches and there is no default; under ``strict``, a rule that
        decides no leaf, or a leaf that several rules match.

    Warns:
      UnusedRuleWarning: a rule that decides no leaf (when not ``strict``).
    """
    chosen, unmatched, overlaps = [], [], []
    matched_any = [False] * len(rules)
    for path in paths:
        hits = [i for i, rule in enumerate(rules) if rule.regex.search(path)]
        for i in hits:
            matched_any[i] = True
        if not hits:
            unmatched.append(path)
        if len(hits) > 1:
            overlaps.append((path, hits))
        chosen.append(hits[0] if hits else -1)

    if unmatched and not has_default:
        raise ValueError(
            f"{_count(unmatched, 'leaf', 'leaves')} match no {kind} and no default was "
            "given:\n"
            + _listing(unmatched)
            + f"\n{kind} patterns, in order: {[r.pattern for r in rules]}"
            + "\nAdd a rule that matches them, or pass default=."
        )

    used = set(chosen)
    problems = []
    for i, rule in enumerate(rules):
        if i in used:
            continue
        if matched_any[i]:
            problems.append(
                f"{kind} {i} ({rule.pattern!r}) matches only leaves that earlier rules take "
                "(first match wins), so it decides nothing"
            )
        else:
            problems.append(f"{kind} {i} ({rule.pattern!r}) matches no leaf (a typo?)")
    if strict and overlaps:
        for path, hits in overlaps[:_MAX_LISTED]:
            patterns = ", ".join(f"{kind} {i} ({rules[i].pattern!r})" for i in hits)
            problems.append(f"leaf {path!r} matches {patterns}; the first wins")
    if problems:
        message = "\n".join(problems)
        if strict:
            raise ValueError(
                message + "\n(strict=True: every rule must decide a leaf and no leaf may match "
                "two rules; use default= for a catch-all)"
            )
        warnings.warn(message, UnusedRuleWarning, stacklevel=3)
    return chosen


def assign(
    rules: Sequence[tuple[str, V]] | Sequence[Rule[V]],
    tree: Any,
    *,
    default: V = _NO_DEFAULT,
    strict: bool = False,
    kind: str = "rule",
) -> Any:
    """A tree shaped like ``tree`` holding, per leaf, the value of the first rule matching its path.

    Args:
      rules: ``[(pattern, value), ...]`` in priority order, or rules from :func:`compile_rules`.
      tree: any pytree (dicts, lists, tuples, NamedTuples, registered dataclasses, Flax NNX State).
      default: the value of leaves no rule matches; without it such leaves are an error.
      strict: make a rule that decides no leaf, or a leaf that two rules match, an error.
      kind: what the rules are called in messages.

    Returns:
      A pytree with ``tree``'s structure whose leaves are rule values.

    Examples:
      >>> assign([(r"embed", "adamw"), (r"kernel$", "muon")],
      ...        {"embed": 0.0, "fc": {"kernel": 0.0, "bias": 0.0}}, default="adam")
      {'embed': 'adamw', 'fc': {'bias': 'adam', 'kernel': 'muon'}}
    """
    compiled = _as_compiled(rules, kind)
    flat, treedef = leaves_with_paths(tree)
    indices = match_indices(
        compiled,
        [path for path, _ in flat],
        has_default=default is not _NO_DEFAULT,
        strict=strict,
        kind=kind,
    )
    values = [default if i < 0 else compiled[i].value for i in indices]
    return jax.tree_util.tree_unflatten(treedef, values)


def map_with_path(fn: Callable[[str, Any], Any], tree: Any, *rest: Any) -> Any:
    """Like :func:`jax.tree_util.tree_map`, but ``fn`` also receives each leaf's path string."""
    return jax.tree_util.tree_map_with_path(
        lambda kp, *xs: fn(path_str(kp), *xs), tree, *rest, is_leaf=is_leaf
    )


def owner(path: str, owners: Collection[str]) -> str | None:
    """The longest run of ``path``'s components that is one of ``owners``, or ``None``.

    Charges optimizer-state leaves to parameters: Adam's ``0/mu/blocks/0/fc/kernel`` and an
    8-bit moment's ``1/nu/blocks/0/fc/kernel/codes`` both belong to ``blocks/0/fc/kernel``.

    Examples:
      >>> owner("0/nu/fc/kernel/codes", {"fc/kernel", "fc/bias"})
      'fc/kernel'
    """
    parts = path.split("/")
    for length in range(len(parts), 0, -1):
        for start in range(len(parts) - length + 1):
            candidate = "/".join(parts[start : start + length])
            if candidate in owners:
                return candidate
    return None


def _as_compiled(rules, kind):
    if isinstance(rules, tuple) and all(isinstance(r, Rule) for r in rules):
        return rules
    return compile_rules(rules, kind=kind)


def _count(items: Sequence[Any], one: str, many: str) -> str:
    return f"{len(items)} {one if len(items) == 1 else many}"


def _listing(items: Sequence[str]) -> str:
    shown = "\n".join(f"  {item}" for item in items[:_MAX_LISTED])
    if len(items) > _MAX_LISTED:
        shown += f"\n  ... and {len(items) - _MAX_LISTED} more"
    return shown
