"""``hybrid_jax.jmp`` as a drop-in for DeepMind's jmp 0.0.4.

The semantics of jmp's own test cases (``policy_test.py``, ``loss_scale_test.py``) and of its
README examples, run against ``hybrid_jax.jmp`` and, where jmp is installed, against jmp too
(the ``mod`` fixture). jmp relies on implicit dtype promotion, so it runs under standard
promotion; ``hybrid_jax.jmp`` under the suite's strict promotion. The deliberate deviations that
``hybrid_jax.jmp``'s docstring lists have a test each, which also pins jmp's behaviour.
"""

import contextlib
import inspect
import itertools
import typing
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hybrid_jax
import hybrid_jax.jmp as hj_jmp

try:
    import jmp as dm_jmp
except ImportError:  # jmp is a dev dependency: the tests of our module still run without it
    dm_jmp = None

needs_jmp = pytest.mark.skipif(dm_jmp is None, reason="jmp is not installed")
MODULES = [pytest.param(hj_jmp, id="hybrid_jax.jmp")]
if dm_jmp is not None:
    MODULES.append(pytest.param(dm_jmp, id="jmp"))

HALF = jnp.float16  # the CPU's and GPU's half type; jmp's README uses it as `half`
FULL = jnp.float32
HALF_DTYPES = (np.float16, jnp.float16, jnp.bfloat16)
FULL_DTYPES = (np.float32, jnp.float32)
DTYPES = HALF_DTYPES + FULL_DTYPES
NUMPYS = (np, jnp)
_NAMES = {np.float16: "float16", jnp.bfloat16: "bfloat16", np.float32: "float32"}


def _promotion(module):
    return jax.numpy_dtype_promotion("standard") if module is dm_jmp else contextlib.nullcontext()


@pytest.fixture(params=MODULES)
def mod(request):
    with _promotion(request.param):
        yield request.param


# ----------------------------------------------------------------------------------------------
# The public API


@needs_jmp
def test_public_names_equal_jmps():
    assert sorted(hj_jmp.__all__) == sorted(dm_jmp.__all__)
    public = {n for n in dir(dm_jmp) if not n.startswith("_")}
    assert public <= set(dir(hj_jmp))


@needs_jmp
@pytest.mark.parametrize("name", sorted(set(dm_jmp.__all__) - {"LossScale"}) if dm_jmp else [])
def test_signatures_start_with_jmps(name):
    # Ours may add trailing parameters with defaults (max_loss_scale, carrier_dtype), never
    # rename, reorder or require more.
    theirs = inspect.signature(getattr(dm_jmp, name)).parameters
    ours = inspect.signature(getattr(hj_jmp, name)).parameters
    assert list(ours)[: len(theirs)] == list(theirs)
    for extra in list(ours)[len(theirs) :]:
        assert ours[extra].default is not inspect.Parameter.empty, extra


def test_loss_scale_is_the_union_of_the_three(mod):
    assert set(typing.get_args(mod.LossScale)) == {
        mod.NoOpLossScale,
        mod.StaticLossScale,
        mod.DynamicLossScale,
    }


def test_the_names_are_the_packages_own():
    # One Policy and one set of loss scales: what get_policy returns works across hybrid_jax.
    assert hj_jmp.Policy is hybrid_jax.Policy
    assert hj_jmp.DynamicLossScale is hybrid_jax.DynamicLossScale
    assert hj_jmp.select_tree is hybrid_jax.select_tree


# ----------------------------------------------------------------------------------------------
# Policies (jmp's policy_test.py)


@pytest.mark.parametrize("method", ["param", "compute", "output"])
@pytest.mark.parametrize(("dtype", "np_"), list(itertools.product(DTYPES, NUMPYS)))
def test_policy_casts(mod, method, dtype, np_):
    policy = mod.Policy(dtype, dtype, dtype)
    assert getattr(policy, f"{method}_dtype") == dtype
    out = getattr(policy, f"cast_to_{method}")({"a": np_.ones([])})
    assert out["a"].dtype == np_.ones([], dtype).dtype


@pytest.mark.parametrize(("dtype", "np_"), list(itertools.product(DTYPES, NUMPYS)))
def test_policy_with_output_dtype(mod, dtype, np_):
    policy = mod.Policy(np_.float32, np_.float32, np_.float32).with_output_dtype(dtype)
    assert policy.output_dtype == dtype


@pytest.mark.parametrize(
    ("name", "dtype"),
    [("float16", np.float16), ("float32", np.float32), ("bfloat16", jnp.bfloat16)],
)
def test_get_policy(mod, name, dtype):
    policy = mod.get_policy(name)
    assert policy.param_dtype == policy.compute_dtype == policy.output_dtype == dtype


