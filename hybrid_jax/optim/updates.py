"""Pure-bf16 training: Optax wrappers whose updates survive bf16 rounding, without fp32 weights.

``optax.apply_updates`` adds each update to its parameter and rounds the sum to the parameter's
dtype, to nearest. For a bf16 parameter that drops every update below half an ulp: a weight of 1.0
(ulp 2^-7) given a hundred updates of 1e-3 stays exactly 1.0. Late in training most updates are
that small, so pure-bf16 training stalls where fp32 training still learns (Zamirai et al. 2020).
The wrappers here choose the new bf16 value themselves and return the update that makes
``apply_updates`` land on it:

- ``"nearest"``: what Optax does (the wrapped transformation's updates, untouched).
- ``"stochastic"``: the fp32 sum ``p + u`` is rounded stochastically, so the weight is right in
  expectation (no extra state).
- ``"kahan"``: Kahan-compensated summation: a bf16 buffer per parameter holds what the last
  roundings dropped and adds it back into the next update (2 more bytes per parameter).
- ``"master"``: an fp32 master copy per parameter, rounded to nearest into the bf16 parameter:
  classic mixed precision, kept inside the optimizer state (4 more bytes per parameter).
"""

from __future__ import annotations

import zlib
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hybrid_jax import tree as tree_lib
from hybrid_jax.precision import dtypes, stochastic_round

MODES = ("nearest", "stochastic", "kahan", "master")
# The dtypes that rounding modes act on; fp32 and fp64 leaves keep the inner updates as they are.
_LOW_PRECISION = frozenset({dtypes.BFLOAT16, dtypes.FLOAT16})


class LowPrecisionState(NamedTuple):
    """The state of :func:`low_precision_updates`.

    Attributes:
      count: updates taken (int32); keys the stochastic rounding of each step.
      inner_state: the wrapped transformation's state.
      compensation: a tree like the params: for each ``"kahan"`` leaf, the rounding error its
        last update left over, in the parameter's dtype; ``optax.MaskedNode()`` elsewhere (no
        bytes, and orbax saves it, where it refuses zero-size arrays).
      master: a tree like the params: an fp32 copy of each ``"master"`` leaf; ``MaskedNode()``
        elsewhere.
    """

    count: jax.Array
    inner_state: optax.OptState
    compensation: Any
    master: Any


def _is_mode_leaf(x: Any) -> bool:
    return x is None or isinstance(x, str)


def _check_mode(mode: Any, where: str) -> str:
    if mode is None:
        return "nearest"
    if isinstance(mode, str) and mode in MODES:
        return mode
    raise ValueError(
        f"unknown rounding mode {mode!r} for {where}; accepted: "
        + ", ".join(repr(m) for m in MODES)
        + " (or None, which means 'nearest')"
    )


def _check_rounding(rounding: Any) -> None:
    """Checks the mode names of ``rounding`` up front, at construction."""
    if _is_mode_leaf(rounding):
        _check_mode(rounding, "every leaf")
        return
    flat, _ = jax.tree_util.tree_flatten_with_path(rounding, is_leaf=_is_mode_leaf)
    for keypath, mode in flat:
        _check_mode(mode, f"leaf {tree_lib.path_str(keypath)!r} of the rounding tree")


