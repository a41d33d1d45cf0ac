"""The matrix products of a compiled program: the dtypes XLA multiplies in, and whose they are.

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

On XLA:CPU a bf16-mixed layer's forward dot reads ``f32 x f32`` whose sources are
``bf16 x bf16``; an fp8 layer's reads ``f32 x f32`` with sources ``e4m3 x e4m3`` (its backward
dots ``e5m2`` gradients); an int8 layer's dot reads ``s8 x s8`` and accumulates in ``s32``. On a
GPU, XLA runs bf16 dots on bf16 operands and rewrites fp8 ones into ``__cublas$lt$matmul$f8``
custom calls on f8 operands, which are read too; the source dtypes agree across backends where
the operand dtypes do not, which is why the audit compares those.

A dot outside every known layer that reads the optimizer state (an argument whose path names
``opt_state``, as :class:`~hybrid_jax.train.TrainState` and Optax's examples call it) belongs to
the optimizer's update, e.g. Muon's Newton-Schulz products: it is named after the name scope it
ran in (``hybrid_jax.optim.muon`` opens ``muon``) or, without one, after the ``optax.partition``
groups whose state it reads.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from typing import Any

import numpy as np

from hybrid_jax.diagnostics import _hlo
from hybrid_jax.diagnostics._sources import Arguments, Sources, is_quantized
from hybrid_jax.precision import dtypes

#: A dot's pass: the model's forward and backward passes, and the optimizer's update.
PASSES = ("forward", "backward", "update")

# GPU backends rewrite dots into library calls: cuBLAS(Lt) GEMMs (fp8 ones included), cuDNN
# convolutions, oneDNN matmuls.
_GEMM_TARGET = re.compile(r"gemm|matmul|conv", re.IGNORECASE)
_IDENTIFIER = re.compile(r"[A-Za-z_]\w*|\d+")
# Scopes JAX opens itself around call primitives, remat and control flow: never a layer's name.
_JAX_SCOPES = re.compile(r"closed_call|core_call|custom_[jv]vp_call|checkpoint|remat|while|cond")
_JAX_SCOPES_AFTER = {"while": re.compile("body|cond"), "cond": re.compile(r"branch_\d+_fun")}
# The optimizer state in an argument's path, and an optax.partition group's label in it.
_OPT_STATE = re.compile(r"(?:^|\.)opt_state\b")
_GROUP = re.compile(r"inner_states\['(?P<label>[^']*)'\]")


def _scope_groups(op_name: str) -> list[tuple[str, ...]]:
    """The runs of plain name-scope components in ``op_name``, outermost first.

    ``"jit(step)/transpose(jvp(blocks/0/mlp/fc))/dot_general"`` -> ``[("blocks", "0", "mlp",
    "fc")]``: transform wrappers (``jvp(...)``) delimit runs, the contents of ``jit(...)`` are
    function names, the scopes JAX opens itself (``closed_call``, ``checkpoint``,
    ``while/body``, ``cond/branch_1_fun``) are dropped, and the trailing primitive name is left
    out.
    """
    head, _, tail = op_name.rpartition("/")
    if head and not any(c in tail for c in "()"):
        op_name = head  # the primitive's name: "dot_general", "transpose", ...
    elif not head and not any(c in op_name for c in "()"):
        return []

    def sequence(i: int, in_jit: bool) -> tuple[list[tuple[str, ...]], int]:
        groups, run, previous = [], [], ""
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
            elif token and not in_jit and not _is_jax_scope(token, previous):
                run.append(token)
            previous = token
            i = j + 1 if j < len(op_name) and op_name[j] == "/" else j
        if run:
            groups.append(tuple(run))
        return groups, i

    try:
        groups, end = sequence(0, False)
    except ValueError:
        return []
    return groups if end >= len(op_name) else []


def _is_jax_scope(token: str, previous: str) -> bool:
    after = _JAX_SCOPES_AFTER.get(previous)
    return bool(_JAX_SCOPES.fullmatch(token) or (after and after.fullmatch(token)))


def layer_of(op_name: str, layers: Iterable[str] | None = None) -> str | None:
    """The layer path an HLO instruction's ``op_name`` metadata names, or None.

    With ``layers``, the innermost of them that appears as consecutive scope components (so
    ``forward/blocks/0/mlp/fc`` gives ``blocks/0/mlp/fc``); without, or when none appears, the
    innermost run of scope components that looks like a parameter path (identifiers and indices
    joined by ``/``), which leaves out einsum scopes (``bhqk,bhkd->bhqd``), ``jit`` function
    names and the scopes JAX opens itself (``closed_call``).

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
      >>> layer_of("jit(step)/vmap()/closed_call/dot_general") is None
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
      layer: the layer path parsed from ``op_name`` (:func:`layer_of`); ``"optimizer"`` for a
        dot outside the known layers that reads the optimizer state (module docstring), or
        ``"optimizer (muon)"`` naming the ``optax.partition`` groups whose state it reads;
        else None.
      pass_: ``"update"`` for the optimizer's dots, ``"backward"`` when ``op_name`` shows a
        ``transpose(`` (a VJP), else ``"forward"``: one of :data:`PASSES`.
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
        if is_quantized(dtype):
            return all(s == dtype for s in self.source_dtypes)
        return max(self.source_dtypes, key=lambda d: d.itemsize) == dtype


def _is_dot(instruction: _hlo.Instruction) -> bool:
    if instruction.opcode in ("dot", "convolution"):
        return True
    target = _hlo.custom_call_target(instruction) if instruction.opcode == "custom-call" else None
    return bool(target and _GEMM_TARGET.search(target))


def hlo_dots(compiled: Any, layers: Iterable[str] | None = None) -> list[HloDot]:
    """The matrix products of a compiled program, with their dtypes and the layers they belong to.

    Reads every ``dot`` and ``convolution`` instruction of the optimized HLO, those inside fused
    computations included, and the GEMM and convolution custom calls of GPU backends. A dot in a
    computation that several fusions or calls run gives one record per call site (operands
    resolve through each). Operand dtypes are what the instruction reads; source dtypes follow
    the operands back through converts and fusions; a dot that reads the optimizer state
    outside the known layers is the optimizer's (see the module docstring).

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
    module = _hlo.read_module(compiled)
    sources, arguments = Sources(module), Arguments(module)
    layers = tuple(layers or ())
    dots = []
    for computation, instructions in module.computations.items():
        for instruction in instructions.values():
            if not _is_dot(instruction):
                continue
            op_name = _hlo.op_name(instruction)
            operands = [module.get(computation, o) for o in instruction.operands[:2]]
            if any(o is None or o.dtype is None for o in operands):
                continue  # not an array product this parser can read
            layer = layer_of(op_name, layers) if op_name else None
            pass_ = "backward" if "transpose(" in op_name else "forward"
            for chain in module.call_chains(computation):
                nodes = [(computation, o.name, chain) for o in operands]
                optimizer = None
                if layer not in layers:
                    optimizer = _optimizer(arguments(nodes[0]) | arguments(nodes[1]), layer)
                dots.append(
                    HloDot(
                        name=instruction.name,
                        opcode=_dot_kind(instruction),
                        computation=computation,
                        operand_dtypes=tuple(o.dtype for o in operands),
                        operand_shapes=tuple(o.shape for o in operands),
                        source_dtypes=tuple(
                            sources.source_dtype(node, o.dtype)
                            for node, o in zip(nodes, operands, strict=True)
                        ),
                        result_dtype=instruction.dtype,
                        result_shape=instruction.shape,
                        op_name=op_name,
                        layer=optimizer or layer,
                        pass_="update" if optimizer else pass_,
                    )
                )
    return dots


def _optimizer(arguments: frozenset[str], scope: str | None) -> str | None:
    """For a product that reads the optimizer state, ``"optimizer"`` followed by the name
    scope it ran in (``"optimizer (muon)"``) or else the labels of the ``optax.partition``
    groups whose state it reads; None for any other product."""
    state = [name for name in arguments if _OPT_STATE.search(name)]
    if not state:
        return None
    if scope:
        return f"optimizer ({scope})"
    labels = sorted({groups[-1] for name in state if (groups := _GROUP.findall(name))})
    return f"optimizer ({', '.join(labels)})" if labels else "optimizer"


def _dot_kind(instruction: _hlo.Instruction) -> str:
    return _hlo.custom_call_target(instruction) or instruction.opcode