def test_get_policy_almost_dtype(mod):
    with pytest.raises(ValueError, match="Unknown dtype"):
        mod.get_policy("compute_float16")
    with pytest.raises(ValueError, match="Unknown dtype"):
        mod.get_policy("c=bf17")


@pytest.mark.parametrize("output", ["", ",o=full"])
@pytest.mark.parametrize("dtype", [np.float16, jnp.bfloat16, np.float32])
def test_get_policy_mixed(mod, dtype, output):
    policy = mod.get_policy(f"c={_NAMES[dtype]}{output}")
    assert policy.param_dtype == FULL
    assert policy.compute_dtype == dtype
    assert policy.output_dtype == (FULL if output else dtype)


def test_half_dtype(mod):
    expected = jnp.bfloat16 if jax.default_backend() == "tpu" else jnp.float16
    assert mod.half_dtype() is expected  # a scalar type, so half_dtype()(2**15) builds a value
    assert mod.half_dtype()(2**15).dtype == expected


def _mixed_tree(dtype):
    return dict(o=object(), h=jnp.ones([], dtype), f=jnp.ones([]), i=jnp.ones([], jnp.int16))


def test_cast_to_full(mod):
    tree = _mixed_tree(mod.half_dtype())
    out = mod.cast_to_full(tree)
    assert out["o"] is tree["o"] and out["f"] is tree["f"] and out["i"] is tree["i"]
    chex.assert_trees_all_equal(out["h"], tree["h"].astype(jnp.float32), strict=True)


def test_cast_to_half(mod):
    tree = _mixed_tree(mod.half_dtype())
    out = mod.cast_to_half(tree)
    assert out["o"] is tree["o"] and out["h"] is tree["h"] and out["i"] is tree["i"]
    chex.assert_trees_all_equal(out["f"], tree["f"].astype(mod.half_dtype()), strict=True)


@needs_jmp
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64])
def test_str_writes_f32_where_jmp_writes_full_and_both_parse_everywhere(dtype):
    # Deliberate: str() is the package's one spelling; each string parses to the same policy in
    # both libraries.
    ours, theirs = hj_jmp.Policy(dtype, dtype, dtype), dm_jmp.Policy(dtype, dtype, dtype)
    name = {jnp.float16: "f16", jnp.bfloat16: "bf16", jnp.float32: "f32", jnp.float64: "f64"}
    assert str(ours) == f"p={name[dtype]},c={name[dtype]},o={name[dtype]}"
    assert str(theirs) == str(ours).replace("f32", "full")
    for text in (str(ours), str(theirs)):
        for module in (hj_jmp, dm_jmp):
            policy = module.get_policy(text)
            assert policy.param_dtype == policy.compute_dtype == policy.output_dtype == dtype


@needs_jmp
@pytest.mark.parametrize(
    "spec",
    [
        *("half", "full", "f32", "bf16", "c=half", "p=f16", "p=full,c=half,o=full"),
        *("c=bf16,o=f32", "params=float32,compute=float16,output=float32", "o=bfloat16"),
        "p=bf16,c=f32",
    ],
)
def test_get_policy_equals_jmps(spec):
    ours, theirs = hj_jmp.get_policy(spec), dm_jmp.get_policy(spec)
    for field in ("param_dtype", "compute_dtype", "output_dtype"):
        assert getattr(ours, field) == getattr(theirs, field), field
    tree = {"w": np.ones(2, np.float32), "b": jnp.zeros(2, jnp.bfloat16), "n": jnp.arange(2)}
    for method in ("cast_to_param", "cast_to_compute", "cast_to_output"):
        chex.assert_trees_all_equal(
            getattr(ours, method)(tree), getattr(theirs, method)(tree), strict=True
        )


# ----------------------------------------------------------------------------------------------
# Loss scales (jmp's loss_scale_test.py)


def test_no_op_loss_scale(mod):
    loss_scale = mod.NoOpLossScale()
    tree = {"a": jnp.ones([])}
    assert loss_scale.scale(tree) is tree
    assert loss_scale.unscale(tree) is tree


@pytest.mark.parametrize("cls", ["StaticLossScale", "DynamicLossScale"])
@pytest.mark.parametrize("scale", [2, 3, 4])
def test_scale_and_unscale(mod, cls, scale):
    scale = float(scale) if cls == "DynamicLossScale" else scale  # as jmp's test
    loss_scale = getattr(mod, cls)(scale)
    tree, scaled = {"a": jnp.array(1.0)}, {"a": jnp.array(1.0 * scale)}
    chex.assert_trees_all_close(loss_scale.scale(tree), scaled)
    chex.assert_trees_all_close(loss_scale.unscale(scaled), tree)


