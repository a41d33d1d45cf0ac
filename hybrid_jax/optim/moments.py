"""8-bit block-wise quantized (or bf16/f16) optimizer moments, for any Optax optimizer.

Adam keeps two fp32 moments per parameter, 8 bytes per element: twice the parameters' own bytes.
:func:`with_moment_storage` stores the ``mu`` and ``nu`` of any Optax transformation in the 8-bit
block-wise format of Dettmers et al. (about 1 byte per element), or as a plain cast to bf16 or f16:
each ``update`` decodes the moments to fp32, runs the unchanged Optax update, and encodes the new
moments. Only the storage changes; the arithmetic is Optax's. The re-encoding rounds
stochastically by default (unbiased): ``nu`` moves by ~0.1% per step under ``b2 = 0.999``, less
than half a code step, and rounding to nearest would drop those moves and leave ``nu`` stuck high.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hybrid_jax.optim._blockwise import BlockQuantized, check_block_size, quantize_blocks
from hybrid_jax.optim._storage_specs import EIGHT_BIT, Spec, leaf_specs, make_spec
from hybrid_jax.tree import is_float_leaf, key_str, path_str

_FIELDS = ("mu", "nu")


def _is_stored_leaf(x: Any) -> bool:
    # MaskedNode is an empty NamedTuple (no leaves): it must be seen to be recognized as masked.
    return isinstance(x, BlockQuantized | optax.MaskedNode)


def _is_moment_node(x: Any) -> bool:
    fields = getattr(type(x), "_fields", None)
    return isinstance(x, tuple) and fields is not None and any(f in fields for f in _FIELDS)


def _map_moments(
    state: Any, specs: tuple[Spec, ...], leaf_fn: Callable[[str, Any, str, Any], Any]
) -> Any:
    """Applies ``leaf_fn(field, spec, path, leaf)`` to each leaf of each mu/nu tree in ``state``.

    ``path`` is the leaf's path within its mu/nu tree, which is shaped like the params: the
    params leaf's path string (:func:`hybrid_jax.tree.path_str`).
    """

    def visit(keypath, node):
        if not _is_moment_node(node):
            return node
        changes = {}
        for spec in specs:
            if spec.unchanged or spec.field not in node._fields:
                continue
            tree = getattr(node, spec.field)
            flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_stored_leaf)
            where = "/".join(key_str(k) for k in keypath) or "<root>"
            what = f"the {spec.field} of the optimizer state at {where!r}"
            per_leaf = leaf_specs(spec, flat, what)
            new = [
                leaf_fn(spec.field, s, path_str(kp), leaf)
                for (kp, leaf), s in zip(flat, per_leaf, strict=True)
            ]
            changes[spec.field] = jax.tree_util.tree_unflatten(treedef, new)
        return node._replace(**changes)

    return jax.tree_util.tree_map_with_path(visit, state, is_leaf=_is_moment_node)


class MomentStorageState(NamedTuple):
    """The state of :func:`with_moment_storage` when it rounds 8-bit moments stochastically.

    Attributes:
      rounding_count: int32 scalar, the number of updates so far; update ``t`` draws its random
        bits from it. Not named ``count``, so that ``optax.tree.get(state, "count")`` still finds
        the inner optimizer's step count alone.
      inner_state: the wrapped transformation's state, its moments encoded.
    """

    rounding_count: jax.Array
    inner_state: Any


def with_moment_storage(
    inner: optax.GradientTransformation,
    *,
    mu: Any = None,
    nu: Any = None,
    block_size: int = 256,
    min_size: int = 4096,
    stochastic: bool = True,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    """Stores the first and second moments (``mu``, ``nu``) of ``inner`` in narrower storage.

    Every NamedTuple in ``inner``'s state with a field ``mu`` or ``nu`` (``ScaleByAdamState``,
    ``ScaleByLionState``, ``ScaleByRmsState``, ... at any depth: inside ``chain``, ``partition``,
    ``masked``, ``inject_hyperparams``) has those trees encoded leaf by leaf. Other fields
    (``count``, ``trace``, ``nu_max``) are left alone. Each ``update`` decodes the moments to
    fp32, runs ``inner.update`` unchanged, and encodes the new moments, so the update rule is
    ``inner``'s and only the storage is narrower.

    A spec is one of

    * ``None``: leave the leaf as ``inner`` keeps it;
    * ``"f32"``, ``"bf16"``, ``"f16"`` (or the dtype): a plain cast, rounding to nearest;
    * ``"8bit"``: :func:`quantize_blocks`, ``mu`` with the signed map and ``nu`` with the
      unsigned map in the square-root domain (second moments are non-negative; negative values
      would be clamped to 0). Leaves with fewer than ``min_size`` elements are kept in fp32
      instead: their scale and padding would cost more than they save (bitsandbytes does the
      same for small tensors).

    ``"8bit"`` moments are re-encoded after every update, with stochastic rounding by default
    (``stochastic=True``): each value goes to one of the two code-book entries around it, the
    upper with probability its position between them, so the stored moment is unbiased (for
    ``nu``, in the square-root domain it is stored in). This is what lets ``nu`` track: with
    ``b2 = 0.999`` it moves ~0.1% per step, under half a code step, and rounding to nearest
    (``stochastic=False``) drops every such move, so ``nu`` stays stuck high as the gradients
    shrink and the steps come out too small (on a noisy quadratic over 1,000 steps: loss 13%
    above fp32 AdamW's with nearest, within 0.5% with stochastic rounding). The random bits of
    a leaf at update ``t`` come from ``fold_in(fold_in(fold_in(key(seed), t), crc32(path)), f)``
    with ``path`` the leaf's params path and ``f`` 0 for ``mu``, 1 for ``nu``, so a run is
    reproducible and a leaf's rounding does not depend on the other leaves. ``init`` rounds to
    nearest (Optax starts moments at zero, which every rounding stores exactly). Plain casts
    always round to nearest.

    ``mu`` and ``nu`` each take one spec for every leaf, or a pytree shaped like the params whose
    leaves are specs (per-leaf control). ``optax.MaskedNode`` leaves and non-floating leaves pass
    through. The encoded state is a pytree of uint8 codes and fp32 scales, stable across steps,
    so ``update`` jits once and the state fits ``lax.cond``. With ``stochastic=True`` and an
    ``"8bit"`` spec anywhere, the state is a :class:`MomentStorageState` holding the update
    count and ``inner``'s (encoded) state; otherwise it is ``inner``'s state, encoded.

    Args:
      inner: the transformation whose moments to store narrower.
      mu: the storage of first moments: a spec or a params-shaped tree of specs.
      nu: the storage of second moments: a spec or a params-shaped tree of specs.
      block_size: elements per scale under ``"8bit"``.
      min_size: the smallest leaf (in elements) that ``"8bit"`` quantizes.
      stochastic: re-encode ``"8bit"`` moments with unbiased stochastic rounding (else nearest).
      seed: the seed of the stochastic rounding's random bits.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with ``inner``'s update rule.

    Raises:
      ValueError: an unknown spec (the message names its path and the choices), a bad
        ``block_size`` or ``min_size``; at ``init``, a spec tree that does not match the params
        (the message lists the paths).
      TypeError: ``seed`` is not an int.

    Examples:
      >>> tx = with_moment_storage(optax.adam(1e-3), mu="8bit", nu="bf16", min_size=0)
      >>> state = tx.init({"w": jnp.zeros(1000)})
      >>> adam = state.inner_state[0]
      >>> adam.mu["w"].codes.shape, adam.mu["w"].codes.dtype, adam.nu["w"].dtype
      ((4, 256), dtype('uint8'), dtype(bfloat16))
      >>> state.rounding_count
      Array(0, dtype=int32)

    References:
      Dettmers et al., `8-bit Optimizers via Block-wise Quantization
      <https://arxiv.org/abs/2110.02861>`_, 2021.
    """
    block_size = check_block_size(block_size)
    if isinstance(min_size, bool) or not isinstance(min_size, int | np.integer) or min_size < 0:
        raise ValueError(f"min_size must be a non-negative int, got {min_size!r:.100}")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}: {seed!r:.100}")
    seed = int(seed)
    specs = (make_spec("mu", mu), make_spec("nu", nu))
    # The count is kept only where it is used, so that casts and nearest rounding leave the
    # state's structure as inner's.
    counted = bool(stochastic) and any(spec.has_8bit for spec in specs)
    inner = optax.with_extra_args_support(inner)

    def encoder(step_key):
        def encode(field, spec, path, leaf):
            if spec is None or not is_float_leaf(leaf):
                return leaf
            if isinstance(spec, str):  # the one string spec left after parsing: "8bit"
                if leaf.size < min_size:
                    return leaf.astype(jnp.float32)
                key = None
                if step_key is not None:
                    # Keyed by the path, not the leaf's position: adding, removing or reordering
                    # other leaves leaves this one's bits alone.
                    key = jax.random.fold_in(step_key, np.uint32(zlib.crc32(path.encode())))
                    key = jax.random.fold_in(key, _FIELDS.index(field))
                return quantize_blocks(
                    leaf, block_size=block_size, signed=field == "mu", sqrt=field == "nu", key=key
                )
            return leaf.astype(spec)

        return encode

    def decode(field, spec, path, leaf):
        del field, path
        if isinstance(leaf, BlockQuantized):
            return leaf.dequantize()
        if spec is None or not is_float_leaf(leaf):
            return leaf
        return leaf.astype(jnp.float32)

    def init_fn(params):
        # Check per-leaf spec trees against the params first: the message is about the params,
        # which the caller wrote the spec tree for, rather than about some state node.
        flat, _ = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_stored_leaf)
        for spec in specs:
            leaf_specs(spec, flat, "the params")
        state = _map_moments(inner.init(params), specs, encoder(None))
        if counted:
            return MomentStorageState(jnp.zeros((), jnp.int32), state)
        return state

    def update_fn(updates, state, params=None, **extra_args):
        if counted:
            count, state = state.rounding_count, state.inner_state
            step_key = jax.random.fold_in(jax.random.key(seed), count)
        state = _map_moments(state, specs, decode)
        updates, state = inner.update(updates, state, params, **extra_args)
        if not counted:
            return updates, _map_moments(state, specs, encoder(None))
        state = _map_moments(state, specs, encoder(step_key))
        return updates, MomentStorageState(optax.safe_increment(count), state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def adamw_8bit(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-4,
    mask: Any = None,
    *,
    block_size: int = 256,
    min_size: int = 4096,
    stochastic: bool = True,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    """AdamW with both moments block-quantized to 8 bits: ``optax.adamw`` in 2 bytes per element.

    ``with_moment_storage(optax.adamw(...), mu="8bit", nu="8bit")``: Optax's AdamW update on
    moments stored as in Dettmers et al. (the signed dynamic map for ``mu``, the unsigned map of
    ``sqrt(nu)`` for ``nu``, one fp32 absmax per ``block_size`` elements). Leaves smaller than
    ``min_size`` elements keep fp32 moments. The moments are re-encoded with unbiased stochastic
    rounding unless ``stochastic=False`` (see :func:`with_moment_storage` for why it matters).

    Args:
      learning_rate: a learning rate or schedule, as for ``optax.adamw``.
      b1: the decay of the first moment.
      b2: the decay of the second moment.
      eps: added to the denominator.
      weight_decay: the decoupled weight decay.
      mask: which leaves decay, as for ``optax.adamw``.
      block_size: elements per scale.
      min_size: the smallest leaf (in elements) whose moments are quantized.
      stochastic: re-encode the moments with unbiased stochastic rounding (else nearest).
      seed: the seed of the stochastic rounding's random bits.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; its state is a :class:`MomentStorageState`
      when ``stochastic``.

    Examples:
      >>> tx = adamw_8bit(1e-3)
      >>> state = tx.init({"w": jnp.zeros((64, 128)), "b": jnp.zeros(128)})
      >>> adam = state.inner_state[0]
      >>> w, b = adam.nu["w"], adam.nu["b"]  # b is under min_size: it stays fp32
      >>> w.codes.dtype, w.codes.shape, w.scales.dtype, b.dtype
      (dtype('uint8'), (32, 256), dtype('float32'), dtype('float32'))

    References:
      Dettmers et al., `8-bit Optimizers via Block-wise Quantization
      <https://arxiv.org/abs/2110.02861>`_, 2021; Loshchilov and Hutter, `Decoupled Weight
      Decay Regularization <https://arxiv.org/abs/1711.05101>`_, 2019.
    """
    inner = optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=mask)
    return with_moment_storage(
        inner,
        mu=EIGHT_BIT,
        nu=EIGHT_BIT,
        block_size=block_size,
        min_size=min_size,
        stochastic=stochastic,
        seed=seed,
    )
