"""A tiny MLP in Flax NNX, for tests and examples of the train step."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import jax
from flax import nnx

from hybrid_jax.models.gpt import DotGeneral, Linear


class MLP(nnx.Module):
    """Dense layers with an activation between them (none after the last).

    Parameter paths are ``layers/{i}/kernel`` and ``layers/{i}/bias``. Kernels start as
    LeCun normal (``std = 1 / sqrt(fan_in)``), biases at zero. The computation runs in the
    parameters' dtype, as in :class:`~hybrid_jax.models.GPT`.

    Args:
      features: layer widths, input first: ``(4, 32, 1)`` is two layers, ``4 -> 32 -> 1``.
      rngs: its ``params`` stream initialises the kernels.
      activation: applied between layers (default :func:`jax.nn.gelu`).
      dot_general: the matmul of every layer (default :func:`jax.lax.dot_general`).

    Raises:
      ValueError: fewer than two widths, or a width that is not a positive integer.

    Examples:
      >>> from flax import nnx
      >>> model = MLP((4, 8, 1), rngs=nnx.Rngs(0))
      >>> model(jnp.ones((3, 4))).shape
      (3, 1)
    """

    def __init__(
        self,
        features: Sequence[int],
        *,
        rngs: nnx.Rngs,
        activation: Callable[[jax.Array], jax.Array] = jax.nn.gelu,
        dot_general: DotGeneral | None = None,
    ):
        features = tuple(features)
        if len(features) < 2 or any(
            isinstance(f, bool) or not isinstance(f, int) or f < 1 for f in features
        ):
            raise ValueError(
                f"features must be two or more positive integer widths, input first, got {features}"
            )
        self.activation = activation
        self.layers = nnx.List(
            [
                Linear(
                    n_in,
                    n_out,
                    bias=True,
                    std=1 / math.sqrt(n_in),
                    dot_general=dot_general,
                    rngs=rngs,
                )
                for n_in, n_out in itertools.pairwise(features)
            ]
        )

    def __call__(self, x_NxI: jax.Array) -> jax.Array:
        """Maps ``[batch, features[0]]`` to ``[batch, features[-1]]``."""
        for i, layer in enumerate(self.layers):
            if i:
                x_NxI = self.activation(x_NxI)
            x_NxI = layer(x_NxI)
        return x_NxI
