"""Batches of random contiguous blocks, sampled on the device or gathered on the host.

nanoGPT's ``get_batch`` draws ``batch_size`` random offsets into a split and takes
``block_size + 1`` tokens from each: the inputs are the first ``block_size``, the targets the
last ``block_size`` (the next token at every position). Here the same happens inside ``jit``
with :mod:`jax.random`, so the host never stalls the step, and a train step can derive its key
as ``jax.random.fold_in(data_key, step)``: batch ``t`` depends only on ``t``, which also makes a
resumed run draw exactly the batches an uninterrupted one would.

A corpus too large for the device (a multi-GB ``train.bin`` read through ``np.memmap``) is
batched on the host instead, by :func:`sample_batch_host` and :func:`eval_batches_host`. They
draw the offsets with the same :mod:`jax.random` calls (on the CPU, where they cost
microseconds) and gather the blocks with NumPy, so a key gives the same batch on either side:
a run can move its data between host and device without changing what it trains on.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

_INT32_MAX = int(np.iinfo(np.int32).max)


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
    starts_B = _offsets(key, tokens.shape[0], batch_size, block_size)
    return _gather(tokens, starts_B, block_size)


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
    _check_n_batches(n_batches)
    tokens = jnp.asarray(tokens)
    _check(tokens, batch_size, block_size)
    return _eval_batches(tokens, _eval_keys(seed, n_batches), batch_size, block_size)


def sample_batch_host(
    tokens: np.ndarray, key: jax.Array, batch_size: int, block_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`sample_batch` on the host: the same blocks for the same key, gathered by NumPy.

    For a split that does not fit on the device, such as a ``train.bin`` of billions of tokens
    read through ``np.memmap``: only the ``batch_size`` blocks are read, not the file. The
    offsets come from the same :mod:`jax.random` call as on the device, computed on the CPU, so
    ``sample_batch_host(np_tokens, key, B, T)`` equals ``sample_batch(jnp.asarray(np_tokens),
    key, B, T)`` exactly. A split of more than ``2**31`` tokens, which a device sampler cannot
    index with ``int32`` offsets, draws 64 random bits per offset instead (reduced modulo the
    range; the bias is below ``range / 2**64``).

    Args:
      tokens: the token ids of a split, a 1-D integer NumPy array or memmap.
      key: a PRNG key (``jax.random.key`` or ``jax.random.PRNGKey``), on any device.
      batch_size: blocks per batch.
      block_size: tokens per block.

    Returns:
      ``(x_BxT, y_BxT)``, ``int32`` NumPy arrays, as :func:`sample_batch` gives them.

    Raises:
      ValueError: as :func:`sample_batch`.

    Examples:
      >>> tokens, key = np.arange(100, dtype=np.uint16), jax.random.key(0)
      >>> x, y = sample_batch_host(tokens, key, 2, 8)
      >>> x.dtype, bool((x == np.asarray(sample_batch(jnp.asarray(tokens), key, 2, 8)[0])).all())
      (dtype('int32'), True)
    """
    tokens = np.asarray(tokens)
    _check(tokens, batch_size, block_size)
    keys_1 = jax.device_put(key, _cpu())[None]
    starts_1xB = _host_offsets(keys_1, tokens.shape[0], batch_size, block_size)
    return _host_gather(tokens, starts_1xB[0], block_size)


def eval_batches_host(
    tokens: np.ndarray, n_batches: int, batch_size: int, block_size: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`eval_batches` on the host: the same fixed batches, gathered by NumPy.

    Args:
      tokens: the token ids of a split, a 1-D integer NumPy array or memmap.
      n_batches: how many batches.
      batch_size: blocks per batch.
      block_size: tokens per block.
      seed: the seed of the offsets.

    Returns:
      ``(xs_NxBxT, ys_NxBxT)``, ``int32`` NumPy arrays, equal to :func:`eval_batches`'s for
      the same token ids and seed.

    Raises:
      ValueError: as :func:`eval_batches`.

    Examples:
      >>> tokens = np.arange(100, dtype=np.uint16)
      >>> xs, ys = eval_batches_host(tokens, 3, 2, 8, seed=1)
      >>> xs.shape, bool((xs == np.asarray(eval_batches(tokens, 3, 2, 8, seed=1)[0])).all())
      ((3, 2, 8), True)
    """
    _check_n_batches(n_batches)
    tokens = np.asarray(tokens)
    _check(tokens, batch_size, block_size)
    starts_NxB = _host_offsets(_eval_keys(seed, n_batches), tokens.shape[0], batch_size, block_size)
    return _host_gather(tokens, starts_NxB, block_size)


# The offsets of a batch, drawn here only, so the device and the host samplers agree.
def _offsets(key, n_tokens, batch_size, block_size):
    # Offsets in [0, n - block_size): the block and its shifted target both fit, as nanoGPT's
    # torch.randint(len(data) - block_size, ...).
    return jax.random.randint(key, (batch_size,), 0, n_tokens - block_size)


def _eval_keys(seed, n_batches):
    return jax.random.split(jax.random.key(seed), n_batches)


def _gather(tokens, starts_B, block_size):
    take = lambda start: jax.lax.dynamic_slice_in_dim(tokens, start, block_size + 1)
    blocks_BxT1 = jax.vmap(take)(starts_B).astype(jnp.int32)
    return blocks_BxT1[:, :-1], blocks_BxT1[:, 1:]


@functools.partial(jax.jit, static_argnums=(2, 3))
def _eval_batches(tokens, keys_N, batch_size, block_size):
    starts_NxB = jax.vmap(lambda key: _offsets(key, tokens.shape[0], batch_size, block_size))(
        keys_N
    )
    return jax.vmap(lambda starts_B: _gather(tokens, starts_B, block_size))(starts_NxB)


_offsets_K = jax.jit(jax.vmap(_offsets, in_axes=(0, None, None, None)), static_argnums=(1, 2, 3))
_bits_K = jax.jit(
    jax.vmap(lambda key, n: jax.random.bits(key, (2, n), jnp.uint32), in_axes=(0, None)),
    static_argnums=1,
)


def _host_offsets(keys_K, n_tokens, batch_size, block_size) -> np.ndarray:
    keys_K = jax.device_put(keys_K, _cpu())
    span = n_tokens - block_size
    if span <= _INT32_MAX:
        return np.asarray(_offsets_K(keys_K, n_tokens, batch_size, block_size)).astype(np.int64)
    # Beyond int32 (OpenWebText's train.bin holds 9e9 tokens): 64 random bits per offset.
    bits_Kx2xB = np.asarray(_bits_K(keys_K, batch_size)).astype(np.uint64)
    wide_KxB = (bits_Kx2xB[:, 0] << np.uint64(32)) | bits_Kx2xB[:, 1]
    return (wide_KxB % np.uint64(span)).astype(np.int64)


@functools.cache
def _cpu():
    # A few integer ops: on the CPU they return at once, where an accelerator would queue them
    # behind the train step. Without a CPU backend (JAX_PLATFORMS=cuda) the default device does.
    try:
        return jax.local_devices(backend="cpu")[0]
    except RuntimeError:
        return jax.local_devices()[0]


def _host_gather(tokens, starts, block_size):
    # One fancy index: a memmap reads only the pages the blocks touch.
    blocks = np.asarray(tokens[starts[..., None] + np.arange(block_size + 1)], dtype=np.int32)
    return blocks[..., :-1], blocks[..., 1:]


def _check_n_batches(n_batches):
    if isinstance(n_batches, bool) or not isinstance(n_batches, int) or n_batches < 1:
        raise ValueError(f"n_batches must be a positive integer, got {n_batches!r}")


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
