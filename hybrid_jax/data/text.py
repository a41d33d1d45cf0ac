"""Text corpora and character tokenization, as nanoGPT's ``shakespeare_char/prepare.py``.

The embedded corpus is Tiny Shakespeare (1,115,394 characters, 65 distinct), shipped inside the
package and read with :mod:`importlib.resources`, so it works from an installed wheel. Any other
UTF-8 text file gets the same treatment: the vocabulary is the sorted set of its characters, the
first 90% of it is the training split and the last 10% the validation split. Given a directory,
:func:`load_dataset` opens nanoGPT's pre-tokenized ``train.bin``/``val.bin`` instead
(:mod:`hybrid_jax.data.tokens`).
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import os

import numpy as np

from hybrid_jax.data.tokenizer import CharTokenizer
from hybrid_jax.data.tokens import TokenDataset, is_token_folder, load_token_files

EMBEDDED_NAME = "tinyshakespeare.txt"
"""The file name of the embedded corpus, a resource of :mod:`hybrid_jax.data`."""

_Path = str | os.PathLike


def load_text(path: _Path | None = None) -> str:
    """Reads a UTF-8 text file, or the embedded Tiny Shakespeare when ``path`` is ``None``.

    Args:
      path: a text file, or ``None`` for the embedded corpus.

    Returns:
      The whole text.

    Raises:
      FileNotFoundError: ``path`` does not exist.
      ValueError: ``path`` is a directory, cannot be read, is not valid UTF-8, or is empty;
        the message names the path and the problem.

    Examples:
      >>> text = load_text()
      >>> len(text), text[:14]
      (1115394, 'First Citizen:')
    """
    if path is None:
        resource = importlib.resources.files(__package__).joinpath(EMBEDDED_NAME)
        return resource.read_text(encoding="utf-8")
    where = os.fspath(path)
    try:
        with open(where, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"text file {where!r} does not exist") from None
    except IsADirectoryError:
        raise ValueError(f"text file {where!r} is a directory, not a file") from None
    except OSError as e:
        raise ValueError(f"text file {where!r} cannot be read: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"text file {where!r} is not UTF-8: byte {data[e.start]:#04x} at offset {e.start} "
            f"({e.reason}); convert it, e.g. iconv -f latin1 -t utf-8"
        ) from None
    if not text:
        raise ValueError(f"text file {where!r} is empty")
    return text


def train_val_split(tokens: np.ndarray, val_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """The first ``1 - val_fraction`` of ``tokens`` for training, the rest for validation.

    The boundary is ``int(n * (1 - val_fraction))``, nanoGPT's ``int(n * 0.9)`` by default.

    Raises:
      ValueError: ``val_fraction`` is not in (0, 1).

    Examples:
      >>> train, val = train_val_split(np.arange(10))
      >>> train.tolist(), val.tolist()
      ([0, 1, 2, 3, 4, 5, 6, 7, 8], [9])
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n_train = int(len(tokens) * (1 - val_fraction))
    return tokens[:n_train], tokens[n_train:]


@dataclasses.dataclass(frozen=True)
class TextDataset:
    """A character-level corpus, tokenized and split.

    Attributes:
      tokenizer: the :class:`CharTokenizer` of the whole text.
      train: token ids of the training split, 1-D ``int32`` (NumPy; put it on the device with
        ``jnp.asarray`` once and sample batches from it there).
      val: token ids of the validation split.
      source: where the text came from: the path, or ``"<embedded tinyshakespeare.txt>"``.
    """

    tokenizer: CharTokenizer
    train: np.ndarray
    val: np.ndarray
    source: str

    @property
    def vocab_size(self) -> int:
        """The number of token ids, the tokenizer's."""
        return self.tokenizer.vocab_size


def load_dataset(
    path: _Path | None = None, *, block_size: int = 64, val_fraction: float = 0.1
) -> TextDataset | TokenDataset:
    """Loads a corpus: a text file, a token folder, or the embedded Tiny Shakespeare.

    A text (``path`` a file, or ``None``) is tokenized by characters and split. A token folder
    (``path`` a directory with nanoGPT's ``train.bin`` and ``val.bin``) is opened with
    :func:`~hybrid_jax.data.load_token_files`, its splits as they were written. Either result
    has ``train``, ``val``, ``vocab_size`` and ``tokenizer``.

    Args:
      path: a UTF-8 text file, a token folder, or ``None``.
      block_size: the context length the batches will have; each split must hold at least one
        block plus its next-token target, ``block_size + 1`` tokens.
      val_fraction: the share of a text, at its end, kept for validation (a token folder comes
        split).

    Returns:
      A :class:`TextDataset` for a text, a :class:`~hybrid_jax.data.TokenDataset` for a folder.

    Raises:
      FileNotFoundError: ``path`` does not exist, or a token folder lacks ``val.bin``.
      ValueError: ``path`` is a directory without ``train.bin``; the file is unreadable, not
        UTF-8, empty, or too short for ``block_size`` (the message names the path, the split and
        the lengths); or a token folder is malformed (see
        :func:`~hybrid_jax.data.load_token_files`).

    Examples:
      >>> data = load_dataset()
      >>> data.vocab_size, len(data.train), len(data.val)
      (65, 1003854, 111540)
    """
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    if path is not None and os.path.isdir(path):
        if is_token_folder(path):
            return load_token_files(path, block_size=block_size)
        raise ValueError(
            f"{os.fspath(path)!r} is a directory without train.bin: give a UTF-8 text file, or "
            f"a token folder with train.bin and val.bin (uint16 token ids, as nanoGPT's "
            f"prepare.py writes them) and optionally meta.pkl"
        )
    text = load_text(path)
    source = f"<embedded {EMBEDDED_NAME}>" if path is None else os.fspath(path)
    tokenizer = CharTokenizer.from_text(text)
    train, val = train_val_split(tokenizer.encode(text), val_fraction)
    for name, split in (("training", train), ("validation", val)):
        if len(split) < block_size + 1:
            raise ValueError(
                f"text file {source!r} is too short: its {name} split has {len(split)} "
                f"characters of {len(text)}, but block_size={block_size} needs at least "
                f"{block_size + 1} in each split; use a longer text or a smaller block size"
            )
    return TextDataset(tokenizer, train, val, source)
