"""8-bit block-wise quantized optimizer moments (Dettmers et al. 2021), for any Optax optimizer.

Adam keeps two fp32 moments per parameter, 8 bytes per element: twice the parameters' own bytes.
Dettmers et al. store each moment in 8 bits: the tensor is cut into blocks of 256 elements, each
block is divided by its largest magnitude (its absmax, kept in fp32), and each element becomes the
index of the nearest entry of a 256-entry *dynamic* code book, whose levels are spread over six
decades so that small moments keep a few significant bits. One scale per block confines an
outlier to its own 256 elements, and the cost is ``1 + 4 / block_size`` bytes per element
(1.016 for 256).

:func:`with_moment_storage` applies this, or a plain cast to bf16 or f16, to the ``mu`` and ``nu``
of any Optax transformation: each ``update`` decodes the moments to fp32, runs the unchanged
Optax update, and encodes the new moments. Only the storage changes; the arithmetic is Optax's.
The re-encoding rounds stochastically by default (unbiased, ``quantize_blocks(..., key=...)``):
``nu`` moves by ~0.1% per step under ``b2 = 0.999``, less than half a code step, and rounding to
nearest would drop those moves and leave ``nu`` stuck high.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hybrid_jax.precision import dtypes
from hybrid_jax.tree import key_str, path_str

_EIGHT_BIT = "8bit"

# The plain casts a moment may be stored in; fp8 needs a scale, which is what "8bit" provides.
_CAST_DTYPES = (dtypes.FLOAT32, dtypes.BFLOAT16, dtypes.FLOAT16)
_FIELDS = ("mu", "nu")


def _magnitudes(n_decades: int) -> np.ndarray:
    # A code is read as: the number of leading zero bits picks the decade e, the first 1 bit
    # ends the exponent, and the bits after it are a linear fraction. Decade e, the interval
    # (10^-(e+1), 10^-e], thus holds 2^(n_decades-1-e) evenly spaced levels, half as many as the
    # decade above: the finest steps go to the large moments, which dominate the update. The
    # all-zero code is left for the value 0.
    levels = []
    for e in range(n_decades):
        n = 2 ** (n_decades - 1 - e)
        k = np.arange(1, n + 1, dtype=np.float64)
        # (1 + 9k/n) / 10 runs over (0.1, 1]; k = n gives exactly 1.0, so 10^0 decodes to 1.0.
        levels.append(10.0**-e * (1.0 + 9.0 * k / n) / 10.0)
    return np.sort(np.concatenate(levels))


@functools.cache
def _dynamic_map(signed: bool) -> np.ndarray:
    if signed:
        # 1 sign bit + 7 bits: 7 decades (1e-6 ... 1), 64 + 32 + ... + 1 = 127 levels a side.
        # The pattern that would read -0 is spent on -1e-7, the next decade's single level.
        positive = _magnitudes(7)
        values = np.concatenate([-positive, [-1e-7, 0.0], positive])
    else:
        # 8 bits: 8 decades (1e-7 ... 1), 128 + 64 + ... + 1 = 255 levels, and 0.
        values = np.concatenate([[0.0], _magnitudes(8)])
    table = np.sort(values).astype(np.float32)
    table.setflags(write=False)  # cached and shared: nobody may edit it
    return table


def dynamic_map(signed: bool) -> np.ndarray:
    """The 256-entry code book of the 8-bit dynamic (exponent + linear fraction) map.

    As in Dettmers' dynamic tree quantization, a code is an exponent followed by a linear
    fraction: its leading zero bits count decades down from 1, and the bits after the first
    one bit place it linearly within the decade. Decade ``e``, ``(10^-(e+1), 10^-e]``, holds
    ``2^(bits-1-e)`` evenly spaced levels ending on ``10^-e``, so the top decade has the most
    levels: the largest moments, which dominate the update, keep the finest steps.

    * ``signed=True``: a sign bit and 7 bits: 127 levels a side over the 7 decades
      1e-6 ... 1, the value 0, and one spare code (the would-be ``-0``) at ``-1e-7``.
    * ``signed=False``: 8 bits: 255 levels over the 8 decades 1e-7 ... 1, and 0.

    The map is built once per ``signed`` and cached; the returned array is read-only.

    Args:
      signed: whether the map covers ``[-1, 1]`` (first moments) or ``[0, 1]`` (second moments).

    Returns:
      A sorted float32 array of 256 distinct values containing 0 and 1 (and -1 when signed).

    Examples:
      >>> table = dynamic_map(signed=True)
      >>> table.shape, table[0], table[-1], float(table[128])
      ((256,), np.float32(-1.0), np.float32(1.0), 0.0)

    References:
      Dettmers et al., `8-bit Optimizers via Block-wise Quantization
      <https://arxiv.org/abs/2110.02861>`_, 2021 (dynamic tree quantization, section 2).
    """
    return _dynamic_map(bool(signed))


@functools.cache
def _midpoints(signed: bool) -> np.ndarray:
    # Rounding to the nearest entry is a search among the 255 midpoints between entries; taking
    # them in float64 first makes each the fp32 nearest to the true midpoint.
    table = _dynamic_map(signed).astype(np.float64)
    return ((table[1:] + table[:-1]) / 2).astype(np.float32)


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["codes", "scales"],
    meta_fields=["shape", "signed", "sqrt"],
)
@dataclasses.dataclass(frozen=True)
class BlockQuantized:
    """A float array stored as 8-bit codes with one fp32 scale per block.

    A pytree: ``codes`` and ``scales`` are its leaves, ``shape``, ``signed`` and ``sqrt`` are
    static metadata (part of the tree structure, so they survive ``jit``, ``tree_map`` and
    checkpoints). Element ``i`` of block ``b`` decodes to
    ``dynamic_map(signed)[codes[b, i]] * scales[b]``, squared when ``sqrt``.

    Attributes:
      codes: uint8 ``[n_blocks, block_size]``, indices into :func:`dynamic_map`; the flattened
        array padded with zeros to whole blocks.
      scales: float32 ``[n_blocks]``, the absmax of each block (of ``sqrt(x)`` when ``sqrt``).
      shape: the shape of the original array.
      signed: whether the codes index the signed map.
      sqrt: whether the square roots of the values were stored (decoding squares).
    """

    codes: jax.Array
    scales: jax.Array
    shape: tuple[int, ...]
    signed: bool
    sqrt: bool

    @property
    def block_size(self) -> int:
        """The number of elements that share one scale."""
        return self.codes.shape[-1]

    def dequantize(self) -> jax.Array:
        """The float32 array of the original shape; see :func:`dequantize_blocks`."""
        return dequantize_blocks(self)


def _check_block_size(block_size: Any) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, int | np.integer):
        raise TypeError(
            f"block_size must be a positive int, got {type(block_size).__name__}: "
            f"{block_size!r:.100}"
        )
    if block_size <= 0:
        raise ValueError(f"block_size must be a positive int, got {block_size}")
    return int(block_size)


def quantize_blocks(
    x: jax.Array,
    *,
    block_size: int = 256,
    signed: bool = True,
    sqrt: bool = False,
    key: jax.Array | None = None,
) -> BlockQuantized:
    """Quantizes ``x`` block-wise to 8-bit codes of the dynamic map, with an fp32 absmax per block.

    ``x`` is flattened, padded with zeros to a multiple of ``block_size`` and cut into blocks.
    Each block is divided by its absmax ``s``, so that it lies in ``[-1, 1]``, and each element
    becomes the index of the nearest :func:`dynamic_map` entry (ties go to the lower entry). An
    element ``x`` between entries ``c_j <= x / s <= c_{j+1}`` decodes within
    ``(c_{j+1} - c_j) / 2 * s`` of itself, up to fp32 rounding. A zero block has ``s = 0`` and
    decodes to zeros. A block holding ``inf`` or ``NaN`` decodes to non-finite values.

    With a ``key``, the rounding is stochastic and unbiased instead: ``x / s`` becomes ``c_{j+1}``
    with probability ``(x / s - c_j) / (c_{j+1} - c_j)`` (to a resolution of ``2^-16``) and
    ``c_j`` otherwise, so the decoded value is always one of the two entries around ``x`` (times
    ``s``) and its expectation is ``x``, up to fp32 rounding. Repeated re-encoding (an
    optimizer's moments, every step) then keeps changes smaller than a code step on average,
    where rounding to nearest drops them.
    Under ``sqrt=True`` the unbiasedness is in the square-root domain: ``E[sqrt(decoded)] =
    sqrt(x)``, so ``E[decoded] = x + Var[sqrt(decoded)]``, a bias upward of at most a quarter of
    the squared code step (times ``s^2``). The random bits are drawn for the padded
    ``[n_blocks, block_size]`` codes, so they depend on the key and that shape only.

    ``sqrt=True`` (for second moments, which are non-negative) stores ``sqrt(x)``: the map's
    6-7 decades then cover 12-14 decades of ``x``, so that an element ``1e-8`` times its block's
    largest still decodes to a non-zero value, where the plain map would round it to 0.

    Jit-able: the code book is a constant and every shape is static.

    Args:
      x: a floating array of any shape (a scalar too); it is computed on in fp32.
      block_size: the number of elements that share one scale; a positive int.
      signed: use the signed map (``[-1, 1]``). With ``signed=False`` the unsigned map, which has
        twice the levels over ``[0, 1]``, is used and **negative values are clamped to 0** (they
        cannot be checked inside ``jit``).
      sqrt: store ``sqrt(x)``; requires ``signed=False``.
      key: a ``jax.random`` key for stochastic rounding; ``None`` rounds to nearest.

    Returns:
      A :class:`BlockQuantized` with ``ceil(x.size / block_size)`` blocks.

    Raises:
      TypeError: ``x`` is not floating, or ``block_size`` is not an int.
      ValueError: ``block_size`` is not positive, or ``sqrt`` with ``signed``.

    Examples:
      >>> q = quantize_blocks(jnp.array([0.5, -1.0, 0.0, 1e-3]), block_size=2)
      >>> q.codes.dtype, q.codes.shape, q.scales
      (dtype('uint8'), (2, 2), Array([1.   , 0.001], dtype=float32))
      >>> dequantize_blocks(q)  # 0.5 rounds to the nearest level, 0.49375
      Array([ 0.49375, -1.     ,  0.     ,  0.001  ], dtype=float32)
      >>> x = jnp.full(10_000, 0.5).at[0].set(1.0)  # one block, scale 1, 9,999 halves
      >>> q = quantize_blocks(x, block_size=10_000, key=jax.random.key(0))
      >>> halves = dequantize_blocks(q)[1:]  # stochastic: the entries around 0.5, mean 0.5
      >>> jnp.unique(halves), round(float(halves.mean()), 3)
      (Array([0.49375  , 0.5078125], dtype=float32), 0.5)

    References:
      Dettmers et al., `8-bit Optimizers via Block-wise Quantization
      <https://arxiv.org/abs/2110.02861>`_, 2021.
    """
    block_size = _check_block_size(block_size)
    signed, sqrt = bool(signed), bool(sqrt)
    if sqrt and signed:
        raise ValueError(
            "sqrt=True stores the square root of non-negative values (second moments); it "
            "requires signed=False"
        )
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"quantize_blocks takes a floating array, got dtype {x.dtype}")

    return _quantize(x, block_size, signed, sqrt, key)


# Jitted so that an eager call (an optimizer's init, a notebook) is one dispatch of one compiled
# program rather than a dozen op-by-op ones; inside an outer jit it is inlined.
@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _quantize(
    x: jax.Array, block_size: int, signed: bool, sqrt: bool, key: jax.Array | None
) -> BlockQuantized:
    shape = tuple(x.shape)
    n_blocks = -(-x.size // block_size)
    flat = x.astype(jnp.float32).reshape(-1)
    if not signed:
        flat = jnp.maximum(flat, np.float32(0))
    if sqrt:
        flat = jnp.sqrt(flat)
    flat = jnp.pad(flat, (0, n_blocks * block_size - x.size))
    blocks = flat.reshape(n_blocks, block_size)

    scales = jnp.max(jnp.abs(blocks), axis=1)
    # Zero blocks divide by 1 rather than 0: their elements are 0 and encode as the 0 entry.
    safe = jnp.where(scales > 0, scales, np.float32(1))
    normalized = blocks / safe[:, None]
    if key is None:
        codes = _nearest_codes(normalized, signed)
    else:
        codes = _stochastic_codes(normalized, signed, key)
    return BlockQuantized(codes, scales, shape, signed, sqrt)


def _count_below(x: jax.Array, thresholds: np.ndarray, *, inclusive: bool) -> jax.Array:
    # The number of the 2^8 - 1 sorted thresholds below x (inclusive: at or below), int32 in
    # [0, 255]. Eight halving steps of a binary search find it: written out, this compiles faster
    # than jnp.searchsorted's loop and on CPU runs ~6x faster (1M elements: 8 ms against 53 ms).
    thresholds = jnp.asarray(thresholds)
    above = jnp.greater_equal if inclusive else jnp.greater
    codes = jnp.zeros(x.shape, jnp.int32)
    for step in (128, 64, 32, 16, 8, 4, 2, 1):
        codes = jnp.where(above(x, thresholds[codes + (step - 1)]), codes + step, codes)
    return codes


def _nearest_codes(normalized: jax.Array, signed: bool) -> jax.Array:
    # The index of the nearest entry is the number of midpoints below the value (a tie goes to
    # the lower entry).
    return _count_below(normalized, _midpoints(signed), inclusive=False).astype(jnp.uint8)


def _stochastic_codes(normalized: jax.Array, signed: bool, key: jax.Array) -> jax.Array:
    table = _dynamic_map(signed)
    # The lower neighbour j, table[j] <= x < table[j + 1], is the number of entries after the
    # first that are at or below x; x = 1 (table[255]) is taken as the top of the last gap,
    # which it then rounds up to with probability 1. NaN compares false: j = 0, p = NaN, and the
    # block's NaN scale decodes it to NaN anyway.
    lower = jnp.minimum(_count_below(normalized, table[1:], inclusive=True), 254)
    table = jnp.asarray(table)
    low, high = table[lower], table[lower + 1]
    p = (normalized - low) / (high - low)
    # Up with probability p rounded to a multiple of 2^-16: u is uniform over 0 ... 2^16 - 1 and
    # u + 1/2 < 2^16 p holds for round(2^16 p) of its values. E[table[code]] = x then holds to
    # 2^-17 of the gap, far below what the decoded moments can resolve, and each 32 random bits
    # serve two elements: threefry's bits are most of the cost on CPU (1M elements: 19 ms
    # against 28 ms with a float32 uniform per element, and 8 ms for nearest).
    n = normalized.shape[-1]
    bits = jax.random.bits(key, (*normalized.shape[:-1], -(-n // 2)), jnp.uint32)
    u = jnp.concatenate([bits >> 16, bits & 0xFFFF], axis=-1)[..., :n]
    up = u.astype(jnp.float32) + np.float32(0.5) < p * np.float32(2**16)
    return (lower + up.astype(jnp.int32)).astype(jnp.uint8)


def dequantize_blocks(q: BlockQuantized) -> jax.Array:
    """Decodes a :class:`BlockQuantized` to a float32 array of its original shape.

    Args:
      q: the output of :func:`quantize_blocks`.

    Returns:
      ``dynamic_map(q.signed)[q.codes] * q.scales[:, None]``, squared when ``q.sqrt``, with the
      block padding dropped and the original shape restored.

    Examples:
      >>> x = jnp.array([1.0, 0.3, 1e-8, 0.0])
      >>> dequantize_blocks(quantize_blocks(x, signed=False))  # 1e-8 is below the map's range
      Array([1.      , 0.296875, 0.      , 0.      ], dtype=float32)
      >>> dequantize_blocks(quantize_blocks(x, signed=False, sqrt=True))  # 1e-8 survives
      Array([1.000000e+00, 3.025000e-01, 9.999999e-09, 0.000000e+00], dtype=float32)
    """
    return _dequantize(q)


@jax.jit
def _dequantize(q: BlockQuantized) -> jax.Array:
    table = jnp.asarray(_dynamic_map(q.signed))
    values = table[q.codes.astype(jnp.int32)] * q.scales[:, None]
    size = int(np.prod(q.shape, dtype=np.int64))
    flat = values.reshape(-1)[:size]
    if q.sqrt:
        flat = jnp.square(flat)
    return flat.reshape(q.shape)


# --- Moment storage for any Optax transformation -------------------------------------------------


def _is_single_spec(value: Any) -> bool:
    return value is None or isinstance(value, str | np.dtype | type)


def _parse_spec(value: Any, where: str) -> Any:
    """``None``, ``"8bit"``, or one of the cast dtypes."""
    if value is None or (isinstance(value, str) and value == _EIGHT_BIT):
        return value
    choices = "None (unchanged), '8bit', or a float dtype name: 'f32', 'bf16', 'f16'"
    try:
        dtype = dtypes.parse_dtype(value)
    except ValueError:
        raise ValueError(
            f"{where}: unknown moment storage {value!r:.100}; choose {choices}"
        ) from None
    if dtype not in _CAST_DTYPES:
        raise ValueError(
            f"{where}: moments cannot be stored as a plain {dtypes.short_name(dtype)} cast; "
            f"choose {choices} ('8bit' is the block-scaled 8-bit format)"
        )
    return dtype


@dataclasses.dataclass(frozen=True)
class _Spec:
    """One field's storage: a single spec for every leaf, or a spec per leaf path."""

    field: str
    single: Any = None
    by_path: dict[tuple[str, ...], Any] | None = None

    @property
    def unchanged(self) -> bool:
        return self.by_path is None and self.single is None


def _make_spec(field: str, spec: Any) -> _Spec:
    if _is_single_spec(spec):
        return _Spec(field, single=_parse_spec(spec, f"{field}={spec!r:.100}"))
    flat, _ = jax.tree_util.tree_flatten_with_path(spec, is_leaf=lambda x: x is None)
    by_path = {}
    for keypath, value in flat:
        path = tuple(key_str(k) for k in keypath)
        by_path[path] = _parse_spec(value, f"{field} spec at {'/'.join(path)!r}")
    return _Spec(field, by_path=by_path)


def _is_stored_leaf(x: Any) -> bool:
    # MaskedNode is an empty NamedTuple (no leaves): it must be seen to be recognized as masked.
    return isinstance(x, BlockQuantized | optax.MaskedNode)


def _leaf_specs(spec: _Spec, flat: list[tuple[Any, Any]], what: str) -> list[Any]:
    """The spec of each leaf of a flattened tree shaped like the params (MaskedNodes allowed).

    A leaf takes the spec at its own path or, failing that, at the nearest enclosing path, so a
    moment tree may refine a params leaf (or a spec tree end at a subtree). A MaskedNode, which
    optax.masked/partition put where a group has no parameter, matches any spec below it.
    """
    if spec.by_path is None:
        return [spec.single] * len(flat)
    specs, used, masked, missing = [], set(), [], []
    for keypath, leaf in flat:
        path = tuple(key_str(k) for k in keypath)
        if isinstance(leaf, optax.MaskedNode):
            masked.append(path)
            specs.append(None)
            continue
        for i in range(len(path), -1, -1):
            if path[:i] in spec.by_path:
                used.add(path[:i])
                specs.append(spec.by_path[path[:i]])
                break
        else:
            missing.append("/".join(path))
            specs.append(None)
    masked_set = set(masked)
    # An unused spec of None changes nothing, so it is no error: params trees built with
    # tree_map keep None nodes, which the spec tree then holds as None leaves.
    extra = [
        "/".join(path)
        for path, value in spec.by_path.items()
        if value is not None
        and path not in used
        and not any(path[:i] in masked_set for i in range(len(path) + 1))
    ]
    if missing or extra:
        lines = [f"the {spec.field} spec tree does not match {what}:"]
        if missing:
            lines.append(f"  leaves with no spec: {missing[:10]}")
        if extra:
            lines.append(f"  specs for paths that are not there: {extra[:10]}")
        lines.append(
            f"Pass a {spec.field} spec tree shaped like the params (None leaves for 'unchanged'),"
            " e.g. jax.tree_util.tree_map(lambda p: '8bit' if p.size >= 4096 else None, params)."
        )
        raise ValueError("\n".join(lines))
    return specs


def _is_moment_node(x: Any) -> bool:
    fields = getattr(type(x), "_fields", None)
    return isinstance(x, tuple) and fields is not None and any(f in fields for f in _FIELDS)


def _is_float_array(x: Any) -> bool:
    return isinstance(x, jax.Array | np.ndarray) and jnp.issubdtype(x.dtype, jnp.floating)


def _map_moments(
    state: Any, specs: tuple[_Spec, ...], leaf_fn: Callable[[str, Any, str, Any], Any]
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
            leaf_specs = _leaf_specs(spec, flat, what)
            new = [
                leaf_fn(spec.field, s, path_str(kp), leaf)
                for (kp, leaf), s in zip(flat, leaf_specs, strict=True)
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


def _has_8bit(spec: _Spec) -> bool:
    values = [spec.single] if spec.by_path is None else list(spec.by_path.values())
    return any(isinstance(v, str) and v == _EIGHT_BIT for v in values)


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
    block_size = _check_block_size(block_size)
    if isinstance(min_size, bool) or not isinstance(min_size, int | np.integer) or min_size < 0:
        raise ValueError(f"min_size must be a non-negative int, got {min_size!r:.100}")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}: {seed!r:.100}")
    seed = int(seed)
    specs = (_make_spec("mu", mu), _make_spec("nu", nu))
    # The count is kept only where it is used, so that casts and nearest rounding leave the
    # state's structure as inner's.
    counted = bool(stochastic) and any(_has_8bit(spec) for spec in specs)
    inner = optax.with_extra_args_support(inner)

    def encoder(step_key):
        def encode(field, spec, path, leaf):
            if spec is None or not _is_float_array(leaf):
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
        if spec is None or not _is_float_array(leaf):
            return leaf
        return leaf.astype(jnp.float32)

    def init_fn(params):
        # Check per-leaf spec trees against the params first: the message is about the params,
        # which the caller wrote the spec tree for, rather than about some state node.
        flat, _ = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_stored_leaf)
        for spec in specs:
            _leaf_specs(spec, flat, "the params")
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
        mu=_EIGHT_BIT,
        nu=_EIGHT_BIT,
        block_size=block_size,
        min_size=min_size,
        stochastic=stochastic,
        seed=seed,
    )
