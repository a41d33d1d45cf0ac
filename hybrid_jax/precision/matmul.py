"""Quantized matmuls: drop-in replacements for :func:`jax.lax.dot_general` in fp8 and int8.

Each function has ``dot_general``'s signature ``(lhs, rhs, dimension_numbers, precision=None,
preferred_element_type=None)``, so it plugs into any layer with a ``dot_general`` hook (the
bundled GPT's, Flax's ``nnx.Linear``), configured with :func:`functools.partial`.

* :func:`fp8_dot_general`: both operands are rounded onto the e4m3 grid with per-tensor amax
  scales in the forward pass, and the incoming gradient onto the e5m2 grid in the backward pass
  (the hybrid format of Micikevicius et al. 2022). Products and sums are fp32, as in an fp8 GEMM
  with fp32 accumulation, so on CPU the rounding of a Hopper fp8 GEMM is simulated exactly (up
  to the order of the sum). The dot reads the fp8 codes themselves and the scales divide its
  output, the form XLA's GPU compiler runs as a real fp8 GEMM (``benchmarks/device_check.py``
  counts them).
* :func:`fp8_dot_general_delayed`: the same with *delayed* scaling, as Transformer Engine and
  Flax's ``fp8_ops`` do: each scale comes from a history of past amaxes, kept in the train state
  (:func:`fp8_meta`). The new histories come back as the "gradient" of the history argument
  ("overwrite with gradient"), so one ``jax.grad`` computes them inside the jitted step.
* :func:`int8_dot_general`: symmetric int8 with one scale per row of the activations and per
  output channel of the weights (W8A8, as in LLM.int8 without its outliers); both scales commute
  with the product, so the matmul really runs on int8 values with int32 accumulation. The
  gradient is straight-through (quantization-aware training, QAT).

What the backward pass keeps is the quantized operands (one byte per element) and their
scales, not the wide inputs.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hybrid_jax.precision import dtypes
from hybrid_jax.precision.quantize import (
    amax,
    dequantize,
    quantize,
    quantize_int8_channels,
    scale_from_amax,
)

DimensionNumbers = tuple[tuple[tuple[int, ...], tuple[int, ...]], tuple[tuple[int, ...], ...]]

_F32 = dtypes.FLOAT32

#: The leaf names of a layer's matmul weight (the first found wins): where fp8/int8 compute
#: reaches a layer, and what the precision audit reads a layer's compute dtype from.
WEIGHT_NAMES = ("kernel", "embedding")


def _normalize_dims(dimension_numbers: Any) -> DimensionNumbers:
    """Nested tuples (hashable, as a ``custom_vjp`` static argument needs) from any sequences."""
    (lc, rc), (lb, rb) = dimension_numbers
    return (tuple(lc), tuple(rc)), (tuple(lb), tuple(rb))


def _out_dtype(lhs: jax.Array, rhs: jax.Array, preferred_element_type: Any) -> np.dtype:
    if preferred_element_type is not None:
        return np.dtype(preferred_element_type)
    if lhs.dtype != rhs.dtype:
        raise TypeError(
            f"quantized dot_general operands must share a dtype (as lax.dot_general's do), got "
            f"{lhs.dtype} and {rhs.dtype}; cast one, or pass preferred_element_type"
        )
    return np.dtype(lhs.dtype)


def _like(x: jax.Array) -> jax.Array:
    """A zero-size stand-in that carries ``x``'s dtype into a backward pass."""
    return jnp.zeros((0,), x.dtype)


def _fp8_codes(x, dtype, scale=None):
    """``x`` on the fp8 grid: ``(codes, scale, divisor)`` with ``x ≈ codes / scale``.

    ``divisor`` is ``scale``, or NaN when ``x`` holds a non-finite value, which the codes cannot:
    a product divided by it is then NaN, and the train step skips the update.
    """
    q, scale = quantize(x, dtype, scale)
    return q, scale, jnp.where(jnp.all(jnp.isfinite(x)), scale, jnp.nan)


