"""Narrow optimizer moments (optim.moments): seeds, storage, per-leaf specs, Optax composition."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hybrid_jax.optim import with_precision
from hybrid_jax.optim._blockwise import BlockQuantized, quantize_blocks
from hybrid_jax.optim.moments import MomentStorageState, adamw_8bit, with_moment_storage

# --- Stochastic rounding of the moments -----------------------------------------------------------

# The shape and block size of test_blockwise.py's round trips: the encodings are jitted inside
# the library, once per shape and mode, so tests in one process share those compilations.
_N, _BLOCK = 777, 64


def _run_eagerly(params, seed, stochastic=True):
    # RMSProp's nu (of the gradients) and Lion's mu, whose updates suit strict promotion: the
    # encodings they run are then those test_blockwise.py compiles (jit caches are per promotion
    # mode).
    tx = with_moment_storage(
        optax.chain(optax.scale_by_rms(), optax.scale_by_lion()),
        mu="8bit",
        nu="8bit",
        block_size=_BLOCK,
        min_size=0,
        stochastic=stochastic,
        seed=seed,
    )
    state = tx.init(params)
    # Eager steps: the encoding is jitted inside the library, once per shape and mode, and
    # shared by every seed (and with test_blockwise.py, for leaves of _N elements in blocks of
    # _BLOCK); jitting each tx.update would compile each run anew.
    for i in range(3):
        grads = jax.tree.map(lambda p, i=i: jnp.sin(p * (i + 1)), params)
        _, state = tx.update(grads, state, params)
    return state


def _moments(state, leaf):
    rms, lion = state
    return {"mu": lion.mu[leaf], "nu": rms.nu[leaf]}


def test_a_seed_reproduces_the_moments_and_a_leaf_does_not_depend_on_the_others():
    w = {"w": jnp.linspace(-1.0, 1.0, _N)}
    first, again = _run_eagerly(w, seed=0), _run_eagerly(w, seed=0)
    assert isinstance(first, MomentStorageState) and int(first.rounding_count) == 3
    chex.assert_trees_all_equal(first, again)
    # Another leaf before it (a different position in the flattened tree) changes nothing for w:
    # the bits are keyed by the path.
    more = _run_eagerly({"a": jnp.ones(_N), **w}, seed=0)
    chex.assert_trees_all_equal(_moments(more.inner_state, "w"), _moments(first.inner_state, "w"))
    other = _moments(_run_eagerly(w, seed=1).inner_state, "w")
    for field, moment in _moments(first.inner_state, "w").items():
        assert np.mean(np.asarray(other[field].codes != moment.codes)) > 0.05, field


def test_nearest_rounding_keeps_the_inner_state_structure():
    state = _run_eagerly({"w": jnp.linspace(-1.0, 1.0, _N)}, seed=0, stochastic=False)
    # No count added: the state is inner's own.
    assert isinstance(state[0], optax.ScaleByRmsState)
    assert isinstance(state[1], optax.ScaleByLionState)
    # Re-encoding a nearest-rounded moment is exact: its codes are a fixed point.
    nu = _moments(state, "w")["nu"]
    again = quantize_blocks(nu.dequantize(), block_size=_BLOCK, signed=False, sqrt=True)
    np.testing.assert_array_equal(again.codes, nu.codes)


# --- Storage ------------------------------------------------------------------------------------


def _abstract_init(tx, params):
    # The state's shapes and dtypes without computing it (nor compiling anything).
    return jax.eval_shape(tx.init, params)


def test_8bit_moments_take_under_2_04_bytes_per_element():
    n = 1_000_000
    state = _abstract_init(adamw_8bit(1e-3), {"w": jax.ShapeDtypeStruct((n,), jnp.float32)})
    adam = state.inner_state[0]
    for moment in (adam.mu["w"], adam.nu["w"]):
        assert isinstance(moment, BlockQuantized)
    leaves = jax.tree_util.tree_leaves((adam.mu, adam.nu))
    assert {leaf.dtype for leaf in leaves} == {jnp.dtype(jnp.uint8), jnp.dtype(jnp.float32)}
    per_element = sum(leaf.size * leaf.dtype.itemsize for leaf in leaves) / n
    # Per moment: 1 byte of code per element (and 192 padding codes) + one fp32 scale per 256.
    assert per_element <= 2.04, per_element
    # Stochastic rounding adds one int32 count for the whole state.
    assert state.rounding_count.shape == () and state.rounding_count.dtype == jnp.int32


def test_the_count_is_no_trouble_for_optax_tree_utilities_and_checkpoints():
    params = {"w": jnp.zeros(5000), "b": jnp.zeros(3)}
    state = adamw_8bit(1e-3).init(params)
    # Named rounding_count, so that "count" still finds Adam's step count alone.
    assert optax.tree.get(state, "count") is state.inner_state[0].count
    assert optax.tree.get(state, "rounding_count") is state.rounding_count
    # Orbax refuses zero-size arrays; every leaf of the state has a value.
    assert all(leaf.size > 0 for leaf in jax.tree.leaves(state))
    # with_precision's int8 moments get stochastic rounding too.
    tx = with_precision(optax.adam(1e-3), "p=f32,nu=int8")
    assert isinstance(_abstract_init(tx, params), MomentStorageState)


def test_small_and_non_floating_leaves_are_left_alone():
    tx = with_moment_storage(optax.adam(1e-3), mu="8bit", nu="8bit", min_size=100)
    state = _abstract_init(tx, {"big": jnp.zeros(100), "small": jnp.zeros(99, jnp.bfloat16)})
    adam = state.inner_state[0]
    assert isinstance(adam.mu["big"], BlockQuantized)
    assert adam.mu["small"].dtype == jnp.float32  # "8bit" keeps small leaves in fp32
    assert adam.count.dtype == jnp.int32


def test_other_moment_states_under_strict_promotion():
    # Lion's mu and RMSProp's nu are found by their field names too; neither update mixes an
    # int count into float math, so this runs the encode/decode under strict promotion.
    # Eager, on the shape and blocks of _run_eagerly, whose compiled encodings it reuses.
    tx = with_moment_storage(
        optax.chain(optax.scale_by_lion(), optax.scale_by_rms()),
        mu="8bit",
        nu="8bit",
        block_size=_BLOCK,
        min_size=0,
    )
    params = {"w": jnp.linspace(-1.0, 1.0, _N)}
    updates, state = tx.update(params, tx.init(params), params)
    lion, rms = state.inner_state
    assert isinstance(lion.mu["w"], BlockQuantized) and lion.mu["w"].signed
    assert isinstance(rms.nu["w"], BlockQuantized) and rms.nu["w"].sqrt
    assert updates["w"].dtype == jnp.float32


# --- Specs --------------------------------------------------------------------------------------


def _params():
    # One leaf above min_size = 4096, which "8bit" quantizes, and two below (each quantized leaf
    # adds to every compilation, so one is enough).
    rng = np.random.default_rng(0)
    return {
        "enc": {"w": jnp.asarray(rng.normal(size=(64, 80)), jnp.float32)},
        "dec": {
            "w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=(3,)), jnp.float32),
        },
    }


def _grads(params, n, seed=1):
    rng = np.random.default_rng(seed)
    return [
        jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
        for _ in range(n)
    ]


def _run(tx, params, grads, **extra_args):
    step = jax.jit(functools.partial(tx.update, **extra_args))
    state = tx.init(params)
    for g in grads:
        updates, state = step(g, state, params)
        params = optax.apply_updates(params, updates)
    return params, state


_STEPS = 5
_GROUPS = {"adam": optax.adam(1e-2), "sgd": optax.sgd(0.1)}
_LABELS = {"enc": {"w": "adam"}, "dec": {"w": "adam", "b": "sgd"}}


@functools.cache
def _reference(name):
    """fp32 parameters after _STEPS steps of optax.adam, or of a partition into Adam and SGD."""
    tx = optax.adam(1e-2) if name == "adam" else optax.partition(_GROUPS, _LABELS)
    return _run(tx, _params(), _grads(_params(), _STEPS))[0]


def _assert_close_to_reference(params, name):
    # The 8-bit moments perturb each update by about a code step of mu and of sqrt(nu): after
    # _STEPS steps the distance to the fp32 run measures 1% of how far that run moved, per
    # quantized leaf (0 for leaves kept in fp32). Tolerance: 5%.
    start, reference = _params(), _reference(name)
    for path, p in jax.tree_util.tree_leaves_with_path(params):
        r, s = _get(reference, path), _get(start, path)
        assert float(jnp.linalg.norm(p - r)) <= 0.05 * float(jnp.linalg.norm(r - s)), path


def _get(tree, path):
    for key in path:
        tree = tree[key.key]
    return tree


@pytest.mark.standard_promotion
def test_a_per_leaf_spec_tree_stores_each_leaf_as_asked():
    params = _params()
    mu = {"enc": {"w": "8bit"}, "dec": {"w": "bf16", "b": None}}
    tx = with_moment_storage(optax.adam(1e-2), mu=mu, nu="f16")
    final, state = _run(tx, params, _grads(params, _STEPS))
    adam = state.inner_state[0]
    assert isinstance(adam.mu["enc"]["w"], BlockQuantized) and adam.mu["enc"]["w"].signed
    assert adam.mu["dec"]["w"].dtype == jnp.bfloat16
    assert adam.mu["dec"]["b"].dtype == jnp.float32
    assert {leaf.dtype for leaf in jax.tree.leaves(adam.nu)} == {jnp.dtype(jnp.float16)}
    _assert_close_to_reference(final, "adam")


def test_a_spec_tree_not_shaped_like_the_params_names_the_paths():
    tx = with_moment_storage(optax.adam(1e-2), mu={"enc": {"w": "8bit"}, "dex": {"w": "8bit"}})
    with pytest.raises(ValueError, match=r"mu spec tree does not match the params") as info:
        tx.init(_params())
    assert "dec/w" in str(info.value) and "dex/w" in str(info.value)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("int4", r"mu='int4': unknown moment storage 'int4'"),
        ({"enc": {"w": "e4m3"}}, r"mu spec at 'enc/w'.*plain e4m3 cast.*'8bit'"),
        ({"enc": {"w": 8}}, r"mu spec at 'enc/w': unknown moment storage 8"),
    ],
)
def test_an_unknown_spec_is_refused_at_construction(spec, match):
    with pytest.raises(ValueError, match=match):
        with_moment_storage(optax.adam(1e-2), mu=spec)


@pytest.mark.parametrize(
    ("kwargs", "error"), [({"block_size": 0}, ValueError), ({"min_size": -1}, ValueError)]
)
def test_bad_block_or_min_size_is_refused(kwargs, error):
    with pytest.raises(error):
        with_moment_storage(optax.adam(1e-2), mu="8bit", **kwargs)


# --- Composition --------------------------------------------------------------------------------


@pytest.mark.standard_promotion
@pytest.mark.parametrize("where", ["around", "inside"])
def test_works_around_and_inside_optax_partition(where):
    if where == "around":
        tx = with_moment_storage(optax.partition(_GROUPS, _LABELS), mu="8bit", nu="8bit")
    else:
        adam8 = with_moment_storage(_GROUPS["adam"], mu="8bit", nu="8bit")
        tx = optax.partition({**_GROUPS, "adam": adam8}, _LABELS)
    final, state = _run(tx, _params(), _grads(_params(), _STEPS))
    if where == "around":
        mu = state.inner_state.inner_states["adam"].inner_state[0].mu
    else:  # partition masks the group's state: MaskedState(MomentStorageState(count, adam))
        mu = state.inner_states["adam"].inner_state.inner_state[0].mu
    assert isinstance(mu["enc"]["w"], BlockQuantized) and mu["dec"]["w"].dtype == jnp.float32
    assert isinstance(mu["dec"]["b"], optax.MaskedNode)
    _assert_close_to_reference(final, "partition")


@pytest.mark.standard_promotion
def test_a_spec_tree_over_a_masked_subtree():
    # optax.masked with a prefix mask replaces the whole "dec" subtree by one MaskedNode; the
    # spec tree still names dec/w and dec/b, which the MaskedNode covers.
    params = _params()
    mu = {"enc": {"w": "8bit"}, "dec": {"w": "8bit", "b": "8bit"}}
    masked = optax.masked(optax.adam(1e-2), {"enc": True, "dec": False})
    state = with_moment_storage(masked, mu=mu, nu="8bit").init(params)
    adam = state.inner_state.inner_state[0]  # MomentStorageState(count, MaskedState(adam))
    assert isinstance(adam.mu["dec"], optax.MaskedNode)
    assert isinstance(adam.mu["enc"]["w"], BlockQuantized)


@pytest.mark.standard_promotion
def test_around_and_inside_optax_chain_agree_and_pass_extra_args():
    params, grads = _params(), _grads(_params(), _STEPS)
    # A clip that never binds, so that the chains compute optax.adam's update.
    clip = optax.clip_by_global_norm(1e9)
    around = with_moment_storage(optax.chain(clip, optax.adam(1e-2)), mu="8bit", nu="8bit")
    inside = optax.chain(clip, with_moment_storage(optax.adam(1e-2), mu="8bit", nu="8bit"))
    a, _ = _run(around, params, grads)
    b, _ = _run(inside, params, grads, value=jnp.float32(1.0))  # an extra arg, passed through
    # The same decode, Adam step and encode, with the same random bits: the moments' paths and
    # the count do not depend on where the clip is.
    chex.assert_trees_all_close(a, b, rtol=1e-6)
    _assert_close_to_reference(a, "adam")


_STATE_DTYPES = (jnp.uint8, jnp.float32, jnp.int32)  # codes; scales and small moments; count


@pytest.mark.standard_promotion
def test_jitted_update_traces_once_and_keeps_state_structure_and_dtypes():
    tx = adamw_8bit(1e-2)
    params = _params()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def update(grads, state, params):
        return tx.update(grads, state, params)

    state = tx.init(params)
    before = jax.tree.map(lambda x: (x.shape, x.dtype), state)
    for g in _grads(params, 3):
        updates, state = update(g, state, params)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), state) == before
    assert {x.dtype for x in jax.tree.leaves(state)} == {jnp.dtype(t) for t in _STATE_DTYPES}
    chex.assert_trees_all_equal_dtypes(updates, params)
