"""Multi-loss training: LM loss terms, weightings (fixed, scheduled, adaptive), gradient mixing."""

from hybrid_jax.losses.adaptive import DWA, DWAState, Uncertainty
from hybrid_jax.losses.mixing import Mixer, PCGrad, Sum, gram_matrix, term_gradients
from hybrid_jax.losses.terms import cross_entropy, lm_terms, z_loss
from hybrid_jax.losses.weighting import Weighted, Weighting, weighted_sum

__all__ = [
    "DWA",
    "DWAState",
    "Mixer",
    "PCGrad",
    "Sum",
    "Uncertainty",
    "Weighted",
    "Weighting",
    "cross_entropy",
    "gram_matrix",
    "lm_terms",
    "term_gradients",
    "weighted_sum",
    "z_loss",
]
