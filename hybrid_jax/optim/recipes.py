"""Optimizer recipes as readable path rules: Muon + AdamW, layer-wise LR decay, freezing."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import optax

from hybrid_jax.optim.by_path import Rules, by_path
from hybrid_jax.optim.muon import muon
from hybrid_jax.tree import map_with_path

Schedule = float | Callable[[int], float]

#: Path patterns of the GPT's parameter kinds (hybrid_jax.models naming; nanoGPT-like). Each is a
#: regular expression searched in the leaf path; override them to fit another model.
EMBEDDING = r"(^|/)(tok|pos)_embed/|(^|/)embed(ding)?s?/"
HEAD = r"(^|/)lm_head/"
GAIN_OR_BIAS = r"(^|/)(ln_\w+|norm\w*)/|(^|/)bias$"
HIDDEN_MATRIX = r"(^|/)blocks/\d+/.*kernel$"


def muon_adamw_rules(
    learning_rate: Schedule = 1e-3,
    *,
    muon_learning_rate: Schedule | None = None,
    weight_decay: float = 0.1,
    b1: float = 0.9,
    b2: float = 0.99,
    muon_beta: float = 0.95,
    consistent_rms: float | None = 0.2,
    ns_steps: int = 5,
    ns_dtype=None,
    mu_dtype=None,
) -> list[tuple[str, optax.GradientTransformation]]:
    """The rules of :func:`muon_adamw`, to read, edit and pass to :func:`by_path`.

    In order: embeddings, the output head, norm gains and biases (one rule) get Adam without
    weight decay; the hidden 2-D weight matrices of the transformer blocks get Muon, with
    decoupled weight decay. Only the hidden matrices decay: decay on an embedding pulls the
    vectors of rare tokens, which get few gradients, towards zero, and a tied head is the token
    embedding. An untied head is treated like the tied one, so that tying the embeddings does
    not change how the output projection is regularized (as in modded-nanogpt, the Muon
    speedrun, where the embeddings, the head and the scalars get Adam without decay).
    A leaf that none of the rules matches is an error, so a new kind of parameter is never
    optimized by accident.
    The patterns are :data:`EMBEDDING`, :data:`HEAD`, :data:`GAIN_OR_BIAS` and
    :data:`HIDDEN_MATRIX`; which leaf is which is decided by path, not by ``ndim`` (an embedding
    is 2-D too).

    Args:
      learning_rate: Adam's learning rate (a number or an Optax schedule).
      muon_learning_rate: Muon's; by default ``learning_rate``, which fits because
        ``consistent_rms`` matches Muon's update RMS to AdamW's (Liu et al. 2025).
      weight_decay: decoupled weight decay of the hidden matrices (the Muon group).
      b1, b2: Adam's moment decays.
      muon_beta: Muon's momentum.
      consistent_rms: Muon's update RMS target (``None``: Keller Jordan's width scaling).
      ns_steps, ns_dtype: Muon's Newton-Schulz iterations and the dtype of their products'
        inputs (:func:`~hybrid_jax.optim.muon.newton_schulz`).
      mu_dtype: dtype of the first moments (e.g. ``jnp.bfloat16``); see also
        :func:`~hybrid_jax.optim.with_state_dtype` for every moment.

    Returns:
      ``[(pattern, transformation), ...]``: two rules, Adam's first.

    Examples:
      >>> [pattern == HIDDEN_MATRIX for pattern, _ in muon_adamw_rules()]
      [False, True]

    References:
      Jordan et al., 2024, `Muon: An optimizer for hidden layers in neural networks
      <https://kellerjordan.github.io/posts/muon/>`_; Jordan et al., 2024, `modded-nanogpt
      <https://github.com/KellerJordan/modded-nanogpt>`_; Liu et al., 2025, `Muon is Scalable
      for LLM Training <https://arxiv.org/abs/2502.16982>`_.
    """
    muon_lr = learning_rate if muon_learning_rate is None else muon_learning_rate
    return [
        # One rule for all of them, so that a model with a tied head (no lm_head) leaves none
        # unused.
        (
            f"{EMBEDDING}|{HEAD}|{GAIN_OR_BIAS}",
            optax.adam(learning_rate, b1=b1, b2=b2, mu_dtype=mu_dtype),
        ),
        (
            HIDDEN_MATRIX,
            muon(
                muon_lr,
                beta=muon_beta,
                weight_decay=weight_decay,
                consistent_rms=consistent_rms,
                ns_steps=ns_steps,
                ns_dtype=ns_dtype,
                mu_dtype=mu_dtype,
            ),
        ),
    ]


def muon_adamw(learning_rate: Schedule = 1e-3, **kwargs) -> optax.GradientTransformationExtraArgs:
    """Muon with weight decay on the hidden matrices; Adam without decay on every other leaf.

    ``by_path(muon_adamw_rules(learning_rate, **kwargs))``; see :func:`muon_adamw_rules` for the
    rules and arguments.

    Examples:
      >>> params = {"tok_embed": {"embedding": jnp.ones((8, 4))},
      ...           "blocks": [{"mlp": {"fc": {"kernel": jnp.ones((4, 4)), "bias": jnp.ones(4)}}}],
      ...           "lm_head": {"kernel": jnp.ones((4, 8))}}
      >>> tx = muon_adamw(1e-3, weight_decay=0.1)
      >>> zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
      >>> updates, _ = tx.update(zeros, tx.init(params), params)  # weight decay alone
      >>> bool(updates["tok_embed"]["embedding"].any()), bool(updates["lm_head"]["kernel"].any())
      (False, False)
      >>> round(float(updates["blocks"][0]["mlp"]["fc"]["kernel"][0, 0]), 6)
      -0.0001

    References:
      Jordan et al., 2024, `Muon: An optimizer for hidden layers in neural networks
      <https://kellerjordan.github.io/posts/muon/>`_.
    """
    return by_path(muon_adamw_rules(learning_rate, **kwargs))


def frozen(patterns: str | Sequence[str]) -> Rules:
    """Rules that freeze the leaves matching ``patterns``: zero updates, no optimizer state.

    Put them first in a rule list, so that they win over later rules.

    Examples:
      >>> tx = by_path([*frozen(r"tok_embed/"), (r".", optax.adam(1e-3))])
    """
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    return [(pattern, optax.set_to_zero()) for pattern in patterns]


def scale_by_path(factor: Callable[[str], float]) -> optax.GradientTransformation:
    """Multiplies each leaf's update by ``factor(path)``, a Python number fixed at trace time.

    Stateless. After any Optax optimizer whose learning rate is its last multiplier (all of
    Optax's aliases), this is a per-leaf learning rate.
    """

    def update_fn(updates, state, params=None):
        del params
        return map_with_path(lambda path, u: u * factor(path), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def layerwise_lr_decay(
    decay: float,
    n_blocks: int,
    *,
    block_pattern: str = r"(^|/)blocks/(?P<index>\d+)/",
    embedding_pattern: str = EMBEDDING,
) -> optax.GradientTransformation:
    """Layer-wise learning-rate decay: block ``k`` of ``n`` learns at ``decay ** (n - k)``.

    Chain it after an optimizer: ``optax.chain(optax.adamw(lr), layerwise_lr_decay(0.8, 4))``
    gives block ``k`` (0-based, the index the path rule extracts) the learning rate
    ``lr * decay ** (n - k)``, embeddings ``lr * decay ** (n + 1)`` and every other leaf (final
    norm, head) ``lr``, as BEiT does. Since Optax applies the learning rate last, scaling the
    update is the same as scaling the learning rate, weight decay included.

    Args:
      decay: the factor per block, in (0, 1].
      n_blocks: the number of blocks ``n``.
      block_pattern: a regular expression with a group named ``index`` that extracts the block
        index from the path.
      embedding_pattern: the leaves below the first block.

    Returns:
      A stateless ``optax.GradientTransformation``.

    Raises:
      ValueError: a bad ``decay``, a pattern without an ``index`` group, or a path whose block
        index is not below ``n_blocks``.

    References:
      Bao et al., 2021, `BEiT: BERT Pre-Training of Image Transformers
      <https://arxiv.org/abs/2106.08254>`_; Clark et al., 2020, ELECTRA.
    """
    if not 0 < decay <= 1:
        raise ValueError(f"decay must be in (0, 1], got {decay}")
    block = re.compile(block_pattern)
    if "index" not in block.groupindex:
        raise ValueError(
            f"block_pattern {block_pattern!r} needs a group named 'index', as in (?P<index>\\d+)"
        )
    embedding = re.compile(embedding_pattern)

    def factor(path: str) -> float:
        match = block.search(path)
        if match:
            k = int(match.group("index"))
            if not 0 <= k < n_blocks:
                raise ValueError(f"leaf {path!r} is in block {k}, but n_blocks={n_blocks}")
            return decay ** (n_blocks - k)
        if embedding.search(path):
            return decay ** (n_blocks + 1)
        return 1.0

    return scale_by_path(factor)
