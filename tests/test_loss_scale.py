"""Loss scaling at work: skipped steps, underflow, floors, growth, no-op scaling, all_finite,
select_tree and argument checks. Long trajectories run as one ``lax.scan`` under ``jax.jit``;
the jitted drivers are module-level so that tests share their compilations.
"""

import math

import chex
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _loss_scale_runs import assert_same_bits, jmp_trajectory, run_adjust
from hypothesis import given, settings

import hybrid_jax
from hybrid_jax import DynamicLossScale, NoOpLossScale, StaticLossScale, all_finite, select_tree

F32_MAX = float(np.finfo(np.float32).max)


# ----------------------------------------------------------------------------------------------
# 1. Scaling touches floating leaves only


def test_scale_leaves_integer_leaves_alone():
    tree = {"x": jnp.ones(2, jnp.float32), "step": jnp.array(3, jnp.int32), "m": jnp.array(True)}
    for ls in (StaticLossScale(4.0), DynamicLossScale(4.0)):
        out = ls.unscale(ls.scale(tree))
        chex.assert_trees_all_equal(out, tree, strict=True)
        assert ls.scale(tree)["x"].tolist() == [4.0, 4.0]


def test_scale_keeps_complex_leaves():
    out = StaticLossScale(2.0).scale(jnp.array([1 + 2j], jnp.complex64))
    assert out.dtype == jnp.complex64
    np.testing.assert_array_equal(out, np.array([2 + 4j], np.complex64))


# ----------------------------------------------------------------------------------------------
# 2. A non-finite gradient skips the step, leaving params and every optimizer state as is


# Optax's Adam computes `decay ** count` (float ** int32), which strict promotion rejects; only the
# optimizer update runs under the standard rules (at trace time), the loss-scale code stays strict.
def _optax_promotion():
    return jax.numpy_dtype_promotion("standard")


_PARAMS = {
    "a_embed": jnp.array([0.5, -1.0, 2.0], jnp.float32),
    "b_dense": {
        "bias": jnp.array([0.1, -0.1], jnp.float32),
        "kernel": jnp.array([[1.0, -2.0], [0.25, 3.0]], jnp.float32),
    },
    "c_head": jnp.array([1.5, -0.5], jnp.float32),
}
# Leaves flatten as a_embed, b_dense/bias, b_dense/kernel, c_head. "b_dense/*" is the second group
# (labels sort as g1 < g2, so it is also second in the multi_transform state).
_LABELS = {
    "a_embed": "g1_sgd",
    "b_dense": {"bias": "g2_adam", "kernel": "g2_adam"},
    "c_head": "g1_sgd",
}
_TX = optax.multi_transform(
    {"g1_sgd": optax.sgd(0.1, momentum=0.9), "g2_adam": optax.adam(1e-2)}, _LABELS
)
_INJECT_AT = {  # leaf -> (path into _PARAMS, index in the leaf)
    "first": (("a_embed",), (0,)),
    "last": (("c_head",), (1,)),
    "second_group": (("b_dense", "kernel"), (1, 0)),
}


def _loss(params):
    return sum(jnp.sum(jnp.sin(p) * p) for p in jax.tree_util.tree_leaves(params))


@jax.jit
def _train_step(params, opt_state, loss_scale, inject):
    """One mixed-precision step; ``inject`` is added to the scaled gradients (zeros, or one bad
    value) so that a single compilation serves every case."""
    grads = jax.grad(lambda p: loss_scale.scale(_loss(p)))(params)
    grads = jax.tree_util.tree_map(jnp.add, grads, inject)
    grads = loss_scale.unscale(grads)
    finite = all_finite(grads)
    with _optax_promotion():
        updates, new_opt_state = _TX.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    params, opt_state = select_tree(finite, (new_params, new_opt_state), (params, opt_state))
    return params, opt_state, loss_scale.adjust(finite), finite


def _adam_count(opt_state):
    counts = [
        leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]
        if jax.tree_util.keystr(path).endswith(".count")
    ]
    assert len(counts) == 1, counts
    return int(counts[0])


