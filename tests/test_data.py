"""Tests of hybrid_jax.data: the embedded corpus, the tokenizer, splits and batches."""

import importlib.resources
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybrid_jax.data import (
    EMBEDDED_NAME,
    CharTokenizer,
    eval_batches,
    load_dataset,
    load_text,
    sample_batch,
    train_val_split,
)

DATA = load_dataset()  # the embedded corpus, once for the module
SAMPLE = jax.jit(sample_batch, static_argnums=(2, 3))
POSITIONS = jnp.arange(1000, dtype=jnp.int32)  # token value == its position: blocks show offsets


# --- The embedded corpus ----------------------------------------------------------------------


def test_embedded_corpus_is_tiny_shakespeare():
    text = load_text()
    assert len(text) == 1_115_394
    assert text.startswith("First Citizen:\nBefore we proceed any further, hear me speak.")
    assert DATA.tokenizer.vocab_size == 65
    assert DATA.tokenizer.chars == (
        "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
    )
    assert DATA.source == f"<embedded {EMBEDDED_NAME}>"


def test_embedded_corpus_is_a_package_resource(tmp_path, monkeypatch):
    resource = importlib.resources.files("hybrid_jax.data").joinpath(EMBEDDED_NAME)
    assert resource.is_file()
    monkeypatch.chdir(tmp_path)  # no path relative to the repository or working directory
    assert load_text() == resource.read_text(encoding="utf-8")


def test_split_is_nanogpts_90_10():
    n = 1_115_394
    assert len(DATA.train) == int(n * 0.9) == 1_003_854
    assert len(DATA.val) == n - int(n * 0.9) == 111_540
    assert DATA.train.dtype == DATA.val.dtype == np.int32
    text = load_text()
    assert DATA.tokenizer.decode(DATA.train[:14]) == "First Citizen:"
    assert DATA.tokenizer.decode(DATA.val) == text[int(n * 0.9) :]


def test_train_val_split_boundaries():
    train, val = train_val_split(np.arange(25), val_fraction=0.2)
    assert (train.tolist(), val.tolist()) == (list(range(20)), list(range(20, 25)))
    with pytest.raises(ValueError, match="val_fraction must be in"):
        train_val_split(np.arange(10), val_fraction=1.0)


# --- Tokenizer ----------------------------------------------------------------------------------


def test_encode_decode_round_trip():
    text = load_text()
    ids = DATA.tokenizer.encode(text)
    assert ids.dtype == np.int32 and ids.shape == (len(text),)
    assert ids.min() == 0 and ids.max() == 64
    assert DATA.tokenizer.decode(ids) == text
    assert DATA.tokenizer.decode(jnp.asarray(ids[:50])) == text[:50]  # device arrays too


def test_vocabulary_is_sorted_set_of_characters():
    tok = CharTokenizer.from_text("bcaab\u00e9\u4e2d")
    assert tok.chars == "abc\u00e9\u4e2d" and tok.vocab_size == 5
    assert tok.encode("\u4e2dab").tolist() == [4, 0, 1]


def test_tokenizer_errors():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(ValueError, match=r"2 characters are not in the vocabulary of 3: 'xz'"):
        tok.encode("axbz")
    with pytest.raises(ValueError, match=r"token id 3 is outside the vocabulary \[0, 3\)"):
        tok.decode([0, 3])
    with pytest.raises(ValueError, match="without repeats"):
        CharTokenizer("aab")
    with pytest.raises(ValueError, match="sorted by code point"):
        CharTokenizer("ba")


# --- Any text file: same treatment, clear errors -----------------------------------------------


def test_any_utf8_file_gets_the_same_treatment(tmp_path):
    path = tmp_path / "poem.txt"
    text = "\u00e0 bient\u00f4t, dit le vent; " * 20
    path.write_text(text, encoding="utf-8")
    data = load_dataset(path, block_size=8)
    assert data.tokenizer.chars == "".join(sorted(set(text)))
    assert len(data.train) == int(len(text) * 0.9)
    assert data.tokenizer.decode(np.concatenate([data.train, data.val])) == text
    assert data.source == str(path)
    assert load_text(str(path)) == text


def test_missing_file(tmp_path):
    path = tmp_path / "nope.txt"
    with pytest.raises(
        FileNotFoundError, match=re.escape(f"text file {str(path)!r} does not exist")
    ):
        load_dataset(path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=re.escape(f"text file {str(path)!r} is empty")):
        load_text(path)


def test_non_utf8_file(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\u00e9 au lait".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.txt' is not UTF-8: byte 0xe9 at offset 3"):
        load_dataset(path)


def test_directory_is_not_a_text_file(tmp_path):
    with pytest.raises(ValueError, match="is a directory, not a file"):
        load_text(tmp_path)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads all")
def test_unreadable_file(tmp_path):
    path = tmp_path / "secret.txt"
    path.write_text("x" * 100)
    path.chmod(0)
    with pytest.raises(ValueError, match=r"secret\.txt' cannot be read"):
        load_text(path)


