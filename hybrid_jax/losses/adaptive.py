"""Adaptive loss weightings: learned (``Uncertainty``) and loss-history-driven (``DWA``).

Both implement the :class:`~hybrid_jax.losses.weighting.Weighting` interface, so a train step
drives them exactly as it drives fixed weights.

Why DWA and not GradNorm: GradNorm (Chen et al., 2018) sets the weights from the norm of each
term's gradient with respect to a chosen "last shared layer", and learns them through a second loss
on those norms. That needs a per-term backward pass every step, a model-specific choice of layer,
and a gradient of a gradient norm (second order), all inside the train step. DWA (Liu et al., 2019)
reaches a similar goal — slow down the terms that are already falling fast — from the loss values
alone: no extra backward pass, nothing model-specific, and its state is a few scalars per term.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hybrid_jax.losses.weighting import (
    Weighting,
    check_names,
    check_same_names,
    check_terms,
    weighted_sum,
)


class Uncertainty(Weighting):
    """Uncertainty weighting: one learned log-variance ``s_i`` per term (Kendall et al., 2018).

    .. math::
      L = \\sum_i e^{-s_i} L_i + s_i, \\qquad \\lambda_i = e^{-s_i}

    ``s_i = log sigma_i²`` is learned with the model: it lives in the train state's learned
    loss-weight parameters and ``optimizer`` updates it from the gradient of this total. For a
    fixed ``L_i`` the total is smallest at ``e^{s_i} = L_i``, so each term ends up weighted by the
    inverse of its own size: a noisier task (larger irreducible loss) gets a smaller weight.

    Form and factors: the paper's Gaussian likelihood gives ``½ e^{-s} L + ½ s`` for a regression
    term and ``e^{-s} L + ½ s`` for a classification term. We use ``e^{-s} L + s`` for every term,
    as most implementations do: twice the regression form (the same optimum ``e^{s} = L`` and
    gradient direction) and, for classification, Kendall's own approximation up to the factor on
    the regulariser. One form keeps ``λ_i = e^{-s_i}`` comparable between terms, and the parameter
    is ``log sigma²`` rather than ``sigma`` so the total stays finite for any ``s``.

    Note that the total includes ``Σ s_i`` and can be negative; compare runs by the raw terms
    (``loss/<name>``), not by the total.

    Args:
      init_log_var: the starting ``s_i`` (``0``: every weight starts at 1), a number or a
        ``{name: number}`` mapping.
      optimizer: updates the log-variances; default ``optax.adam(1e-2)``, fast enough to follow a
        run of a few thousand steps (each step moves ``s_i`` by about the learning rate).

    Examples:
      >>> weighting = Uncertainty()
      >>> params, state = weighting.init(["lm", "aux"])
      >>> params
      {'log_var': {'aux': Array(0., dtype=float32), 'lm': Array(0., dtype=float32)}}
      >>> total, metrics = weighting({"lm": jnp.float32(2.0), "aux": jnp.float32(1.0)}, params)
      >>> total, metrics["weight/lm"]
      (Array(3., dtype=float32), Array(1., dtype=float32))

    References:
      Kendall, Gal & Cipolla, 2018, `Multi-Task Learning Using Uncertainty to Weigh Losses for
      Scene Geometry and Semantics <https://arxiv.org/abs/1705.07115>`_.
    """

    def __init__(
        self,
        init_log_var: float | Mapping[str, float] = 0.0,
        optimizer: optax.GradientTransformation | None = None,
    ):
        self.init_log_var = init_log_var
        self.optimizer = optax.adam(1e-2) if optimizer is None else optimizer

    def __repr__(self) -> str:
        return f"Uncertainty(init_log_var={self.init_log_var!r})"

    def init(self, names: Sequence[str]):
        """``({"log_var": {name: s_i}}, {})`` with fp32 scalars ``s_i``."""
        # Sorted, as JAX flattens dicts: the summation order then never changes between steps.
        names = sorted(check_names(names, "Uncertainty.init"))
        init = self.init_log_var
        if isinstance(init, Mapping):
            check_same_names(names, list(init), "the loss terms", "init_log_var")
        log_var = {}
        for name in names:
            value = np.float32(init[name] if isinstance(init, Mapping) else init)
            if not np.isfinite(value):
                raise ValueError(f"init_log_var of {name!r} must be finite, got {value}")
            log_var[name] = jnp.asarray(value)
        return {"log_var": log_var}, {}

    def __call__(self, terms, params=None, state=None, step=None):
        """``Σ e^{-s_i} L_i + s_i`` in fp32, differentiable in the terms and in ``params``."""
        del state, step
        if not (isinstance(params, Mapping) and isinstance(params.get("log_var"), Mapping)):
            raise ValueError(
                "Uncertainty needs its learned params ({'log_var': {name: s}}), from "
                f"Uncertainty.init(names); got {params!r:.200}"
            )
        log_var = params["log_var"]
        terms = check_terms(terms, list(log_var), "the learned log-variances")
        s = {name: jnp.asarray(log_var[name]).astype(jnp.float32) for name in terms}
        total, metrics = weighted_sum(terms, {name: jnp.exp(-s[name]) for name in terms})
        return total + sum(s.values()), metrics


class DWAState(NamedTuple):
    """What DWA remembers: per-term sums of the current window and means of the last two."""

    window_sum: dict[str, jax.Array]  # fp32, sum of each term over the current window
    last: dict[str, jax.Array]  # fp32, mean over the last complete window
    before: dict[str, jax.Array]  # fp32, mean over the window before that
    count: jax.Array  # int32, steps into the current window
    windows: jax.Array  # int32, complete windows seen, saturating at 2


class DWA(Weighting):
    """Dynamic Weight Average: weights from how fast each term fell lately (Liu et al., 2019).

    .. math::
      \\lambda_k = K \\frac{\\exp(r_k / T)}{\\sum_i \\exp(r_i / T)}, \\qquad
      r_k = \\frac{\\bar L_k(t-1)}{\\bar L_k(t-2)}

    where ``K`` is the number of terms and ``L̄_k(t)`` the mean of term ``k`` over window ``t``
    (the paper's windows are epochs). A term whose loss fell less (ratio near 1) gets more weight;
    the weights always sum to ``K``, and are all 1 until two windows are complete. They come from
    the state, so no gradient flows into them. See the module docstring for why DWA rather than
    GradNorm.

    Call :meth:`update` after every step that was applied (the train step keeps the old state on
    a skipped step, so a NaN loss never enters the averages). The ratio assumes positive losses;
    a window mean ``<= 0`` makes that term's ratio 1.

    Args:
      temperature: ``T``; larger is smoother (``T → ∞`` gives equal weights). The paper uses 2.
      period: steps per window. ``1`` is the formula on per-step losses, whose ratio is mostly
        minibatch noise; a few hundred steps behave like the paper's epochs.

    Raises:
      ValueError: ``temperature <= 0`` or ``period < 1``; at call time, names that do not match.

    Examples:
      >>> weighting = DWA(temperature=2.0)
      >>> params, state = weighting.init(["a", "b"])
      >>> for a, b in [(4.0, 4.0), (2.0, 4.0)]:  # term "a" halves, "b" stays
      ...     state = weighting.update({"a": jnp.float32(a), "b": jnp.float32(b)}, state, 0)
      >>> _, metrics = weighting({"a": jnp.float32(2.0), "b": jnp.float32(4.0)}, params, state)
      >>> round(float(metrics["weight/a"]), 3), round(float(metrics["weight/b"]), 3)
      (0.876, 1.124)

    References:
      Liu, Johns & Davison, 2019, `End-to-End Multi-Task Learning with Attention
      <https://arxiv.org/abs/1803.10704>`_ (section 3.3).
    """

    def __init__(self, temperature: float = 2.0, period: int = 1):
        if not (np.isfinite(temperature) and temperature > 0):
            raise ValueError(f"DWA temperature must be finite and > 0, got {temperature!r}")
        if not (isinstance(period, int) and period >= 1):
            raise ValueError(f"DWA period must be an int >= 1, got {period!r}")
        self.temperature = float(temperature)
        self.period = period

    def __repr__(self) -> str:
        return f"DWA(temperature={self.temperature}, period={self.period})"

    def init(self, names: Sequence[str]):
        """``({}, DWAState)`` with every average at 0 and no complete window."""
        # Sorted, as JAX flattens dicts: the summation order then never changes between steps.
        names = sorted(check_names(names, "DWA.init"))
        # A fresh array per field: a train step donates the state, and one buffer in two
        # fields would be donated twice.
        zeros = lambda: {name: jnp.zeros((), jnp.float32) for name in names}
        state = DWAState(
            zeros(), zeros(), zeros(), jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32)
        )
        return {}, state

    def weight_values(self, state: DWAState) -> dict[str, jax.Array]:
        """The current ``λ_k`` as fp32 scalars."""
        names = list(state.last)
        last = jnp.stack([state.last[n] for n in names])
        before = jnp.stack([state.before[n] for n in names])
        ratio = jnp.where(before > 0, last / jnp.where(before > 0, before, 1.0), 1.0)
        weights = len(names) * jax.nn.softmax(ratio / np.float32(self.temperature))
        weights = jnp.where(state.windows >= 2, weights, jnp.ones_like(weights))
        weights = jax.lax.stop_gradient(weights)
        return {name: weights[i] for i, name in enumerate(names)}

    def __call__(self, terms, params=None, state=None, step=None):
        """``Σ λ_k L_k`` in fp32 with the weights of :meth:`weight_values`."""
        del params, step
        state = _check_state(state)
        terms = check_terms(terms, list(state.last), "the DWA state")
        return weighted_sum(terms, self.weight_values(state))

    def update(self, terms, state, step):
        """Adds this step's terms to the window; closes the window every ``period`` steps."""
        del step
        state = _check_state(state)
        terms = check_terms(terms, list(state.last), "the DWA state")
        terms = jax.lax.stop_gradient(terms)
        count = state.count + 1
        close = count >= self.period
        window_sum = {n: state.window_sum[n] + terms[n] for n in terms}
        mean = {n: window_sum[n] / np.float32(self.period) for n in terms}

        def pick(closed, opened):
            return {n: jnp.where(close, closed[n], opened[n]) for n in terms}

        return DWAState(
            window_sum=pick({n: jnp.zeros_like(window_sum[n]) for n in terms}, window_sum),
            last=pick(mean, state.last),
            before=pick(state.last, state.before),
            count=jnp.where(close, jnp.zeros_like(count), count),
            windows=jnp.where(close, jnp.minimum(state.windows + 1, 2), state.windows),
        )


def _check_state(state) -> DWAState:
    if not isinstance(state, DWAState):
        raise ValueError(
            f"DWA needs its state, from DWA.init(names); got {type(state).__name__}: {state!r:.200}"
        )
    return state