@pytest.mark.parametrize("where", list(_INJECT_AT))
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "+inf", "-inf"])
def test_nonfinite_gradient_skips_step_bitwise(bad, where):
    zeros = jax.tree_util.tree_map(jnp.zeros_like, _PARAMS)
    params, opt_state = _PARAMS, _TX.init(_PARAMS)
    ls = DynamicLossScale(2.0**15, period=2)
    scales = []
    for _ in range(3):  # finite steps: non-zero moments and momentum, one growth
        params, opt_state, ls, finite = _train_step(params, opt_state, ls, zeros)
        assert bool(finite)
        scales.append(float(ls.loss_scale))
    assert scales == [2.0**15, 2.0**16, 2.0**16] and int(ls.counter) == 1
    assert _adam_count(opt_state) == 3

    keys, index = _INJECT_AT[where]
    inject = jax.tree_util.tree_map(lambda p: np.zeros(p.shape, np.float32), _PARAMS)
    leaf = inject
    for key in keys:
        leaf = leaf[key]
    leaf[index] = bad
    new_params, new_opt_state, new_ls, finite = _train_step(params, opt_state, ls, inject)
    assert not bool(finite)
    chex.assert_trees_all_equal(new_params, params, strict=True)
    # Every optimizer-state leaf of both groups is unchanged. The whole opt_state is selected, so
    # Adam's step count is not advanced either: a skipped step does not count towards the bias
    # correction (PyTorch's GradScaler skips optimizer.step() altogether, with the same effect).
    chex.assert_trees_all_equal(new_opt_state, opt_state, strict=True)
    assert _adam_count(new_opt_state) == 3
    assert_same_bits(new_ls.loss_scale, np.float32(2.0**15))  # halved exactly
    assert_same_bits(new_ls.counter, np.int32(0))

    # The next finite step updates every leaf and counts again.
    params2, opt_state2, ls2, finite = _train_step(new_params, new_opt_state, new_ls, zeros)
    assert bool(finite) and _adam_count(opt_state2) == 4
    for before, after in zip(
        jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(params2), strict=True
    ):
        assert np.all(np.asarray(before) != np.asarray(after))
    assert float(ls2.loss_scale) == 2.0**15 and int(ls2.counter) == 1


# ----------------------------------------------------------------------------------------------
# 3. Underflow


def test_fp16_gradient_underflow_rescued_by_loss_scale():
    assert jnp.float16(1e-8) == 0  # below half of fp16's smallest subnormal, 5.96e-8

    # `x` is an argument, not a closed-over constant: XLA rewrites (a * c) * c as a * (c * c) for
    # constants and folds c * c = 1e-8 to 0 in fp16, which no loss scale can undo.
    @jax.jit
    def grad(w, x, loss_scale):  # fp32 master weight, fp16 compute, d loss / d w = x * x ~ 1e-8
        def loss(w):
            return loss_scale.scale((w.astype(jnp.float16) * x) * x)

        return loss_scale.unscale(jax.grad(loss)(w))

    w, x = jnp.float32(1.0), jnp.float16(1e-4)
    assert float(grad(w, x, NoOpLossScale())) == 0.0  # flushed to zero in the fp16 backward pass
    for ls in (StaticLossScale(2.0**15), DynamicLossScale(2.0**15)):
        g = grad(w, x, ls)
        assert g.dtype == jnp.float32
        # Tolerance: fp16(1e-4) is 1.7e-4 off (3.3e-4 squared) plus one fp16 rounding (4.9e-4).
        assert g != 0 and abs(float(g) - 1e-8) <= 1e-3 * 1e-8


def test_bf16_small_updates_cancel_while_fp32_master_accumulates():
    @jax.jit
    def run():
        def body(_, carry):
            p_bf16, p_f32 = carry
            return p_bf16 + jnp.bfloat16(1e-3), p_f32 + jnp.float32(1e-3)

        return jax.lax.fori_loop(0, 1000, body, (jnp.bfloat16(1.0), jnp.float32(1.0)))

    p_bf16, p_f32 = run()
    # bf16's spacing at 1.0 is 2^-7 = 7.8e-3: each 1e-3 update rounds away.
    assert_same_bits(p_bf16, np.asarray(1.0, jnp.bfloat16))
    # Tolerance: 1000 fp32 roundings of at most half an ulp below 2 (6e-8) each: 6e-5 < 1e-4.
    assert abs(float(p_f32) - 2.0) <= 1e-4


