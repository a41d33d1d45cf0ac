"""Where each optimizer moment is stored: parse storage specs and match spec trees to leaves."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
import optax

from hybrid_jax.precision import dtypes
from hybrid_jax.tree import key_str

EIGHT_BIT = "8bit"

# The plain casts a moment may be stored in; fp8 needs a scale, which is what "8bit" provides.
_CAST_DTYPES = (dtypes.FLOAT32, dtypes.BFLOAT16, dtypes.FLOAT16)


def _is_single_spec(value: Any) -> bool:
    return value is None or isinstance(value, str | np.dtype | type)


def _parse_spec(value: Any, where: str) -> Any:
    """``None``, ``"8bit"``, or one of the cast dtypes."""
    if value is None or (isinstance(value, str) and value == EIGHT_BIT):
        return value
    choices = "None (unchanged), '8bit', or a float dtype name: 'f32', 'bf16', 'f16'"
    try:
        dtype = dtypes.parse_dtype(value)
    except ValueError:
        raise ValueError(
            f"{where}: unknown moment storage {value!r:.100}; choose {choices}"
        ) from None
    if dtype not in _CAST_DTYPES:
        raise ValueError(
            f"{where}: moments cannot be stored as a plain {dtypes.short_name(dtype)} cast; "
            f"choose {choices} ('8bit' is the block-scaled 8-bit format)"
        )
    return dtype


@dataclasses.dataclass(frozen=True)
class Spec:
    """One field's storage: a single spec for every leaf, or a spec per leaf path."""

    field: str
    single: Any = None
    by_path: dict[tuple[str, ...], Any] | None = None

    @property
    def unchanged(self) -> bool:
        return self.by_path is None and self.single is None

    @property
    def has_8bit(self) -> bool:
        values = [self.single] if self.by_path is None else list(self.by_path.values())
        return any(isinstance(v, str) and v == EIGHT_BIT for v in values)


def make_spec(field: str, spec: Any) -> Spec:
    if _is_single_spec(spec):
        return Spec(field, single=_parse_spec(spec, f"{field}={spec!r:.100}"))
    flat, _ = jax.tree_util.tree_flatten_with_path(spec, is_leaf=lambda x: x is None)
    by_path = {}
    for keypath, value in flat:
        path = tuple(key_str(k) for k in keypath)
        by_path[path] = _parse_spec(value, f"{field} spec at {'/'.join(path)!r}")
    return Spec(field, by_path=by_path)


def leaf_specs(spec: Spec, flat: list[tuple[Any, Any]], what: str) -> list[Any]:
    """The spec of each leaf of a flattened tree shaped like the params (MaskedNodes allowed).

    A leaf takes the spec at its own path or, failing that, at the nearest enclosing path, so a
    moment tree may refine a params leaf (or a spec tree end at a subtree). A MaskedNode, which
    optax.masked/partition put where a group has no parameter, matches any spec below it.
    """
    if spec.by_path is None:
        return [spec.single] * len(flat)
    specs, used, masked, missing = [], set(), [], []
    for keypath, leaf in flat:
        path = tuple(key_str(k) for k in keypath)
        if isinstance(leaf, optax.MaskedNode):
            masked.append(path)
            specs.append(None)
            continue
        for i in range(len(path), -1, -1):
            if path[:i] in spec.by_path:
                used.add(path[:i])
                specs.append(spec.by_path[path[:i]])
                break
        else:
            missing.append("/".join(path))
            specs.append(None)
    masked_set = set(masked)
    # An unused spec of None changes nothing, so it is no error: params trees built with
    # tree_map keep None nodes, which the spec tree then holds as None leaves.
    extra = [
        "/".join(path)
        for path, value in spec.by_path.items()
        if value is not None
        and path not in used
        and not any(path[:i] in masked_set for i in range(len(path) + 1))
    ]
    if missing or extra:
        lines = [f"the {spec.field} spec tree does not match {what}:"]
        if missing:
            lines.append(f"  leaves with no spec: {missing[:10]}")
        if extra:
            lines.append(f"  specs for paths that are not there: {extra[:10]}")
        lines.append(
            f"Pass a {spec.field} spec tree shaped like the params (None leaves for 'unchanged'),"
            " e.g. jax.tree_util.tree_map(lambda p: '8bit' if p.size >= 4096 else None, params)."
        )
        raise ValueError("\n".join(lines))
    return specs