def test_dynamic_loss_scale_no_warnings(mod):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mod.DynamicLossScale(2.0**15)


def test_dynamic_loss_scale_tree(mod):
    scale, counter = jnp.ones([]), jnp.zeros([], jnp.int32)
    loss_scale = mod.DynamicLossScale(scale, counter, 2000, 2)
    leaves = jax.tree_util.tree_leaves(loss_scale)
    chex.assert_trees_all_equal(leaves[:2], [scale, counter], strict=True)
    same = jax.tree_util.tree_map(lambda x: x, loss_scale)
    assert (same.period, same.factor) == (2000, 2)
    chex.assert_trees_all_equal(jax.tree_util.tree_leaves(same), leaves, strict=True)


@pytest.mark.parametrize(("period", "factor"), [(20, 2), (30, 3)])
def test_dynamic_loss_scale_adjust_increases_on_finite(mod, period, factor):
    loss_scale = mod.DynamicLossScale(jnp.float32(10), jnp.int32(0), period, factor)
    for i in range(1, period):
        loss_scale = loss_scale.adjust(jnp.bool_(True))
        assert (float(loss_scale.loss_scale), int(loss_scale.counter)) == (10, i)
    loss_scale = loss_scale.adjust(jnp.bool_(True))  # the period-th finite step: growth, wrap
    assert (float(loss_scale.loss_scale), int(loss_scale.counter)) == (10 * factor, 0)
    assert (loss_scale.period, loss_scale.factor) == (period, factor)


@pytest.mark.parametrize(
    ("period", "factor", "min_loss_scale"),
    [(20, 2, None), (30, 3, None), (20, 2, 0.3125), (30, 3, 0.37), (5.0, 2.0, 0.0)],
)
def test_dynamic_loss_scale_adjust_reduces_on_non_finite(mod, period, factor, min_loss_scale):
    # Twenty non-finite steps reach the floor (default 1) from 10 with either factor.
    init = np.float32(10)
    floor = {} if min_loss_scale is None else {"min_loss_scale": jnp.asarray(min_loss_scale)}
    loss_scale = mod.DynamicLossScale(jnp.asarray(init), jnp.int32(0), period, factor, **floor)
    low = 1.0 if min_loss_scale is None else min_loss_scale
    scales = []
    for _ in range(20):
        loss_scale = loss_scale.adjust(jnp.bool_(False))
        assert int(loss_scale.counter) == 0
        scales.append(loss_scale.loss_scale)
    expected = [max(low, init / factor ** (i + 1)) for i in range(20)]
    np.testing.assert_allclose(np.stack(scales), expected, rtol=1e-5)
    assert (loss_scale.period, loss_scale.factor) == (period, factor)


def test_dynamic_loss_scale_accepts_an_integer_like_period(mod):
    # A period read from a NumPy config (np.int64) or a float hyperparameter (5.0).
    for period in (np.int64(3), np.int32(3), 3.0, jnp.int32(3)):
        loss_scale = mod.DynamicLossScale(jnp.float32(2.0**10), period=period)
        for _ in range(3):
            loss_scale = loss_scale.adjust(jnp.bool_(True))
        assert float(loss_scale.loss_scale) == 2.0**11, period
    ours = hj_jmp.DynamicLossScale(2.0**15, period=np.int64(2000))
    assert type(ours.period) is int  # canonical static metadata: one tree definition
    assert jax.tree_util.tree_structure(ours) == jax.tree_util.tree_structure(
        hj_jmp.DynamicLossScale(2.0**15, period=2000)
    )


@pytest.mark.parametrize("non_finite", [jnp.inf, jnp.nan])
def test_all_finite(mod, non_finite):
    bad, one = jnp.array(non_finite), jnp.ones([])
    assert bool(mod.all_finite(None)) and bool(mod.all_finite({}))
    assert not bool(mod.all_finite({"a": bad}))
    assert not bool(mod.all_finite({"a": one, "b": bad}))
    assert not bool(mod.all_finite({"a": bad, "b": one}))
    assert bool(mod.all_finite({"a": one, "b": one}))


def test_select_tree(mod):
    a = {"a": jnp.ones([]), "b": jnp.zeros([])}
    b = {"a": jnp.zeros([]), "b": jnp.ones([])}
    assert mod.select_tree(jnp.bool_(True), None, None) is None
    assert mod.select_tree(jnp.bool_(False), None, None) is None
    chex.assert_trees_all_equal(mod.select_tree(jnp.bool_(True), a, b), a, strict=True)
    chex.assert_trees_all_equal(mod.select_tree(jnp.bool_(False), a, b), b, strict=True)