@pytest.mark.parametrize(("n_chars", "split"), [(50, "validation"), (5, "training")])
def test_too_short_file(tmp_path, n_chars, split):
    path = tmp_path / "short.txt"
    path.write_text("ab" * (n_chars // 2))
    # 50 characters: 45 train / 5 validation; block_size=8 needs 9 tokens in each split.
    with pytest.raises(ValueError, match=rf"short.txt' is too short: its {split} split has"):
        load_dataset(path, block_size=8)


def test_just_long_enough_file(tmp_path):
    path = tmp_path / "ok.txt"
    path.write_text("abcdefghij" * 9)  # 90 characters: 81 train, 9 validation
    data = load_dataset(path, block_size=8)
    x, y = SAMPLE(jnp.asarray(data.val), jax.random.key(0), 4, 8)
    assert bool(jnp.all(x == jnp.asarray(data.val[:8]))) and bool(jnp.all(y == data.val[1:]))


# --- Batches ------------------------------------------------------------------------------------


def test_sample_batch_shapes_dtypes_and_shift():
    tokens = jnp.asarray(DATA.train)
    x, y = SAMPLE(tokens, jax.random.key(0), 12, 64)
    assert x.shape == y.shape == (12, 64)
    assert x.dtype == y.dtype == jnp.int32
    assert bool(jnp.all(x[:, 1:] == y[:, :-1]))


def test_sampled_blocks_are_contiguous_and_inside_the_split():
    n, block = POSITIONS.shape[0], 16
    keys = jax.random.split(jax.random.key(1), 200)
    x, y = jax.jit(jax.vmap(lambda k: sample_batch(POSITIONS, k, 8, block)))(keys)
    starts = np.asarray(x[..., 0])
    assert np.all(np.asarray(x) == starts[..., None] + np.arange(block))
    assert np.all(np.asarray(y) == np.asarray(x) + 1)
    assert starts.min() >= 0 and starts.max() + block <= n - 1  # the target fits too
    assert starts.min() < 20 and starts.max() > n - block - 20  # both ends are reachable


def test_sample_batch_is_a_function_of_the_key():
    a = SAMPLE(POSITIONS, jax.random.key(7), 4, 8)
    b = SAMPLE(POSITIONS, jax.random.key(7), 4, 8)
    c = SAMPLE(POSITIONS, jax.random.fold_in(jax.random.key(7), 1), 4, 8)
    assert all(bool(jnp.all(u == v)) for u, v in zip(a, b, strict=True))
    assert not bool(jnp.all(a[0] == c[0]))
    legacy = SAMPLE(POSITIONS, jax.random.PRNGKey(7), 4, 8)  # raw uint32 keys work too
    assert legacy[0].shape == (4, 8)


def test_sample_batch_accepts_narrow_integer_tokens():
    x, y = SAMPLE(jnp.arange(50, dtype=jnp.uint8), jax.random.key(0), 2, 8)
    assert x.dtype == y.dtype == jnp.int32


def test_eval_batches_are_fixed():
    xs, ys = eval_batches(jnp.asarray(DATA.val), 5, 12, 64, seed=3)
    assert xs.shape == ys.shape == (5, 12, 64)
    assert xs.dtype == jnp.int32
    again = eval_batches(jnp.asarray(DATA.val), 5, 12, 64, seed=3)
    assert bool(jnp.all(xs == again[0])) and bool(jnp.all(ys == again[1]))
    other = eval_batches(jnp.asarray(DATA.val), 5, 12, 64, seed=4)
    assert not bool(jnp.all(xs == other[0]))
    assert len({tuple(np.asarray(x[:, 0])) for x in xs}) == 5  # five different batches
    assert bool(jnp.all(xs[:, :, 1:] == ys[:, :, :-1]))


@pytest.mark.parametrize(
    ("tokens", "sizes", "match"),
    [
        (jnp.zeros((4, 10), jnp.int32), (2, 3), r"1-D array of integer ids, got int32\[4, 10\]"),
        (jnp.zeros(10, jnp.float32), (2, 3), r"1-D array of integer ids, got float32\[10\]"),
        (jnp.zeros(8, jnp.int32), (2, 8), "tokens has 8 ids, fewer than block_size \\+ 1 = 9"),
        (jnp.zeros(10, jnp.int32), (0, 3), "batch_size must be a positive integer, got 0"),
        (jnp.zeros(10, jnp.int32), (2, 2.0), "block_size must be a positive integer, got 2.0"),
    ],
)
def test_sample_batch_errors(tokens, sizes, match):
    with pytest.raises(ValueError, match=match):
        sample_batch(tokens, jax.random.key(0), *sizes)


def test_eval_batches_errors():
    with pytest.raises(ValueError, match="n_batches must be a positive integer, got 0"):
        eval_batches(POSITIONS, 0, 2, 8)
