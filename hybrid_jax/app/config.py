"""What decides a run's result: :class:`RunConfig`, the precision it names and its optimizer.

The defaults are nanoGPT's CPU "baby GPT" run (4 layers, 4 heads, 128 channels, context 64,
batch 12, 2000 iterations, no dropout; :data:`MODEL_PRESETS` also has GPT-2 124M and 350M),
with Muon on the hidden matrices and Adam on the rest,
warm-up and cosine decay to a tenth, and the precision that is fastest on the backend
(:func:`auto_precision`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import optax

from hybrid_jax.models import ATTENTION, FP8_SCALINGS
from hybrid_jax.optim import group_labels, muon_adamw, muon_adamw_rules, with_precision
from hybrid_jax.precision import Policy, PrecisionRules
from hybrid_jax.train import parse_mesh

OPTIMIZERS = ("muon_adamw", "adamw")
#: Adam's peak learning rate when ``RunConfig.lr`` is None: nanoGPT's for its AdamW recipe; for
#: Muon + Adam, where Adam trains only embeddings, gains and biases, the best of
#: ``benchmarks/schedule_sweep.py`` (final val loss 1.609 against 1.616 at 1e-3).
DEFAULT_LR = {"adamw": 1e-3, "muon_adamw": 3e-3}
LOSS_SCALES = ("auto", "dynamic", "none")
AUTO = "auto"


@dataclasses.dataclass(frozen=True)
class ModelPreset:
    """The shape ``--model NAME`` gives a run's GPT, where its own fields are left ``None``."""

    n_layer: int
    n_head: int
    n_embd: int
    block_size: int
    eval_batch_size: int


#: ``--model`` presets: nanoGPT's CPU baby GPT, and GPT-2 small and medium as nanoGPT trains them
#: (``config/train_gpt2.py``: context 1024, no biases, tied head; the vocabulary comes from the
#: data, GPT-2's 50257 padded to 50304 for token files without ``meta``). Evaluation batches of the
#: GPT-2 sizes are 8 sequences: 64 x 1024 x 50304 fp32 logits alone would be 13 GB.
MODEL_PRESETS = {
    "baby": ModelPreset(n_layer=4, n_head=4, n_embd=128, block_size=64, eval_batch_size=64),
    "gpt2-124m": ModelPreset(n_layer=12, n_head=12, n_embd=768, block_size=1024, eval_batch_size=8),
    "gpt2-350m": ModelPreset(
        n_layer=24, n_head=16, n_embd=1024, block_size=1024, eval_batch_size=8
    ),
}
_PRESET_FIELDS = tuple(field.name for field in dataclasses.fields(ModelPreset))


