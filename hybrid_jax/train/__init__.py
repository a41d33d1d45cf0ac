"""Training: the train state, the jitted train step, evaluation, sharding, checkpoints."""

from hybrid_jax.train.checkpoint import Checkpointer
from hybrid_jax.train.guard import NonFiniteError, SkipGuard
from hybrid_jax.train.sharding import (
    batch_parts,
    batch_sharding,
    initialize_distributed,
    make_mesh,
    parse_mesh,
    replicated,
    shard_state,
    state_shardings,
)
from hybrid_jax.train.state import TrainState, merge_frozen, split_frozen, state_bytes
from hybrid_jax.train.step import evaluate, make_eval_step, make_train_step

__all__ = [
    "Checkpointer",
    "NonFiniteError",
    "SkipGuard",
    "TrainState",
    "batch_parts",
    "batch_sharding",
    "evaluate",
    "initialize_distributed",
    "make_eval_step",
    "make_mesh",
    "make_train_step",
    "merge_frozen",
    "parse_mesh",
    "replicated",
    "shard_state",
    "split_frozen",
    "state_bytes",
    "state_shardings",
]
