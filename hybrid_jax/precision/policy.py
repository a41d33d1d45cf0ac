"""``Policy``: the three dtypes of mixed precision, and the string grammar jmp users know."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

from hybrid_jax.precision import dtypes
from hybrid_jax.precision.quantize import quantize_dequantize

T = TypeVar("T")

_KEYS = {
    "p": "param_dtype",
    "params": "param_dtype",
    "c": "compute_dtype",
    "compute": "compute_dtype",
    "o": "output_dtype",
    "output": "output_dtype",
    "carrier": "carrier_dtype",
}

GRAMMAR = (
    "a policy is a preset (fp32, bf16-mixed, fp16-mixed, bf16-pure, fp8-mixed), one dtype name "
    "for all three ('bf16'), or comma-separated key=dtype items with keys params|p, compute|c, "
    "output|o (and carrier, the dtype that carries fp8/int8 compute values), e.g. "
    "'params=float32,compute=bfloat16,output=float32'; missing keys default as in jmp: params "
    "float32, compute follows params, output follows compute"
)


def _is_array(x: Any) -> bool:
    return isinstance(x, (np.ndarray, np.generic, jax.Array))


def cast_floating(tree: T, dtype: np.dtype, carrier_dtype: np.dtype = dtypes.BFLOAT16) -> T:
    """Casts the floating-point array leaves of ``tree`` to ``dtype``; other leaves pass through.

    A quantized ``dtype`` (fp8, int8) gives a scaled quantize-dequantize carried in
    ``carrier_dtype`` (:func:`~hybrid_jax.precision.quantize.quantize_dequantize`).
    """
    return jax.tree_util.tree_map(lambda x: cast_leaf(x, dtype, carrier_dtype), tree)


def cast_leaf(x: Any, dtype: np.dtype, carrier_dtype: np.dtype = dtypes.BFLOAT16) -> Any:
    """Casts one leaf as :func:`cast_floating` does."""
    if not (_is_array(x) and jnp.issubdtype(x.dtype, jnp.floating)):
        return x  # integers, booleans, Python scalars and None are left alone, as in jmp
    if dtype in dtypes.QUANTIZED:
        return quantize_dequantize(x, dtype, carrier_dtype)
    return x.astype(dtype)


@dataclasses.dataclass(frozen=True)
class Policy:
    """Which dtype parameters are stored in, computed in, and returned in.

    A frozen, hashable dataclass (usable as a static argument of ``jax.jit``) in the manner of jmp.
    Its fields accept names (``"bf16"``) or dtypes and hold :class:`numpy.dtype` objects.

    * ``param_dtype``: the dtype of stored (master) parameters: f64, f32, bf16 or f16.
    * ``compute_dtype``: the dtype parameters and inputs are cast to for the forward pass. fp8
      (e4m3, e5m2) and int8 are allowed here: the cast is then a scaled quantize-dequantize whose
      values are carried in ``carrier_dtype``.
    * ``output_dtype``: the dtype of the model's outputs.
    * ``carrier_dtype``: the dtype that carries quantized compute values (default bf16).

    Examples:
      >>> policy = Policy.parse("params=float32,compute=bfloat16,output=float32")
      >>> str(policy)
      'p=f32,c=bf16,o=f32'
      >>> policy == Policy.parse("bf16-mixed") == Policy("f32", "bf16", "f32")
      True
    """

    param_dtype: np.dtype
    compute_dtype: np.dtype
    output_dtype: np.dtype
    carrier_dtype: np.dtype = dtypes.BFLOAT16

    def __post_init__(self):
        for field in ("param_dtype", "compute_dtype", "output_dtype", "carrier_dtype"):
            dtype = dtypes.parse_dtype(getattr(self, field))
            if field != "compute_dtype" and dtype not in dtypes.FLOATING:
                raise ValueError(
                    f"{field} cannot be {dtypes.short_name(dtype)}: only compute_dtype may be "
                    "fp8 or int8 (it needs a scale, which a stored tensor has nowhere to keep); "
                    "use f64, f32, bf16 or f16"
                )
            object.__setattr__(self, field, dtype)

    @classmethod
    def parse(cls, spec: str | Policy) -> Policy:
        """Parses a policy string: a preset, a dtype name, or jmp's ``key=dtype`` grammar.

        Every string jmp's ``get_policy`` accepts gives the same three dtypes here, so a jmp user
        can switch by changing the import. Unlike jmp, a repeated key, an empty item or an item
        with two ``=`` is a ``ValueError`` that quotes it (jmp keeps the last value of a repeated
        key and raises a raw unpacking error for the others).

        Args:
          spec: the string, or a ``Policy`` (returned as is).

        Returns:
          The ``Policy``.

        Raises:
          ValueError: the string does not parse; the message quotes the bad part and the grammar.
          TypeError: ``spec`` is neither a string nor a ``Policy``.

        Examples:
          >>> str(Policy.parse("c=f16"))
          'p=f32,c=f16,o=f16'
          >>> str(Policy.parse("fp8-mixed"))
          'p=f32,c=e4m3,o=f32'
        """
        if isinstance(spec, Policy):
            return spec
        if not isinstance(spec, str):
            raise TypeError(f"a policy is a Policy or a string, got {type(spec).__name__}")
        if spec in PRESETS:
            return PRESETS[spec]
        try:
            return cls._parse_fields(spec)
        except ValueError as e:
            raise ValueError(f"cannot parse policy {spec!r}: {e}.\nGrammar: {GRAMMAR}") from None

    @classmethod
    def _parse_fields(cls, spec: str) -> Policy:
        if "=" not in spec:
            if not spec:
                raise ValueError("the string is empty")
            dtype = dtypes.parse_dtype(spec)
            return cls(dtype, dtype, dtype)
        fields = {}
        for item in spec.split(","):
            key, sep, value = item.partition("=")
            if not sep or "=" in value:
                what = "an empty item (a stray comma?)" if not item else f"item {item!r}"
                raise ValueError(f"{what} is not of the form key=dtype")
            if key not in _KEYS:
                raise ValueError(
                    f"unknown key {key!r} in item {item!r}; keys are {', '.join(_KEYS)}"
                )
            field = _KEYS[key]
            if field in fields:
                raise ValueError(f"item {item!r} sets {field} a second time")
            try:
                fields[field] = dtypes.parse_dtype(value)
            except ValueError as e:
                raise ValueError(f"item {item!r}: {e}") from None
        param = fields.setdefault("param_dtype", dtypes.FLOAT32)
        compute = fields.setdefault("compute_dtype", param)
        carrier = fields.setdefault("carrier_dtype", dtypes.BFLOAT16)
        # Output follows compute (jmp); a quantized compute produces carrier-dtype values.
        fields.setdefault("output_dtype", carrier if compute in dtypes.QUANTIZED else compute)
        return cls(**fields)

    def __str__(self) -> str:
        s = (
            f"p={dtypes.short_name(self.param_dtype)},c={dtypes.short_name(self.compute_dtype)},"
            f"o={dtypes.short_name(self.output_dtype)}"
        )
        if self.carrier_dtype != dtypes.BFLOAT16:
            s += f",carrier={dtypes.short_name(self.carrier_dtype)}"
        return s

    def __repr__(self) -> str:
        return f"Policy.parse({str(self)!r})"

    def with_output_dtype(self, output_dtype) -> Policy:
        """The same policy with another output dtype (as jmp's ``Policy.with_output_dtype``)."""
        return dataclasses.replace(self, output_dtype=output_dtype)

    def cast_to_param(self, tree: T) -> T:
        """Casts the floating leaves of ``tree`` to the param dtype."""
        return cast_floating(tree, self.param_dtype)

    def cast_to_compute(self, tree: T) -> T:
        """Casts the floating leaves of ``tree`` to the compute dtype (fp8/int8: scaled, STE)."""
        return cast_floating(tree, self.compute_dtype, self.carrier_dtype)

    def cast_to_output(self, tree: T) -> T:
        """Casts the floating leaves of ``tree`` to the output dtype."""
        return cast_floating(tree, self.output_dtype)


#: Named policies, usable wherever a policy string is.
PRESETS = {
    "fp32": Policy("f32", "f32", "f32"),
    "bf16-mixed": Policy("f32", "bf16", "f32"),
    "fp16-mixed": Policy("f32", "f16", "f32"),
    "bf16-pure": Policy("bf16", "bf16", "bf16"),
    "fp8-mixed": Policy("f32", "e4m3", "f32"),
}
