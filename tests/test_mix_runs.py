"""hybrid-jax mix (hybrid_jax.app.mix_runs): soups and merges of saved runs."""

import json

import numpy as np
import pytest

from hybrid_jax.app import cli
from hybrid_jax.app.config import RunConfig
from hybrid_jax.app.loop import train
from hybrid_jax.app.run import build
from hybrid_jax.train import Checkpointer

TINY = dict(
    n_layer=1,
    n_head=2,
    n_embd=16,
    block_size=16,
    batch_size=4,
    steps=6,
    eval_interval=6,
    eval_batches=1,
    eval_batch_size=8,
    sample_chars=10,
    optimizer="adamw",
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    quiet = dict(progress=False, log=lambda s: None)
    train(RunConfig(seed=1, **TINY), root / "a", **quiet)
    train(RunConfig(seed=1, lr=3e-3, precision="bf16-pure-sr", **TINY), root / "b", **quiet)
    return root


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


def test_uniform_soup_and_resume_from_it(runs, tmp_path):
    out = tmp_path / "uniform"
    assert cli.main(["mix", str(runs / "a"), str(runs / "b"), "--out", str(out)]) == 0
    mixed = _params(out)
    a, b = _params(runs / "a"), _params(runs / "b")
    kernel = lambda p: np.asarray(p["blocks"][0]["mlp"]["fc"]["kernel"][...], np.float32)
    # The mean of an fp32 and a bf16 run, saved in the first run's fp32.
    np.testing.assert_allclose(kernel(mixed), (kernel(a) + kernel(b)) / 2, rtol=1e-6)
    # The result is a checkpoint of the first run's settings that training resumes from.
    summary = train(RunConfig(seed=1, **TINY), out, resume=True, progress=False, log=lambda s: None)
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


def test_bad_input_is_a_clear_error(runs, tmp_path, capsys):
    assert cli.main(["mix", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert cli.main(["mix", str(runs / "a"), "--mode", "interpolate"]) == 2
    assert "exactly two runs" in capsys.readouterr().err
    assert cli.main(["mix", str(runs / "a"), str(runs / "b"), "--mode", "merge"]) == 2
    assert "needs --rules" in capsys.readouterr().err