def _scaled_dot(a_q, a_divisor, b_q, b_divisor, dims):
    """The fp32 product of ``a_q / a_divisor`` and ``b_q / b_divisor``: a dot of the fp8 codes
    themselves, accumulated in fp32, divided by the per-tensor scales after (they commute with
    the sum).

    This is the form XLA:GPU runs as a cuBLASLt fp8 GEMM: on an H200 (jaxlib 0.11.2,
    ``benchmarks/device_check.py``) a dot of the codes became ``__cublas$lt$matmul$f8``, while
    the same product with the codes dequantized before the dot (``convert(q) / scale``, or
    Flax's ``convert(q) * scale``) stayed an fp32 or bf16 GEMM.
    """
    out = jax.lax.dot_general(a_q, b_q, dims, preferred_element_type=_F32)
    return out / a_divisor / b_divisor


def _gradient_dims(dims, lhs_ndim, rhs_ndim):
    """For ``out = dot_general(lhs, rhs, dims)``: ``(dims, perm)`` of ``d_lhs =
    dot_general(g, rhs, dims).transpose(perm)`` and of ``d_rhs`` likewise from ``g`` and
    ``lhs``, so that both gradients are products of the fp8 codes too."""
    (lc, rc), (lb, rb) = dims
    lf = [i for i in range(lhs_ndim) if i not in lc and i not in lb]
    rf = [i for i in range(rhs_ndim) if i not in rc and i not in rb]
    # g's axes: the batch axes, then lhs's free axes, then rhs's.
    g_batch = tuple(range(len(lb)))
    g_lf = tuple(range(len(lb), len(lb) + len(lf)))
    g_rf = tuple(range(len(lb) + len(lf), len(lb) + len(lf) + len(rf)))
    # A dot_general's result: batch axes, the first operand's free axes, the second's (in axis
    # order); each axis of it stands for an axis of the operand whose gradient it is.
    lhs_src = [*lb, *lf, *(lc[rc.index(r)] for r in sorted(rc))]
    rhs_src = [*rb, *rf, *(rc[lc.index(c)] for c in sorted(lc))]
    perm = lambda src: tuple(int(i) for i in np.argsort(src))
    d_lhs = (((g_rf, tuple(rf)), (g_batch, tuple(rb))), perm(lhs_src))
    d_rhs = (((g_lf, tuple(lf)), (g_batch, tuple(lb))), perm(rhs_src))
    return d_lhs, d_rhs


def _input_grads(residuals, dims, g, backward_dtype, g_scale=None):
    """The operands' gradients: ``g`` rounded to ``backward_dtype`` times the kept codes, in
    fp32 (:func:`_scaled_dot`), cast to the operands' dtypes."""
    lhs_q, lhs_scale, rhs_q, rhs_scale, lhs_like, rhs_like = residuals
    g_q, _, g_divisor = _fp8_codes(g, backward_dtype, g_scale)
    (lhs_dims, lhs_perm), (rhs_dims, rhs_perm) = _gradient_dims(dims, lhs_q.ndim, rhs_q.ndim)
    d_lhs = _scaled_dot(g_q, g_divisor, rhs_q, rhs_scale, lhs_dims).transpose(lhs_perm)
    d_rhs = _scaled_dot(g_q, g_divisor, lhs_q, lhs_scale, rhs_dims).transpose(rhs_perm)
    return d_lhs.astype(lhs_like.dtype), d_rhs.astype(rhs_like.dtype)


# --- fp8, current scaling -------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _fp8_dot(lhs, rhs, dims, forward_dtype, backward_dtype, out_dtype):
    return _fp8_dot_fwd(lhs, rhs, dims, forward_dtype, backward_dtype, out_dtype)[0]


def _fp8_dot_fwd(lhs, rhs, dims, forward_dtype, backward_dtype, out_dtype):
    lhs_q, lhs_scale, lhs_divisor = _fp8_codes(lhs, forward_dtype)
    rhs_q, rhs_scale, rhs_divisor = _fp8_codes(rhs, forward_dtype)
    out = _scaled_dot(lhs_q, lhs_divisor, rhs_q, rhs_divisor, dims).astype(out_dtype)
    return out, (lhs_q, lhs_scale, rhs_q, rhs_scale, _like(lhs), _like(rhs))


def _fp8_dot_bwd(dims, forward_dtype, backward_dtype, out_dtype, residuals, g):
    del forward_dtype, out_dtype
    return _input_grads(residuals, dims, g, backward_dtype)


_fp8_dot.defvjp(_fp8_dot_fwd, _fp8_dot_bwd)


