"""Numerics diagnostics of a run (hybrid_jax.app.diagnose) and ``train --diagnose``."""

import jax
import pytest

from hybrid_jax.app import cli
from hybrid_jax.app.config import RunConfig
from hybrid_jax.app.diagnose import diagnose
from hybrid_jax.app.run import build

SMALL = dict(n_layer=1, n_head=2, n_embd=32, block_size=64, batch_size=12, optimizer="adamw")


def _total(table, column):
    return table.footer[-1][table.columns.index(column)]


@pytest.fixture(scope="module")
def fp16_reports():
    reports = {}
    for loss_scale in ("none", "dynamic"):
        run = build(RunConfig(precision="fp16-mixed", loss_scale=loss_scale, **SMALL))
        reports[loss_scale] = diagnose(run, run.state, run.sample_train(run.data_key))
    return reports


def test_fp16_without_loss_scaling_flushes_gradients_that_scaling_keeps(fp16_reports):
    # The backward pass runs in fp16: without a loss scale, activation gradients below 2^-25
    # flush to zero; scaled by 2^15 they stay representable.
    unscaled = fp16_reports["none"].activation_gradients
    scaled = fp16_reports["dynamic"].activation_gradients
    assert fp16_reports["none"].loss_scale == 1.0 and fp16_reports["dynamic"].loss_scale == 2**15
    assert _total(unscaled, "zeros") > 1e-3
    assert _total(scaled, "zeros") < _total(unscaled, "zeros") / 10
    assert _total(scaled, "min_abs_nonzero") < 2**-24  # values fp16 alone cannot hold


def test_reports_cover_every_layer(fp16_reports):
    report = fp16_reports["dynamic"]
    paths = {row[0] for row in report.activations.rows}
    assert paths == {
        "blocks/0/attn/qkv",
        "blocks/0/attn/proj",
        "blocks/0/mlp/fc",
        "blocks/0/mlp/proj",
        "tok_embed",
    }
    assert len(report.params.rows) == len(report.gradients.rows) == len(report.stagnation.rows)
    assert "suggest" in report.params.columns
    text = str(report)
    for title in ("parameters", "activations entering each matmul", "update stagnation"):
        assert title in text


@pytest.mark.standard_promotion
def test_bf16_params_show_update_stagnation():
    run = build(RunConfig(precision="bf16-pure", lr=1e-4, warmup_steps=1, **SMALL))
    state = run.state
    for t in range(3):  # past the warm-up's zero learning rate
        state, _ = run.step(state, run.sample_train(jax.random.fold_in(run.data_key, t)))
    report = diagnose(run, state, run.sample_train(run.data_key)).stagnation
    stagnant = _total(report, "stagnant")
    assert 0.1 < stagnant <= 1.0  # lr 1e-4 steps are mostly below half a bf16 ulp


def test_train_diagnose_writes_the_report(tmp_path, capsys):
    args = ["train", "--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "8"]
    args += ["--steps", "2", "--eval-interval", "2", "--eval-batches", "1", "--no-progress"]
    assert cli.main([*args, "--diagnose", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "diagnostics.txt").read_text()
    assert "update stagnation" in text and "blocks/0/mlp/fc" in text
    assert "parameter gradients" in capsys.readouterr().out