def _leaf_modes(rounding: Any, params: Any) -> tuple[list[tuple[str, Any]], Any, list[str]]:
    """Flattens ``params`` and gives each leaf the mode that acts on it.

    Returns ``(flat, treedef, modes)``: ``flat`` as :func:`tree_lib.leaves_with_paths` gives it;
    ``modes`` per leaf, ``"nearest"`` for leaves that are not bf16/fp16 (nothing to round).
    """
    flat, treedef = tree_lib.leaves_with_paths(params)
    if _is_mode_leaf(rounding):
        chosen = [_check_mode(rounding, "every leaf")] * len(flat)
    else:
        # A per-leaf tree may also be a prefix of the params (one mode for a whole subtree).
        mode_def = jax.tree_util.tree_structure(rounding, is_leaf=_is_mode_leaf)
        try:
            subtrees = mode_def.flatten_up_to(params)
        except (ValueError, TypeError) as e:
            raise ValueError(
                "the rounding tree does not fit the params: it must have their structure (or a "
                f"prefix of it) with a mode name or None at each leaf.\n  {e}\n"
                f"rounding tree: {mode_def}\nparams: {treedef}"
            ) from None
        mode_leaves = jax.tree_util.tree_leaves(rounding, is_leaf=_is_mode_leaf)
        chosen = [
            mode
            for mode, subtree in zip(mode_leaves, subtrees, strict=True)
            for _ in jax.tree_util.tree_leaves(subtree)
        ]
        chosen = [
            _check_mode(m, f"leaf {path!r}") for m, (path, _) in zip(chosen, flat, strict=True)
        ]

    modes = []
    for (path, leaf), mode in zip(flat, chosen, strict=True):
        dtype = np.dtype(getattr(leaf, "dtype", np.float32))
        if dtype not in _LOW_PRECISION:
            mode = "nearest"  # fp32/fp64 (or integer) leaves: nothing is lost, nothing to do
        elif mode == "stochastic" and dtype == dtypes.FLOAT16:
            raise ValueError(
                f"leaf {path!r} is float16, which stochastic rounding does not support (bf16 "
                "only); use 'kahan' or 'master' for it, or cast it to bf16"
            )
        modes.append(mode)
    return flat, treedef, modes


def _update_landing_on(new: jax.Array, p: jax.Array) -> jax.Array:
    """The fp32 update ``u`` with ``(p + u).astype(p.dtype) == new`` under standard promotion."""
    # apply_updates computes fl32(p + u) (bf16 + fp32 promotes to fp32) and casts it to p's
    # dtype. p and new have P significant bits (8 for bf16, 11 for fp16), so new - p is a
    # multiple of the ulp of the smaller one and below 4x the larger one's binade: it fits in
    # P + 1 + (exponent gap) bits, exactly in fp32's 24 while the gap is at most 23 - P (15 for
    # bf16). Then p + u == new in exact arithmetic, fl32 of it is new (bf16 is a subset of fp32)
    # and the cast is exact. If new is larger by more than that, u misses new - p by at most
    # 2^-24 |new|, far inside half an ulp of new, so the cast still lands on new. Only a step
    # that shrinks a weight by more than 2^15 at once (towards, not onto, zero) can land up to
    # ~2^-24 |p| off: fp32 sums with p cannot resolve anything finer. Nor can fp32 express
    # values or differences in its subnormal range (below 1.2e-38), which XLA on CPU and GPU
    # flushes to zero, or differences beyond its range (|new - p| > 3.4e38).
    return new.astype(jnp.float32) - p.astype(jnp.float32)


