"""SODA kernels: fused Triton kernels for distributional alignment in generative recommendation.

Public API (the mathematics of every function: docs/maths.md)::

    import soda_kernels as sk
    sk.codebook_log_softmax(x, codebooks, temperature=1.0)
    sk.pairwise_kl(p_logits, q_logits, layer_weights=None)
    sk.distributional_bpr(user, items, codebooks, positives, negatives=None, ...)
    sk.DistributionalBPRLoss(**options)
    sk.distributional_topk(user, items, codebooks, k, exclude=None, ...)   # retrieval, -> (scores, indices)
    sk.ItemDistributions.from_items(items, codebooks, temperature=1.0)     # a catalogue, precomputed once
    sk.gather_in_batch(user, items, positives, item_ids=None, group=None)   # data-parallel in-batch
"""

from .api import (
    DistributionalBPRLoss,
    ItemDistributions,
    codebook_log_softmax,
    distributional_bpr,
    distributional_topk,
    pairwise_kl,
)
from .distributed import gather_in_batch

__all__ = [
    "codebook_log_softmax", "pairwise_kl", "distributional_bpr", "DistributionalBPRLoss", "distributional_topk",
    "ItemDistributions", "gather_in_batch",
]
__version__ = "0.1.0"
