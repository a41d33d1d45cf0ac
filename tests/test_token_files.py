"""Tests of nanoGPT token folders, host batching and prefetching (hybrid_jax.data)."""

import gc
import json
import pickle
import threading

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from hybrid_jax.data import (
    GPT2_VOCAB_SIZE,
    CharTokenizer,
    TextDataset,
    TokenDataset,
    eval_batches,
    eval_batches_host,
    is_token_folder,
    load_dataset,
    load_token_files,
    prefetch,
    sample_batch,
    sample_batch_host,
)
from hybrid_jax.data import batches as batches_lib
from hybrid_jax.data import tokens as tokens_lib

SAMPLE = jax.jit(sample_batch, static_argnums=(2, 3))
TEXT = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 8


def write_folder(folder, train, val, meta=None, meta_name="meta.pkl"):
    """A token folder as nanoGPT's prepare.py writes it; ``meta`` pickled or as JSON."""
    folder.mkdir(exist_ok=True)
    np.asarray(train, np.uint16).tofile(folder / "train.bin")
    np.asarray(val, np.uint16).tofile(folder / "val.bin")
    if meta is not None:
        with open(folder / meta_name, "wb") as f:
            if meta_name.endswith(".pkl"):
                pickle.dump(meta, f)
            else:
                f.write(json.dumps(meta).encode())
    return folder


def shakespeare_char_prepare(text, folder):
    """nanoGPT's data/shakespeare_char/prepare.py, line for line, on ``text``."""
    chars = sorted(set(text))
    vocab_size = len(chars)
    stoi = {ch: i for i, ch in enumerate(chars)}
    itos = {i: ch for i, ch in enumerate(chars)}
    encode = lambda s: [stoi[c] for c in s]
    n = len(text)
    train_data = text[: int(n * 0.9)]
    val_data = text[int(n * 0.9) :]
    train_ids = np.array(encode(train_data), dtype=np.uint16)
    val_ids = np.array(encode(val_data), dtype=np.uint16)
    folder.mkdir()
    train_ids.tofile(folder / "train.bin")
    val_ids.tofile(folder / "val.bin")
    meta = {"vocab_size": vocab_size, "itos": itos, "stoi": stoi}
    with open(folder / "meta.pkl", "wb") as f:
        pickle.dump(meta, f)


def assert_same(host, device):
    """Bit-identical batches: same dtype, shape and values."""
    for h, d in zip(host, device, strict=True):
        d = np.asarray(d)
        assert isinstance(h, np.ndarray) and h.dtype == d.dtype == np.int32
        np.testing.assert_array_equal(h, d)


@pytest.fixture
def random_folder(tmp_path):
    rng = np.random.default_rng(0)
    train, val = rng.integers(0, 50_000, 3000), rng.integers(0, 50_000, 400)
    return write_folder(tmp_path / "owt", train, val), train, val


# --- Loading ------------------------------------------------------------------------------------


def test_random_token_folder_loads_with_gpt2_vocab(random_folder):
    folder, train, val = random_folder
    assert is_token_folder(folder) and not is_token_folder(folder / "train.bin")
    data = load_token_files(folder, block_size=32)
    assert isinstance(data, TokenDataset)
    assert data.vocab_size == GPT2_VOCAB_SIZE == 50304 and data.tokenizer is None
    assert isinstance(data.train, np.memmap) and data.train.dtype == np.uint16
    np.testing.assert_array_equal(data.train, train)
    np.testing.assert_array_equal(data.val, val)
    assert data.source == str(folder)
    with pytest.raises(ValueError, match="read-only"):
        data.train[0] = 1
    assert load_dataset(folder, block_size=32).vocab_size == 50304  # load_dataset dispatches


def test_shakespeare_char_meta_matches_the_text_path(tmp_path):
    text_file = tmp_path / "input.txt"
    text_file.write_text(TEXT, encoding="utf-8")
    shakespeare_char_prepare(TEXT, tmp_path / "shakespeare_char")
    tokens = load_dataset(tmp_path / "shakespeare_char", block_size=16)
    chars = load_dataset(text_file, block_size=16)
    assert isinstance(tokens, TokenDataset) and isinstance(chars, TextDataset)
    assert tokens.tokenizer == chars.tokenizer and tokens.vocab_size == chars.vocab_size
    np.testing.assert_array_equal(tokens.train, chars.train)
    np.testing.assert_array_equal(tokens.val, chars.val)
    assert tokens.tokenizer.decode(tokens.val) == TEXT[int(len(TEXT) * 0.9) :]


def test_meta_json_with_itos_as_object_or_list(tmp_path):
    chars = "\n abc"
    for i, itos in enumerate([{str(i): c for i, c in enumerate(chars)}, list(chars)]):
        meta = {"vocab_size": 5, "itos": itos}
        folder = write_folder(tmp_path / f"f{i}", [1, 2, 3, 4] * 5, [0, 4] * 5, meta, "meta.json")
        data = load_token_files(folder, block_size=8)
        assert data.vocab_size == 5 and data.tokenizer == CharTokenizer(chars)
    folder = write_folder(tmp_path / "bare", [7] * 20, [0] * 20, {"vocab_size": 8}, "meta.json")
    data = load_token_files(folder, block_size=8)
    assert data.vocab_size == 8 and data.tokenizer is None