def test_select_tree_rejects_non_scalar(mod):
    with pytest.raises(AssertionError, match="expected boolean scalar"):
        mod.select_tree(jnp.ones([1]), None, None)
    with pytest.raises(AssertionError, match="Expected boolean scalar"):
        mod.DynamicLossScale(2.0**15).adjust(jnp.ones([2], bool))


def test_a_bad_predicate_is_also_a_type_error():
    # The package's own contract (a wrong argument is a TypeError) and jmp's both hold.
    with pytest.raises(TypeError, match="expected boolean scalar: pred is float32\\[1\\]"):
        hj_jmp.select_tree(jnp.ones([1]), None, None)
    with pytest.raises(TypeError, match="grads_finite is int32\\[\\]; pass a scalar bool"):
        hj_jmp.DynamicLossScale(2.0**15).adjust(jnp.int32(1))


@needs_jmp
def test_dynamic_trajectory_equals_jmps():
    finite = [True, True, False, True, True, True, False, False, True, True, True, True]
    ours = hj_jmp.DynamicLossScale(2.0**4, period=np.int64(3), min_loss_scale=8.0)
    theirs = dm_jmp.DynamicLossScale(
        jnp.float32(2.0**4), period=np.int64(3), min_loss_scale=jnp.float32(8.0)
    )
    for ok in finite:
        ours = ours.adjust(jnp.bool_(ok))
        with jax.numpy_dtype_promotion("standard"):
            theirs = theirs.adjust(jnp.bool_(ok))
        chex.assert_trees_all_equal(
            (ours.loss_scale, ours.counter), (theirs.loss_scale, theirs.counter), strict=True
        )


# ----------------------------------------------------------------------------------------------
# Deliberate deviations (hybrid_jax.jmp's docstring), each with jmp's behaviour pinned


def test_every_loss_scale_field_is_a_leaf():
    assert len(jax.tree_util.tree_leaves(hj_jmp.StaticLossScale(0))) == 1
    dynamic = hj_jmp.DynamicLossScale(2.0**15, min_loss_scale=4.0)
    back = jax.tree_util.tree_map(lambda x: x, dynamic)
    assert float(back.min_loss_scale) == 4.0  # jmp's resets to 1 (jmp PR #44)
    if dm_jmp is not None:
        assert jax.tree_util.tree_leaves(dm_jmp.StaticLossScale(0)) == []


def test_an_integer_scale_becomes_fp32():
    loss_scale = hj_jmp.DynamicLossScale(jnp.asarray(1, jnp.int32))
    assert loss_scale.loss_scale.dtype == jnp.float32
    if dm_jmp is not None:
        with pytest.warns(UserWarning, match="Expected floating type for loss_scale"):
            dm_jmp.DynamicLossScale(jnp.asarray(1, jnp.int32))


@pytest.mark.parametrize("cls", ["StaticLossScale", "DynamicLossScale"])
def test_scale_and_unscale_of_f16_give_fp32(cls):
    ours = getattr(hj_jmp, cls)(2**15 if cls == "StaticLossScale" else 2.0**15)
    loss, grads = jnp.float16(4.0), {"w": jnp.full([2], 2.0**-10, jnp.float16)}
    assert ours.scale(loss).dtype == jnp.float32 and float(ours.scale(loss)) == 2.0**17
    assert ours.unscale(grads)["w"].dtype == jnp.float32
    if dm_jmp is None:
        return
    with jax.numpy_dtype_promotion("standard"):
        # With an fp32 array scale (jmp's documented use) jmp agrees, values and dtypes.
        theirs = getattr(dm_jmp, cls)(jnp.float32(2.0**15))
        chex.assert_trees_all_equal(theirs.unscale(grads), ours.unscale(grads), strict=True)
        chex.assert_trees_all_equal(theirs.scale(loss), ours.scale(loss), strict=True)
        # With a Python number jmp stays in f16, where the scaled loss overflows.
        assert jnp.isinf(getattr(dm_jmp, cls)(ours.loss_scale.item()).scale(loss))


def test_policy_fields_are_numpy_dtypes():
    policy = hj_jmp.Policy(jnp.float32, jnp.float16, jnp.float16)
    assert policy.compute_dtype == np.dtype(np.float16) == jnp.float16
    assert jnp.ones([], policy.compute_dtype).dtype == jnp.float16


