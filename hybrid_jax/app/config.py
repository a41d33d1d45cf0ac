"""What decides a run's result: :class:`RunConfig`, the precision it names and its optimizer.

The defaults are nanoGPT's CPU "baby GPT" run (4 layers, 4 heads, 128 channels, context 64,
batch 12, 2000 iterations, lr 1e-3 cosine to 1e-4 after 100 warm-up steps, no dropout), with
bf16-mixed precision, Muon on the hidden matrices and Adam on the rest.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import optax

from hybrid_jax.models import FP8_SCALINGS
from hybrid_jax.optim import group_labels, muon_adamw, muon_adamw_rules, with_precision
from hybrid_jax.precision import Policy, PrecisionRules
from hybrid_jax.train import parse_mesh

OPTIMIZERS = ("muon_adamw", "adamw")
LOSS_SCALES = ("auto", "dynamic", "none")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything that decides a run's result; saved with its checkpoints and summary."""

    precision: str = "bf16-mixed"
    optimizer: str = "muon_adamw"
    steps: int = 2000
    batch_size: int = 12
    block_size: int = 64
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    lr: float = 1e-3
    min_lr: float = 1e-4
    muon_lr: float = 1e-2
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    z_loss_weight: float = 1e-4
    data: str | None = None
    seed: int = 1337
    eval_interval: int = 250
    eval_batches: int = 25
    eval_batch_size: int = 64
    sample_chars: int = 300
    fp8_scaling: str = "current"
    loss_scale: str = "auto"
    ema_decay: float = 0.0
    eval_ema: bool = False
    mesh: str | None = None
    max_skips: int = 20

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose from {OPTIMIZERS}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1) (0: no EMA), got {self.ema_decay}")
        if self.eval_ema and not self.ema_decay:
            raise ValueError("eval_ema needs an EMA of the parameters: set ema_decay, e.g. 0.999")
        if self.loss_scale not in LOSS_SCALES:
            raise ValueError(f"unknown loss_scale {self.loss_scale!r}; choose from {LOSS_SCALES}")
        if self.mesh is not None:
            parse_mesh(self.mesh)
        if self.fp8_scaling not in FP8_SCALINGS:
            raise ValueError(
                f"unknown fp8_scaling {self.fp8_scaling!r}; choose from {FP8_SCALINGS}"
            )
        for name in (
            "steps",
            "batch_size",
            "block_size",
            "n_layer",
            "n_head",
            "n_embd",
            "eval_interval",
            "eval_batches",
            "eval_batch_size",
            "max_skips",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def load_precision(spec: str) -> Policy | PrecisionRules:
    """A preset or policy string, the path of a JSON rules file, or the JSON itself.

    Rules in JSON are ``{"rules": [[pattern, policy], ...], "default": policy}`` (``default``
    optional), e.g. ``{"rules": [["embed|ln_", "fp32"]], "default": "bf16-mixed"}``.
    """
    inline = spec.lstrip().startswith("{")
    if inline or os.path.isfile(spec):
        where = "inline precision rules" if inline else f"precision rules file {spec!r}"
        try:
            if inline:
                raw = json.loads(spec)
            else:
                with open(spec, encoding="utf-8") as f:
                    raw = json.load(f)
            return PrecisionRules([tuple(r) for r in raw["rules"]], default=raw.get("default"))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{where}: {e}") from e
    return Policy.parse(spec)


def uses_fp16(precision: Policy | PrecisionRules) -> bool:
    if isinstance(precision, Policy):
        policies = [precision]
    else:
        default = [precision.default] if precision.default else []
        policies = [*(r.value for r in precision.rules), *default]
    return any(p.compute_dtype == jnp.float16 for p in policies)


def build_optimizer(
    config: RunConfig, precision: Policy | PrecisionRules | None = None
) -> optax.GradientTransformation:
    """Gradient clipping, then AdamW (nanoGPT's recipe) or Muon + AdamW, on a cosine schedule;
    with ``precision``, :func:`~hybrid_jax.optim.with_precision` applies its policies' optimizer
    keys (master, grad, mu, nu, update) leaf by leaf."""
    schedule = optax.warmup_cosine_decay_schedule(
        0.0,
        config.lr,
        config.warmup_steps,
        max(config.steps, config.warmup_steps + 1),
        config.min_lr,
    )
    if config.optimizer == "adamw":
        # nanoGPT decays only the matrices (dim >= 2), never gains or biases.
        decay_mask = lambda params: jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)
        inner = optax.adamw(
            schedule, b1=0.9, b2=0.99, weight_decay=config.weight_decay, mask=decay_mask
        )
    else:
        # Muon follows the same warm-up and cosine, scaled to its own peak.
        muon_schedule = lambda step: schedule(step) * (config.muon_lr / config.lr)
        inner = muon_adamw(
            schedule, muon_learning_rate=muon_schedule, weight_decay=config.weight_decay
        )
    tx = optax.chain(optax.clip_by_global_norm(config.grad_clip), inner)
    # A policy without optimizer keys leaves the transformation as it is.
    return tx if precision is None else with_precision(tx, precision, seed=config.seed)


def optimizer_groups(config: RunConfig, params: Any) -> Any:
    """A tree like ``params`` naming the optimizer group :func:`build_optimizer` gives each leaf."""
    if config.optimizer == "adamw":
        return jax.tree_util.tree_map(
            lambda p: "adamw" if p.ndim >= 2 else "adamw (no decay)", params
        )
    rules = muon_adamw_rules()
    # muon_adamw_rules' order: embeddings, head, gains and biases; hidden matrices.
    patterns = [pattern for pattern, _ in rules]
    names = dict(zip(patterns, ("adam (no decay)", "muon"), strict=True))
    return jax.tree_util.tree_map(names.get, group_labels(rules, params))
