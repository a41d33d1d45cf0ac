"""Hybrid optimizers: by_path, describe, recipes, optimizer-state precision."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import hybrid_jax as hj
from hybrid_jax.optim import (
    EMBEDDING,
    GAIN_OR_BIAS,
    HEAD,
    HIDDEN_MATRIX,
    by_path,
    describe,
    frozen,
    group_labels,
    layerwise_lr_decay,
    muon_adamw,
    muon_adamw_rules,
    with_state_dtype,
)

# Optax's Adam mixes an int32 step count with floats in its bias correction, which strict dtype
# promotion refuses; these tests step Optax optimizers, so they run under standard promotion.
pytestmark = pytest.mark.standard_promotion


def _mlp(seed=0):
    rng = np.random.default_rng(seed)
    w = lambda *s: jnp.asarray(rng.normal(0, 0.1, s), jnp.float32)
    return {
        "embed": {"embedding": w(5, 4)},
        "hidden": {"kernel": w(4, 8), "bias": w(8)},
        "out": {"kernel": w(8, 3), "bias": w(3)},
    }


def _grads(params, n, seed=1):
    rng = np.random.default_rng(seed)
    return [
        jax.tree_util.tree_map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
        for _ in range(n)
    ]


def _run(tx, params, grads):
    @jax.jit
    def step(params, state, g):
        updates, state = tx.update(g, state, params)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    for g in grads:
        params, state = step(params, state, g)
    return params, state


_LR = 0.05
_THREE_GROUPS = [
    (r"^hidden/", optax.sgd(_LR)),
    (r"^out/", optax.adam(1e-2)),
    (r"^embed/", optax.set_to_zero()),
]


def test_three_groups_sgd_adam_frozen_match_their_references():
    params, grads = _mlp(), _grads(_mlp(), 10)
    final, state = _run(by_path(_THREE_GROUPS), params, grads)

    # SGD: p - lr * g at every step, exactly in fp32. XLA:CPU contracts the multiply-add into an
    # FMA (one rounding of the exact p - lr*g); a backend that does not rounds twice. The
    # references are both exact evaluations: the exact product in f64 rounded once, and numpy's.
    fused = separate = {k: np.asarray(v) for k, v in params["hidden"].items()}
    lr = np.float32(_LR)
    for g in grads:
        gh = {k: np.asarray(v) for k, v in g["hidden"].items()}
        fused = {
            k: (v.astype(np.float64) - np.float64(lr) * gh[k]).astype(np.float32)
            for k, v in fused.items()
        }
        separate = {k: v - lr * gh[k] for k, v in separate.items()}
    for k, v in final["hidden"].items():
        v = np.asarray(v)
        assert np.array_equal(v, fused[k]) or np.array_equal(v, separate[k]), k

    # Adam on its group equals optax.adam run alone on those leaves: the same ops on the same
    # values, so bitwise equal on one backend (XLA fuses both programs alike on CPU).
    alone, _ = _run(optax.adam(1e-2), params["out"], [g["out"] for g in grads])
    chex.assert_trees_all_equal(final["out"], alone)

    # Frozen: bit-identical, and no optimizer state at all.
    chex.assert_trees_all_equal(final["embed"], params["embed"])
    frozen_state = state.inner_states["^embed/"]
    assert jax.tree_util.tree_leaves(frozen_state) == []
    table = describe(_THREE_GROUPS, params)
    assert (
        dict(zip(table.column("path"), table.column("state"), strict=True))["embed/embedding"]
        == "0 B"
    )


def test_muon_adamw_assigns_muon_to_exactly_the_hidden_matrices(gpt_tree):
    names = {f"{EMBEDDING}|{HEAD}|{GAIN_OR_BIAS}": "adam", HIDDEN_MATRIX: "muon"}
    labels = group_labels(muon_adamw_rules(), gpt_tree)
    got = {
        path: names[label]
        for path, label in zip(_paths(gpt_tree), jax.tree_util.tree_leaves(labels), strict=True)
    }
    expected = {
        "tok_embed/embedding": "adam",
        "pos_embed/embedding": "adam",
        "lm_head/kernel": "adam",
        "ln_f/scale": "adam",
        "ln_f/bias": "adam",
    }
    for i in range(2):
        for ln in ("ln_1", "ln_2"):
            expected[f"blocks/{i}/{ln}/scale"] = expected[f"blocks/{i}/{ln}/bias"] = "adam"
        for layer in ("attn/qkv", "attn/proj", "mlp/fc", "mlp/proj"):
            expected[f"blocks/{i}/{layer}/kernel"] = "muon"
            expected[f"blocks/{i}/{layer}/bias"] = "adam"
    assert got == expected
    # Muon's leaves are 2-D, but not every 2-D leaf is Muon's: embeddings and head are Adam's.
    assert all(gpt_tree_leaf.ndim == 2 for gpt_tree_leaf in _leaves_of(gpt_tree, got, "muon"))
    assert any(leaf.ndim == 2 for leaf in _leaves_of(gpt_tree, got, "adam"))


@pytest.mark.parametrize("tie", [True, False], ids=["tied_head", "untied_head"])
def test_muon_adamw_decays_only_the_hidden_matrices(gpt_tree, tie):
    # Ones-valued parameters and zero gradients: every update is weight decay alone.
    params = jax.tree_util.tree_map(jnp.ones_like, gpt_tree)
    if tie:
        del params["lm_head"]
    lr, weight_decay = 1e-3, 0.1
    tx = muon_adamw(lr, weight_decay=weight_decay)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    for path, update in hj.tree.leaves_with_paths(updates)[0]:
        if path.startswith("blocks/") and path.endswith("/kernel"):
            np.testing.assert_allclose(update, -lr * weight_decay, rtol=1e-6, err_msg=path)
        else:  # embeddings (the tied head among them), the untied head, gains and biases
            np.testing.assert_array_equal(update, 0.0, err_msg=path)


def _paths(tree):
    return [path for path, _ in hj.tree.leaves_with_paths(tree)[0]]


def _leaves_of(tree, assignment, group):
    return [leaf for path, leaf in hj.tree.leaves_with_paths(tree)[0] if assignment[path] == group]


def test_muon_adamw_trains_under_jit(gpt_tree):
    tx = muon_adamw(optax.warmup_cosine_decay_schedule(0.0, 1e-2, 2, 10, 1e-3))
    target = jax.tree_util.tree_map(jnp.zeros_like, gpt_tree)
    loss = lambda p: sum(
        jnp.sum((a - b) ** 2)
        for a, b in zip(
            jax.tree_util.tree_leaves(p), jax.tree_util.tree_leaves(target), strict=True
        )
    )

    @jax.jit
    def step(params, state):
        updates, state = tx.update(jax.grad(loss)(params), state, params)
        return optax.apply_updates(params, updates), state

    params, state = gpt_tree, tx.init(gpt_tree)
    before = float(loss(params))
    for _ in range(10):
        params, state = step(params, state)
    assert np.isfinite(float(loss(params))) and float(loss(params)) < before


def test_every_leaf_lands_in_exactly_one_group_or_the_error_names_it(gpt_tree):
    rules = [(r"attn/", optax.sgd(0.1)), (r"mlp/", optax.sgd(0.1))]
    with pytest.raises(ValueError) as err:
        by_path(rules).init(gpt_tree)
    assert "tok_embed/embedding" in str(err.value) and "lm_head/kernel" in str(err.value)
    # With a default, every leaf has a group, and the labels cover the tree exactly once.
    labels = jax.tree_util.tree_leaves(group_labels(rules, gpt_tree, default=optax.sgd(0.1)))
    assert len(labels) == len(jax.tree_util.tree_leaves(gpt_tree))
    assert set(labels) == {"attn/", "mlp/", "(default)"}


def test_unknown_group_names_and_bad_values_are_clear_errors():
    with pytest.raises(ValueError, match=r"rule 0 \('attn'\) names group 'muon', which is not"):
        by_path([(r"attn", "muon")], transforms={"adamw": optax.adamw(1e-3)})
    with pytest.raises(TypeError, match=r"rule 0 \('attn'\) must give an optax.Gradient"):
        by_path([(r"attn", 0.1)])
    with pytest.raises(TypeError, match=r"transforms\['sgd'\] must be an optax"):
        by_path([(r"attn", "sgd")], transforms={"sgd": "sgd"})
    with pytest.raises(ValueError, match=r"group label 'attn' is used twice"):
        by_path([(r"attn", optax.sgd(1.0)), (r"attn", optax.sgd(2.0))])


def test_catch_all_placed_first_is_reported(gpt_tree):
    rules = [(r".", optax.adamw(1e-3)), (HIDDEN_MATRIX, optax.sgd(0.1))]
    with pytest.warns(hj.UnusedRuleWarning, match="only leaves that earlier rules take"):
        by_path(rules).init(gpt_tree)
    with pytest.raises(ValueError, match="decides nothing"):
        by_path(rules, strict=True).init(gpt_tree)
    with pytest.warns(hj.UnusedRuleWarning, match=r"transforms \['unused'\] are named by no rule"):
        by_path([(r".", "sgd")], transforms={"sgd": optax.sgd(0.1), "unused": optax.sgd(0.2)})


def test_named_groups_share_one_state():
    rules = [(r"embed", "adamw"), (r"^out/", "adamw"), (r".", "sgd")]
    transforms = {"adamw": optax.adamw(1e-3), "sgd": optax.sgd(0.1)}
    state = by_path(rules, transforms=transforms).init(_mlp())
    assert set(state.inner_states) == {"adamw", "sgd"}
    mu = state.inner_states["adamw"].inner_state[0].mu
    assert isinstance(mu["hidden"]["kernel"], optax.MaskedNode)
    assert mu["out"]["kernel"].shape == (8, 3) and mu["embed"]["embedding"].shape == (5, 4)


def test_second_jitted_update_does_not_recompile():
    tx = by_path(_THREE_GROUPS)
    params = _mlp()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def update(grads, state, params):
        return tx.update(grads, state, params)

    state = tx.init(params)
    for g in _grads(params, 3):
        _, state = update(g, state, params)


def test_composes_with_optax_wrappers():
    params, grads = _mlp(), _grads(_mlp(), 4)
    # MultiSteps around: parameters move only every second step.
    tx = optax.MultiSteps(by_path(_THREE_GROUPS), every_k_schedule=2)
    after_one, _ = _run(tx, params, grads[:1])
    chex.assert_trees_all_equal(after_one, params)
    after_two, _ = _run(tx, params, grads[:2])
    assert not np.allclose(after_two["hidden"]["kernel"], params["hidden"]["kernel"])
    # inject_hyperparams around (a learning rate read back from the state) and inside a group.
    outer = optax.inject_hyperparams(
        lambda learning_rate: by_path([(r".", optax.sgd(learning_rate))])
    )(learning_rate=0.5)
    _, state = _run(outer, params, grads[:1])
    assert float(state.hyperparams["learning_rate"]) == 0.5
    inner = by_path(
        [(r"^out/", optax.inject_hyperparams(optax.adam)(learning_rate=1e-2))],
        default=optax.sgd(_LR),
    )
    alone = optax.inject_hyperparams(optax.adam)(learning_rate=1e-2)
    chex.assert_trees_all_equal(
        _run(inner, params, grads)[0]["out"],
        _run(alone, params["out"], [g["out"] for g in grads])[0],
    )
    # apply_if_finite around and inside: a NaN gradient leaves the parameters as they were.
    nan_grads = [jax.tree_util.tree_map(lambda g: g.at[0].set(jnp.nan), grads[0])]
    for tx in (
        optax.apply_if_finite(by_path(_THREE_GROUPS), 3),
        by_path([(r".", optax.apply_if_finite(optax.adam(1e-2), 3))]),
    ):
        chex.assert_trees_all_equal(_run(tx, params, nan_grads)[0], params)


def test_nnx_state_and_linen_trees():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Embed(5, 4, rngs=rngs)
            self.fc = nnx.Linear(4, 3, rngs=rngs)

    state = nnx.state(Net(nnx.Rngs(0)), nnx.Param)
    rules = [(r"^embed/", optax.set_to_zero()), (r"^fc/", optax.adam(1e-2))]
    grads = jax.tree_util.tree_map(jnp.ones_like, state)
    new_state, _ = _run(by_path(rules, strict=True), state, [grads])
    assert type(new_state) is type(state)
    np.testing.assert_array_equal(
        new_state["embed"]["embedding"][...], state["embed"]["embedding"][...]
    )
    assert not np.allclose(new_state["fc"]["kernel"][...], state["fc"]["kernel"][...])
    # A Linen variables dict keeps its "params" key in the path.
    linen = {"params": _mlp()}
    table = describe([(r"^params/embed/", optax.set_to_zero())], linen, default=optax.sgd(0.1))
    assert "params/hidden/kernel" in table.column("path")


def test_describe_counts_state_bytes_per_leaf_group_and_total():
    params = _mlp()
    rules = [
        (r"^embed/", optax.set_to_zero()),
        (r"^hidden/", optax.adam(1e-3)),
        (r"^out/", with_state_dtype(optax.adam(1e-3), "bf16")),
    ]
    table = describe(rules, params)
    state_of = dict(zip(table.column("path"), table.column("state"), strict=True))
    assert state_of["hidden/kernel"] == f"{2 * 4 * 32} B"  # mu and nu in fp32
    assert state_of["out/kernel"] == f"{2 * 2 * 24} B"  # mu and nu in bf16: half
    assert state_of["embed/embedding"] == "0 B"
    footer = {row[0]: row for row in table.footer}
    assert footer["^hidden/"][-1] == f"{2 * 4 * 40 + 4} B"  # + Adam's int32 step count
    assert footer["^embed/"][-1] == "0 B"
    real = sum(x.nbytes for x in jax.tree_util.tree_leaves(by_path(rules).init(params)))
    assert footer["total"][-1] == f"{real / 1024:.1f} KiB" if real >= 1024 else f"{real} B"
    assert "<tfoot>" in table._repr_html_() and "total" in str(table).splitlines()[-1]


def test_layerwise_lr_decay_scales_block_k_by_decay_to_the_n_minus_k(gpt_tree):
    decay, n, lr = 0.5, 2, 0.1
    tx = optax.chain(optax.sgd(lr), layerwise_lr_decay(decay, n))
    grads = jax.tree_util.tree_map(jnp.ones_like, gpt_tree)
    updates, _ = jax.jit(tx.update)(grads, tx.init(gpt_tree), gpt_tree)
    step = np.float32(-lr)
    assert float(updates["blocks"][0]["mlp"]["fc"]["kernel"][0, 0]) == step * np.float32(0.25)
    assert float(updates["blocks"][1]["attn"]["qkv"]["bias"][0]) == step * np.float32(0.5)
    assert float(updates["tok_embed"]["embedding"][0, 0]) == step * np.float32(0.125)
    assert float(updates["lm_head"]["kernel"][0, 0]) == step
    with pytest.raises(ValueError, match="needs a group named 'index'"):
        layerwise_lr_decay(0.5, 2, block_pattern=r"blocks/\d+/")
    with pytest.raises(ValueError, match=r"leaf 'blocks/1/.*' is in block 1, but n_blocks=1"):
        tx = optax.chain(optax.sgd(lr), layerwise_lr_decay(decay, 1))
        tx.update(grads, tx.init(gpt_tree), gpt_tree)
    with pytest.raises(ValueError, match=r"decay must be in \(0, 1\]"):
        layerwise_lr_decay(1.5, 2)


def test_frozen_rules_come_first_and_keep_no_state(gpt_tree):
    tx = by_path([*frozen([r"tok_embed/", r"pos_embed/"]), *muon_adamw_rules()])
    grads = jax.tree_util.tree_map(jnp.ones_like, gpt_tree)
    final, state = _run(tx, gpt_tree, [grads])
    chex.assert_trees_all_equal(final["tok_embed"], gpt_tree["tok_embed"])
    for path, _ in hj.tree.leaves_with_paths(state)[0]:
        assert not path.endswith(("tok_embed/embedding", "pos_embed/embedding")), path


def test_bf16_state_tracks_fp32_adam_and_keeps_its_dtypes():
    params, grads = _mlp(), _grads(_mlp(), 20)
    narrow, state = _run(with_state_dtype(optax.adam(1e-2), jnp.bfloat16), params, grads)
    wide, _ = _run(optax.adam(1e-2), params, grads)
    dtypes = {x.dtype for x in jax.tree_util.tree_leaves(state)}
    assert dtypes == {jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.int32)}
    # bf16 keeps 8 significant bits per moment; Adam's update is mu/sqrt(nu), so after 20 steps
    # of lr 1e-2 the parameters differ by a small fraction of the distance travelled (0.2).
    chex.assert_trees_all_close(narrow, wide, atol=2e-3)