# ----------------------------------------------------------------------------------------------
# 4. Persistent non-finite gradients floor the scale exactly


@jax.jit
def _run_all_nonfinite(loss_scale, params):
    def body(carry, _):
        ls, params = carry
        grads = ls.unscale(jax.tree_util.tree_map(lambda p: jnp.full_like(p, jnp.nan), params))
        finite = all_finite(grads)
        new_params = jax.tree_util.tree_map(lambda p, g: p - 0.1 * g, params, grads)
        params = select_tree(finite, new_params, params)
        ls = ls.adjust(finite)
        return (ls, params), ls.loss_scale

    return jax.lax.scan(body, (loss_scale, params), length=100)


def test_persistent_nonfinite_floors_exactly_and_floor_survives_round_trips():
    params = {"w": jnp.array([1.0, -2.0], jnp.float32)}
    ls = DynamicLossScale(2.0**15, period=5, min_loss_scale=2.0**5)
    (ls, out_params), scales = _run_all_nonfinite(ls, params)
    expected = np.maximum(np.float32(2.0**5), np.float32(2.0**15) / 2.0 ** np.arange(1, 101))
    assert_same_bits(scales, expected.astype(np.float32))
    chex.assert_trees_all_equal(out_params, params, strict=True)  # never NaN, never touched
    assert_same_bits(ls.min_loss_scale, np.float32(2.0**5))  # survived jit and lax.scan

    leaves, treedef = jax.tree_util.tree_flatten(ls)
    restored = {
        "tree_util": jax.tree_util.tree_unflatten(treedef, leaves),
        # Stand-ins for a checkpoint: NumPy arrays on the host, and plain Python numbers.
        "numpy": jax.tree_util.tree_unflatten(
            treedef, [np.asarray(x) for x in jax.device_get(leaves)]
        ),
        "python": jax.tree_util.tree_unflatten(treedef, [np.asarray(x).item() for x in leaves]),
    }
    # A restore into a template built with the default floor: the floor is a leaf, so the saved
    # value wins (as static metadata, the template's floor of 1 would).
    template = jax.tree_util.tree_structure(DynamicLossScale(2.0**15, period=5))
    restored["template"] = jax.tree_util.tree_unflatten(template, jax.device_get(leaves))
    compilations = _run_all_nonfinite._cache_size()
    for name, back in restored.items():
        assert float(back.min_loss_scale) == 2.0**5, name
        assert_same_bits(back.adjust(jnp.array(False)).loss_scale, np.float32(2.0**5))
        (again, _), scales = _run_all_nonfinite(back, params)
        assert_same_bits(scales, np.full(100, 2.0**5, np.float32))
        chex.assert_trees_all_equal(jax.device_get(again), jax.device_get(ls), strict=True)
    assert _run_all_nonfinite._cache_size() == compilations  # same avals after every round trip


# ----------------------------------------------------------------------------------------------
# 5. Exact growth, the ceiling, and the fp32 limit


