"""Batches of random contiguous blocks, sampled on the device.

nanoGPT's ``get_batch`` draws ``batch_size`` random offsets into a split and takes
``block_size + 1`` tokens from each: the inputs are the first ``block_size``, the targets the
last ``block_size`` (the next token at every position). Here the same happens inside ``jit``
with :mod:`jax.random`, so the host never stalls the step, and a train step can derive its key
as ``jax.random.fold_in(data_key, step)``: batch ``t`` depends only on ``t``, which also makes a
resumed run draw exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def sample_batch(
    tokens: jax.Array, key: jax.Array, batch_size: int, block_size: int
) -> tuple[jax.Array, jax.Array]:
    """Random contiguous blocks of ``tokens`` and their next-token targets.

    Jittable with ``batch_size`` and ``block_size`` static (they fix the output shapes); under
    ``jit`` write ``jax.jit(sample_batch, static_argnums=(2, 3))`` or call it inside a jitted
    step with Python integers.

    Args:
      tokens: the token ids of a split, a 1-D integer array (on the device, ideally).
      key: a PRNG key (``jax.random.key`` or ``jax.random.PRNGKey``).
      batch_size: blocks per batch.
      block_size: tokens per block.

    Returns:
      ``(x_BxT, y_BxT)``, ``int32``, with ``y[:, t] == x[:, t + 1]`` for ``t < T - 1``: each
      row of ``y`` is its row of ``x`` shifted by one token.

    Raises:
      ValueError: ``tokens`` is not a 1-D integer array, a size is not a positive integer, or
        ``tokens`` is shorter than ``block_size + 1``.

    Examples:
      >>> x, y = sample_batch(jnp.arange(100), jax.random.key(0), 2, 8)
      >>> x.shape, x.dtype, bool((x[:, 1:] == y[:, :-1]).all())
      ((2, 8), dtype('int32'), True)
    """
    _check(tokens, batch_size, block_size)
    n = tokens.shape[0]
    # Offsets in [0, n - block_size): the block and its shifted target both fit, as nanoGPT's
    # torch.randint(len(data) - block_size, ...).
    starts_B = jax.random.randint(key, (batch_size,), 0, n - block_size)
    take = lambda start: jax.lax.dynamic_slice_in_dim(tokens, start, block_size + 1)
    blocks_BxT1 = jax.vmap(take)(starts_B).astype(jnp.int32)
    return blocks_BxT1[:, :-1], blocks_BxT1[:, 1:]


def eval_batches(
    tokens: jax.Array, n_batches: int, batch_size: int, block_size: int, seed: int = 0
) -> tuple[jax.Array, jax.Array]:
    """A fixed set of batches for validation: the same ones on every call with the same seed.

    nanoGPT estimates the validation loss on freshly drawn batches each time; a fixed set
    removes that sampling noise from the comparison between evaluations and between runs.

    Args:
      tokens: the token ids of a split, a 1-D integer array.
      n_batches: how many batches.
      batch_size: blocks per batch.
      block_size: tokens per block.
      seed: the seed of the offsets.

    Returns:
      ``(xs_NxBxT, ys_NxBxT)``, ``int32``: batch ``i`` is ``(xs[i], ys[i])``, as
      :func:`sample_batch` gives it. Stacked, so that a jitted evaluation can ``lax.map`` over
      them.

    Raises:
      ValueError: as :func:`sample_batch`, or ``n_batches`` is not a positive integer.

    Examples:
      >>> xs, ys = eval_batches(jnp.arange(100), 3, 2, 8)
      >>> xs.shape, bool((xs == eval_batches(jnp.arange(100), 3, 2, 8)[0]).all())
      ((3, 2, 8), True)
    """
    if isinstance(n_batches, bool) or not isinstance(n_batches, int) or n_batches < 1:
        raise ValueError(f"n_batches must be a positive integer, got {n_batches!r}")
    tokens = jnp.asarray(tokens)
    _check(tokens, batch_size, block_size)
    return _eval_batches(tokens, jax.random.key(seed), n_batches, batch_size, block_size)


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _eval_batches(tokens, key, n_batches, batch_size, block_size):
    keys = jax.random.split(key, n_batches)
    return jax.vmap(lambda k: sample_batch(tokens, k, batch_size, block_size))(keys)


def _check(tokens, batch_size, block_size):
    for name, value in (("batch_size", batch_size), ("block_size", block_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if tokens.ndim != 1 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(
            f"tokens must be a 1-D array of integer ids, got {tokens.dtype}{list(tokens.shape)}"
        )
    if tokens.shape[0] < block_size + 1:
        raise ValueError(
            f"tokens has {tokens.shape[0]} ids, fewer than block_size + 1 = {block_size + 1}"
        )