def low_precision_updates(
    inner: optax.GradientTransformation,
    rounding: Any = "stochastic",
    *,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    """Makes ``inner``'s updates survive the rounding of bf16 (or fp16) parameters.

    ``inner`` computes an update ``u`` as usual; for each bf16 parameter ``p`` the wrapper picks
    the new low-precision value by ``rounding`` and returns the fp32 update that lands
    ``optax.apply_updates(params, updates)`` exactly on it (under JAX's standard dtype
    promotion, which bf16 + fp32 needs):

    - ``"nearest"``: ``inner``'s updates untouched, which is what Optax does: ``p + u`` rounded to
      nearest, dropping any ``|u|`` below half an ulp of ``p``.
    - ``"stochastic"``: ``stochastic_round(p + u)``, unbiased: ``E[new] = p + u``. The random bits
      of a leaf come from ``fold_in(fold_in(key(seed), count), crc32(path))``, so a run is
      reproducible and a leaf's rounding does not depend on the other leaves. Nor on how the
      arrays are sharded: ``jax.random`` bits are a function of the key and the shape only, and
      with threefry's partitionable mode (``jax_threefry_partitionable``, the default since JAX
      0.5) each device draws its own shard's bits without communication.
    - ``"kahan"``: ``y = u - c``, ``new = round(p + y)``, ``c = (new - p) - y``: the buffer ``c``
      (stored in ``p``'s dtype) carries what rounding dropped into the next update.
    - ``"master"``: ``m = m + u`` on an fp32 copy ``m`` kept in the state, ``new = round(m)``;
      ``inner`` sees ``m`` as the params (for weight decay) and fp32 gradients for the leaf, so
      its state for the leaf is fp32 too.

    fp32 and fp64 leaves get ``inner``'s updates unchanged, whatever their mode. Nothing may
    change the returned updates before ``apply_updates``: wrap the whole optimizer (inside
    ``optax.partition`` is fine: it keeps the paths and passes updates through).

    Args:
      inner: any Optax transformation; it is called with ``params``.
      rounding: one of ``"nearest"``, ``"stochastic"``, ``"kahan"``, ``"master"``; or a tree
        shaped like the params (or a prefix of it) of those names, ``None`` meaning
        ``"nearest"``, for per-leaf control (e.g. from :func:`hybrid_jax.tree.assign`).
      seed: the seed of the stochastic rounding's random bits.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a :class:`LowPrecisionState`.
      Its ``update`` requires ``params``.

    Raises:
      ValueError: an unknown mode name (the message names the leaf and lists the modes), a
        rounding tree that does not fit the params, ``"stochastic"`` on an fp16 leaf, or
        ``update`` called without ``params``.

    Examples:
      >>> params = {"w": jnp.ones(3, jnp.bfloat16)}
      >>> grads = {"w": jnp.full(3, -1e-3)}
      >>> def train(tx, steps=100):
      ...     p, state = params, tx.init(params)
      ...     for _ in range(steps):
      ...         updates, state = tx.update(grads, state, p)
      ...         p = optax.apply_updates(p, updates)
      ...     return p["w"]
      >>> train(optax.sgd(1.0))  # every +1e-3 is below half of bf16's ulp at 1.0: lost
      Array([1, 1, 1], dtype=bfloat16)
      >>> train(low_precision_updates(optax.sgd(1.0), "kahan"))
      Array([1.10156, 1.10156, 1.10156], dtype=bfloat16)

    References:
      Zamirai et al., 2020, `Revisiting BFloat16 Training <https://arxiv.org/abs/2010.06192>`_.

      Kahan, 1965, `Further remarks on reducing truncation errors
      <https://doi.org/10.1145/363707.363723>`_.
    """
    _check_rounding(rounding)
    inner = optax.with_extra_args_support(inner)
    if not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}: {seed!r:.100}")
    seed = int(seed)

    def init_fn(params):
        flat, treedef, modes = _leaf_modes(rounding, params)
        masters, compensations, inner_params = [], [], []
        for (_, p), mode in zip(flat, modes, strict=True):
            master = p.astype(jnp.float32) if mode == "master" else optax.MaskedNode()
            masters.append(master)
            compensations.append(jnp.zeros_like(p) if mode == "kahan" else optax.MaskedNode())
            inner_params.append(master if mode == "master" else p)
        unflatten = lambda leaves: jax.tree_util.tree_unflatten(treedef, leaves)
        return LowPrecisionState(
            count=jnp.zeros((), jnp.int32),
            inner_state=inner.init(unflatten(inner_params)),
            compensation=unflatten(compensations),
            master=unflatten(masters),
        )

    def update_fn(updates, state, params=None, **extra_args):
        if params is None:
            raise ValueError(
                "low_precision_updates needs the params to round them: call "
                "tx.update(grads, state, params)"
            )
        flat, treedef, modes = _leaf_modes(rounding, params)
        grads = treedef.flatten_up_to(updates)
        masters = treedef.flatten_up_to(state.master)
        compensations = treedef.flatten_up_to(state.compensation)

        # "master" leaves: inner optimizes the fp32 copy, with fp32 gradients.
        inner_params = [
            m if mode == "master" else p
            for (_, p), m, mode in zip(flat, masters, modes, strict=True)
        ]
        inner_grads = [
            g.astype(jnp.float32) if mode == "master" else g
            for g, mode in zip(grads, modes, strict=True)
        ]
        unflatten = lambda leaves: jax.tree_util.tree_unflatten(treedef, leaves)
        inner_updates, inner_state = inner.update(
            unflatten(inner_grads), state.inner_state, unflatten(inner_params), **extra_args
        )
        inner_updates = treedef.flatten_up_to(inner_updates)

        if "stochastic" in modes:
            step_key = jax.random.fold_in(jax.random.key(seed), state.count)
        new_updates, new_masters, new_compensations = [], [], []
        for (path, p), u, m, c, mode in zip(
            flat, inner_updates, masters, compensations, modes, strict=True
        ):
            if mode == "nearest":
                new_updates.append(u)
                new_masters.append(m)
                new_compensations.append(c)
                continue
            p32, u32 = p.astype(jnp.float32), jnp.asarray(u).astype(jnp.float32)
            if mode == "stochastic":
                # Keyed by the path, not the leaf's position: adding, removing or reordering
                # other leaves leaves this one's bits alone.
                key = jax.random.fold_in(step_key, np.uint32(zlib.crc32(path.encode())))
                new = stochastic_round(p32 + u32, key)
            elif mode == "kahan":
                # In fp32, then stored: new - p is exact (see _update_landing_on), so c is this
                # step's rounding error to fp32 accuracy. Storing c in p's dtype then drops up to
                # 2^-9 |c| (bf16), which nothing compensates: p - c tracks the exact sum closely
                # but not exactly, while p stays within rounding of it.
                y = u32 - c.astype(jnp.float32)
                new = (p32 + y).astype(p.dtype)
                c = ((new.astype(jnp.float32) - p32) - y).astype(p.dtype)
            else:  # "master"
                m = m + u32
                new = m.astype(p.dtype)
            new_updates.append(_update_landing_on(new, p))
            new_masters.append(m)
            new_compensations.append(c)

        return unflatten(new_updates), LowPrecisionState(
            count=optax.safe_increment(state.count),
            inner_state=inner_state,
            compensation=unflatten(new_compensations),
            master=unflatten(new_masters),
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def stochastic_rounding(
    inner: optax.GradientTransformation, *, seed: int = 0
) -> optax.GradientTransformationExtraArgs:
    """:func:`low_precision_updates` with ``"stochastic"`` rounding on every bf16 leaf.

    Examples:
      >>> tx = stochastic_rounding(optax.adam(1e-3), seed=1)
      >>> state = tx.init({"w": jnp.ones(3, jnp.bfloat16)})
      >>> int(state.count)
      0
    """
    return low_precision_updates(inner, "stochastic", seed=seed)


def kahan_summation(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """:func:`low_precision_updates` with ``"kahan"`` summation on every bf16/fp16 leaf.

    Examples:
      >>> tx = kahan_summation(optax.sgd(0.1))
      >>> tx.init({"w": jnp.ones(3, jnp.bfloat16), "b": jnp.ones(3)}).compensation
      {'b': MaskedNode(), 'w': Array([0, 0, 0], dtype=bfloat16)}
    """
    return low_precision_updates(inner, "kahan")


def master_weights(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """:func:`low_precision_updates` with an fp32 ``"master"`` copy of every bf16/fp16 leaf.

    Examples:
      >>> tx = master_weights(optax.sgd(0.1))
      >>> tx.init({"w": jnp.ones(3, jnp.bfloat16)}).master["w"].dtype
      dtype('float32')
    """
    return low_precision_updates(inner, "master")
