"""Training: the train state, the jitted train step, evaluation."""

from hybrid_jax.train.audit import audit, audit_step, expected_from_plan, hlo_dots
from hybrid_jax.train.checkpoint import Checkpointer
from hybrid_jax.train.state import TrainState, merge_frozen, split_frozen, state_bytes
from hybrid_jax.train.step import evaluate, make_eval_step, make_train_step

__all__ = [
    "Checkpointer",
    "TrainState",
    "audit",
    "audit_step",
    "evaluate",
    "expected_from_plan",
    "hlo_dots",
    "make_eval_step",
    "make_train_step",
    "merge_frozen",
    "split_frozen",
    "state_bytes",
]
