"""A character-level tokenizer, as nanoGPT's ``shakespeare_char/prepare.py`` builds it."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class CharTokenizer:
    """A character-level tokenizer: token ``i`` is ``chars[i]``.

    Build it with :meth:`from_text`, which sorts the distinct characters of a text by code
    point, as nanoGPT's ``prepare.py`` does (``sorted(set(text))``).

    Attributes:
      chars: the vocabulary, one character per token id, in id order.

    Examples:
      >>> tok = CharTokenizer.from_text("hello world")
      >>> tok.vocab_size, tok.chars
      (8, ' dehlorw')
      >>> ids = tok.encode("low")
      >>> ids, tok.decode(ids)
      (array([4, 5, 7], dtype=int32), 'low')
    """

    chars: str

    def __post_init__(self):
        if not self.chars or len(set(self.chars)) != len(self.chars):
            raise ValueError(
                f"chars must be non-empty and without repeats, got {self.chars[:80]!r}"
            )
        code_points = _code_points(self.chars)
        if np.any(np.diff(code_points.astype(np.int64)) <= 0):
            raise ValueError("chars must be sorted by code point; build with from_text")

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        """The tokenizer whose vocabulary is every character of ``text``, sorted."""
        if not text:
            raise ValueError("cannot build a vocabulary from an empty text")
        return cls("".join(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        """The number of token ids."""
        return len(self.chars)

    def encode(self, text: str) -> np.ndarray:
        """Token ids of ``text``, a 1-D ``int32`` array.

        Raises:
          ValueError: ``text`` has characters outside the vocabulary (listed).
        """
        vocab = _code_points(self.chars)
        points = _code_points(text)
        ids = np.searchsorted(vocab, points)
        unknown = (ids >= len(vocab)) | (vocab[np.minimum(ids, len(vocab) - 1)] != points)
        if np.any(unknown):
            missing = sorted({chr(p) for p in points[unknown]})
            raise ValueError(
                f"{len(missing)} characters are not in the vocabulary of {self.vocab_size}: "
                f"{''.join(missing)[:80]!r}"
            )
        return ids.astype(np.int32)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """The text of token ids (any integer sequence or array, also a JAX array).

        Raises:
          ValueError: an id outside ``[0, vocab_size)``.
        """
        ids = np.asarray(ids).reshape(-1)
        if ids.size and not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"token ids must be integers, got dtype {ids.dtype}")
        bad = (ids < 0) | (ids >= self.vocab_size)
        if np.any(bad):
            raise ValueError(
                f"token id {int(ids[bad][0])} is outside the vocabulary [0, {self.vocab_size})"
            )
        table = np.array(list(self.chars))
        return "".join(table[ids.astype(np.int64)].tolist())


def _code_points(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
