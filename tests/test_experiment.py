"""The main job end to end at tiny size: `hybrid-jax train`, its outputs, resume, bad input."""

import dataclasses
import json
import shutil
import signal
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import pytest

from hybrid_jax.app import cli
from hybrid_jax.app.config import DEFAULT_LR, RunConfig, load_precision
from hybrid_jax.app.loop import train
from hybrid_jax.app.run import build
from hybrid_jax.precision import Policy, PrecisionRules
from hybrid_jax.train import Checkpointer

_TINY = [
    "--steps",
    "12",
    "--n-layer",
    "1",
    "--n-head",
    "2",
    "--n-embd",
    "16",
    "--block-size",
    "16",
    "--batch-size",
    "4",
    "--eval-interval",
    "6",
    "--eval-batches",
    "1",
    "--no-progress",
]


def _config(**overrides):
    base = dict(
        steps=12,
        n_layer=1,
        n_head=2,
        n_embd=16,
        block_size=16,
        batch_size=4,
        eval_interval=6,
        eval_batches=1,
        eval_batch_size=8,
        sample_chars=20,
    )
    return RunConfig(**{**base, **overrides})


_QUIET = dict(progress=False, log=lambda s: None)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The tiny run through the command line, 12 steps without a stop (compiled once, shared)."""
    out = tmp_path_factory.mktemp("straight")
    assert cli.main(["train", *_TINY, "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def half(tmp_path_factory):
    """The same run stopped after 6 steps."""
    out = tmp_path_factory.mktemp("half")
    train(_config(steps=6), out, **_QUIET)
    return out


def test_cli_train_runs_to_the_end_and_writes_its_outputs(straight, capsys, tmp_path):
    summary = json.loads((straight / "summary.json").read_text())
    for key in ("final_val_loss", "wall_time_s", "steps", "tokens_per_s", "settings"):
        assert key in summary
    # --precision auto (the default) resolved to fp32 on a CPU, and the summary says why.
    assert summary["steps"] == 12 and summary["settings"]["precision"] == "fp32"
    assert summary["precision_reason"].startswith("auto on cpu")
    records = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    evaluations = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evaluations] == [6, 12]
    # Every evaluation records the seconds since the run began (build and compile included).
    assert 0 < evaluations[0]["elapsed_s"] < evaluations[1]["elapsed_s"] <= summary["wall_time_s"]
    assert summary["evaluations"] == evaluations
    assert len([r for r in records if "loss" in r]) == 12
    assert [r for r in records if "val_loss" in r][-1]["val_loss"] == pytest.approx(
        summary["final_val_loss"]
    )
    with Checkpointer(straight / "checkpoints") as ckpt:
        assert ckpt.latest_step() == 12
    # Resuming a finished run trains nothing; the last line printed is the final val loss.
    assert cli.main(["train", *_TINY, "--out", str(straight), "--resume"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == f"final val loss {summary['final_val_loss']:.4f}"


def test_resumed_run_gives_the_same_parameters_as_an_uninterrupted_one(straight, half, tmp_path):
    parts = tmp_path / "parts"
    shutil.copytree(half, parts)
    summary = train(_config(), parts, resume=True, **_QUIET)
    assert summary["steps"] == 12
    # The evaluations before the stop are carried over, their clock continued.
    elapsed = [e["elapsed_s"] for e in summary["evaluations"]]
    assert [e["step"] for e in summary["evaluations"]] == [6, 12] and elapsed == sorted(elapsed)
    like = build(_config()).state
    with Checkpointer(straight / "checkpoints") as a, Checkpointer(parts / "checkpoints") as b:
        assert a.latest_step() == b.latest_step() == 12
        state_a, _ = a.restore(like)
        state_b, _ = b.restore(like)
    chex.assert_trees_all_equal(state_a, state_b)  # bit-identical on one backend


def test_resume_refuses_a_checkpoint_of_other_settings(half, tmp_path):
    with pytest.raises(ValueError, match=r"other settings \(lr=0.003, min_lr=0.0003"):
        train(_config(lr=1e-2), half, resume=True, **_QUIET)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(_config(), tmp_path / "new", resume=True, **_QUIET)


def test_low_precision_state_resumes_bit_identically(tmp_path):
    # Delayed fp8 histories, 8-bit moments with their rounding count, stochastic rounding:
    # everything the lean and fp8 recipes add to the state must survive a checkpoint.
    # About 10 s: three trainings and a build of a recipe whose step no other test compiles
    # (delayed fp8 with 8-bit moments); each train() samples and compiles its own programs.
    rules = json.dumps(
        {
            "rules": [["mlp/", "fp8-mixed"]],
            "default": "p=bf16,c=bf16,o=bf16,mu=int8,nu=int8,update=sr",
        }
    )
    # 32 channels: the 32x128 MLP kernels just reach the 4096 values that get 8-bit moments.
    config = _config(precision=rules, optimizer="adamw", fp8_scaling="delayed", n_embd=32)
    straight_run = train(dataclasses.replace(config, steps=4), tmp_path / "a", **_QUIET)
    train(dataclasses.replace(config, steps=2, eval_interval=2), tmp_path / "b", **_QUIET)
    resumed = train(
        dataclasses.replace(config, steps=4, eval_interval=2), tmp_path / "b", resume=True, **_QUIET
    )
    assert resumed["final_val_loss"] == straight_run["final_val_loss"]
    like = build(config).state
    assert jax.tree_util.tree_leaves(like.fp8_meta)  # the histories are in the state
    with (
        Checkpointer(tmp_path / "a" / "checkpoints") as a,
        Checkpointer(tmp_path / "b" / "checkpoints") as b,
    ):
        chex.assert_trees_all_equal(a.restore(like)[0], b.restore(like)[0])


def test_a_target_loss_stops_the_run_and_records_when(tmp_path):
    # Any loss reaches 100: the run stops at its first evaluation, checkpointed.
    summary = train(_config(target_loss=100.0), tmp_path, **_QUIET)
    assert summary["steps"] == summary["step_at_target"] == 6
    assert summary["target_loss"] == 100.0
    assert summary["time_to_target_s"] == summary["evaluations"][0]["elapsed_s"] > 0
    with Checkpointer(tmp_path / "checkpoints") as ckpt:
        assert ckpt.latest_step() == 6
    with pytest.raises(ValueError, match="target_loss must be a loss > 0"):
        _config(target_loss=0.0)


@pytest.mark.parametrize("backend", ["gpu", "tpu", "cpu"])
def test_auto_precision_is_bf16_mixed_on_accelerators_and_fp32_on_cpu(monkeypatch, backend):
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    expected = "fp32" if backend == "cpu" else "bf16-mixed"
    config, reason = RunConfig().resolved()
    assert config.precision == expected and reason.startswith(f"auto on {backend}")
    assert load_precision("auto") == Policy.parse(expected)
    # An explicit precision is kept as it is.
    config, reason = RunConfig(precision="bf16-mixed").resolved()
    assert (config.precision, reason) == ("bf16-mixed", "as given")


def test_learning_rates_default_per_optimizer():
    # nanoGPT's 1e-3 for its AdamW recipe (the twin of nanoGPT's script); Muon + Adam's own.
    twin, _ = RunConfig(optimizer="adamw").resolved()
    assert (twin.lr, twin.min_lr) == (1e-3, 1e-4)
    default, _ = RunConfig().resolved()
    assert (default.lr, default.min_lr) == (DEFAULT_LR["muon_adamw"], DEFAULT_LR["muon_adamw"] / 10)
    assert RunConfig(lr=2e-3, min_lr=0.0).resolved()[0].min_lr == 0.0  # given: kept


def test_inline_json_rules_and_loss_scale_setting():
    loaded = load_precision('{"rules": [["embed", "fp32"]], "default": "bf16-mixed"}')
    assert isinstance(loaded, PrecisionRules)
    with pytest.raises(ValueError, match="inline precision rules"):
        load_precision('{"rules": 3}')
    with pytest.raises(ValueError, match="unknown loss_scale"):
        _config(loss_scale="sometimes")
    with pytest.raises(ValueError, match="unknown fp8_scaling"):
        _config(fp8_scaling="late")


def test_bad_data_and_flags_are_clear_errors(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert cli.main(["train", *_TINY, "--data", str(empty), "--out", str(tmp_path)]) == 2
    assert "empty.txt" in capsys.readouterr().err
    assert cli.main(["train", *_TINY, "--precision", "bf17", "--out", str(tmp_path)]) == 2
    assert "cannot parse policy 'bf17'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["train", "--optimizer", "sgd"])


def test_precision_rules_file(tmp_path):
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps({"rules": [["embed|ln_", "fp32"]], "default": "bf16-mixed"}))
    loaded = load_precision(str(rules))
    assert isinstance(loaded, PrecisionRules) and loaded.default == Policy.parse("bf16-mixed")
    rules.write_text("[not json")
    with pytest.raises(ValueError, match="precision rules file"):
        load_precision(str(rules))


def test_other_text_and_fp16_with_loss_scaling(tmp_path):
    text = tmp_path / "abc.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40, encoding="utf-8")
    config = _config(
        data=str(text), precision="fp16-mixed", optimizer="adamw", steps=4, eval_interval=4
    )
    summary = train(config, tmp_path / "out", **_QUIET)
    assert np.isfinite(summary["final_val_loss"])


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    args = [a if a != "12" else "100000" for a in _TINY]  # a run that would not end by itself
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from hybrid_jax.app.cli import run; run()",
            "train",
            *args,
            "--out",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (metrics.exists() and metrics.stat().st_size):
        time.sleep(0.2)  # wait until it is training
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "checkpoint saved" in out and "--resume" in out
    with Checkpointer(tmp_path / "checkpoints") as ckpt:
        step = ckpt.latest_step()
    assert step is not None and step >= 1


def test_the_progress_bar_keeps_when_the_target_was_reached():
    from hybrid_jax.app.progress import ProgressBar

    lines = []
    with ProgressBar(True, 0, 10, lines.append, target=2.0) as bar:
        bar.evaluated(5, 2.5, 1.0)
        bar.evaluated(10, 1.9, 2.0)
        bar.evaluated(15, 1.8, 3.0)  # later evaluations do not move the mark
        bar.update(15, 1.7, 100.0)
        info = bar._bar.tasks[0].fields["info"]
    assert info.endswith("val 1.8000  target 2.0 at step 10, 2 s")
    # Without a bar, the evaluations are logged with their elapsed seconds.
    with ProgressBar(False, 0, 10, lines.append, target=2.0) as bar:
        bar.evaluated(5, 2.5, 1.25)
    assert lines == ["step 5: val loss 2.5000 (1.2 s)"]
