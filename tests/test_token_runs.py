"""Training on nanoGPT token files: the GPT-2 presets, the prepared-folder path against the text
path, and the prefetched batches of the training loop."""

import dataclasses
import json
import pickle

import jax
import numpy as np
import pytest

from hybrid_jax.app import cli
from hybrid_jax.app.config import RunConfig
from hybrid_jax.app.loop import train
from hybrid_jax.app.run import build
from hybrid_jax.data import GPT2_VOCAB_SIZE, load_text

_QUIET = {"progress": False, "log": lambda line: None}
TINY = RunConfig(
    precision="fp32",
    optimizer="adamw",
    steps=10,
    batch_size=4,
    block_size=16,
    n_layer=1,
    n_head=2,
    n_embd=16,
    lr=1e-2,
    warmup_steps=2,
    eval_interval=10,
    eval_batches=2,
    eval_batch_size=4,
    sample_chars=20,
)


def prepare_char_folder(text: str, folder) -> None:
    """What nanoGPT's data/shakespeare_char/prepare.py writes for ``text``."""
    chars = sorted(set(text))
    stoi = {ch: i for i, ch in enumerate(chars)}
    itos = dict(enumerate(chars))
    n = len(text)
    train_ids = [stoi[c] for c in text[: int(n * 0.9)]]
    val_ids = [stoi[c] for c in text[int(n * 0.9) :]]
    folder.mkdir()
    np.array(train_ids, dtype=np.uint16).tofile(folder / "train.bin")
    np.array(val_ids, dtype=np.uint16).tofile(folder / "val.bin")
    with open(folder / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": itos, "stoi": stoi}, f)


@pytest.fixture(scope="module")
def random_tokens(tmp_path_factory):
    """A folder of random GPT-2 token ids and no meta; ids below 500, so that a few steps learn
    their frequencies."""
    folder = tmp_path_factory.mktemp("random_tokens")
    rng = np.random.default_rng(0)
    for split, n in (("train", 20_000), ("val", 2_000)):
        rng.integers(0, 500, n, dtype=np.uint16).tofile(folder / f"{split}.bin")
    return folder


def test_a_prepared_char_folder_trains_exactly_like_its_text(tmp_path):
    """The same seed gives the same batches from the memmap (host) as from the text (device):
    the runs end at the same validation loss (1e-4 relative; in fact bitwise) and samples."""
    text = load_text()[:30_000]
    (tmp_path / "text.txt").write_text(text, encoding="utf-8")
    prepare_char_folder(text, tmp_path / "folder")
    losses, samples = [], []
    for data in ("text.txt", "folder"):
        lines = []
        config = dataclasses.replace(TINY, data=str(tmp_path / data))
        summary = train(config, tmp_path / f"out_{data}", progress=False, log=lines.append)
        losses.append(summary["final_val_loss"])
        samples.append(lines[lines.index("---- sample ----") + 1])
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)
    assert samples[0] == samples[1]


def test_gpt2_preset_on_token_files_without_meta(random_tokens, tmp_path, capsys):
    """The GPT-2 preset takes GPT-2's padded vocabulary from a folder without meta, trains (the
    loss falls in 10 steps), and says why it prints no sample. The shape is shrunk to keep the
    test fast; the full 124M run is the README's command."""
    args = ["train", "--model", "gpt2-124m", "--data", str(random_tokens), "--precision", "fp32"]
    args += ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16"]
    args += ["--batch-size", "4", "--steps", "10", "--eval-interval", "10", "--eval-batches", "1"]
    args += ["--optimizer", "adamw", "--lr", "3e-2", "--warmup-steps", "1"]
    args += ["--out", str(tmp_path), "--no-progress"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "no sample:" in out
    summary = _summary(tmp_path)
    assert summary["settings"]["model"] == "gpt2-124m"
    with open(tmp_path / "metrics.jsonl") as f:
        first = json.loads(f.readline())
    assert first["step"] == 1 and first["loss"] == pytest.approx(np.log(GPT2_VOCAB_SIZE), abs=0.1)
    assert summary["final_val_loss"] < first["loss"] - 0.5  # 10.8 -> 10.1 measured


def test_prefetched_batches_are_the_steps_batches(random_tokens):
    run = build(dataclasses.replace(TINY, data=str(random_tokens)))
    assert run.state.params["tok_embed"]["embedding"].shape == (GPT2_VOCAB_SIZE, 16)
    with_prefetch = run.train_batches(3)
    for t in (3, 4, 5):
        want = run.sample_train(jax.random.fold_in(run.data_key, t))
        np.testing.assert_array_equal(next(with_prefetch)[0], want[0])
    with_prefetch.close()


def test_vocab_size_override_and_its_errors(random_tokens):
    config = dataclasses.replace(TINY, data=str(random_tokens), vocab_size=100)
    with pytest.raises(ValueError, match=r"vocab_size 100 is smaller than the data's vocabulary"):
        build(config)
    with pytest.raises(ValueError, match=r"unknown model 'gpt3'"):
        RunConfig(model="gpt3")


def _summary(out):
    with open(out / "summary.json") as f:
        return json.load(f)
