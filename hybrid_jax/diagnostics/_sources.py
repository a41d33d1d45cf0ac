"""Where a dot's operands come from: the format their values were last rounded to, and the
arguments of the program they are computed from (the rules are in :mod:`.dots`)."""

from __future__ import annotations

import re

import jax.numpy as jnp
import numpy as np

from hybrid_jax.diagnostics._hlo import Dataflow, Instruction, Node, op_name
from hybrid_jax.precision import dtypes

_REDUCE_PRECISION = re.compile(r"exponent_bits=(?P<e>\d+).*?mantissa_bits=(?P<m>\d+)")

# How a value's format passes through each kind of instruction (the rules in :mod:`.dots`).
_MOVES = frozenset(
    {
        "bitcast",
        "broadcast",
        "concatenate",
        "copy",
        "dynamic-slice",
        "dynamic-update-slice",
        "gather",
        "pad",
        "reshape",
        "reverse",
        "select",
        "slice",
        "transpose",
    }
)
_SCALES = frozenset({"multiply", "divide", "negate", "abs", "clamp"})
_NO_DATA = frozenset({"constant", "iota", "rng", "rng-bit-generator", "after-all"})
# Operands that carry values (the rest are predicates, indices or bounds).
_DATA_OPERANDS = {
    "select": (1, 2),
    "gather": (0,),
    "dynamic-slice": (0,),
    "dynamic-update-slice": (0, 1),
    "pad": (0, 1),
    "clamp": (1,),
}
# reduce-precision's (exponent, mantissa) bits for the formats it can simulate.
_REDUCED = {
    (8, 7): dtypes.BFLOAT16,
    (5, 10): dtypes.FLOAT16,
    (4, 3): dtypes.FLOAT8_E4M3,
    (5, 2): dtypes.FLOAT8_E5M2,
}


def is_float(dtype: np.dtype | None) -> bool:
    # jnp.issubdtype knows ml_dtypes' floats (bf16, fp8), which numpy files under kind "V".
    return dtype is not None and bool(jnp.issubdtype(dtype, jnp.floating))


def is_quantized(dtype: np.dtype | None) -> bool:
    """fp8 and smaller floats, and 8-bit or smaller integers: formats that need a scale."""
    if dtype is None or dtype.kind == "b":
        return False
    return dtype.itemsize == 1 and (is_float(dtype) or dtype.kind in "iu")


def carries_values(instruction: Instruction | None) -> bool:
    """Whether an instruction is an array of numbers (not a tuple, token or predicate)."""
    return (
        instruction is not None
        and not instruction.is_tuple
        and instruction.dtype is not None
        and instruction.dtype.kind != "b"
    )


# What the walk knows of a value: the format it was last rounded to, and the quantized types
# whose grids it lies on.
_Format = tuple[np.dtype | None, frozenset]
_NOTHING: _Format = (None, frozenset())


class Sources(Dataflow):
    """The source format of values in a module (:mod:`.dots`), memoized."""

    empty = _NOTHING

    def inputs(self, node: Node) -> list[Node]:
        computation, name, chain = node
        instruction = self.module.get(computation, name)
        if not carries_values(instruction) or is_quantized(instruction.dtype):
            return []
        opcode = instruction.opcode
        if opcode in ("parameter", "fusion", "call"):
            across = self.module.across_call(node)
            return [across] if across else []
        if opcode in _MOVES or opcode in _SCALES or opcode in ("convert", "reduce-precision"):
            indices = _DATA_OPERANDS.get(opcode, range(len(instruction.operands)))
            if opcode == "reduce-precision":
                indices = (0,)
            return [
                (computation, instruction.operands[i], chain)
                for i in indices
                if i < len(instruction.operands)
            ]
        return []

    def combine(self, node: Node, inputs: list[_Format]) -> _Format:
        instruction = self.module.get(node[0], node[1])
        if not carries_values(instruction):
            return _NOTHING
        own, opcode = instruction.dtype, instruction.opcode
        if opcode in _NO_DATA:
            return _NOTHING
        if is_quantized(own):
            return own, frozenset({own})
        quantized = frozenset().union(*(q for _, q in inputs))
        formats = [f for f, _ in inputs if f is not None]
        own_format = own if is_float(own) else None
        if opcode in ("parameter", "fusion", "call"):
            return (formats[0] if formats else own_format), quantized
        if opcode == "convert":
            # A widening convert is exact: the values keep their narrower format.
            narrower = [f for f in formats if own_format is not None and f.itemsize < own.itemsize]
            return (narrower[0] if narrower else own_format), quantized
        if opcode == "reduce-precision":
            m = _REDUCE_PRECISION.search(instruction.attributes)
            reduced = _REDUCED.get((int(m["e"]), int(m["m"]))) if m else None
            if reduced is not None and is_quantized(reduced):
                quantized |= {reduced}
            return (reduced or own_format), quantized
        if opcode in _MOVES:
            widest = max(formats, key=lambda f: f.itemsize, default=None)
            return (widest or own_format), quantized
        if opcode in _SCALES:
            return own_format, quantized
        return own_format, frozenset()

    def source_dtype(self, node: Node, dtype: np.dtype) -> np.dtype:
        fmt, quantized = self(node)
        if quantized:
            return sorted(quantized, key=lambda d: (d.itemsize, d.name))[0]
        return fmt if fmt is not None else dtype


class Arguments(Dataflow):
    """The ``op_name`` of each argument of the entry computation a value is computed from.

    JAX names a jitted function's arguments by their path (``state.opt_state[1].mu['w']``), so
    this tells what a product reads: the parameters, the batch, the optimizer state. Every
    operand counts, through fusions, calls and tuples; a loop's result reads what enters it.
    """

    empty = frozenset()

    def inputs(self, node: Node) -> list[Node]:
        computation, name, chain = node
        instruction = self.module.get(computation, name)
        if instruction is None:
            return []
        if instruction.opcode in ("parameter", "fusion", "call"):
            across = self.module.across_call(node)
            return [across] if across else []
        return [(computation, operand, chain) for operand in instruction.operands]

    def combine(self, node: Node, inputs: list[frozenset]) -> frozenset:
        instruction = self.module.get(node[0], node[1])
        if (
            instruction is not None
            and instruction.opcode == "parameter"
            and (node[0] == self.module.entry)
        ):
            return frozenset({op_name(instruction)})
        return frozenset().union(*inputs)
