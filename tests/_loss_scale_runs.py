"""What the loss-scale tests share: bitwise equality and ``adjust`` trajectories (ours, jmp's)."""

import functools

import jax
import jax.numpy as jnp
import jmp
import numpy as np


def assert_same_bits(actual, expected):
    """Bitwise equality (so -0.0 != 0.0 and every NaN payload counts), dtype and shape included."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    uint = f"u{actual.dtype.itemsize}"
    np.testing.assert_array_equal(actual.reshape(-1).view(uint), expected.reshape(-1).view(uint))


@jax.jit
def run_adjust(loss_scale, finite):
    """Drives ``loss_scale.adjust`` over ``finite``; returns the final state and the trajectory.

    The whole ``DynamicLossScale`` is the scan carry: every field, floor included, is a pytree
    field, so nothing is lost.
    """

    def body(ls, ok):
        ls = ls.adjust(ok)
        return ls, (ls.loss_scale, ls.counter)

    return jax.lax.scan(body, loss_scale, jnp.asarray(finite))


@functools.partial(jax.jit, static_argnames=("period", "factor"))
def _run_jmp(loss_scale, min_loss_scale, finite, *, period, factor):
    """The same for ``jmp.DynamicLossScale``.

    jmp's ``tree_flatten`` keeps only (loss_scale, counter) and its ``tree_unflatten`` rebuilds the
    object with the default ``min_loss_scale=1`` (jmp PR #44), so carrying a jmp loss scale through
    ``lax.scan`` would silently reset a non-default floor. The carry is therefore its two arrays,
    and the object is rebuilt each step with the floor closed over.
    """

    def body(carry, ok):
        ls = jmp.DynamicLossScale(carry[0], carry[1], period, factor, min_loss_scale)
        ls = ls.adjust(ok)
        return (ls.loss_scale, ls.counter), (ls.loss_scale, ls.counter)

    init = (jnp.asarray(loss_scale, jnp.float32), jnp.zeros((), jnp.int32))
    return jax.lax.scan(body, init, jnp.asarray(finite))[1]


def jmp_trajectory(finite, scale, *, period, factor, min_scale):
    # jmp's adjust multiplies the int32 counter by the bool `grads_finite`, which strict promotion
    # rejects; run jmp as it is written, under the standard rules.
    with jax.numpy_dtype_promotion("standard"):
        return _run_jmp(
            np.float32(scale), np.float32(min_scale), finite, period=period, factor=factor
        )
