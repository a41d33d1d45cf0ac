"""Training: the train state, the jitted train step, evaluation."""

from hybrid_jax.train.checkpoint import Checkpointer
from hybrid_jax.train.state import TrainState, merge_frozen, split_frozen, state_bytes
from hybrid_jax.train.step import evaluate, make_eval_step, make_train_step

__all__ = [
    "Checkpointer",
    "TrainState",
    "evaluate",
    "make_eval_step",
    "make_train_step",
    "merge_frozen",
    "split_frozen",
    "state_bytes",
]
