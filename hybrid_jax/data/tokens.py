"""Token files as nanoGPT's ``prepare.py`` scripts write them: ``train.bin``, ``val.bin``, meta.

A token folder holds ``train.bin`` and ``val.bin``, raw ``uint16`` token ids with no header
(``np.array(ids, dtype=np.uint16).tofile(path)``), and optionally ``meta.pkl``
(``shakespeare_char``: a dict with ``vocab_size``, ``itos`` and ``stoi``) or ``meta.json``
(``{"vocab_size": N}``, optionally with ``"itos"``). Without meta the ids are GPT-2 BPE's, and
the vocabulary is nanoGPT's 50304: GPT-2's 50257 padded to a multiple of 64.

The splits are read through ``np.memmap``, so a 17 GB OpenWebText ``train.bin`` costs no memory
until batches are gathered from it (:func:`~hybrid_jax.data.sample_batch_host`).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle

import numpy as np

from hybrid_jax.data.tokenizer import CharTokenizer

GPT2_VOCAB_SIZE = 50304
"""The vocabulary of a token folder without meta: GPT-2's 50257 padded to 50304, as nanoGPT."""

_Path = str | os.PathLike
_TOKEN_DTYPE = np.dtype(np.uint16)
# Tokens per read when checking the ids: 32 MB at a time, whatever the size of the file.
_CHUNK_TOKENS = 1 << 24


def is_token_folder(path: _Path) -> bool:
    """Whether ``path`` is a directory holding a ``train.bin``.

    ``val.bin`` is not required here, so that :func:`load_token_files` can report it missing.

    Examples:
      >>> is_token_folder("."), is_token_folder("no/such/folder")
      (False, False)
    """
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "train.bin"))


@dataclasses.dataclass(frozen=True)
class TokenDataset:
    """A tokenized corpus read from a token folder.

    Attributes:
      train: token ids of the training split, a read-only 1-D ``uint16`` ``np.memmap``.
        Batch it on the host (:func:`~hybrid_jax.data.sample_batch_host`), or, when it fits,
        put it on the device with ``jnp.asarray`` once and use
        :func:`~hybrid_jax.data.sample_batch`.
      val: token ids of the validation split, as ``train``.
      vocab_size: the number of token ids: the meta's ``vocab_size``, else 50304.
      tokenizer: a :class:`~hybrid_jax.data.CharTokenizer` when the meta maps every id to a
        character (``itos``), else ``None``: the ids cannot be decoded here.
      source: the folder.
    """

    train: np.memmap
    val: np.memmap
    vocab_size: int
    tokenizer: CharTokenizer | None
    source: str


def load_token_files(folder: _Path, *, block_size: int = 64) -> TokenDataset:
    """Opens a token folder: ``train.bin``, ``val.bin`` and an optional ``meta.pkl``/``meta.json``.

    Every file is checked before a batch is drawn from it: each split is a whole number of
    ``uint16`` tokens, holds at least ``block_size + 1`` of them, and every id is below the
    vocabulary size (read in 32 MB chunks, so the check costs one pass over the file and no
    memory). ``meta.pkl`` is read with an unpickler that builds only plain dicts, lists, strings
    and numbers, so a meta file cannot run code.

    Args:
      folder: a directory with ``train.bin`` and ``val.bin``.
      block_size: the context length the batches will have; each split must hold at least one
        block plus its next-token target, ``block_size + 1`` tokens.

    Returns:
      A :class:`TokenDataset`.

    Raises:
      FileNotFoundError: ``train.bin`` or ``val.bin`` is missing (the message names it).
      ValueError: a file is unreadable, has an odd number of bytes (not ``uint16``), is too
        short for ``block_size``, holds an id ``>= vocab_size`` (the message gives the id, its
        offset and the vocabulary size), or the meta is malformed, or both metas exist; every
        message names the file.

    Examples:
      >>> import tempfile
      >>> with tempfile.TemporaryDirectory() as folder:
      ...     np.arange(100, dtype=np.uint16).tofile(os.path.join(folder, "train.bin"))
      ...     np.arange(20, dtype=np.uint16).tofile(os.path.join(folder, "val.bin"))
      ...     data = load_token_files(folder, block_size=8)
      >>> data.vocab_size, len(data.train), len(data.val), data.val.dtype, data.tokenizer
      (50304, 100, 20, dtype('uint16'), None)
    """
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    source = os.fspath(folder)
    if not os.path.isdir(source):
        raise FileNotFoundError(f"token folder {source!r} does not exist or is not a directory")
    vocab_size, tokenizer, vocab_from = _read_meta(source)
    # Both files' sizes first: a missing or short val.bin is reported before a long scan.
    paths = [os.path.join(source, name) for name in ("train.bin", "val.bin")]
    for path in paths:
        _check_size(path, block_size)
    train, val = (_open_tokens(path, vocab_size, vocab_from) for path in paths)
    return TokenDataset(train, val, vocab_size, tokenizer, source)


