"""Dtype names: the one table that turns ``"bf16"`` into a dtype and a dtype into its short name."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

FLOAT64 = np.dtype(jnp.float64)
FLOAT32 = np.dtype(jnp.float32)
BFLOAT16 = np.dtype(jnp.bfloat16)
FLOAT16 = np.dtype(jnp.float16)
FLOAT8_E4M3 = np.dtype(jnp.float8_e4m3fn)
FLOAT8_E5M2 = np.dtype(jnp.float8_e5m2)
INT8 = np.dtype(jnp.int8)

# Short name first: it is what str(Policy) writes.
_NAMES = {
    FLOAT32: ("f32", "float32", "fp32", "full"),
    BFLOAT16: ("bf16", "bfloat16"),
    FLOAT16: ("f16", "float16", "fp16"),
    FLOAT64: ("f64", "float64"),
    FLOAT8_E4M3: ("e4m3", "float8_e4m3fn", "fp8_e4m3"),
    FLOAT8_E5M2: ("e5m2", "float8_e5m2", "fp8_e5m2"),
    INT8: ("int8",),
}
_BY_NAME = {name: dtype for dtype, names in _NAMES.items() for name in names}

#: Dtypes whose values need a scale to represent typical tensors: fp8 and int8.
QUANTIZED = frozenset({FLOAT8_E4M3, FLOAT8_E5M2, INT8})
#: Floating dtypes that hold tensors without a scale (parameters, outputs, carriers).
FLOATING = frozenset({FLOAT64, FLOAT32, BFLOAT16, FLOAT16})

ACCEPTED_NAMES = (*_BY_NAME, "half")


class UnknownDtypeError(ValueError):
    """A dtype name that is not among :data:`ACCEPTED_NAMES` (a ``ValueError``).

    Its own class so that callers, such as :func:`hybrid_jax.jmp.get_policy`, can tell a misspelt
    dtype from other bad input without reading the message.

    Attributes:
      name: the name that was not recognised.
    """

    def __init__(self, message: str, name: str | None = None):
        super().__init__(message)
        self.name = name


def half_dtype() -> np.dtype:
    """The half-precision dtype of the default backend: bf16 on TPU, f16 elsewhere (as jmp)."""
    return BFLOAT16 if jax.default_backend() == "tpu" else FLOAT16


def parse_dtype(value: str | np.dtype | type) -> np.dtype:
    """Returns the dtype a name (``"bf16"``, ``"e4m3"``, ...) or a dtype-like stands for.

    ``"half"`` follows jmp: bfloat16 on TPU, float16 on CPU and GPU.

    Args:
      value: a name from :data:`ACCEPTED_NAMES`, or a dtype (``jnp.bfloat16``, ``np.float32``).

    Returns:
      A :class:`numpy.dtype` among the supported ones.

    Raises:
      UnknownDtypeError: an unknown name (a ``ValueError``); the message lists the accepted names.
      ValueError: an unsupported dtype.

    Examples:
      >>> parse_dtype("bf16")
      dtype(bfloat16)
      >>> parse_dtype("fp8_e4m3")
      dtype(float8_e4m3fn)
    """
    if isinstance(value, str):
        if value == "half":
            return half_dtype()
        try:
            return _BY_NAME[value]
        except KeyError:
            raise UnknownDtypeError(
                f"unknown dtype {value!r}; accepted names: {', '.join(ACCEPTED_NAMES)}", value
            ) from None
    try:
        dtype = np.dtype(value)
    except TypeError:
        raise ValueError(
            f"{value!r} is not a dtype; accepted names: {', '.join(ACCEPTED_NAMES)}"
        ) from None
    if dtype not in _NAMES:
        raise ValueError(
            f"unsupported dtype {dtype.name}; supported: "
            + ", ".join(names[1] if len(names) > 1 else names[0] for names in _NAMES.values())
        )
    return dtype


def short_name(dtype: np.dtype) -> str:
    """The short name of a supported dtype, as ``str(Policy)`` writes it (``"bf16"``)."""
    return _NAMES[np.dtype(dtype)][0]


def at_least_f32(dtype) -> np.dtype:
    """``dtype`` promoted with fp32: fp64 stays, every narrower float becomes fp32.

    Spelled out rather than left to ``jnp.promote_types``, which refuses mixed float widths under
    ``jax_numpy_dtype_promotion="strict"``.
    """
    return FLOAT64 if np.dtype(dtype) == FLOAT64 else FLOAT32


def format_max(dtype: np.dtype) -> float:
    """The largest finite magnitude a quantized format holds: 448 (e4m3), 57344 (e5m2), 127."""
    dtype = np.dtype(dtype)
    if dtype == INT8:
        return 127.0  # symmetric: -128 is left out so that +x and -x quantize alike
    return float(jnp.finfo(dtype).max)