# --- Errors name the file ------------------------------------------------------------------------


def test_odd_byte_size(random_folder):
    folder = random_folder[0]
    with open(folder / "val.bin", "ab") as f:
        f.write(b"\x00")
    with pytest.raises(ValueError, match=r"val\.bin' has 801 bytes, not a whole number.*dtype"):
        load_token_files(folder, block_size=8)


@pytest.mark.parametrize("split", ["train", "val"])
def test_too_few_tokens(tmp_path, split):
    sizes = {"train": 100, "val": 100} | {split: 8}
    folder = write_folder(tmp_path / "t", np.zeros(sizes["train"]), np.zeros(sizes["val"]))
    with pytest.raises(ValueError, match=rf"{split}\.bin' is too short: it holds 8 tokens.* 9"):
        load_dataset(folder, block_size=8)


def test_token_id_outside_the_vocabulary(tmp_path, monkeypatch):
    ids = np.zeros(100, np.uint16)
    ids[[37, 90]] = 9
    folder = write_folder(tmp_path / "t", np.zeros(50), ids, {"vocab_size": 9})
    # Small chunks: the bad id lies in a later chunk than the first, as in a multi-GB file.
    monkeypatch.setattr(tokens_lib, "_CHUNK_TOKENS", 16)
    message = r"val\.bin' holds token id 9 at token offset 37 \(byte 74\).* vocabulary of 9"
    with pytest.raises(ValueError, match=message + r" \(vocab_size from meta\.pkl\)"):
        load_token_files(folder, block_size=8)
    ids = np.full(50, 50304)  # GPT-2's padded vocabulary, 50304, is the bound without meta
    folder = write_folder(tmp_path / "gpt2", ids, np.zeros(50))
    with pytest.raises(ValueError, match=r"train\.bin' holds token id 50304 at token offset 0"):
        load_token_files(folder, block_size=8)


def test_missing_val_bin(random_folder):
    folder = random_folder[0]
    (folder / "val.bin").unlink()
    with pytest.raises(FileNotFoundError, match=r"val\.bin' is missing"):
        load_dataset(folder, block_size=8)


def test_directory_that_is_not_a_token_folder(tmp_path):
    with pytest.raises(ValueError, match=r"is a directory without train\.bin"):
        load_dataset(tmp_path)
    assert not is_token_folder(tmp_path) and not is_token_folder(tmp_path / "nope")


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("meta.pkl", b"not a pickle", r"meta\.pkl' is malformed"),
        ("meta.pkl", pickle.dumps(np.int64(3)), r"meta\.pkl' is malformed: it refers to numpy"),
        ("meta.pkl", pickle.dumps([1, 2]), r"meta\.pkl' must hold a dict, got list"),
        ("meta.json", b"{vocab_size: 3", r"meta\.json' is malformed"),
        ("meta.json", b'{"vocab_size": "65"}', r"meta\.json' must give vocab_size.*'65'"),
        ("meta.json", b'{"itos": ["a"]}', r"meta\.json' must give vocab_size.*None"),
        (
            "meta.json",
            b'{"vocab_size": 3, "itos": ["a", "b"]}',
            r"itos must map every id in \[0, 3\) once, got 2 ids",
        ),
        ("meta.json", b'{"vocab_size": 2, "itos": ["a", "bc"]}', "single characters"),
        ("meta.json", b'{"vocab_size": 2, "itos": ["b", "a"]}', "sorted by code point"),
        ("meta.json", b'{"vocab_size": 2, "itos": {"x": "a"}}', "key that is not a token id"),
    ],
)
def test_bad_meta(tmp_path, name, content, match):
    folder = write_folder(tmp_path / "t", np.zeros(20), np.zeros(20))
    (folder / name).write_bytes(content)
    with pytest.raises(ValueError, match=match) as info:
        load_token_files(folder, block_size=8)
    assert str(folder / name) in str(info.value)


def test_two_metas(tmp_path):
    folder = write_folder(tmp_path / "t", np.zeros(20), np.zeros(20), {"vocab_size": 3})
    (folder / "meta.json").write_text('{"vocab_size": 3}')
    with pytest.raises(ValueError, match=r"has both meta\.pkl and meta\.json"):
        load_token_files(folder, block_size=8)


# --- Host batches are the device batches ---------------------------------------------------------


def test_host_batches_equal_device_batches(random_folder):
    data = load_token_files(random_folder[0], block_size=32)
    device_train = jnp.asarray(data.train)
    for key in [jax.random.key(0), jax.random.key(7), jax.random.PRNGKey(3)]:
        for step in range(3):
            k = jax.random.fold_in(key, step)
            assert_same(sample_batch_host(data.train, k, 8, 32), SAMPLE(device_train, k, 8, 32))
    for seed in (0, 5):
        assert_same(
            eval_batches_host(data.val, 4, 3, 32, seed), eval_batches(data.val, 4, 3, 32, seed)
        )
    x, y = sample_batch_host(data.train, jax.random.key(1), 8, 32)
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])


