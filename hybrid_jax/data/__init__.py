"""The embedded Tiny Shakespeare corpus, a character tokenizer, and on-device batching."""

from hybrid_jax.data.batches import eval_batches, sample_batch
from hybrid_jax.data.text import (
    EMBEDDED_NAME,
    CharTokenizer,
    TextDataset,
    load_dataset,
    load_text,
    train_val_split,
)

__all__ = [
    "EMBEDDED_NAME",
    "CharTokenizer",
    "TextDataset",
    "eval_batches",
    "load_dataset",
    "load_text",
    "sample_batch",
    "train_val_split",
]
