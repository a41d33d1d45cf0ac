"""Optimized HLO text, read into computations of instructions linked through fusions and calls.

The parser knows what the dot audit needs of XLA's text: each instruction's result dtype and
shape, opcode, operands and attributes (``metadata={op_name=...}``, ``calls=``), which
computation is the entry, and which fusions and calls run each computation.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import ml_dtypes
import numpy as np

_HEADER = re.compile(r"^(?P<entry>ENTRY\s+)?%?(?P<name>[^\s(]+)\s*\(.*\)\s*->.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s+(?P<root>ROOT\s+)?%?(?P<name>[^\s=]+)\s*=\s*(?P<rest>.+)$")
_ARRAY = re.compile(r"^(?P<dtype>[a-z][a-z0-9]*)\[(?P<dims>[^\]]*)\]")
_OPCODE = re.compile(r"\s*(?P<opcode>[a-z][\w\-]*)\(")
_OP_NAME = re.compile(r'op_name="(?P<op_name>(?:[^"\\]|\\.)*)"')
_CALLS = re.compile(r"\b(?:calls|to_apply)=%?(?P<callee>[\w.\-]+)")
_TARGET = re.compile(r'custom_call_target="(?P<target>[^"]*)"')


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
class Instruction:
    computation: str
    name: str
    opcode: str
    dtype: np.dtype | None  # None: a token; a tuple's is its first element's
    shape: tuple[int, ...]
    is_tuple: bool
    operands: tuple[str, ...]
    attributes: str
    parameter: int | None  # the number of a `parameter` instruction


def _parse_instruction(computation: str, name: str, rest: str) -> Instruction:
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
    return Instruction(
        computation, name, opcode, dtype, shape, is_tuple, operands, attributes, parameter
    )


class Module:
    """The computations of an HLO module's text, and how fusions and calls link them."""

    def __init__(self, text: str):
        self.computations: dict[str, dict[str, Instruction]] = {}
        self.roots: dict[str, str] = {}
        self.entry: str | None = None
        current = None
        for line in text.splitlines():
            if current is None:
                if header := _HEADER.match(line):
                    current = header["name"]
                    self.computations[current] = {}
                    if header["entry"]:
                        self.entry = current
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
        self.callers: dict[str, list[Instruction]] = {}
        self._chains: dict[str, tuple[tuple[Instruction, ...], ...]] = {}
        for instructions in self.computations.values():
            for instruction in instructions.values():
                m = _CALLS.search(instruction.attributes)
                if m and instruction.opcode in ("fusion", "call"):
                    self.callers.setdefault(m["callee"], []).append(instruction)

    def get(self, computation: str, name: str) -> Instruction | None:
        return self.computations.get(computation, {}).get(name)

    def call_chains(self, computation: str) -> tuple[tuple[Instruction, ...], ...]:
        """Each chain of fusions and calls from a top-level computation down to this one."""
        if computation not in self._chains:
            callers = self.callers.get(computation, [])
            self._chains[computation] = tuple(
                (*chain, caller)
                for caller in callers
                for chain in self.call_chains(caller.computation)
            ) or ((),)
        return self._chains[computation]

    def across_call(self, node: Node) -> Node | None:
        """What a fusion or call computes (its callee's root), or what a fused computation's
        parameter receives (the caller's operand); None for other instructions, or where the
        caller is ambiguous (a computation several sites run, reached without a chain)."""
        computation, name, chain = node
        instruction = self.get(computation, name)
        if instruction is None:
            return None
        if instruction.opcode in ("fusion", "call"):
            m = _CALLS.search(instruction.attributes)
            if m and m["callee"] in self.roots:
                callee = m["callee"]
                return callee, self.roots[callee], (*chain, instruction)
            return None
        if instruction.opcode != "parameter":
            return None
        callers = self.callers.get(computation, [])
        if chain:
            caller, chain = chain[-1], chain[:-1]
        elif len(callers) == 1:
            caller = callers[0]
        else:
            return None
        if instruction.parameter >= len(caller.operands):
            return None
        return caller.computation, caller.operands[instruction.parameter], chain


def op_name(instruction: Instruction) -> str:
    """The ``op_name`` of an instruction's metadata, unescaped ("" when it has none)."""
    m = _OP_NAME.search(instruction.attributes)
    return re.sub(r"\\(.)", r"\1", m["op_name"]) if m else ""


def custom_call_target(instruction: Instruction) -> str | None:
    """A custom call's ``custom_call_target`` ("__cublas$gemm"), or None."""
    m = _TARGET.search(instruction.attributes)
    return m["target"] if m else None


def read_module(compiled: Any) -> Module:
    """The :class:`Module` of a ``jax.stages.Compiled`` or of its ``as_text()``."""
    if isinstance(compiled, str):
        return Module(compiled)
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
    return Module(text)


# A value in context: (computation, instruction name, the chain of fusions/calls it runs in).
Node = tuple[str, str, tuple[Instruction, ...]]


class Dataflow:
    """A fact about each value computed from the facts about its inputs, memoized.

    Subclasses say which values are a value's inputs and how their facts combine; the walk is
    iterative, not recursive, since a residual stream is a long chain of elementwise ops.
    """

    #: The fact about an input the walk has not reached (a cycle, which valid HLO has not).
    empty: Any = None

    def __init__(self, module: Module):
        self.module = module
        self.memo: dict[Node, Any] = {}

    def inputs(self, node: Node) -> list[Node]:
        raise NotImplementedError

    def combine(self, node: Node, inputs: list[Any]) -> Any:
        raise NotImplementedError

    def __call__(self, node: Node) -> Any:
        stack, expanded = [node], set()
        while stack:
            top = stack[-1]
            if top in self.memo:
                stack.pop()
                continue
            inputs = self.inputs(top)
            pending = [i for i in inputs if i not in self.memo]
            if pending and top not in expanded:
                expanded.add(top)
                stack.extend(pending)
                continue
            self.memo[top] = self.combine(top, [self.memo.get(i, self.empty) for i in inputs])
            stack.pop()
        return self.memo[node]