@hypothesis.settings(max_examples=10, deadline=None)
@hypothesis.given(
    n=st.integers(2, 300),
    batch_size=st.integers(1, 5),
    block_size=st.integers(1, 40),
    seed=st.integers(0, 2**31 - 1),
)
def test_host_equals_device_for_any_sizes(n, batch_size, block_size, seed):
    hypothesis.assume(n >= block_size + 1)
    tokens = np.random.default_rng(seed).integers(0, 2**16, n).astype(np.uint16)
    key = jax.random.key(seed)
    host = sample_batch_host(tokens, key, batch_size, block_size)
    assert_same(host, SAMPLE(jnp.asarray(tokens), key, batch_size, block_size))


def test_host_batches_errors():
    with pytest.raises(ValueError, match=r"1-D array of integer ids, got float32\[10\]"):
        sample_batch_host(np.zeros(10, np.float32), jax.random.key(0), 2, 3)
    with pytest.raises(ValueError, match="fewer than block_size \\+ 1 = 9"):
        sample_batch_host(np.zeros(8, np.uint16), jax.random.key(0), 2, 8)
    with pytest.raises(ValueError, match="n_batches must be a positive integer, got 0"):
        eval_batches_host(np.zeros(10, np.uint16), 0, 2, 3)


def test_offsets_beyond_int32_use_the_whole_range():
    # OpenWebText's train.bin holds 9e9 tokens: more than an int32 offset reaches.
    n, block = 2**40, 1024
    keys = jax.random.split(jax.random.key(0), 4)
    starts = batches_lib._host_offsets(keys, n, 64, block)
    assert starts.shape == (4, 64) and starts.dtype == np.int64
    assert starts.min() >= 0 and starts.max() < n - block and starts.max() > 2**39
    np.testing.assert_array_equal(starts, batches_lib._host_offsets(keys, n, 64, block))


# --- Prefetch -----------------------------------------------------------------------------------


def prefetch_threads():
    return [t for t in threading.enumerate() if t.name == "hybrid_jax.data.prefetch"]


def test_prefetch_yields_device_batches_in_order():
    tokens = np.arange(500, dtype=np.uint16)
    keys = [jax.random.key(i) for i in range(5)]
    host = [sample_batch_host(tokens, k, 4, 16) for k in keys]
    with prefetch((sample_batch_host(tokens, k, 4, 16) for k in keys), depth=2) as it:
        device = list(it)
    assert len(device) == 5
    for (hx, hy), (dx, dy) in zip(host, device, strict=True):
        assert isinstance(dx, jax.Array) and dx.dtype == jnp.int32
        np.testing.assert_array_equal(hx, dx)
        np.testing.assert_array_equal(hy, dy)
    assert not it._thread.is_alive()


def test_prefetch_to_a_sharding():
    mesh = jax.make_mesh((1,), ("data",))
    sharding = NamedSharding(mesh, P("data"))
    batches = [(np.full((2, 3), i, np.int32), np.zeros((2, 3), np.int32)) for i in range(3)]
    with prefetch(iter(batches), depth=1, sharding=sharding) as it:
        out = list(it)
    assert [int(x[0, 0]) for x, _ in out] == [0, 1, 2]
    assert all(x.sharding == sharding and y.sharding == sharding for x, y in out)


def test_prefetch_reraises_the_producers_error():
    def failing_batches():
        yield np.zeros(3, np.int32)
        raise RuntimeError("disk on fire")

    it = prefetch(failing_batches())
    assert int(next(it)[0]) == 0
    with pytest.raises(RuntimeError, match="disk on fire") as info:
        next(it)
    assert any(entry.name == "failing_batches" for entry in info.traceback)  # where it happened
    assert not it._thread.is_alive()
    with pytest.raises(StopIteration):
        next(it)


def test_prefetch_close_stops_the_thread_and_the_source():
    closed = threading.Event()

    def endless():
        try:
            while True:
                yield np.zeros(4, np.int32)
        finally:
            closed.set()

    it = prefetch(endless(), depth=3)
    next(it)
    assert it._thread.is_alive()  # blocked on a full queue
    it.close()
    assert not it._thread.is_alive() and closed.is_set()
    with pytest.raises(StopIteration):
        next(it)
    assert not prefetch_threads()


def test_prefetch_depth_must_be_positive():
    for depth in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="depth must be a positive integer"):
            prefetch(iter([]), depth=depth)


def test_an_unclosed_prefetcher_stops_when_collected():
    it = prefetch(np.zeros(4, np.int32) for _ in iter(int, 1))  # endless
    next(it)
    thread = it._thread
    del it
    gc.collect()
    thread.join(timeout=5)
    assert not thread.is_alive()