def fp8_dot_general(
    lhs: jax.Array,
    rhs: jax.Array,
    dimension_numbers: Any,
    precision: Any = None,
    preferred_element_type: Any = None,
    *,
    forward_dtype: Any = "e4m3",
    backward_dtype: Any = "e5m2",
) -> jax.Array:
    """``lax.dot_general`` on fp8 operands with per-tensor scales from their current amax.

    Forward: each operand is scaled so that its largest finite magnitude lands on the format's
    maximum, rounded to ``forward_dtype`` (saturating), and the product is summed in fp32.
    Backward: the incoming gradient is rounded the same way to ``backward_dtype``, and the two
    input gradients are products of it with the rounded operands, in fp32. A non-finite value
    in an operand (or in the gradient) makes the whole product (or both input gradients) NaN,
    so the train step's finite check sees it.

    Args:
      lhs, rhs: floating operands of one dtype (bf16, f16 or f32).
      dimension_numbers: as for :func:`jax.lax.dot_general`.
      precision: ignored: the operands are fp8 and the accumulation fp32 whatever it says.
      preferred_element_type: the result dtype; by default the operands' dtype.
      forward_dtype: the operands' format, e4m3 by default (more precision).
      backward_dtype: the gradient's format, e5m2 by default (more range).

    Returns:
      The product, in ``preferred_element_type`` or the operands' dtype.

    Examples:
      >>> x = jnp.array([[1.0, 2.0, 3.0]])
      >>> w = jnp.array([[0.1], [0.2], [0.3]])
      >>> fp8_dot_general(x, w, (((1,), (0,)), ((), ())))  # exact: 1.4; e4m3 keeps 4 bits
      Array([[1.364923...]], dtype=float32)

    References:
      Micikevicius et al., 2022, `FP8 Formats for Deep Learning
      <https://arxiv.org/abs/2209.05433>`_.
    """
    del precision
    return _fp8_dot(
        lhs,
        rhs,
        _normalize_dims(dimension_numbers),
        dtypes.parse_dtype(forward_dtype),
        dtypes.parse_dtype(backward_dtype),
        _out_dtype(lhs, rhs, preferred_element_type),
    )


# --- fp8, delayed scaling -------------------------------------------------------------------


def fp8_meta(history_length: int = 16) -> dict[str, jax.Array]:
    """A fresh amax history for one :func:`fp8_dot_general_delayed`: zeros, fp32.

    Args:
      history_length: how many past amaxes each scale looks back over (Transformer Engine's
        ``amax_history_len``; 16 is Flax's default, TE's is 1024).

    Returns:
      ``{"lhs": history, "rhs": history, "grad": history}``, each ``float32[history_length]``.
    """
    if not (isinstance(history_length, int) and history_length >= 1):
        raise ValueError(f"history_length must be a positive int, got {history_length!r}")
    return {name: jnp.zeros((history_length,), _F32) for name in ("lhs", "rhs", "grad")}


def _delayed(history: jax.Array, x: jax.Array, dtype: np.dtype) -> tuple[jax.Array, jax.Array]:
    """The scale for ``x`` from ``history``, and the history with ``x``'s amax pushed in
    (newest at index 0, the oldest dropped)."""
    current = amax(x).astype(_F32)
    # An all-zero history knows nothing yet (the first step): use the tensor's own amax then,
    # rather than scale 1, which flushes typical weights and gradients to zero.
    known = jnp.max(history)
    scale = scale_from_amax(jnp.where(known > 0, known, current), dtype)
    return scale, jnp.roll(history, 1).at[0].set(current)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _fp8_dot_delayed(lhs, rhs, meta, dims, forward_dtype, backward_dtype, out_dtype):
    return _fp8_dot_delayed_fwd(lhs, rhs, meta, dims, forward_dtype, backward_dtype, out_dtype)[0]


def _fp8_dot_delayed_fwd(lhs, rhs, meta, dims, forward_dtype, backward_dtype, out_dtype):
    lhs_scale, lhs_history = _delayed(meta["lhs"], lhs, forward_dtype)
    rhs_scale, rhs_history = _delayed(meta["rhs"], rhs, forward_dtype)
    lhs_q, lhs_scale, lhs_divisor = _fp8_codes(lhs, forward_dtype, lhs_scale)
    rhs_q, rhs_scale, rhs_divisor = _fp8_codes(rhs, forward_dtype, rhs_scale)
    out = _scaled_dot(lhs_q, lhs_divisor, rhs_q, rhs_divisor, dims).astype(out_dtype)
    new_meta = {"lhs": lhs_history, "rhs": rhs_history}
    codes = (lhs_q, lhs_scale, rhs_q, rhs_scale, _like(lhs), _like(rhs))
    return out, (codes, meta["grad"], new_meta)


