"""What the host-side reports share: concrete arrays read from a pytree, and their table cells."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hybrid_jax import tree as tree_lib
from hybrid_jax.precision import dtypes


class Shown(float):
    """A float that ``str()`` prints with a few significant digits (tables); ``repr`` is exact."""

    def __new__(cls, value: float, digits: int = 3) -> Shown:
        self = super().__new__(cls, value)
        self.digits = digits
        return self

    def __str__(self) -> str:
        return f"{float(self):.{self.digits}g}"


def dtype_label(dtype: Any) -> str:
    """The library's short name of a dtype (``"bf16"``), its NumPy name for others (``"int32"``),
    "" for None."""
    if dtype is None:
        return ""
    dtype = np.dtype(dtype)
    try:
        return dtypes.short_name(dtype)
    except KeyError:
        return dtype.name


def host_array(x: Any, what: str, path: str | None = None) -> np.ndarray:
    where = "" if path is None else f" (leaf {path!r})"
    if isinstance(x, (jax.core.Tracer, jax.ShapeDtypeStruct)):
        raise TypeError(
            f"{what} reads values, so it needs concrete arrays, got {type(x).__name__}{where}; "
            "call it outside jit, on the arrays a step returns"
        )
    arr = np.asarray(x)
    if not jnp.issubdtype(arr.dtype, jnp.floating):
        raise TypeError(f"{what} takes floating arrays, got dtype {arr.dtype}{where}")
    return arr


def floating_leaves(tree: Any, what: str) -> list[tuple[str, np.ndarray]]:
    out = []
    for path, leaf in tree_lib.leaves_with_paths(tree)[0]:
        if not tree_lib.is_float_leaf(leaf):
            continue
        out.append((path, host_array(leaf, what, path)))
    return out
