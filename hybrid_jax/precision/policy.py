"""``Policy``: the three dtypes of mixed precision, and the string grammar jmp users know."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

import jax
import numpy as np

from hybrid_jax import tree as tree_lib
from hybrid_jax.precision import dtypes
from hybrid_jax.precision.quantize import quantize_dequantize
from hybrid_jax.precision.storage import Int8Weight

T = TypeVar("T")

_KEYS = {
    "p": "param_dtype",
    "params": "param_dtype",
    "c": "compute_dtype",
    "compute": "compute_dtype",
    "o": "output_dtype",
    "output": "output_dtype",
    "carrier": "carrier_dtype",
    "master": "master_dtype",
    "grad": "grad_dtype",
    "mu": "mu_dtype",
    "nu": "nu_dtype",
    "update": "update",
}
# The optimizer-side keys, in the order str() writes them; absent from jmp's grammar.
_OPTIMIZER_FIELDS = ("master_dtype", "grad_dtype", "mu_dtype", "nu_dtype", "update")
_OPTIMIZER_KEYS = {field: key for key, field in _KEYS.items() if field in _OPTIMIZER_FIELDS}

#: How an update reaches a parameter stored narrower than fp32 without a master copy.
UPDATE_ROUNDINGS = {
    "nearest": "nearest",
    "sr": "stochastic",
    "stochastic": "stochastic",
    "kahan": "kahan",
}
_MOMENT_FIELDS = ("mu_dtype", "nu_dtype")

GRAMMAR = (
    "a policy is a preset (fp32, bf16-mixed, fp16-mixed, bf16-pure, fp8-mixed, int8-mixed, "
    "bf16-pure-sr, bf16-pure-kahan, bf16-lean), one dtype name for all three ('bf16'), or "
    "comma-separated key=value items with keys params|p, compute|c, output|o (and carrier, the "
    "dtype that carries fp8/int8 compute values), e.g. "
    "'params=float32,compute=bfloat16,output=float32'; missing keys default as in jmp: params "
    "float32, compute follows params, output follows compute. Optional keys for the optimizer: "
    "master (f32 or none: an fp32 master copy of narrower params), grad (the gradient's "
    "dtype), mu and nu (the optimizer's moments: f32, bf16, f16, or int8 for 8-bit block-wise "
    "storage), update (nearest, sr or kahan: how updates round into params narrower than fp32 "
    "without a master copy)"
)


def cast_floating(
    tree: T, dtype: np.dtype, carrier_dtype: np.dtype = dtypes.BFLOAT16, *, storage: bool = False
) -> T:
    """Casts the floating-point array leaves of ``tree`` to ``dtype``; other leaves pass through.

    A quantized ``dtype`` (fp8, int8) gives a scaled quantize-dequantize carried in
    ``carrier_dtype`` (:func:`~hybrid_jax.precision.quantize.quantize_dequantize`), except with
    ``storage=True`` (the cast to the param dtype), where int8 gives an :class:`Int8Weight`.
    """
    return jax.tree_util.tree_map(
        lambda x: cast_leaf(x, dtype, carrier_dtype, storage=storage),
        tree,
        is_leaf=tree_lib.is_leaf,
    )


def cast_leaf(
    x: Any, dtype: np.dtype, carrier_dtype: np.dtype = dtypes.BFLOAT16, *, storage: bool = False
) -> Any:
    """Casts one leaf as :func:`cast_floating` does."""
    if isinstance(x, Int8Weight):
        if storage and dtype == dtypes.INT8:
            return x
        return x.dequantize(carrier_dtype if dtype in dtypes.QUANTIZED else dtype)
    if not tree_lib.is_float_leaf(x):
        return x  # integers, booleans, complex, Python scalars and None are left alone, as in jmp
    if isinstance(x, jax.ShapeDtypeStruct):  # an abstract leaf gets the abstract cast
        return jax.eval_shape(lambda y: cast_leaf(y, dtype, carrier_dtype, storage=storage), x)
    if storage and dtype == dtypes.INT8:
        return Int8Weight.quantize(x)
    if dtype in dtypes.QUANTIZED:
        return quantize_dequantize(x, dtype, carrier_dtype)
    return x.astype(dtype)


@dataclasses.dataclass(frozen=True)
class Policy:
    """Which dtype parameters are stored in, computed in, and returned in.

    A frozen, hashable dataclass (usable as a static argument of ``jax.jit``) in the manner of jmp.
    Its fields accept names (``"bf16"``) or dtypes and hold :class:`numpy.dtype` objects.

    * ``param_dtype``: the dtype of stored (master) parameters: f64, f32, bf16 or f16; or
      int8 for a frozen weight stored as int8 with per-channel scales (an
      :class:`~hybrid_jax.precision.storage.Int8Weight`: no gradient, no optimizer state).
    * ``compute_dtype``: the dtype parameters and inputs are cast to for the forward pass. fp8
      (e4m3, e5m2) and int8 are allowed here: the cast is then a scaled quantize-dequantize whose
      values are carried in ``carrier_dtype``.
    * ``output_dtype``: the dtype of the model's outputs.
    * ``carrier_dtype``: the dtype that carries quantized compute values (default bf16).

    Optional fields say how the optimizer treats the parameter (``None``: as the optimizer does
    by itself); :func:`hybrid_jax.optim.with_precision` honours them per leaf:

    * ``master_dtype``: f32 keeps an fp32 master copy of a bf16/f16 parameter in the optimizer
      state (updates apply to it; the parameter is its rounding).
    * ``grad_dtype``: the dtype gradients are rounded to before the optimizer sees them.
    * ``mu_dtype``, ``nu_dtype``: the storage of the optimizer's first and second moments:
      f32, bf16, f16, or int8 for 8-bit block-wise quantization (Dettmers et al. 2021).
    * ``update``: ``"nearest"`` (Optax's ``apply_updates``), ``"stochastic"`` (``sr``) or
      ``"kahan"``: how updates round into a parameter stored narrower than fp32 without a master
      copy (Zamirai et al. 2020).

    Examples:
      >>> policy = Policy.parse("params=float32,compute=bfloat16,output=float32")
      >>> str(policy)
      'p=f32,c=bf16,o=f32'
      >>> policy == Policy.parse("bf16-mixed") == Policy("f32", "bf16", "f32")
      True
      >>> lean = Policy.parse("p=bf16,c=bf16,o=bf16,mu=int8,nu=int8,update=sr")
      >>> lean.nu_dtype, lean.update
      (dtype('int8'), 'stochastic')
    """

    param_dtype: np.dtype
    compute_dtype: np.dtype
    output_dtype: np.dtype
    carrier_dtype: np.dtype = dtypes.BFLOAT16
    master_dtype: np.dtype | None = None
    grad_dtype: np.dtype | None = None
    mu_dtype: np.dtype | None = None
    nu_dtype: np.dtype | None = None
    update: str | None = None

    def __post_init__(self):
        for field in ("param_dtype", "compute_dtype", "output_dtype", "carrier_dtype"):
            dtype = dtypes.parse_dtype(getattr(self, field))
            if field == "param_dtype" and dtype == dtypes.INT8:
                pass  # frozen int8 storage with per-channel scales: an Int8Weight
            elif field != "compute_dtype" and dtype not in dtypes.FLOATING:
                raise ValueError(
                    f"{field} cannot be {dtypes.short_name(dtype)}: only compute_dtype may be "
                    "fp8 or int8, and param_dtype int8 (frozen int8 storage); use f64, f32, "
                    "bf16 or f16"
                )
            object.__setattr__(self, field, dtype)
        for field in _OPTIMIZER_FIELDS:
            if field == "update":
                continue  # a rounding's name, not a dtype: _check_update_fields
            value = getattr(self, field)
            if value is None or value == "none":
                object.__setattr__(self, field, None)
                continue
            dtype = dtypes.parse_dtype(value)
            allowed = dtypes.FLOATING | ({dtypes.INT8} if field in _MOMENT_FIELDS else set())
            if dtype not in allowed:
                raise ValueError(
                    f"{field} cannot be {dtypes.short_name(dtype)}; use f64, f32, bf16 or f16"
                    + (" (or int8 for 8-bit block-wise storage)" if field in _MOMENT_FIELDS else "")
                )
            object.__setattr__(self, field, dtype)
        self._check_update_fields()

    def _check_update_fields(self):
        narrow = self.param_dtype in (dtypes.BFLOAT16, dtypes.FLOAT16)
        if self.master_dtype is not None and (
            not narrow or self.master_dtype.itemsize <= self.param_dtype.itemsize
        ):
            raise ValueError(
                f"master_dtype={dtypes.short_name(self.master_dtype)} with params in "
                f"{dtypes.short_name(self.param_dtype)}: a master copy must be wider than "
                "bf16/f16 params (use master=f32 with p=bf16 or p=f16, or leave master out)"
            )
        if self.update is None:
            return
        if self.update not in UPDATE_ROUNDINGS:
            raise ValueError(
                f"update={self.update!r} is not a rounding; use one of {sorted(UPDATE_ROUNDINGS)}"
            )
        object.__setattr__(self, "update", UPDATE_ROUNDINGS[self.update])
        if self.update == "nearest":
            return
        if self.master_dtype is not None:
            raise ValueError(
                f"update={self.update} and master={dtypes.short_name(self.master_dtype)} "
                "exclude each other: with a master copy, updates apply to it in full precision"
            )
        wanted = (
            (dtypes.BFLOAT16,) if self.update == "stochastic" else (dtypes.BFLOAT16, dtypes.FLOAT16)
        )
        if self.param_dtype not in wanted:
            raise ValueError(
                f"update={self.update} needs params in "
                f"{' or '.join(dtypes.short_name(d) for d in wanted)}, got "
                f"{dtypes.short_name(self.param_dtype)}"
            )

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
            A misspelt dtype name is the subclass
            :class:`~hybrid_jax.precision.dtypes.UnknownDtypeError`.
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
            raise _reworded(e, f"cannot parse policy {spec!r}: {e}.\nGrammar: {GRAMMAR}") from None

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
                if field == "update" or (field in _OPTIMIZER_FIELDS and value == "none"):
                    fields[field] = value
                else:
                    fields[field] = dtypes.parse_dtype(value)
            except ValueError as e:
                raise _reworded(e, f"item {item!r}: {e}") from None
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
        for field, key in _OPTIMIZER_KEYS.items():
            value = getattr(self, field)
            if value is not None:
                s += f",{key}={value if field == 'update' else dtypes.short_name(value)}"
        return s

    def __repr__(self) -> str:
        return f"Policy.parse({str(self)!r})"

    def with_output_dtype(self, output_dtype) -> Policy:
        """The same policy with another output dtype (as jmp's ``Policy.with_output_dtype``)."""
        return dataclasses.replace(self, output_dtype=output_dtype)

    def cast_to_param(self, tree: T) -> T:
        """Casts the floating leaves of ``tree`` to the param dtype (int8: an Int8Weight)."""
        return cast_floating(tree, self.param_dtype, storage=True)

    def cast_to_compute(self, tree: T) -> T:
        """Casts the floating leaves of ``tree`` to the compute dtype (fp8/int8: scaled, STE)."""
        return cast_floating(tree, self.compute_dtype, self.carrier_dtype)

    def cast_to_output(self, tree: T) -> T:
        """Casts the floating leaves of ``tree`` to the output dtype."""
        return cast_floating(tree, self.output_dtype)


def _reworded(error: ValueError, message: str) -> ValueError:
    # The same error with more context; an UnknownDtypeError stays one, with its name.
    if isinstance(error, dtypes.UnknownDtypeError):
        return dtypes.UnknownDtypeError(message, error.name)
    return ValueError(message)


#: Named policies, usable wherever a policy string is.
PRESETS = {
    "fp32": Policy("f32", "f32", "f32"),
    "bf16-mixed": Policy("f32", "bf16", "f32"),
    "fp16-mixed": Policy("f32", "f16", "f32"),
    "bf16-pure": Policy("bf16", "bf16", "bf16"),
    "fp8-mixed": Policy("f32", "e4m3", "f32"),
    "int8-mixed": Policy("f32", "int8", "f32"),
    "bf16-pure-sr": Policy("bf16", "bf16", "bf16", update="stochastic"),
    "bf16-pure-kahan": Policy("bf16", "bf16", "bf16", update="kahan"),
    "bf16-lean": Policy(
        "bf16", "bf16", "bf16", mu_dtype="int8", nu_dtype="int8", update="stochastic"
    ),
}