def _fp8_dot_delayed_bwd(dims, forward_dtype, backward_dtype, out_dtype, residuals, g):
    del forward_dtype, out_dtype
    codes, grad_history, new_meta = residuals
    g_scale, grad_history = _delayed(grad_history, g, backward_dtype)
    d_lhs, d_rhs = _input_grads(codes, dims, g, backward_dtype, g_scale)
    return d_lhs, d_rhs, {**new_meta, "grad": grad_history}


_fp8_dot_delayed.defvjp(_fp8_dot_delayed_fwd, _fp8_dot_delayed_bwd)


def fp8_dot_general_delayed(
    lhs: jax.Array,
    rhs: jax.Array,
    dimension_numbers: Any,
    precision: Any = None,
    preferred_element_type: Any = None,
    *,
    meta: dict[str, jax.Array],
    forward_dtype: Any = "e4m3",
    backward_dtype: Any = "e5m2",
) -> jax.Array:
    """:func:`fp8_dot_general` with delayed scaling from an amax history.

    Each operand's scale is ``format_max / max(history)`` over the last ``len(history)`` steps'
    amaxes (Transformer Engine's ``"max"`` recipe), so no reduction over the tensor has to finish
    before it can be quantized; a value above the history's maximum saturates. An all-zero
    history (the first step) falls back on the tensor's own amax.

    The history is updated by differentiation: the gradient of the loss with respect to ``meta``
    is not a derivative but the *new* history, with this step's amaxes of ``lhs``, ``rhs`` and
    the incoming gradient pushed in. The train step overwrites ``TrainState.fp8_meta`` with it
    (Flax's "overwrite with gradient" collection). Each history must feed exactly one matmul per
    step: two uses would add their new histories.

    Args:
      lhs, rhs, dimension_numbers, precision, preferred_element_type: as for
        :func:`fp8_dot_general`.
      meta: this matmul's histories, from :func:`fp8_meta`.
      forward_dtype, backward_dtype: as for :func:`fp8_dot_general`.

    Returns:
      The product, in ``preferred_element_type`` or the operands' dtype.

    Examples:
      >>> x, w, meta = jnp.ones((2, 3)), jnp.full((3, 4), 0.5), fp8_meta(4)
      >>> loss = lambda w, meta: fp8_dot_general_delayed(
      ...     x, w, (((1,), (0,)), ((), ())), meta=meta).sum()
      >>> _, new_meta = jax.grad(loss, argnums=(0, 1))(w, meta)
      >>> new_meta["rhs"]
      Array([0.5, 0. , 0. , 0. ], dtype=float32)

    References:
      NVIDIA Transformer Engine, `FP8 primer
      <https://docs.nvidia.com/deeplearning/transformer-engine/user-guide/examples/fp8_primer.html>`_.
    """
    del precision
    return _fp8_dot_delayed(
        lhs,
        rhs,
        meta,
        _normalize_dims(dimension_numbers),
        dtypes.parse_dtype(forward_dtype),
        dtypes.parse_dtype(backward_dtype),
        _out_dtype(lhs, rhs, preferred_element_type),
    )


# --- int8 -----------------------------------------------------------------------------------


def _int8_operands(lhs, rhs, dims):
    (lhs_contract, rhs_contract), _ = dims
    # Per row of the activations and per output channel of the weights.
    lhs_q, lhs_scale = quantize_int8_channels(lhs, lhs_contract)
    rhs_q, rhs_scale = quantize_int8_channels(rhs, rhs_contract)
    return lhs_q, lhs_scale, rhs_q, rhs_scale


def _int8_product(lhs_q, lhs_scale, rhs_q, rhs_scale, dims):
    (lhs_contract, rhs_contract), _ = dims
    acc = jax.lax.dot_general(lhs_q, rhs_q, dims, preferred_element_type=jnp.int32)
    # The result's axes are lhs's free axes, then rhs's: so are the scales' once squeezed.
    lhs_scale = jnp.squeeze(lhs_scale, tuple(lhs_contract))
    rhs_scale = jnp.squeeze(rhs_scale, tuple(rhs_contract))
    denominator = lhs_scale.reshape(lhs_scale.shape + (1,) * rhs_scale.ndim) * rhs_scale
    return acc.astype(_F32) / denominator


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _int8_dot(lhs, rhs, dims, out_dtype):
    return _int8_product(*_int8_operands(lhs, rhs, dims), dims).astype(out_dtype)