def test_growth_doubles_on_every_period_th_finite_step():
    _, (scales, counters) = run_adjust(DynamicLossScale(2.0**10, period=3), np.ones(12, bool))
    steps = np.arange(1, 13)
    assert_same_bits(scales, (2.0 ** (10 + steps // 3)).astype(np.float32))
    assert_same_bits(counters, (steps % 3).astype(np.int32))


@pytest.mark.parametrize(
    "max_scale, expected",
    [(2.0**17, [2.0**16, 2.0**17, 2.0**17, 2.0**17]), (1e5, [2.0**16, 1e5, 1e5, 1e5])],
)
def test_growth_never_passes_max_loss_scale(max_scale, expected):
    ls = DynamicLossScale(2.0**15, period=1, max_loss_scale=max_scale)
    _, (scales, _) = run_adjust(ls, np.ones(4, bool))
    assert_same_bits(scales, np.asarray(expected, np.float32))


def test_growth_refused_when_it_would_overflow():
    start = np.float32(F32_MAX / 1.5)
    _, (scales, counters) = run_adjust(DynamicLossScale(start, period=1), np.ones(3, bool))
    assert_same_bits(scales, np.full(3, start))
    assert_same_bits(counters, np.zeros(3, np.int32))
    jmp_scales, _ = jmp_trajectory(np.ones(3, bool), start, period=1, factor=2, min_scale=1.0)
    assert_same_bits(jmp_scales, np.full(3, start))


# ----------------------------------------------------------------------------------------------
# 6. No scaling and the fp32 policy are bitwise no-ops

_X = jnp.array([[0.3, -1.2], [2.0, 0.5], [-0.7, 1.1]], jnp.float32)
_Y = jnp.array([[1.0, 0.0], [0.0, -1.0], [0.5, 0.5]], jnp.float32)
_ADAM = optax.adam(1e-2)


def _mse(params):
    return jnp.mean((_X @ params["w"] + params["b"] - _Y) ** 2)


@jax.jit
def _guarded_step(params, opt_state, loss_scale):
    compute_params = hybrid_jax.cast_to_compute(params, "fp32")
    grads = loss_scale.unscale(jax.grad(lambda p: loss_scale.scale(_mse(p)))(compute_params))
    finite = all_finite(grads)
    with _optax_promotion():
        updates, new_opt_state = _ADAM.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    params, opt_state = select_tree(finite, (new_params, new_opt_state), (params, opt_state))
    return params, opt_state, loss_scale.adjust(finite)


@jax.jit
def _plain_step(params, opt_state):
    grads = jax.grad(_mse)(params)
    with _optax_promotion():
        updates, opt_state = _ADAM.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def test_noop_scale_and_fp32_policy_bitwise_equal_plain_optax():
    params = {"w": jnp.array([[0.5, -1.0], [2.0, 0.3]], jnp.float32), "b": jnp.zeros(2)}
    ours = (params, _ADAM.init(params))
    plain = (params, _ADAM.init(params))
    ls = NoOpLossScale()
    for _ in range(10):
        *ours, ls = _guarded_step(*ours, ls)
        plain = _plain_step(*plain)
        chex.assert_trees_all_equal(tuple(ours), plain, strict=True)
    assert not np.array_equal(ours[0]["w"], params["w"])


# ----------------------------------------------------------------------------------------------
# 7. all_finite

_FLOAT_DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]
_SHAPES = [(), (3,), (2, 2)]


@st.composite
def _trees(draw):
    floats = []
    for _ in range(draw(st.integers(1, 4))):
        dtype = draw(st.sampled_from(_FLOAT_DTYPES))
        values = draw(
            hnp.arrays(
                np.float32,
                draw(st.sampled_from(_SHAPES)),
                elements=st.floats(-1e4, 1e4, width=32),
            )
        ).astype(dtype)
        if draw(st.booleans()):  # the largest finite value is still finite
            values.reshape(-1)[0] = jnp.finfo(dtype).max * draw(st.sampled_from([1, -1]))
        floats.append(values)
    ints = np.array([np.iinfo(np.int32).max, -1], np.int32)
    return {"floats": floats, "nested": {"ints": ints, "flag": np.array([True, False])}}


@settings(max_examples=25, deadline=None)
@given(tree=_trees(), data=st.data())
def test_all_finite_property(tree, data):
    as_jax = jax.tree_util.tree_map(jnp.asarray, tree)
    result = all_finite(as_jax)
    assert result.dtype == jnp.bool_ and result.shape == ()
    assert bool(result)

    leaf = data.draw(st.integers(0, len(tree["floats"]) - 1))
    values = tree["floats"][leaf].copy()
    position = data.draw(st.integers(0, values.size - 1))
    values.reshape(-1)[position] = data.draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    tree["floats"][leaf] = values
    assert not bool(all_finite(jax.tree_util.tree_map(jnp.asarray, tree)))


def test_all_finite_edge_cases():
    for tree in ({}, [], None, ()):
        assert bool(all_finite(tree))
    assert bool(all_finite({"step": jnp.arange(3), "mask": jnp.array([True, False])}))
    checked = jax.jit(all_finite)
    assert bool(checked({"a": jnp.ones(2), "n": jnp.array(1)}))
    assert not bool(checked({"a": jnp.ones(2), "b": jnp.array([0.0, -jnp.inf], jnp.bfloat16)}))


# ----------------------------------------------------------------------------------------------
# 8. select_tree and constructor validation


def test_select_tree_picks_a_or_b():
    a = {"x": jnp.ones(2, jnp.float32), "y": (jnp.int32(1), jnp.array(True))}
    b = {"x": jnp.zeros(2, jnp.float32), "y": (jnp.int32(-1), jnp.array(False))}
    for pred, want in ((True, a), (False, b)):
        chex.assert_trees_all_equal(select_tree(jnp.array(pred), a, b), want, strict=True)
        chex.assert_trees_all_equal(jax.jit(select_tree)(jnp.array(pred), a, b), want, strict=True)


@pytest.mark.parametrize(
    "pred, a, b, error, match",
    [
        (jnp.array([True]), jnp.ones(2), jnp.ones(2), TypeError, "scalar bool"),
        (jnp.array(1), jnp.ones(2), jnp.ones(2), TypeError, "scalar bool"),
        (jnp.array(1.0), jnp.ones(2), jnp.ones(2), TypeError, "scalar bool"),
        (
            jnp.array(True),
            {"blk": {"w": jnp.ones(2, jnp.float32)}},
            {"blk": {"w": jnp.ones(2, jnp.bfloat16)}},
            TypeError,
            "blk/w",
        ),
        (
            jnp.array(True),
            {"blk": [jnp.ones(2), jnp.ones(3)]},
            {"blk": [jnp.ones(2), jnp.ones(4)]},
            TypeError,
            "blk/1",
        ),
        (jnp.array(True), {"a": jnp.ones(2)}, {"b": jnp.ones(2)}, ValueError, None),
    ],
    ids=["non-scalar", "int-pred", "float-pred", "dtype", "shape", "structure"],
)
def test_select_tree_errors(pred, a, b, error, match):
    with pytest.raises(error, match=match):
        select_tree(pred, a, b)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(loss_scale=2.0**15, period=0),
        dict(loss_scale=2.0**15, period=-1),
        dict(loss_scale=2.0**15, period=2.5),
        dict(loss_scale=2.0**15, factor=1),
        dict(loss_scale=2.0**15, factor=0.5),
        dict(loss_scale=2.0**15, backoff=1.5),
        dict(loss_scale=2.0**15, backoff=1.0),
        dict(loss_scale=2.0**15, backoff=0.0),
        dict(loss_scale=0.0),
        dict(loss_scale=-1.0),
        dict(loss_scale=math.inf),
        dict(loss_scale=math.nan),
        dict(loss_scale=2.0**5, min_loss_scale=2.0**10),
        dict(loss_scale=2.0**15, max_loss_scale=2.0**10),
    ],
    ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()),
)
def test_dynamic_constructor_rejects(kwargs):
    with pytest.raises(ValueError):
        DynamicLossScale(**kwargs)


def test_dynamic_constructor_accepts_the_bounds():
    DynamicLossScale(2.0**10, min_loss_scale=2.0**10, max_loss_scale=2.0**10)
    DynamicLossScale.grad_scaler(init_scale=1e-3)  # no floor


@pytest.mark.parametrize("grads_finite", [jnp.array([True]), jnp.array(1), jnp.array(1.0)])
def test_adjust_requires_scalar_bool(grads_finite):
    with pytest.raises(TypeError, match="grads_finite"):
        DynamicLossScale(2.0**15).adjust(grads_finite)
