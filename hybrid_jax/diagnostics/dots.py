"""A precision audit of a compiled step: the dtypes XLA actually multiplies in, layer by layer.

A precision plan says what each layer should compute in; whether it does is decided by the
compiler. Flax's fp8 path once fell back to bf16 without a word (flax#4686). This module reads the
**optimized** HLO of a jitted step (``jitted.lower(*args).compile().as_text()``), finds every
``dot`` and ``convolution`` (and the GEMM custom calls GPUs rewrite dots into), names the layer
each belongs to from the ``jax.named_scope`` the model put around it (the bundled GPT names each
matmul by its layer path, so its ``op_name`` reads ``jvp(blocks/0/mlp/fc)/dot_general``), and
checks the dtypes of the values it consumes against the plan.

What a dot consumes and what it computes in differ on XLA:CPU, which has no bf16 or fp8 GEMM: a
bf16 matmul compiles to ``convert(bf16 -> f32)`` of both operands feeding an f32 ``dot``, and an
fp8 one to f32 operands dequantized from ``f8e4m3fn`` converts. So each operand has two dtypes:

* its **dtype**, what the dot instruction itself reads (f32 for both on CPU);
* its **source dtype**, found by following the operand back through the program:

  - if a value of a quantized type (fp8, int8) reaches it through converts, data movement
    (bitcast, copy, transpose, reshape, broadcast, slice, ...), ``select`` and scaling
    (``multiply``, ``divide``, ``negate``, ``abs``, ``clamp``), that type: values on a scaled fp8
    or int8 grid stay on it under those operations, and no others (an ``add`` mixes them);
  - otherwise the format the values were last rounded to: a narrowing ``convert`` rounds, a
    widening one is exact and keeps its input's format, data movement keeps the widest format of
    what it moves, and any other operation rounds to its own dtype.

  The walk crosses fusion boundaries both ways (a fusion's value is its fused computation's root;
  a fused computation's parameter is the fusion's operand) and stops at other dots, reductions,
  custom calls and the step's own parameters, so it stays within one matmul's inputs.

On this JAX (0.10, XLA:CPU) a bf16-mixed layer's forward dot reads ``f32 x f32`` whose sources
are ``bf16 x bf16``; an fp8 layer's reads ``f32 x f32`` with sources ``e4m3 x e4m3`` (its backward
dots ``e5m2`` gradients); an int8 layer's dot reads ``s8 x s8`` and accumulates in ``s32``. On a
GPU, XLA runs bf16 dots on bf16 operands and rewrites fp8 ones into ``__cublas$lt$matmul$f8``
custom calls on f8 operands (read here too, though only from hand-written HLO: no GPU has run these
tests); the source dtypes agree across backends where the operand dtypes do not, which is why the
audit compares those.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from hybrid_jax._table import Table
from hybrid_jax.precision import dtypes
from hybrid_jax.precision.rules import is_policy, policies_with_paths

PASSES = ("forward", "backward")
WEIGHT_NAMES = ("kernel", "embedding")

# --- The HLO text -----------------------------------------------------------------------------

_HEADER = re.compile(r"^(?P<entry>ENTRY\s+)?%?(?P<name>[^\s(]+)\s*\(.*\)\s*->.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s+(?P<root>ROOT\s+)?%?(?P<name>[^\s=]+)\s*=\s*(?P<rest>.+)$")
_ARRAY = re.compile(r"^(?P<dtype>[a-z][a-z0-9]*)\[(?P<dims>[^\]]*)\]")
_OPCODE = re.compile(r"\s*(?P<opcode>[a-z][\w\-]*)\(")
_OP_NAME = re.compile(r'op_name="(?P<op_name>(?:[^"\\]|\\.)*)"')
_CALLS = re.compile(r"\b(?:calls|to_apply)=%?(?P<callee>[\w.\-]+)")
_TARGET = re.compile(r'custom_call_target="(?P<target>[^"]*)"')
_REDUCE_PRECISION = re.compile(r"exponent_bits=(?P<e>\d+).*?mantissa_bits=(?P<m>\d+)")
# GPU backends rewrite dots into library calls: cuBLAS(Lt) GEMMs (fp8 ones included), cuDNN
# convolutions, oneDNN matmuls.
_GEMM_TARGET = re.compile(r"gemm|matmul|conv", re.IGNORECASE)
_IDENTIFIER = re.compile(r"[A-Za-z_]\w*|\d+")

# How a value's format passes through each kind of instruction (module docstring).
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


def _np_dtype(hlo_type: str) -> np.dtype | None:
    """``"bf16"`` -> ``bfloat16``, ``"f8e4m3fn"`` -> ``float8_e4m3fn``; None for tokens and such."""
    if hlo_type == "pred":
        return np.dtype(bool)
    name = hlo_type
    for prefix, numpy_prefix in (("bf", "bfloat"), ("s", "int"), ("u", "uint"), ("c", "complex")):
        if re.fullmatch(prefix + r"\d+", hlo_type):
            name = numpy_prefix + hlo_type[len(prefix) :]
    if m := re.fullmatch(r"f(\d+)(e\w+)?", hlo_type):
        name = f"float{m[1]}" + (f"_{m[2]}" if m[2] else "")
    try:
        return np.dtype(getattr(ml_dtypes, name, name))
    except TypeError:
        return None


def _array_type(text: str) -> tuple[np.dtype | None, tuple[int, ...]]:
    """``"f32[64,16]{1,0}"`` -> ``(float32, (64, 16))``; ``(None, ())`` for what is not an array."""
    array = _ARRAY.match(text.strip())
    if not array:
        return None, ()
    dims = array["dims"].strip()
    shape = tuple(int(d.strip().lstrip("<=")) for d in dims.split(",")) if dims else ()
    return _np_dtype(array["dtype"]), shape


def _balanced(text: str, start: int) -> int:
    """The index just past the bracket group that opens at ``text[start]``."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] in "([{":
            depth += 1
        elif text[i] in ")]}":
            depth -= 1
            if depth == 0:
                return i + 1
    raise ValueError(f"unbalanced brackets in HLO text: {text[start : start + 80]!r}")


def _split_top(text: str) -> list[str]:
    """``text`` split at the commas outside brackets."""
    parts, depth, last = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[last:i])
            last = i + 1
    parts.append(text[last:])
    return [p.strip() for p in parts if p.strip()]


@dataclasses.dataclass(frozen=True)
class _Instruction:
    computation: str
    name: str
    opcode: str
    dtype: np.dtype | None  # None: a token; a tuple's is its first element's
    shape: tuple[int, ...]
    is_tuple: bool
    operands: tuple[str, ...]
    attributes: str
    parameter: int | None  # the number of a `parameter` instruction


def _parse_instruction(computation: str, name: str, rest: str) -> _Instruction:
    # The result type: an array type up to the first space outside brackets, or a tuple.
    if rest.startswith("("):
        end = _balanced(rest, 0)
    else:
        end, depth = len(rest), 0
        for i, ch in enumerate(rest):
            if ch in "([{":
                depth += 1
            elif ch in ")]}":
                depth -= 1
            elif ch.isspace() and depth == 0:
                end = i
                break
    result, rest = rest[:end], rest[end:]
    if result.startswith("("):  # a tuple: a GEMM custom call's (product, workspace), say
        elements = _split_top(result[1:-1])
        dtype, shape = _array_type(elements[0]) if elements else (None, ())
        is_tuple = True
    else:
        (dtype, shape), is_tuple = _array_type(result), False
    m = _OPCODE.match(rest)
    if not m:
        raise ValueError(f"cannot read the opcode of HLO instruction %{name}: {rest[:80]!r}")
    args_end = _balanced(rest, m.end() - 1)
    args, attributes = rest[m.end() : args_end - 1], rest[args_end:]
    opcode = m["opcode"]
    parameter = int(args) if opcode == "parameter" else None
    # Operands print as `%name` (newer XLA) or `f32[2]{0} %name` (older): the last word names it.
    operands = ()
    if opcode not in ("parameter", "constant"):
        operands = tuple(p.split()[-1].lstrip("%") for p in _split_top(args))
    return _Instruction(
        computation, name, opcode, dtype, shape, is_tuple, operands, attributes, parameter
    )


class _Module:
    """The computations of an HLO module's text, and how fusions and calls link them."""

    def __init__(self, text: str):
        self.computations: dict[str, dict[str, _Instruction]] = {}
        self.roots: dict[str, str] = {}
        current = None
        for line in text.splitlines():
            if current is None:
                if header := _HEADER.match(line):
                    current = header["name"]
                    self.computations[current] = {}
                continue
            if line.startswith("}"):
                current = None
                continue
            if not (m := _INSTRUCTION.match(line)):
                continue
            instruction = _parse_instruction(current, m["name"], m["rest"].strip())
            self.computations[current][instruction.name] = instruction
            if m["root"]:
                self.roots[current] = instruction.name
        if not self.computations:
            raise ValueError(
                "no HLO computation found in the text; pass jitted.lower(*args).compile() or "
                "its .as_text()"
            )
        # The fusions and calls that run each computation: its parameters are their operands.
        self.callers: dict[str, list[_Instruction]] = {}
        self._chains: dict[str, tuple[tuple[_Instruction, ...], ...]] = {}
        for instructions in self.computations.values():
            for instruction in instructions.values():
                m = _CALLS.search(instruction.attributes)
                if m and instruction.opcode in ("fusion", "call"):
                    self.callers.setdefault(m["callee"], []).append(instruction)

    def get(self, computation: str, name: str) -> _Instruction | None:
        return self.computations.get(computation, {}).get(name)

    def call_chains(self, computation: str) -> tuple[tuple[_Instruction, ...], ...]:
        """Each chain of fusions and calls from a top-level computation down to this one."""
        if computation not in self._chains:
            callers = self.callers.get(computation, [])
            self._chains[computation] = tuple(
                (*chain, caller)
                for caller in callers
                for chain in self.call_chains(caller.computation)
            ) or ((),)
        return self._chains[computation]


# A value in context: (computation, instruction name, the chain of fusions/calls it runs in).
_Node = tuple[str, str, tuple[_Instruction, ...]]
# What the walk knows of a value: the format it was last rounded to, and the quantized types
# whose grids it lies on.
_Format = tuple[np.dtype | None, frozenset]
_NOTHING: _Format = (None, frozenset())


def _is_float(dtype: np.dtype | None) -> bool:
    # jnp.issubdtype knows ml_dtypes' floats (bf16, fp8), which numpy files under kind "V".
    return dtype is not None and bool(jnp.issubdtype(dtype, jnp.floating))


def _is_quantized(dtype: np.dtype | None) -> bool:
    """fp8 and smaller floats, and 8-bit or smaller integers: formats that need a scale."""
    if dtype is None or dtype.kind == "b":
        return False
    return dtype.itemsize == 1 and (_is_float(dtype) or dtype.kind in "iu")


def _carries_values(instruction: _Instruction | None) -> bool:
    """Whether an instruction is an array of numbers (not a tuple, token or predicate)."""
    return (
        instruction is not None
        and not instruction.is_tuple
        and instruction.dtype is not None
        and instruction.dtype.kind != "b"
    )


class _Sources:
    """The source format of values in a module (module docstring), memoized."""

    def __init__(self, module: _Module):
        self.module = module
        self.memo: dict[_Node, _Format] = {}

    def _inputs(self, node: _Node) -> list[_Node]:
        computation, name, chain = node
        instruction = self.module.get(computation, name)
        if not _carries_values(instruction):
            return []
        if _is_quantized(instruction.dtype):
            return []
        opcode = instruction.opcode
        if opcode == "parameter":
            callers = self.module.callers.get(computation, [])
            if chain:
                caller, chain = chain[-1], chain[:-1]
            elif len(callers) == 1:
                caller = callers[0]
            else:
                return []
            if instruction.parameter >= len(caller.operands):
                return []
            return [(caller.computation, caller.operands[instruction.parameter], chain)]
        if opcode in ("fusion", "call"):
            m = _CALLS.search(instruction.attributes)
            if m and m["callee"] in self.module.roots:
                callee = m["callee"]
                return [(callee, self.module.roots[callee], (*chain, instruction))]
            return []
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

    def _combine(self, node: _Node, inputs: list[_Format]) -> _Format:
        instruction = self.module.get(node[0], node[1])
        if not _carries_values(instruction):
            return _NOTHING
        own, opcode = instruction.dtype, instruction.opcode
        if opcode in _NO_DATA:
            return _NOTHING
        if _is_quantized(own):
            return own, frozenset({own})
        quantized = frozenset().union(*(q for _, q in inputs))
        formats = [f for f, _ in inputs if f is not None]
        own_format = own if _is_float(own) else None
        if opcode in ("parameter", "fusion", "call"):
            return (formats[0] if formats else own_format), quantized
        if opcode == "convert":
            # A widening convert is exact: the values keep their narrower format.
            narrower = [f for f in formats if own_format is not None and f.itemsize < own.itemsize]
            return (narrower[0] if narrower else own_format), quantized
        if opcode == "reduce-precision":
            m = _REDUCE_PRECISION.search(instruction.attributes)
            reduced = _REDUCED.get((int(m["e"]), int(m["m"]))) if m else None
            if reduced is not None and _is_quantized(reduced):
                quantized |= {reduced}
            return (reduced or own_format), quantized
        if opcode in _MOVES:
            widest = max(formats, key=lambda f: f.itemsize, default=None)
            return (widest or own_format), quantized
        if opcode in _SCALES:
            return own_format, quantized
        return own_format, frozenset()

    def __call__(self, node: _Node) -> _Format:
        # Iterative, not recursive: a residual stream is a long chain of elementwise ops.
        stack, expanded = [node], set()
        while stack:
            top = stack[-1]
            if top in self.memo:
                stack.pop()
                continue
            inputs = self._inputs(top)
            pending = [i for i in inputs if i not in self.memo]
            if pending and top not in expanded:
                expanded.add(top)
                stack.extend(pending)
                continue
            # (Inputs still pending here would be a cycle, which valid HLO does not have.)
            self.memo[top] = self._combine(top, [self.memo.get(i, _NOTHING) for i in inputs])
            stack.pop()
        return self.memo[node]

    def source_dtype(self, node: _Node, dtype: np.dtype) -> np.dtype:
        fmt, quantized = self(node)
        if quantized:
            return sorted(quantized, key=lambda d: (d.itemsize, d.name))[0]
        return fmt if fmt is not None else dtype


# --- Layer paths from op_name -----------------------------------------------------------------


def _scope_groups(op_name: str) -> list[tuple[str, ...]]:
    """The runs of plain name-scope components in ``op_name``, outermost first.

    ``"jit(step)/transpose(jvp(blocks/0/mlp/fc))/dot_general"`` -> ``[("blocks", "0", "mlp",
    "fc")]``: transform wrappers (``jvp(...)``) delimit runs, the contents of ``jit(...)`` are
    function names, and the trailing primitive name is left out.
    """
    head, _, tail = op_name.rpartition("/")
    if head and not any(c in tail for c in "()"):
        op_name = head  # the primitive's name: "dot_general", "transpose", ...
    elif not head and not any(c in op_name for c in "()"):
        return []

    def sequence(i: int, in_jit: bool) -> tuple[list[tuple[str, ...]], int]:
        groups, run = [], []
        while i < len(op_name) and op_name[i] != ")":
            j = i
            while j < len(op_name) and op_name[j] not in "/()":
                j += 1
            token = op_name[i:j]
            if j < len(op_name) and op_name[j] == "(":
                if run:
                    groups.append(tuple(run))
                    run = []
                inner, j = sequence(j + 1, token in ("jit", "pjit"))
                if j >= len(op_name):
                    raise ValueError("unbalanced")
                j += 1  # the closing parenthesis
                if token not in ("jit", "pjit"):
                    groups.extend(inner)
            elif token and not in_jit:
                run.append(token)
            i = j + 1 if j < len(op_name) and op_name[j] == "/" else j
        if run:
            groups.append(tuple(run))
        return groups, i

    try:
        groups, end = sequence(0, False)
    except ValueError:
        return []
    return groups if end >= len(op_name) else []


def layer_of(op_name: str, layers: Iterable[str] | None = None) -> str | None:
    """The layer path an HLO instruction's ``op_name`` metadata names, or None.

    With ``layers``, the innermost of them that appears as consecutive scope components (so
    ``forward/blocks/0/mlp/fc`` gives ``blocks/0/mlp/fc``); without, or when none appears, the
    innermost run of scope components that looks like a parameter path (identifiers and indices
    joined by ``/``), which leaves out einsum scopes (``bhqk,bhkd->bhqd``) and ``jit`` function
    names.

    Args:
      op_name: the ``op_name`` of an instruction's metadata.
      layers: the known layer paths (``"blocks/0/mlp/fc"``, ``"tok_embed"``).

    Returns:
      The layer path, or None.

    Examples:
      >>> layer_of("jit(step)/transpose(jvp(blocks/0/mlp/fc))/dot_general")
      'blocks/0/mlp/fc'
      >>> layer_of("jit(step)/jvp(bhqd,bhkd->bhqk)/dot_general") is None
      True
    """
    groups = _scope_groups(op_name)
    known = set(layers or ())
    best = None
    for g, group in enumerate(groups):
        for start in range(len(group)):
            for stop in range(start + 1, len(group) + 1):
                path = "/".join(group[start:stop])
                if path in known:
                    key = (g, stop, stop - start)
                    if best is None or key > best[0]:
                        best = (key, path)
    if best is not None:
        return best[1]
    for group in reversed(groups):
        if all(_IDENTIFIER.fullmatch(c) for c in group):
            return "/".join(group)
    return None


# --- Dots ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class HloDot:
    """One matrix product of a compiled program, as XLA compiled it.

    Attributes:
      name: the HLO instruction's name (``"dot_general.13"``).
      opcode: ``"dot"``, ``"convolution"``, or a GEMM custom call's target
        (``"__cublas$lt$matmul$f8"``).
      computation: the HLO computation that holds it (a fused computation, or the entry).
      operand_dtypes: the dtypes of the two operands the instruction itself reads.
      operand_shapes: their shapes.
      source_dtypes: the dtype each operand's values come from (module docstring): ``bfloat16``
        for an f32 operand converted from bf16, ``float8_e4m3fn`` for one dequantized from fp8.
      result_dtype: the product's dtype, which is what it accumulates in (f32, s32 for int8).
      result_shape: its shape.
      op_name: the instruction's ``op_name`` metadata ("" when it has none).
      layer: the layer path parsed from ``op_name`` (:func:`layer_of`), or None.
      pass_: ``"backward"`` when ``op_name`` shows a ``transpose(`` (a VJP), else ``"forward"``.
    """

    name: str
    opcode: str
    computation: str
    operand_dtypes: tuple[np.dtype, ...]
    operand_shapes: tuple[tuple[int, ...], ...]
    source_dtypes: tuple[np.dtype, ...]
    result_dtype: np.dtype
    result_shape: tuple[int, ...]
    op_name: str
    layer: str | None
    pass_: str

    def computes_in(self, dtype: Any) -> bool:
        """Whether the product is computed in ``dtype``, judged by its operands' source dtypes.

        A quantized ``dtype`` (fp8, int8) asks every operand to come from it. A floating one asks
        the widest source to be it: an f32 layer multiplying a bf16 activation by its f32 kernel
        computes in f32, the activation being exact in f32.

        Args:
          dtype: a dtype or a name :func:`~hybrid_jax.precision.dtypes.parse_dtype` accepts.
        """
        dtype = dtypes.parse_dtype(dtype)
        if _is_quantized(dtype):
            return all(s == dtype for s in self.source_dtypes)
        return max(self.source_dtypes, key=lambda d: d.itemsize) == dtype


def _hlo_text(compiled: Any) -> str:
    if isinstance(compiled, str):
        return compiled
    if isinstance(compiled, jax.stages.Lowered):
        raise TypeError(
            "hlo_dots reads the optimized HLO, after XLA's rewrites; got a Lowered (the program "
            "before them): pass lowered.compile()"
        )
    as_text = getattr(compiled, "as_text", None)
    if not callable(as_text):
        raise TypeError(
            "expected a jax.stages.Compiled (jitted.lower(*args).compile()) or its HLO text, got "
            f"{type(compiled).__name__}"
        )
    text = as_text()
    if not isinstance(text, str):
        raise TypeError(f"{type(compiled).__name__}.as_text() gave no text")
    return text


def _is_dot(instruction: _Instruction) -> bool:
    if instruction.opcode in ("dot", "convolution"):
        return True
    if instruction.opcode == "custom-call":
        m = _TARGET.search(instruction.attributes)
        return bool(m and _GEMM_TARGET.search(m["target"]))
    return False


def hlo_dots(compiled: Any, layers: Iterable[str] | None = None) -> list[HloDot]:
    """The matrix products of a compiled program, with their dtypes and the layers they belong to.

    Reads every ``dot`` and ``convolution`` instruction of the optimized HLO, those inside fused
    computations included, and the GEMM and convolution custom calls of GPU backends. A dot in a
    computation that several fusions or calls run gives one record per call site (operands
    resolve through each). Operand dtypes are what the instruction reads; source dtypes follow
    the operands back through converts and fusions (see the module docstring).

    Args:
      compiled: a ``jax.stages.Compiled`` (``jax.jit(f).lower(*args).compile()``) or its
        ``as_text()``.
      layers: the known layer paths, to name each dot's layer exactly (:func:`layer_of`).

    Returns:
      A list of :class:`HloDot`, in the order of the HLO text.

    Raises:
      TypeError: ``compiled`` is neither, or is a ``Lowered`` (not optimized yet).
      ValueError: text with no HLO computation in it.

    Examples:
      >>> def layer(x, w):
      ...   with jax.named_scope("mlp/fc"):
      ...     return x.astype(jnp.bfloat16) @ w.astype(jnp.bfloat16)
      >>> x, w = jnp.ones((8, 16)), jnp.ones((16, 32))
      >>> [dot] = hlo_dots(jax.jit(layer).lower(x, w).compile())
      >>> dot.layer, dot.pass_, [d.name for d in dot.source_dtypes]
      ('mlp/fc', 'forward', ['bfloat16', 'bfloat16'])
    """
    module = _Module(_hlo_text(compiled))
    sources = _Sources(module)
    layers = tuple(layers or ())
    dots = []
    for computation, instructions in module.computations.items():
        for instruction in instructions.values():
            if not _is_dot(instruction):
                continue
            m = _OP_NAME.search(instruction.attributes)
            op_name = m["op_name"] if m else ""
            operands = [module.get(computation, o) for o in instruction.operands[:2]]
            if any(o is None or o.dtype is None for o in operands):
                continue  # not an array product this parser can read
            for chain in module.call_chains(computation):
                dots.append(
                    HloDot(
                        name=instruction.name,
                        opcode=_dot_kind(instruction),
                        computation=computation,
                        operand_dtypes=tuple(o.dtype for o in operands),
                        operand_shapes=tuple(o.shape for o in operands),
                        source_dtypes=tuple(
                            sources.source_dtype((computation, o.name, chain), o.dtype)
                            for o in operands
                        ),
                        result_dtype=instruction.dtype,
                        result_shape=instruction.shape,
                        op_name=op_name,
                        layer=layer_of(op_name, layers) if op_name else None,
                        pass_="backward" if "transpose(" in op_name else "forward",
                    )
                )
    return dots


def _dot_kind(instruction: _Instruction) -> str:
    if instruction.opcode == "custom-call":
        return _TARGET.search(instruction.attributes)["target"]
    return instruction.opcode


# --- The audit ------------------------------------------------------------------------------


def expected_from_plan(
    plan: Any, weight_names: Sequence[str] = WEIGHT_NAMES
) -> dict[str, np.dtype]:
    """The compute dtype a precision plan asks of each layer: ``{layer path: dtype}``.

    A layer is the path of a weight named ``kernel`` or ``embedding`` without that last
    component (``blocks/0/mlp/fc/kernel`` -> ``blocks/0/mlp/fc``); other leaves (biases,
    LayerNorm scales) have no matmul of their own and are left out. Pass the precision's own plan
    (``hybrid_jax.precision.plan(params, precision)``), not the cast plan
    :func:`~hybrid_jax.models.quantize_matmuls` returns, which gives the carrier dtype (bf16) to
    weights whose matmuls quantize them.

    Args:
      plan: a tree of :class:`~hybrid_jax.precision.Policy` (dicts, lists, an NNX ``State``).
      weight_names: the leaf names that are a layer's matmul weight; the first found wins.

    Returns:
      A dict from layer path to its policy's compute dtype.

    Raises:
      TypeError: a leaf of ``plan`` is not a ``Policy``.

    Examples:
      >>> from hybrid_jax.precision import PrecisionRules
      >>> params = {"mlp": {"fc": {"kernel": jnp.zeros((4, 8)), "bias": jnp.zeros(8)}},
      ...           "tok_embed": {"embedding": jnp.zeros((10, 4))}}
      >>> rules = PrecisionRules([("mlp/", "fp8-mixed")], default="bf16-mixed")
      >>> {k: v.name for k, v in expected_from_plan(rules.plan(params)).items()}
      {'mlp/fc': 'float8_e4m3fn', 'tok_embed': 'bfloat16'}
    """
    expected = {}
    for path, policy in policies_with_paths(plan):
        if not is_policy(policy):
            raise TypeError(
                f"expected_from_plan needs a tree of Policy; the leaf at {path!r} is "
                f"{type(policy).__name__}. Build one with hybrid_jax.precision.plan(params, "
                "precision)"
            )
        layer, _, weight = path.rpartition("/")
        if weight in weight_names and layer and layer not in expected:
            expected[layer] = policy.compute_dtype
    return expected


def _check_expected(expected: Mapping[str, Any]) -> dict[str, np.dtype]:
    if not isinstance(expected, Mapping):
        raise TypeError(
            "expected must map layer paths to compute dtypes ({'blocks/0/mlp/fc': 'bf16'}), got "
            f"{type(expected).__name__}; expected_from_plan(plan) builds it from a precision plan"
        )
    checked = {}
    for layer, dtype in expected.items():
        if is_policy(dtype):
            raise TypeError(
                f"expected[{layer!r}] is a Policy, not a dtype: build the mapping with "
                "expected_from_plan(plan)"
            )
        try:
            checked[str(layer)] = dtypes.parse_dtype(dtype)
        except ValueError as e:
            raise ValueError(f"expected[{layer!r}]: {e}") from None
    return checked


def _short(dtype: np.dtype | None) -> str:
    if dtype is None:
        return ""
    try:
        return dtypes.short_name(dtype)
    except KeyError:  # not one of the library's dtypes: int32, float8_e4m3fnuz, ...
        return dtype.name


def audit(compiled: Any, expected: Mapping[str, Any]) -> Table:
    """A table of a compiled program's matrix products against the compute dtypes expected.

    One row per dot (:func:`hlo_dots`): its layer, pass, the dtypes its operands have and come
    from, its result (accumulation) dtype and the expected compute dtype of its layer. A
    layer's **forward** dots are flagged ``mismatch`` when they do not compute in the expected
    dtype (:meth:`HloDot.computes_in`): bf16 expected but an operand is f32 (an uncast kernel),
    fp8 expected but no fp8 convert feeds an operand (a silent fallback, flax#4686), int8
    expected but the operands are not s8. On XLA:CPU, which has no bf16 or fp8 GEMM, the dot
    itself reads f32 in both cases; the check is on the source dtypes. Backward dots are listed,
    not checked: their gradient operand's format is the backward dtype (e5m2 for fp8), not the
    layer's compute dtype. Dots without a layer (attention's two products) are listed unflagged.

    Rows run forward before backward, layers in the order of ``expected``. The footer names
    expected layers with no dot at all (an embedding only looked up, or a matmul that lost its
    ``op_name``) and counts the mismatches.

    Args:
      compiled: a ``jax.stages.Compiled`` or its ``as_text()``.
      expected: ``{layer path: compute dtype}``, e.g. :func:`expected_from_plan` of a plan.

    Returns:
      A :class:`~hybrid_jax._table.Table` with columns ``dot, layer, pass, operands, source,
      result, shape, expected, mismatch``; ``table.column("mismatch")`` gives the flags.

    Raises:
      TypeError, ValueError: as :func:`hlo_dots`; ``expected`` not a mapping of dtypes.

    Examples:
      >>> def layer(x, w):
      ...   with jax.named_scope("mlp/fc"):
      ...     return x @ w  # fp32: nobody cast to bf16
      >>> compiled = jax.jit(layer).lower(jnp.ones((8, 16)), jnp.ones((16, 32))).compile()
      >>> table = audit(compiled, {"mlp/fc": "bf16"})
      >>> table.column("layer"), table.column("source"), table.column("mismatch")
      (['mlp/fc'], ['f32 x f32'], [True])
    """
    expected = _check_expected(expected)
    dots = hlo_dots(compiled, layers=expected)
    order = {layer: i for i, layer in enumerate(expected)}

    def sort_key(dot: HloDot):
        known = dot.layer in order
        return (
            PASSES.index(dot.pass_),
            dot.layer is None,
            not known,
            order.get(dot.layer, 0),
            dot.layer or "",
            dot.name,
        )

    rows, flagged = [], 0
    for dot in sorted(dots, key=sort_key):
        want = expected.get(dot.layer) if dot.layer is not None else None
        mismatch = dot.pass_ == "forward" and want is not None and not dot.computes_in(want)
        flagged += mismatch
        rows.append(
            (
                dot.name,
                dot.layer or "-",
                dot.pass_,
                " x ".join(_short(d) for d in dot.operand_dtypes),
                " x ".join(_short(d) for d in dot.source_dtypes),
                _short(dot.result_dtype),
                dot.result_shape,
                _short(want),
                mismatch,
            )
        )
    columns = ("dot", "layer", "pass", "operands", "source", "result", "shape", "expected")
    columns += ("mismatch",)
    seen = {dot.layer for dot in dots}
    footer = [
        ("no dot", layer, "", "", "", "", "", _short(dtype), False)
        for layer, dtype in expected.items()
        if layer not in seen
    ]
    footer.append(("total", f"{len(rows)} dots", "", "", "", "", "", "", flagged))
    return Table(columns, tuple(rows), tuple(footer))


def audit_step(step: Any, args: Sequence[Any], expected: Mapping[str, Any]) -> Table:
    """:func:`audit` of a jitted function compiled for ``args``: ``step.lower(*args).compile()``.

    Compiling does not run the step, so donated arguments stay valid.

    Args:
      step: a ``jax.jit``-ed function, e.g. ``hybrid_jax.app.run.build(config).step``.
      args: its positional arguments (``(state, batch)`` for a train step).
      expected: ``{layer path: compute dtype}``, e.g. :func:`expected_from_plan` of a plan.

    Returns:
      The table :func:`audit` gives.

    Raises:
      TypeError: ``step`` is not jitted (has no ``lower``); otherwise as :func:`audit`.
    """
    if not callable(getattr(step, "lower", None)):
        raise TypeError(
            f"audit_step needs a jitted function (jax.jit(f)), got {type(step).__name__}: "
            "its optimized HLO is what the audit reads"
        )
    return audit(step.lower(*args).compile(), expected)