def _int8_dot_fwd(lhs, rhs, dims, out_dtype):
    operands = _int8_operands(lhs, rhs, dims)
    out = _int8_product(*operands, dims).astype(out_dtype)
    return out, (*operands, _like(lhs), _like(rhs))


def _int8_dot_bwd(dims, out_dtype, residuals, g):
    del out_dtype
    # Straight-through: the fp32 gradient of the product of the dequantized operands.
    lhs_q, lhs_scale, rhs_q, rhs_scale, lhs_like, rhs_like = residuals
    lhs_f32, rhs_f32 = dequantize(lhs_q, lhs_scale, _F32), dequantize(rhs_q, rhs_scale, _F32)
    dot_f32 = lambda a, b: jax.lax.dot_general(a, b, dims, preferred_element_type=_F32)
    _, vjp = jax.vjp(dot_f32, lhs_f32, rhs_f32)
    d_lhs, d_rhs = vjp(g.astype(_F32))
    return d_lhs.astype(lhs_like.dtype), d_rhs.astype(rhs_like.dtype)


_int8_dot.defvjp(_int8_dot_fwd, _int8_dot_bwd)


def int8_dot_general(
    lhs: jax.Array,
    rhs: jax.Array,
    dimension_numbers: Any,
    precision: Any = None,
    preferred_element_type: Any = None,
) -> jax.Array:
    """``lax.dot_general`` on symmetric int8 operands, for quantization-aware training.

    ``lhs`` (activations) gets one scale per row and ``rhs`` (weights) one per output channel,
    each ``127 / amax`` over the contracted axes; values round half to even onto
    ``[-127, 127]``. The product of the int8 codes accumulates in int32 and is divided by the two
    scales, which is exact because a per-row and a per-column scale commute with the sum. The
    gradient is straight-through: the ordinary gradient of the product of the dequantized
    operands, in fp32.

    Args:
      lhs, rhs: floating operands of one dtype.
      dimension_numbers: as for :func:`jax.lax.dot_general`, without batch dimensions.
      precision: ignored (the product is exact integer arithmetic).
      preferred_element_type: the result dtype; by default the operands' dtype.

    Returns:
      The product, in ``preferred_element_type`` or the operands' dtype.

    Raises:
      ValueError: ``dimension_numbers`` has batch dimensions.

    Examples:
      >>> x = jnp.array([[1.0, 2.0, 3.0]])
      >>> w = jnp.array([[0.1], [0.2], [0.3]])
      >>> int8_dot_general(x, w, (((1,), (0,)), ((), ())))  # exact: 1.4
      Array([[1.401587...]], dtype=float32)

    References:
      Jacob et al., 2018, `Quantization and Training of Neural Networks for Efficient
      Integer-Arithmetic-Only Inference <https://arxiv.org/abs/1712.05877>`_.
    """
    del precision
    dims = _normalize_dims(dimension_numbers)
    if dims[1] != ((), ()):
        raise ValueError(
            f"int8_dot_general takes no batch dimensions, got {dims[1]}: per-channel scales "
            "are defined for plain matmuls; reshape the batch into the free axes"
        )
    return _int8_dot(lhs, rhs, dims, _out_dtype(lhs, rhs, preferred_element_type))


def dot_general_for(compute_dtype: Any) -> Any:
    """The matmul that computes in ``compute_dtype``: fp8, int8, or ``lax.dot_general``.

    Args:
      compute_dtype: a dtype or name; e4m3 and e5m2 give :func:`fp8_dot_general` with that
        forward format (gradients in e5m2), int8 gives :func:`int8_dot_general`, anything else
        :func:`jax.lax.dot_general` (the operands already arrive in the compute dtype).

    Returns:
      A function with ``dot_general``'s signature.

    Examples:
      >>> dot_general_for("e4m3").func.__name__, dot_general_for("bf16").__name__
      ('fp8_dot_general', 'dot_general')
    """
    dtype = dtypes.parse_dtype(compute_dtype)
    if dtype == dtypes.INT8:
        return int8_dot_general
    if dtype in dtypes.QUANTIZED:
        return functools.partial(fp8_dot_general, forward_dtype=dtypes.short_name(dtype))
    return jax.lax.dot_general