def test_get_policy_takes_presets_and_refuses_a_repeated_key():
    assert hj_jmp.get_policy("bf16-mixed") == hj_jmp.get_policy("p=f32,c=bf16,o=f32")
    with pytest.raises(ValueError, match="a second time"):
        hj_jmp.get_policy("p=f32,p=bf16")


# ----------------------------------------------------------------------------------------------
# jmp's README examples


def test_readme_policy(mod):
    policy = mod.Policy(compute_dtype=HALF, param_dtype=FULL, output_dtype=HALF)

    def layer(params, x):
        params, x = policy.cast_to_compute((params, x))
        w, b = params
        y = x @ w + b
        return policy.cast_to_output(y)

    params = (jnp.ones([3, 2], policy.param_dtype), jnp.zeros([2], policy.param_dtype))
    y = layer(params, jnp.ones([4, 3]))
    assert y.dtype == HALF
    assert policy.with_output_dtype(FULL).output_dtype == FULL

    policy = mod.get_policy("params=float32,compute=float16,output=float32")
    assert (policy.param_dtype, policy.compute_dtype, policy.output_dtype) == (FULL, HALF, FULL)
    assert mod.get_policy("float16").compute_dtype == jnp.float16
    assert mod.get_policy("half").compute_dtype == mod.half_dtype()


def _sgd(params, grads):
    return jax.tree_util.tree_map(lambda p, g: p - 0.1 * g, params, grads)


def _readme_train_step(mod, params, loss_scale, x):
    def my_loss_fn(params, loss_scale):
        loss = jnp.mean((x * params["w"]) ** 2)
        return loss_scale.scale(loss)

    grads = jax.grad(my_loss_fn)(params, loss_scale)
    grads = loss_scale.unscale(grads)
    if isinstance(loss_scale, mod.DynamicLossScale):
        grads_finite = mod.all_finite(grads)
        loss_scale = loss_scale.adjust(grads_finite)
        params = mod.select_tree(grads_finite, _sgd(params, grads), params)
    else:
        params = _sgd(params, grads)
    return params, loss_scale


@pytest.mark.parametrize("kind", ["static", "dynamic", "noop"])
def test_readme_loss_scaling(mod, kind):
    make = {
        "static": lambda: mod.StaticLossScale(2**15),
        "dynamic": lambda: mod.DynamicLossScale(mod.half_dtype()(2**15)),
        "noop": mod.NoOpLossScale,
    }
    params, x = {"w": jnp.full([3], 0.5)}, jnp.array([1.0, 2.0, 3.0])
    loss_scale = make[kind]()
    if kind == "dynamic" and mod is dm_jmp:
        # jmp's own README example fails in jmp: `adjust` puts its f16 scale and its fp32 floor
        # in one lax.select. Ours stores the scale in fp32 (a documented deviation), and runs.
        with pytest.raises(TypeError, match="same dtypes"):
            _readme_train_step(mod, params, loss_scale, x)
        return
    for _ in range(2):
        params, loss_scale = _readme_train_step(mod, params, loss_scale, x)
    # Two SGD steps of mean((x * w)^2): w <- w - 0.1 * 2 * x^2 * w / 3.
    expected = 0.5 * (1 - 0.2 * np.array([1.0, 4.0, 9.0]) / 3) ** 2
    np.testing.assert_allclose(params["w"], expected, rtol=1e-3)
    assert isinstance(loss_scale, make[kind]().__class__)

    # A non-finite gradient skips the update under the dynamic scale, which backs off.
    if kind == "dynamic":
        nan_x = jnp.array([jnp.inf, 1, 1])
        before = float(loss_scale.loss_scale)
        same, loss_scale = _readme_train_step(mod, params, loss_scale, nan_x)
        chex.assert_trees_all_equal(same, params)
        assert float(loss_scale.loss_scale) == before / 2


def test_readme_loss_scales_are_pytrees_under_jit(mod):
    step = jax.jit(lambda params, loss_scale, x: _readme_train_step(mod, params, loss_scale, x))
    params, x = {"w": jnp.full([3], 0.5)}, jnp.array([1.0, 2.0, 3.0])
    loss_scale = mod.DynamicLossScale(jnp.float32(2**15), period=2)
    for _ in range(2):
        params, loss_scale = step(params, loss_scale, x)
    assert float(loss_scale.loss_scale) == 2.0**16 and int(loss_scale.counter) == 0


def test_readme_no_op(mod):
    loss_scale = mod.NoOpLossScale()
    loss, grads = jnp.ones([]), {"w": jnp.ones(2)}
    assert loss is loss_scale.scale(loss)
    assert grads is loss_scale.unscale(grads)
    assert loss_scale is loss_scale.adjust(mod.all_finite(grads))
    assert loss_scale.loss_scale == 1
