"""Loss scaling: keep small fp16 gradients from flushing to zero, and skip non-finite steps.

The three loss scales follow jmp (same fields, defaults and ``scale``/``unscale``/``adjust``
semantics; ``DynamicLossScale`` trajectories are bit-identical to jmp's). Unlike jmp, every field
is part of the pytree: jmp's ``DynamicLossScale`` drops ``min_loss_scale`` when flattened, so the
floor silently resets to 1 under ``jax.jit``, ``lax.scan`` or a checkpoint round trip.

Numbers given to a constructor are stored as fp32 arrays, so ``scale`` and ``unscale`` return at
least fp32 for any floating leaf, however the scale was written. jmp keeps a Python number as
is, so there ``StaticLossScale(2**15)`` scales an f16 loss in f16 (a loss above 2 overflows to
inf) and unscales f16 gradients in f16 (where the small ones the scale protected flush to zero),
while ``StaticLossScale(jnp.float32(2**15))`` gives fp32, as here.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

from hybrid_jax.precision import dtypes
from hybrid_jax.tree import path_str

T = TypeVar("T")


def _as_array(x: Any, dtype=jnp.float32) -> Any:
    # Python/NumPy numbers and concrete arrays become strongly typed device arrays of `dtype`, so
    # that the state's avals (and arguments' kinds: a NumPy leaf and a jax.Array leaf are cached
    # apart; so are weak and strong types) never change between steps and the step compiles
    # once. Tracers and the placeholders JAX passes while unflattening are left alone.
    if isinstance(x, (int, float, np.number, np.ndarray)) or (
        isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer)
    ):
        return jnp.asarray(x, dtype)
    return x


def _scale_leaf(x: Any, factor: jax.Array) -> Any:
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.inexact):
        return x  # integer/bool leaves and float0 cotangents carry no gradient to scale
    # Promote explicitly, as jmp's implicit `x * scale` does (f16 * f32 -> f32), so this also
    # runs under jax_numpy_dtype_promotion="strict". Complex leaves keep their dtype.
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        return x * factor.astype(x.dtype)
    dtype = dtypes.at_least_f32(x.dtype)
    return x.astype(dtype) * factor.astype(dtype)


def _multiply(tree: T, factor: Any) -> T:
    factor = jnp.asarray(factor)
    return jax.tree_util.tree_map(lambda x: _scale_leaf(x, factor), tree)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class NoOpLossScale:
    """A loss scale that does nothing: ``scale``, ``unscale`` and ``adjust`` are identities."""

    @property
    def loss_scale(self) -> np.ndarray:
        return np.ones((), np.float32)

    def scale(self, tree: T) -> T:
        return tree

    def unscale(self, tree: T) -> T:
        return tree

    def adjust(self, grads_finite: jax.Array) -> NoOpLossScale:
        del grads_finite
        return self


class _MultipliesByScale:
    """``scale`` and ``unscale`` for loss scales that hold a ``loss_scale`` array."""

    loss_scale: jax.Array

    def scale(self, tree: T) -> T:
        """Multiplies every floating leaf by the loss scale, in fp32 at least (f64 stays f64)."""
        return _multiply(tree, self.loss_scale)

    def unscale(self, tree: T) -> T:
        """Multiplies every floating leaf by ``1 / loss_scale``, in fp32 at least (as ``scale``)."""
        return _multiply(tree, 1 / jnp.asarray(self.loss_scale))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StaticLossScale(_MultipliesByScale):
    """Scales the loss, and unscales gradients, by a fixed constant.

    Examples:
      >>> StaticLossScale(128.0).scale(jnp.float32(0.5))
      Array(64., dtype=float32)
    """

    loss_scale: jax.Array

    def __post_init__(self):
        object.__setattr__(self, "loss_scale", _as_array(self.loss_scale))

    def adjust(self, grads_finite: jax.Array) -> StaticLossScale:
        del grads_finite
        return self


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DynamicLossScale(_MultipliesByScale):
    """A loss scale that grows while gradients stay finite and backs off when they do not.

    Each call of ``adjust(grads_finite)`` follows jmp::

        if grads_finite:
            counter = (counter + 1) % period
            if counter == 0:  # `period` finite steps in a row
                loss_scale = min(loss_scale * factor, max_loss_scale)  # kept only if finite
        else:
            counter = 0
            loss_scale = max(min_loss_scale, loss_scale / factor)  # or loss_scale * backoff

    Every field is a pytree leaf or static metadata, so the whole state, floor included, survives
    ``jax.jit``, ``lax.scan`` and checkpoints. Numbers given to the constructor become fp32 device
    arrays (the counter int32), so a state built from Python numbers and one returned by a jitted
    step hit the same compiled step.

    Defaults are jmp's: ``period=2000``, ``factor=2``, ``min_loss_scale=1``; the initial scale is
    yours to give (jmp and Keras use 2^15). :meth:`grad_scaler` gives PyTorch's ``GradScaler``
    behaviour instead (2^16, backoff 0.5, no floor).

    Attributes:
      loss_scale: the current scale (fp32 scalar).
      counter: finite steps since the last change (int32 scalar).
      period: finite steps in a row before the scale grows. Any integer-like value is accepted,
        as in jmp (``np.int64(2000)``, ``5.0``), and stored as a Python int.
      factor: growth factor; the scale is divided by it on a non-finite step unless ``backoff``.
        A NumPy number is stored as the Python number it holds.
      min_loss_scale: the floor a non-finite step cannot push the scale below.
      max_loss_scale: the ceiling growth cannot pass (default: none, only finiteness).
      backoff: if given, a non-finite step multiplies the scale by it instead of dividing by
        ``factor`` (PyTorch's ``backoff_factor``).

    Examples:
      >>> ls = DynamicLossScale(2.0**15, period=2)
      >>> ls = ls.adjust(jnp.array(True)).adjust(jnp.array(True))
      >>> float(ls.loss_scale)
      65536.0
      >>> float(ls.adjust(jnp.array(False)).loss_scale)
      32768.0

    References:
      Micikevicius et al., 2018, `Mixed Precision Training <https://arxiv.org/abs/1710.03740>`_.
    """

    loss_scale: jax.Array
    counter: jax.Array = 0
    period: int = dataclasses.field(default=2000, metadata={"static": True})
    factor: int = dataclasses.field(default=2, metadata={"static": True})
    min_loss_scale: jax.Array = 1.0
    max_loss_scale: jax.Array = float("inf")
    backoff: float | None = dataclasses.field(default=None, metadata={"static": True})

    def __post_init__(self):
        fields = ("loss_scale", "min_loss_scale", "max_loss_scale")
        # Only numbers a user wrote are checked: JAX rebuilds this class from arrays in
        # tree_map, unflatten and restore (zeros_like of a state must not raise).
        given = [getattr(self, f) for f in fields]
        numbers = all(isinstance(x, (int, float, np.number)) for x in given)
        for field in fields:
            object.__setattr__(self, field, _as_array(getattr(self, field)))
        object.__setattr__(self, "counter", _as_array(self.counter, jnp.int32))
        # Static metadata: canonical Python numbers, so that `np.int64(2000)` from a config and
        # `2000` give equal, hashable tree definitions (and one compiled step).
        object.__setattr__(self, "period", _as_count(self.period))
        object.__setattr__(self, "factor", _as_python_number(self.factor))
        if not self.period >= 1:
            raise ValueError(f"period must be a positive int, got {self.period!r}")
        if not self.factor > 1:
            raise ValueError(f"factor must be > 1, got {self.factor!r}")
        if self.backoff is not None and not 0 < self.backoff < 1:
            raise ValueError(f"backoff must be in (0, 1), got {self.backoff!r}")
        if numbers:
            scale, low, high = (float(x) for x in given)
            if not np.isfinite(scale) or scale <= 0:
                raise ValueError(f"loss_scale must be finite and > 0, got {scale}")
            if not low <= scale <= high:
                raise ValueError(
                    f"need min_loss_scale <= loss_scale <= max_loss_scale, got "
                    f"{low} <= {scale} <= {high}"
                )

    @classmethod
    def grad_scaler(
        cls,
        init_scale: float = 2.0**16,
        growth_factor: int = 2,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
    ) -> DynamicLossScale:
        """The scale PyTorch's ``torch.amp.GradScaler`` keeps, with its argument names and defaults.

        ``GradScaler`` grows on the ``growth_interval``-th finite step in a row (as jmp does),
        multiplies by ``backoff_factor`` on a non-finite step, and has no floor. A recipe ported
        from PyTorch gets the same scale trajectory, bit for bit, when the factors are powers of
        two (the defaults). Otherwise it can drift by an ulp: PyTorch multiplies the fp32 scale
        by a double ``backoff_factor`` and rounds once, while here the factor is rounded to fp32
        first (JAX computes in fp32 unless x64 is enabled).
        """
        return cls(
            init_scale,
            period=growth_interval,
            factor=growth_factor,
            backoff=backoff_factor,
            min_loss_scale=0.0,
        )

    def adjust(self, grads_finite: jax.Array) -> DynamicLossScale:
        """The next state, given whether this step's gradients were all finite (a scalar bool).

        Raises:
          ScalarBoolError: ``grads_finite`` is not a scalar bool (a ``TypeError``, and an
            ``AssertionError`` as in jmp).
        """
        grads_finite = _check_scalar_bool(grads_finite, "grads_finite", "Expected boolean scalar")
        loss_scale = jnp.asarray(self.loss_scale)
        grown = loss_scale * self.factor
        grown = jnp.minimum(jnp.where(jnp.isfinite(grown), grown, loss_scale), self.max_loss_scale)
        if self.backoff is None:
            shrunk = loss_scale / self.factor
        else:
            shrunk = loss_scale * np.float32(self.backoff)
        shrunk = jnp.maximum(self.min_loss_scale, shrunk)
        counter = (jnp.asarray(self.counter) + 1) % self.period
        new_scale = jnp.where(grads_finite, jnp.where(counter == 0, grown, loss_scale), shrunk)
        return dataclasses.replace(
            self,
            loss_scale=new_scale,
            counter=jnp.where(grads_finite, counter, jnp.zeros_like(counter)),
        )


LossScale = NoOpLossScale | StaticLossScale | DynamicLossScale


def all_finite(tree: Any) -> jax.Array:
    """Whether every element of every floating leaf of ``tree`` is finite (a scalar bool).

    Integer and boolean leaves are always finite; an empty tree is finite.

    Examples:
      >>> bool(all_finite({"a": jnp.ones(3), "b": jnp.array([1.0, jnp.nan])}))
      False
    """
    checks = [
        jnp.isfinite(x).all()
        for x in jax.tree_util.tree_leaves(tree)
        if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)
    ]
    if not checks:
        return jnp.array(True)
    return jnp.stack(checks).all()


def select_tree(pred: jax.Array, a: T, b: T) -> T:
    """Picks ``a`` where ``pred`` is true, else ``b``, for whole trees (``lax.select`` per leaf).

    Args:
      pred: a scalar boolean.
      a: a pytree.
      b: a pytree with ``a``'s structure, shapes and dtypes.

    Returns:
      ``a`` if ``pred`` else ``b``, computed without a branch (so it runs under ``jit``).

    Raises:
      ScalarBoolError: ``pred`` is not a scalar bool (a ``TypeError``, and an ``AssertionError``
        as in jmp).
      TypeError: ``a`` and ``b`` differ in a leaf's dtype or shape (the message names the path).
      ValueError: ``a`` and ``b`` have different structures.
    """
    pred = _check_scalar_bool(pred, "pred", "expected boolean scalar")

    def select(keypath, x, y):
        x, y = jnp.asarray(x), jnp.asarray(y)
        if x.dtype != y.dtype or x.shape != y.shape:
            raise TypeError(
                f"select_tree: leaf {path_str(keypath)!r} is {x.dtype}{list(x.shape)} in `a` but "
                f"{y.dtype}{list(y.shape)} in `b`"
            )
        return jax.lax.select(pred, x, y)

    return jax.tree_util.tree_map_with_path(select, a, b)


class ScalarBoolError(TypeError, AssertionError):
    """A predicate that is not a scalar bool, given to :func:`select_tree` or ``adjust``.

    A ``TypeError``, as this library raises for a wrong argument; also an ``AssertionError``, as
    jmp raises (by ``assert``) for the same mistake, so code written against jmp that catches it
    keeps working. NumPy's ``AxisError`` (a ``ValueError`` and an ``IndexError``) set the
    precedent.
    """


def _check_scalar_bool(pred: Any, name: str, jmp_words: str) -> jax.Array:
    # `jmp_words` is the phrase jmp's own message starts with, which its users match on.
    pred = jnp.asarray(pred)
    if pred.ndim != 0 or pred.dtype != jnp.bool_:
        raise ScalarBoolError(
            f"{jmp_words}: {name} is {pred.dtype}{list(pred.shape)}; pass a scalar bool, "
            "such as all_finite(grads)"
        )
    return pred


def _as_count(value: Any) -> Any:
    # jmp takes any integer-like period: 2000, np.int64(2000), or 5.0 from a float hyperparameter.
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"period must be a positive int, got {value!r}")
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return int(value)
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"period must be a positive int, got {value!r}") from None


def _as_python_number(value: Any) -> Any:
    # A NumPy or concrete 0-d JAX number becomes the Python number it holds.
    concrete = isinstance(value, (np.generic, np.ndarray, jax.Array)) and not isinstance(
        value, jax.core.Tracer
    )
    return np.asarray(value).item() if concrete and np.ndim(value) == 0 else value