def _check_size(path, block_size):
    try:
        n_bytes = os.path.getsize(path)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"token file {path!r} is missing: a token folder holds train.bin and val.bin"
        ) from None
    if n_bytes % _TOKEN_DTYPE.itemsize:
        raise ValueError(
            f"token file {path!r} has {n_bytes} bytes, not a whole number of 2-byte uint16 "
            f"tokens: wrong dtype size? nanoGPT writes np.array(ids, dtype=np.uint16).tofile()"
        )
    n_tokens = n_bytes // _TOKEN_DTYPE.itemsize
    if n_tokens < block_size + 1:
        raise ValueError(
            f"token file {path!r} is too short: it holds {n_tokens} tokens, but "
            f"block_size={block_size} needs at least {block_size + 1}; use more data or a "
            f"smaller block size"
        )


def _open_tokens(path, vocab_size, vocab_from):
    try:
        tokens = np.memmap(path, dtype=_TOKEN_DTYPE, mode="r")
    except OSError as e:
        raise ValueError(f"token file {path!r} cannot be read: {e.strerror or e}") from None
    _check_ids(tokens, path, vocab_size, vocab_from)
    return tokens


def _check_ids(tokens, path, vocab_size, vocab_from):
    if vocab_size > np.iinfo(_TOKEN_DTYPE).max:
        return  # every uint16 is a valid id
    for start in range(0, len(tokens), _CHUNK_TOKENS):
        chunk = tokens[start : start + _CHUNK_TOKENS]
        if chunk.max() >= vocab_size:
            offset = start + int(np.argmax(chunk >= vocab_size))
            raise ValueError(
                f"token file {path!r} holds token id {int(tokens[offset])} at token offset "
                f"{offset} (byte {offset * _TOKEN_DTYPE.itemsize}), outside the vocabulary of "
                f"{vocab_size} ({vocab_from}); the file and its meta do not match"
            )


def _read_meta(folder):
    pkl, js = os.path.join(folder, "meta.pkl"), os.path.join(folder, "meta.json")
    has_pkl, has_json = os.path.exists(pkl), os.path.exists(js)
    if has_pkl and has_json:
        raise ValueError(
            f"token folder {folder!r} has both meta.pkl and meta.json; keep one, so that the "
            f"vocabulary has one source"
        )
    if not (has_pkl or has_json):
        return GPT2_VOCAB_SIZE, None, "GPT-2's padded vocabulary: the folder has no meta"
    path = pkl if has_pkl else js
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ValueError(f"meta file {path!r} cannot be read: {e.strerror or e}") from None
    try:
        meta = _MetaUnpickler(io.BytesIO(raw)).load() if has_pkl else json.loads(raw)
    except Exception as e:  # a corrupt pickle raises nearly any error, as pickle's docs warn
        raise ValueError(f"meta file {path!r} is malformed: {e}") from e
    vocab_size, tokenizer = _parse_meta(meta, path)
    return vocab_size, tokenizer, f"vocab_size from {os.path.basename(path)}"


def _parse_meta(meta, path):
    if not isinstance(meta, dict):
        raise ValueError(f"meta file {path!r} must hold a dict, got {type(meta).__name__}")
    vocab_size = meta.get("vocab_size")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(
            f"meta file {path!r} must give vocab_size, a positive integer, got {vocab_size!r}"
        )
    itos = meta.get("itos")
    if itos is None:
        return vocab_size, None
    if isinstance(itos, list):  # JSON's natural form: the characters in id order
        itos = dict(enumerate(itos))
    if not isinstance(itos, dict):
        raise ValueError(
            f"meta file {path!r}: itos must map token ids to characters, got {type(itos).__name__}"
        )
    try:
        # JSON object keys are strings: "0", "1", ...
        chars = {int(i): c for i, c in itos.items()}
    except (TypeError, ValueError):
        raise ValueError(f"meta file {path!r}: itos has a key that is not a token id") from None
    if sorted(chars) != list(range(vocab_size)):
        raise ValueError(
            f"meta file {path!r}: itos must map every id in [0, {vocab_size}) once, got "
            f"{len(chars)} ids from {min(chars, default=None)} to {max(chars, default=None)}"
        )
    if not all(isinstance(c, str) and len(c) == 1 for c in chars.values()):
        raise ValueError(f"meta file {path!r}: itos values must be single characters")
    try:
        tokenizer = CharTokenizer("".join(chars[i] for i in range(vocab_size)))
    except ValueError as e:
        raise ValueError(f"meta file {path!r}: itos is not a character vocabulary: {e}") from None
    return vocab_size, tokenizer


class _MetaUnpickler(pickle.Unpickler):
    # nanoGPT's meta is plain dicts, strings and ints, which unpickle without any global; a
    # global would be code from the file, so none is loaded.
    def find_class(self, module, name):
        raise pickle.UnpicklingError(
            f"it refers to {module}.{name}; only plain dicts, lists, strings and numbers are read"
        )
