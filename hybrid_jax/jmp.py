"""A drop-in for DeepMind's jmp: ``import hybrid_jax.jmp as jmp``.

`jmp <https://github.com/deepmind/jmp>`_ (0.0.4) is the small mixed-precision library most JAX
code starts from: a three-dtype ``Policy`` with a string grammar, and loss scales. This module
has its public names and signatures, backed by :mod:`hybrid_jax.precision`, so that code written
for jmp runs after one changed import, and its policies and loss scales work with the rest of
this package (``PrecisionRules``, ``make_train_step``, checkpoints)::

    import hybrid_jax.jmp as jmp

    policy = jmp.get_policy("p=f32,c=f16,o=f32")
    loss_scale = jmp.DynamicLossScale(jmp.half_dtype()(2**15))
    ...
    grads = loss_scale.unscale(grads)
    grads_finite = jmp.all_finite(grads)
    loss_scale = loss_scale.adjust(grads_finite)
    params = jmp.select_tree(grads_finite, new_params, params)

Everything jmp accepts is accepted, with jmp's results, except for these deliberate deviations:

* **Every loss-scale field is a pytree leaf** (``StaticLossScale.loss_scale``; and
  ``min_loss_scale`` of ``DynamicLossScale``, which jmp drops when flattening). jmp's floor
  silently resets to 1 under ``jax.jit``, ``lax.scan`` or a checkpoint round trip, and its
  ``StaticLossScale`` is all static metadata, so a new scale means a new compile.
* **Numbers given to a loss-scale constructor are stored as fp32 arrays** (the counter int32),
  integers included (jmp warns about an integer scale and keeps it). A state built from Python
  numbers then has the same avals as one returned by a jitted step, so the step compiles once.
  In consequence ``scale`` and ``unscale`` of an f16 or bf16 leaf return fp32, as jmp does for an
  array scale (``jmp.StaticLossScale(jnp.float32(2**15))``, its documented use) but not for a
  Python number (``jmp.StaticLossScale(2**15)`` computes in f16, where a scaled loss above 2
  overflows and unscaled gradients below 6e-8 flush to zero). ``NoOpLossScale.loss_scale`` is an
  fp32 scalar array equal to 1 (jmp: the int 1).
* **A predicate that is not a scalar bool** (``select_tree``, ``adjust``) raises
  :class:`~hybrid_jax.precision.loss_scale.ScalarBoolError`, both the ``TypeError`` this package
  raises for a wrong argument and the ``AssertionError`` jmp raises, with jmp's words
  ("expected boolean scalar") in the message.
* **Policy fields hold ``numpy.dtype`` objects** (jmp keeps what it was given, such as
  ``jnp.float16``). They compare equal to the scalar types (``policy.compute_dtype ==
  jnp.float16``) and work as ``dtype=`` arguments, but are not callable:
  ``jmp.half_dtype()(2**15)`` works, ``policy.compute_dtype(2**15)`` does not.
* **``str(policy)`` writes ``f32``** where jmp writes ``full``; both strings parse in both
  libraries to the same policy. ``str()`` is the package's one spelling, shown in logs, reports and
  checkpoints, and ``f32`` reads like its neighbours ``bf16`` and ``f16``.
* **The grammar is a superset**: presets (``"bf16-mixed"``), more names (``fp16``, ``e4m3``), and
  optimizer keys (``mu=int8``). Strings jmp rejects are rejected too, some jmp accepts by accident
  are refused with a clear ``ValueError`` (a repeated key: jmp keeps the last). A misspelt dtype
  raises a ``ValueError`` starting "Unknown dtype", as in jmp; other errors have this package's
  wording.
* **Casts** (``cast_to_full``, ``Policy.cast_to_*``) also cast NumPy scalars and
  ``jax.ShapeDtypeStruct`` leaves, which jmp passes through; like jmp they leave integers,
  booleans, complex numbers, Python numbers and other objects alone.
"""

from __future__ import annotations

from typing import TypeVar

import jax.numpy as jnp

from hybrid_jax.precision import dtypes
from hybrid_jax.precision.loss_scale import (
    DynamicLossScale,
    LossScale,
    NoOpLossScale,
    StaticLossScale,
    all_finite,
    select_tree,
)
from hybrid_jax.precision.policy import PRESETS, Policy, cast_floating

T = TypeVar("T")

__all__ = (
    "DynamicLossScale",
    "LossScale",
    "NoOpLossScale",
    "Policy",
    "StaticLossScale",
    "all_finite",
    "cast_to_full",
    "cast_to_half",
    "get_policy",
    "half_dtype",
    "select_tree",
)


def get_policy(policy_name: str) -> Policy:
    """Parses a policy string, as jmp's ``get_policy`` (see :meth:`Policy.parse`).

    Args:
      policy_name: one dtype name for all three dtypes (``"half"``), jmp's ``key=dtype`` items
        (``"params=float32,compute=float16,output=float32"``, or ``"p=f32,c=f16"``: params
        default to f32, compute follows params, output follows compute), or a preset.

    Returns:
      The :class:`Policy`.

    Raises:
      ValueError: the string does not parse; for a misspelt dtype the message starts with
        "Unknown dtype", as in jmp.

    Examples:
      >>> str(get_policy("c=bf16"))
      'p=f32,c=bf16,o=bf16'
      >>> get_policy("float16").param_dtype == jnp.float16
      True
    """
    try:
        return Policy.parse(policy_name)
    except dtypes.UnknownDtypeError as e:
        raise dtypes.UnknownDtypeError(
            f"Unknown dtype {e.name!r} in policy {policy_name!r}: use one of "
            f"{', '.join(dtypes.ACCEPTED_NAMES)}, or a preset ({', '.join(PRESETS)})",
            e.name,
        ) from None


def half_dtype() -> type:
    """The half-precision type of the default backend: ``jnp.bfloat16`` on TPU, else float16.

    A scalar type, as in jmp, so it can also build a value: ``half_dtype()(2**15)``.

    Examples:
      >>> half_dtype()(2.0).dtype in (jnp.float16, jnp.bfloat16)
      True
    """
    return jnp.bfloat16 if dtypes.half_dtype() == dtypes.BFLOAT16 else jnp.float16


def cast_to_full(tree: T) -> T:
    """Casts the floating leaves of ``tree`` to fp32; other leaves pass through.

    Examples:
      >>> cast_to_full({"w": jnp.ones(2, jnp.bfloat16), "step": jnp.int32(3)})["w"].dtype
      dtype('float32')
    """
    return cast_floating(tree, dtypes.FLOAT32)


def cast_to_half(tree: T) -> T:
    """Casts the floating leaves of ``tree`` to :func:`half_dtype`; other leaves pass through.

    Examples:
      >>> cast_to_half({"w": jnp.ones(2)})["w"].dtype == half_dtype()
      True
    """
    return cast_floating(tree, dtypes.half_dtype())
