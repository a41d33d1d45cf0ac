"""The embedded Tiny Shakespeare corpus, nanoGPT token files, tokenization and batching."""

from hybrid_jax.data.batches import eval_batches, eval_batches_host, sample_batch, sample_batch_host
from hybrid_jax.data.prefetch import Prefetcher, prefetch
from hybrid_jax.data.text import (
    EMBEDDED_NAME,
    TextDataset,
    load_dataset,
    load_text,
    train_val_split,
)
from hybrid_jax.data.tokenizer import CharTokenizer
from hybrid_jax.data.tokens import (
    GPT2_VOCAB_SIZE,
    TokenDataset,
    is_token_folder,
    load_token_files,
)

__all__ = [
    "EMBEDDED_NAME",
    "GPT2_VOCAB_SIZE",
    "CharTokenizer",
    "Prefetcher",
    "TextDataset",
    "TokenDataset",
    "eval_batches",
    "eval_batches_host",
    "is_token_folder",
    "load_dataset",
    "load_text",
    "load_token_files",
    "prefetch",
    "sample_batch",
    "sample_batch_host",
    "train_val_split",
]
