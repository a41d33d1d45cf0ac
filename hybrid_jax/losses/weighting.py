"""Loss weightings: ``L = Σ λ_i L_i`` over named terms, behind one interface.

Every weighting answers the same three calls, so a train step drives a fixed, a scheduled and an
adaptive weighting alike:

- ``params, state = weighting.init(names)``: learned parameters (``{}`` unless the weighting
  learns its weights) and non-learned state (``{}`` unless it keeps a history). Both are pytrees of
  fixed-dtype arrays that live in the train state and are checkpointed with it.
- ``total, metrics = weighting(terms, params, state, step)``: the fp32 total, differentiable with
  respect to the terms and to ``params``; ``metrics`` holds ``loss/<name>`` (the raw term) and
  ``weight/<name>`` (the effective ``λ_i``) as fp32 scalars.
- ``state = weighting.update(terms, state, step)``: the non-gradient update after a step.

``weighting.optimizer`` updates ``params`` (``None`` when there are none).

Faults: no term is ever masked. A NaN term with weight 0 gives a NaN total,
because ``0 * NaN = NaN`` and a silently dropped NaN would hide a broken term; the train step's
finite check then skips the step. To switch a term off, leave it out of both the weights and the
terms. Negative and NaN weights are rejected.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

Params = Any
State = Any
Metrics = dict[str, jax.Array]
Schedule = Callable[[jax.Array], Any]


class Weighting:
    """The interface every weighting implements; see the module docstring.

    Attributes:
      optimizer: the transformation that updates the learned ``params`` (``None`` when the
        weighting learns nothing).
    """

    optimizer: optax.GradientTransformation | None = None

    def init(self, names: Sequence[str]) -> tuple[Params, State]:
        """Learned parameters and state for the terms ``names``."""
        raise NotImplementedError

    def __call__(
        self,
        terms: Mapping[str, jax.Array],
        params: Params = None,
        state: State = None,
        step: jax.Array | None = None,
    ) -> tuple[jax.Array, Metrics]:
        """The fp32 total and the metrics ``loss/<name>`` and ``weight/<name>``."""
        raise NotImplementedError

    def update(self, terms: Mapping[str, jax.Array], state: State, step: jax.Array) -> State:
        """The state after a step whose loss terms were ``terms``; the identity by default."""
        del terms, step
        return state


class Weighted(Weighting):
    """Fixed or scheduled weights: ``L = Σ λ_i L_i``, each ``λ_i`` a number or an Optax schedule.

    A schedule is any function of the step (an ``int32`` scalar, the train state's ``step``) that
    returns a scalar, as Optax's schedules do; inside a jitted step it is evaluated on the traced
    step, so changing weights never retraces. Schedules are called under standard dtype promotion
    because Optax's own (``cosine_decay_schedule``, ...) mix Python floats with the ``int32`` step.

    The weighted sum is taken in fp32, in the order of ``weights``, whatever the terms' dtype.

    Args:
      weights: ``{name: weight}``; every weight a finite number ``>= 0`` or a schedule.

    Raises:
      TypeError: ``weights`` is not a mapping, a name is not a string, or a weight is neither a
        number nor a callable.
      ValueError: no weights; a weight is negative or NaN; a schedule fails at step 0, returns a
        non-scalar, or gives a negative or NaN value at step 0. At call time: the terms and the
        weights name different terms (the message names them), a term is not a scalar, or a
        schedule gives a negative or NaN value at a concrete step. Under ``jit`` the step is
        traced and cannot be checked: a negative or NaN scheduled weight makes the total NaN, so
        the train step skips the update instead of following a wrong sign.

    Examples:
      >>> import optax
      >>> weighting = Weighted({"lm": 1.0, "z_loss": optax.linear_schedule(0.0, 1e-4, 100)})
      >>> params, state = weighting.init(["lm", "z_loss"])
      >>> terms = {"lm": jnp.float32(2.0), "z_loss": jnp.float32(10.0)}
      >>> total, metrics = weighting(terms, params, state, step=jnp.int32(50))
      >>> total
      Array(2.0005, dtype=float32)
      >>> sorted(metrics)
      ['loss/lm', 'loss/z_loss', 'weight/lm', 'weight/z_loss']
    """

    def __init__(self, weights: Mapping[str, float | Schedule]):
        if not isinstance(weights, Mapping):
            raise TypeError(
                f"weights must be a {{name: weight}} mapping, got {type(weights).__name__}: "
                f"{weights!r:.100}"
            )
        if not weights:
            raise ValueError("weights must name at least one loss term, got {}")
        check_names(list(weights), "Weighted weights")
        self.weights: dict[str, float | Schedule] = {}
        for name, weight in weights.items():
            if callable(weight):
                _scheduled_value(name, weight, jnp.zeros((), jnp.int32))  # fail early if we can
                self.weights[name] = weight
            else:
                self.weights[name] = _static_weight(name, weight)

    def __repr__(self) -> str:
        return f"Weighted({self.weights!r})"

    def init(self, names: Sequence[str]) -> tuple[Params, State]:
        """No learned parameters and no state: ``({}, {})``, once the names match the weights."""
        check_same_names(names, self.weights, "the loss terms", "the weights")
        return {}, {}

    def weight_values(self, step: jax.Array | None = None) -> dict[str, jax.Array]:
        """Every ``λ_i`` at ``step`` as an fp32 scalar (``step`` is needed only for schedules)."""
        values = {}
        for name, weight in self.weights.items():
            if callable(weight):
                if step is None:
                    raise ValueError(
                        f"the weight of {name!r} is a schedule, so Weighted needs step=; pass the "
                        "train state's step"
                    )
                values[name] = _scheduled_value(name, weight, step)
            else:
                values[name] = jnp.asarray(weight, jnp.float32)
        return values

    def __call__(self, terms, params=None, state=None, step=None):
        """``Σ λ_i L_i`` in fp32 and the metrics; ``params`` and ``state`` are unused."""
        del params, state
        terms = check_terms(terms, self.weights, "the weights")
        return weighted_sum(terms, self.weight_values(step))


def weighted_sum(
    terms: Mapping[str, jax.Array], weights: Mapping[str, jax.Array]
) -> tuple[jax.Array, Metrics]:
    """``Σ λ_i L_i`` in fp32 over ``terms``' order, and the ``loss/``, ``weight/`` metrics.

    No term is masked: a NaN term makes the total NaN whatever its weight.
    """
    total = jnp.zeros((), jnp.float32)
    metrics = {}
    for name, term in terms.items():
        weight = jnp.asarray(weights[name]).astype(jnp.float32)
        total = total + weight * term
        metrics[f"loss/{name}"] = term
        metrics[f"weight/{name}"] = weight
    return total, metrics


def check_terms(
    terms: Mapping[str, jax.Array], expected: Sequence[str], expected_what: str
) -> dict[str, jax.Array]:
    """The terms as fp32 scalars in ``expected``'s order, once their names match ``expected``.

    Raises:
      TypeError: ``terms`` is not a mapping, or a term is not floating.
      ValueError: a name is in one but not the other, or a term is not a scalar.
    """
    if not isinstance(terms, Mapping):
        raise TypeError(
            f"loss terms must be a {{name: scalar}} mapping, got {type(terms).__name__}"
        )
    check_same_names(list(terms), expected, "the loss terms", expected_what)
    checked = {}
    for name in expected:
        term = jnp.asarray(terms[name])
        if term.ndim != 0:
            raise ValueError(
                f"loss term {name!r} must be a scalar, got shape {term.shape}; reduce it (e.g. "
                "with a mean) in the function that computes it"
            )
        if not jnp.issubdtype(term.dtype, jnp.floating):
            raise TypeError(f"loss term {name!r} must be floating, got {term.dtype}")
        # Upcast: a bf16 term would round the weighted sum to 8 bits of mantissa.
        checked[name] = term.astype(jnp.float32)
    return checked


def check_names(names: Sequence[Any], what: str) -> list[str]:
    """``names`` as a list, once every name is a non-empty string and none repeats."""
    if isinstance(names, str) or not isinstance(names, (Sequence, Mapping)):
        raise TypeError(f"{what}: term names must be a sequence of strings, got {names!r:.100}")
    names = list(names)
    for name in names:
        if not isinstance(name, str) or not name:
            raise TypeError(f"{what}: every term name must be a non-empty string, got {name!r}")
    duplicates = sorted({n for n in names if list(names).count(n) > 1})
    if duplicates:
        raise ValueError(f"{what}: duplicate term names {duplicates}")
    return names


def check_same_names(
    names: Sequence[str], expected: Sequence[str], names_what: str, expected_what: str
) -> None:
    names = check_names(names, names_what)
    missing = [n for n in expected if n not in names]
    extra = [n for n in names if n not in expected]
    if missing or extra:
        problems = []
        if missing:
            problems.append(f"{missing} in {expected_what} but not in {names_what}")
        if extra:
            problems.append(f"{extra} in {names_what} but not in {expected_what}")
        raise ValueError(
            "loss term names do not match: "
            + "; ".join(problems)
            + f". {expected_what.capitalize()} name {list(expected)}; {names_what} name "
            f"{list(names)}."
        )


def _static_weight(name: str, weight: Any) -> Any:
    if isinstance(weight, bool) or not (
        isinstance(weight, (numbers.Real, np.ndarray, jax.Array)) and np.ndim(weight) == 0
    ):
        raise TypeError(
            f"the weight of {name!r} must be a number or a schedule (a function of the step), got "
            f"{type(weight).__name__}: {weight!r:.100}"
        )
    if isinstance(weight, jax.core.Tracer):
        return jnp.asarray(weight).astype(jnp.float32)  # built under a transform: checked by NaN
    value = np.float32(weight)
    _check_value(name, value, "")
    return value


def _scheduled_value(name: str, schedule: Schedule, step: jax.Array) -> jax.Array:
    step = jnp.asarray(step)
    try:
        with jax.numpy_dtype_promotion("standard"):
            value = schedule(step)
    except Exception as e:
        raise ValueError(
            f"the weight schedule of {name!r} failed at step {step}: {type(e).__name__}: {e}"
        ) from e
    value = jnp.asarray(value)
    if value.ndim != 0 or not jnp.issubdtype(value.dtype, jnp.number):
        raise ValueError(
            f"the weight schedule of {name!r} must return a scalar, got "
            f"{value.dtype}{list(value.shape)}"
        )
    value = value.astype(jnp.float32)
    if isinstance(value, jax.core.Tracer):
        # Traced: no Python error is possible, so make the fault loud in the numbers instead.
        return jnp.where(value >= 0, value, jnp.float32(np.nan))
    _check_value(name, np.asarray(value), f" at step {int(step)}")
    return value


def _check_value(name: str, value: np.ndarray, where: str) -> None:
    if not np.isfinite(value) or value < 0:
        raise ValueError(
            f"the weight of {name!r} must be finite and >= 0, got {float(value):.6g}{where}. A "
            "weight of 0 "
            "does not mask a NaN term (0 * NaN = NaN); leave a term out of both the weights and "
            "the terms to switch it off"
        )
