"""The leaf-level helpers the mixing functions share: dtypes, copies and matching trees."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hybrid_jax import tree as tree_lib

_TRUNCATE = 300


def leaf_dtype(x: Any) -> np.dtype | None:
    """The dtype of an array-like leaf, or None for a leaf that is not one (a string, ...)."""
    dtype = getattr(x, "dtype", None)
    if dtype is not None:
        return np.dtype(dtype)
    try:
        return np.dtype(jnp.asarray(x).dtype)
    except TypeError:
        return None


def is_averaged(x: Any) -> bool:
    """Whether mixing averages ``x``: a floating-point or complex array, or a Python float.

    Wider than :func:`hybrid_jax.tree.is_float_leaf` on purpose: a weighted mean is as valid for
    complex values and plain numbers as for real arrays, and nothing here casts them to a real
    format. Compound leaves are taken whole, never averaged.
    """
    if tree_lib.is_leaf(x):
        return False
    dtype = leaf_dtype(x)
    return dtype is not None and bool(jnp.issubdtype(dtype, jnp.inexact))


def compute_dtype(dtype: Any) -> np.dtype:
    """fp32 for fp32 and narrower floats; fp64 and complex keep their own dtype."""
    dtype = np.dtype(dtype)
    if dtype in (np.dtype(np.float64), np.dtype(np.complex64), np.dtype(np.complex128)):
        return dtype
    return np.dtype(np.float32)


def widen(x: Any) -> jax.Array:
    x = jnp.asarray(x)
    return x.astype(compute_dtype(x.dtype))


def copy_leaf(x: Any) -> Any:
    """A copy of a leaf with new buffers (each array of a compound leaf copied)."""
    return jax.tree_util.tree_map(
        lambda u: jnp.array(u, copy=True) if isinstance(u, (jax.Array, np.ndarray)) else u, x
    )


def tree_list(trees: Any, what: str) -> list[Any]:
    if isinstance(trees, (Mapping, str, bytes)) or not isinstance(trees, Sequence):
        raise TypeError(
            f"{what}: trees must be a sequence (list or tuple) of pytrees, got "
            f"{type(trees).__name__}"
        )
    if not trees:
        raise ValueError(f"{what}: trees is empty; give at least one tree")
    return list(trees)


def flatten_matching(
    trees: Sequence[Any], names: Sequence[str], *, what: str, same_dtypes: bool = True
) -> tuple[list[list[Any]], list[str], Any]:
    """Flattens trees that must match; the error names the first leaf where they differ.

    Returns each tree's leaves, the leaf paths and the treedef of ``trees[0]``.
    """
    flats = [tree_lib.leaves_with_paths(t) for t in trees]
    ref_flat, ref_def = flats[0]
    paths = [path for path, _ in ref_flat]
    for name, (flat, treedef) in zip(names[1:], flats[1:], strict=True):
        other_paths = [path for path, _ in flat]
        if other_paths != paths or treedef != ref_def:
            raise ValueError(
                f"{what}: {name} and {names[0]} differ in structure: "
                + _structure_difference(paths, other_paths, ref_def, treedef, names[0], name)
            )
        for (path, x), (_, y) in zip(ref_flat, flat, strict=True):
            problem = _leaf_difference(x, y, same_dtypes)
            if problem:
                raise ValueError(
                    f"{what}: {name} and {names[0]} differ at leaf {path!r}: {problem} "
                    f"({names[0]} vs {name})"
                )
    return [[leaf for _, leaf in flat] for flat, _ in flats], paths, ref_def


def _structure_difference(ref_paths, paths, ref_def, treedef, ref_name, name) -> str:
    ref_set, other_set = set(ref_paths), set(paths)
    missing = [p for p in ref_paths if p not in other_set]
    extra = [p for p in paths if p not in ref_set]
    parts = []
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        parts.append(f"{name} lacks leaf {missing[0]!r}{more}")
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        parts.append(f"{name} has leaf {extra[0]!r} that {ref_name} lacks{more}")
    if not parts:
        parts.append(
            f"same leaf paths but different containers: {str(ref_def)[:_TRUNCATE]} vs "
            f"{str(treedef)[:_TRUNCATE]}"
        )
    return "; ".join(parts)


def _leaf_difference(x: Any, y: Any, same_dtypes: bool) -> str | None:
    if tree_lib.is_leaf(x) or tree_lib.is_leaf(y):
        if type(x) is not type(y):
            return f"{type(x).__name__} vs {type(y).__name__}"
        x_parts, x_def = jax.tree_util.tree_flatten(x)
        y_parts, y_def = jax.tree_util.tree_flatten(y)
        if x_def != y_def:
            return f"{type(x).__name__} with different contents"
        pairs = list(zip(x_parts, y_parts, strict=True))
    else:
        pairs = [(x, y)]
    for u, v in pairs:
        if np.shape(u) != np.shape(v):
            return f"shape {np.shape(u)} vs {np.shape(v)}"
        du, dv = leaf_dtype(u), leaf_dtype(v)
        if same_dtypes and du != dv:
            return f"dtype {du} vs {dv}"
        if is_averaged(u) != is_averaged(v):
            return f"dtype {du} vs {dv} (one is floating-point, the other not)"
    return None
