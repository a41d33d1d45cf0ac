"""hybrid-jax mix (hybrid_jax.app.mix_runs): soups and merges of saved runs."""

import dataclasses
import json

import numpy as np
import pytest

from hybrid_jax.app import cli
from hybrid_jax.app.config import RunConfig
from hybrid_jax.app.loop import train
from hybrid_jax.app.run import build
from hybrid_jax.precision import cast_to_param
from hybrid_jax.train import Checkpointer, evaluate

A = RunConfig(
    n_layer=1,
    n_head=2,
    n_embd=16,
    block_size=16,
    batch_size=4,
    steps=2,
    eval_interval=2,
    eval_batches=1,
    eval_batch_size=8,
    sample_chars=10,
    optimizer="adamw",
    seed=1,
)
# Another seed, precision and eval settings: other parameters and other validation batches.
B = dataclasses.replace(
    A, seed=2, lr=3e-3, precision="bf16-pure-sr", eval_batches=2, eval_batch_size=4
)


def _save(config, folder):
    """A run folder as ``hybrid-jax train`` leaves one, at its initial parameters: mixing reads
    only the checkpoint and its settings, and two seeds' parameters differ without training."""
    with Checkpointer(folder / "checkpoints") as ckpt:
        ckpt.save(build(config).state, meta={"settings": dataclasses.asdict(config)})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    _save(A, root / "a")
    _save(B, root / "b")
    _save(dataclasses.replace(A, n_embd=32), root / "wide")
    return root


@pytest.fixture(scope="module")
def uniform(runs, tmp_path_factory):
    """The uniform soup of a and b, mixed once for the tests that read it."""
    out = tmp_path_factory.mktemp("uniform")
    assert cli.main(["mix", str(runs / "a"), str(runs / "b"), "--out", str(out)]) == 0
    return out


def _params(folder):
    with Checkpointer(folder / "checkpoints") as ckpt:
        config = RunConfig(**ckpt.meta()["settings"])
        state, _ = ckpt.restore(build(config).state)
    return state.params


def test_greedy_soup_is_never_worse_than_its_best_run(runs, tmp_path):
    out = tmp_path / "greedy"
    assert (
        cli.main(["mix", str(runs / "a"), str(runs / "b"), "--mode", "greedy", "--out", str(out)])
        == 0
    )
    summary = json.loads((out / "mix.json").read_text())
    assert summary["result_val_loss"] <= min(summary["val_loss"].values())
    assert summary["kept"][0] in ("a", "b")


def test_every_run_is_evaluated_on_the_first_runs_validation_batches(runs, uniform):
    summary = json.loads((uniform / "mix.json").read_text())
    assert summary["val_set"] == {
        "run": str(runs / "a"),
        "data": None,
        "block_size": 16,
        "seed": 1,
        "eval_batches": 1,
        "eval_batch_size": 8,
    }
    first = build(A)
    own = build(B).val_set
    assert own[0].shape != first.val_set[0].shape  # b's own batches are not a's
    for name in ("a", "b"):
        params = cast_to_param(_params(runs / name), first.precision)
        loss = evaluate(first.eval_step, params, first.val_set, first.state.fp8_meta)["lm"]
        assert summary["val_loss"][name] == pytest.approx(loss, rel=1e-6), name


def test_uniform_soup_and_resume_from_it(runs, uniform):
    mixed = _params(uniform)
    a, b = _params(runs / "a"), _params(runs / "b")
    kernel = lambda p: np.asarray(p["blocks"][0]["mlp"]["fc"]["kernel"][...], np.float32)
    assert not np.array_equal(kernel(a), kernel(b))
    # The mean of an fp32 and a bf16 run, saved in the first run's fp32; atol: where the two
    # nearly cancel, a few float32 ulps of weights of scale 0.02.
    np.testing.assert_allclose(kernel(mixed), (kernel(a) + kernel(b)) / 2, rtol=1e-6, atol=1e-8)
    # The result is a checkpoint of the first run's settings that training resumes from.
    summary = train(A, uniform, resume=True, progress=False, log=lambda s: None)
    assert np.isfinite(summary["final_val_loss"])


def test_merge_takes_each_leaf_from_the_run_its_rule_names(runs, tmp_path):
    out = tmp_path / "merge"
    rules = json.dumps({"rules": [["mlp/", "b"]], "default": 0})
    args = ["mix", str(runs / "a"), str(runs / "b"), "--mode", "merge", "--rules", rules]
    assert cli.main([*args, "--out", str(out)]) == 0
    mixed, a, b = _params(out), _params(runs / "a"), _params(runs / "b")
    leaf = lambda p, path: np.asarray(p["blocks"][0][path[0]][path[1]]["kernel"][...], np.float32)
    np.testing.assert_array_equal(leaf(mixed, ("mlp", "fc")), leaf(b, ("mlp", "fc")))
    np.testing.assert_array_equal(leaf(mixed, ("attn", "qkv")), leaf(a, ("attn", "qkv")))


def test_help_says_which_validation_set_is_used(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["mix", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert exit_.value.code == 0 and "on the FIRST run's validation batches" in help_text


def test_bad_input_is_a_clear_error(runs, tmp_path, capsys):
    assert cli.main(["mix", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert cli.main(["mix", str(runs / "a"), "--mode", "interpolate"]) == 2
    assert "exactly two runs" in capsys.readouterr().err
    assert cli.main(["mix", str(runs / "a"), str(runs / "b"), "--mode", "merge"]) == 2
    assert "needs --rules" in capsys.readouterr().err
    assert cli.main(["mix", str(runs / "a"), str(runs / "wide"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"{runs / 'a'} and {runs / 'wide'}" in err and "n_embd 16 vs 32" in err