def auto_precision(backend: str | None = None) -> tuple[str, str]:
    """The preset ``--precision auto`` stands for on ``backend`` (default: JAX's), and why.

    bf16-mixed on GPUs and TPUs, whose matrix units multiply bf16 at several times the fp32
    rate; fp32 on CPUs. XLA:CPU (jaxlib 0.10) runs a bf16 dot natively only when its output is
    fp32 and both operands are laid out for it (its YNNPACK path): a bf16-mixed model's dots,
    with bf16 outputs and transposed operands in the backward pass, are converted to fp32
    around the dot instead, and bf16-mixed steps cost about 1.18x fp32 steps, at no gain in loss.
    No XLA:CPU flag changes that (oneDNN, XNNPACK and the fusion types were measured).

    Examples:
      >>> auto_precision("tpu")[0], auto_precision("cpu")[0]
      ('bf16-mixed', 'fp32')
    """
    backend = backend or jax.default_backend()
    if backend == "cpu":
        return "fp32", (
            "auto on cpu: XLA:CPU converts bf16 matmuls to fp32 around the dot, so bf16-mixed "
            "steps are slower than fp32 at no gain in loss"
        )
    return "bf16-mixed", (
        f"auto on {backend}: bf16 matmuls run natively, fp32 master weights keep the updates"
    )


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything that decides a run's result; saved with its checkpoints and summary."""

    precision: str = AUTO
    optimizer: str = "muon_adamw"
    model: str = "baby"
    steps: int = 2000
    batch_size: int = 12
    block_size: int | None = None  # None: the model preset's (baby: 64)
    n_layer: int | None = None  # None: the model preset's (baby: 4)
    n_head: int | None = None  # None: the model preset's (baby: 4)
    n_embd: int | None = None  # None: the model preset's (baby: 128)
    vocab_size: int | None = None  # None: the data's (token files without meta: 50304)
    attention: str = "auto"  # GPTConfig.attention: cuDNN flash attention where it can run
    lr: float | None = None  # None: DEFAULT_LR[optimizer]
    min_lr: float | None = None  # None: lr / 10
    muon_lr: float = 1e-2
    muon_ns_steps: int = 5
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    z_loss_weight: float = 1e-4
    data: str | None = None
    seed: int = 1337
    eval_interval: int = 250
    eval_batches: int = 25
    eval_batch_size: int | None = None  # None: the model preset's (baby: 64)
    sample_chars: int = 300
    fp8_scaling: str = "current"
    loss_scale: str = "auto"
    ema_decay: float = 0.0
    eval_ema: bool = False
    mesh: str | None = None
    max_skips: int = 20
    target_loss: float | None = None

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose from {OPTIMIZERS}")
        if self.attention not in ATTENTION:
            raise ValueError(f"unknown attention {self.attention!r}; choose from {ATTENTION}")
        if self.model not in MODEL_PRESETS:
            raise ValueError(f"unknown model {self.model!r}; choose from {tuple(MODEL_PRESETS)}")
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
            "vocab_size",
            "eval_interval",
            "eval_batches",
            "eval_batch_size",
            "max_skips",
            "muon_ns_steps",
        ):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.target_loss is not None and not self.target_loss > 0:
            raise ValueError(f"target_loss must be a loss > 0, got {self.target_loss}")

    def resolved(self) -> tuple[RunConfig, str]:
        """This config with its defaults that depend on others filled in (the model's shape
        from :data:`MODEL_PRESETS`, ``lr`` from :data:`DEFAULT_LR`, ``min_lr = lr / 10``,
        ``precision="auto"`` by :func:`auto_precision`), and why the precision is what it is.

        Examples:
          >>> config, _ = RunConfig(model="gpt2-124m", block_size=128, precision="fp32").resolved()
          >>> config.n_layer, config.n_embd, config.block_size, config.lr
          (12, 768, 128, 0.003)
        """
        preset = MODEL_PRESETS[self.model]
        shape = {k: getattr(preset, k) for k in _PRESET_FIELDS if getattr(self, k) is None}
        lr = DEFAULT_LR[self.optimizer] if self.lr is None else self.lr
        min_lr = lr / 10 if self.min_lr is None else self.min_lr
        config = dataclasses.replace(self, lr=lr, min_lr=min_lr, **shape)
        if self.precision != AUTO:
            return config, "as given"
        preset, reason = auto_precision()
        return dataclasses.replace(config, precision=preset), reason


def load_precision(spec: str) -> Policy | PrecisionRules:
    """A preset or policy string, ``"auto"`` (:func:`auto_precision`), the path of a JSON
    rules file, or the JSON itself.

    Rules in JSON are ``{"rules": [[pattern, policy], ...], "default": policy}`` (``default``
    optional), e.g. ``{"rules": [["embed|ln_", "fp32"]], "default": "bf16-mixed"}``.
    """
    if spec == AUTO:
        spec = auto_precision()[0]
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


def build_optimizer(
    config: RunConfig, precision: Policy | PrecisionRules | None = None
) -> optax.GradientTransformation:
    """Gradient clipping, then AdamW (nanoGPT's recipe) or Muon + AdamW, on a cosine schedule;
    with ``precision``, :func:`~hybrid_jax.optim.with_precision` applies its policies' optimizer
    keys (master, grad, mu, nu, update) leaf by leaf."""
    config, _ = config.resolved()
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
            schedule,
            muon_learning_rate=muon_schedule,
            weight_decay=config.weight_decay,
            ns_steps=config.muon_ns_steps,
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
