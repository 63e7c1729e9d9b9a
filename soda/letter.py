"""LETTER's tokenizer losses: collaborative alignment and code diversity.

LETTER (Wang et al., "Learnable Item Tokenization for Generative Recommendation", CIKM 2024)
trains the RQ-VAE with two extra regularisers, then TIGER on its codes:

- collaborative alignment: an in-batch InfoNCE between each item's quantised latent ẑ_i
  and its collaborative-filtering embedding h_i (here SASRec's item embedding, trained on the
  same training split), inner-product scores:

      L_cf = −(1/B) Σ_i log( exp(ẑ_i · W h_i) / Σ_j exp(ẑ_i · W h_j) )

  SASRec's embeddings are 64-d and the latent 32-d, so a learned linear map W (no bias,
  trained with the tokenizer) carries h into the latent space. ẑ is the straight-through
  quantised latent (the decoder's input), so the gradient reaches the encoder.

- code diversity: each layer's codewords are clustered by k-means (10 clusters, redone every
  ``recluster_every`` tokenizer steps). For item i with codeword e = C[l, c_i], a random other
  codeword e⁺ of e's cluster is the positive and every codeword but e the candidates:

      L_div = Σ_l mean_i −log( exp(e · e⁺) / Σ_{k ≠ c_i} exp(e · C[l,k]) )

  which pulls codewords of one cluster together and pushes the clusters apart, so that items
  spread over more codes. An item whose codeword is alone in its cluster has no term.

The loss added to the RQ-VAE's is α·L_cf + β·L_div with LETTER's published α = 0.02, β = 1e-4.
LETTER's ranking-guided generation loss (a temperature on the recommender's softmax) is not
part of this backbone: the recommender is TIGER's, unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from soda.alignment import info_nce
from soda.tokenizer import Quantized, kmeans, nearest_code


@dataclass
class LETTERConfig:
    """LETTER's published weights and number of clusters (Wang et al., CIKM 2024, §4.1); how often
    the codewords are re-clustered and for how many k-means iterations are ours."""

    alignment_weight: float = 0.02  # α, collaborative alignment
    diversity_weight: float = 1e-4  # β, code diversity
    clusters: int = 10
    recluster_every: int = 10  # tokenizer steps
    kmeans_iterations: int = 20


class LETTERLosses(nn.Module):
    """α·collaborative alignment + β·code diversity, a ``RQVAE`` regularizer.

    cf_embeddings (N, H): the collaborative embeddings of items 1..N (row n is item n + 1).
    """

    def __init__(self, cf_embeddings: torch.Tensor, latent_dim: int, config: LETTERConfig):
        super().__init__()
        self.config = config
        self.register_buffer("cf_embeddings", cf_embeddings, persistent=False)
        self.projection = nn.Linear(cf_embeddings.shape[1], latent_dim, bias=False)
        self.register_buffer("clusters", torch.zeros(0, dtype=torch.long), persistent=False)
        self.steps = 0

    def forward(self, quantized: Quantized, rows: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
        """quantized: the tokenizer's pass over items ``rows`` (B,), distinct; codebooks (L, K, d) -> scalar."""
        if self.steps % self.config.recluster_every == 0:
            self.clusters = cluster_codewords(codebooks, self.config.clusters, self.config.kmeans_iterations)
        self.steps += 1
        alignment = collaborative_alignment(quantized.straight_through, self.projection(self.cf_embeddings[rows]))
        diversity = diversity_loss(codebooks, quantized.codes, self.clusters)
        return self.config.alignment_weight * alignment + self.config.diversity_weight * diversity


def collaborative_alignment(quantized_latents: torch.Tensor, cf_latents: torch.Tensor) -> torch.Tensor:
    """L_cf: in-batch InfoNCE, inner product, item i's positive is its own CF latent: (B, d), (B, d) -> scalar."""
    return info_nce(quantized_latents @ cf_latents.T)


@torch.no_grad()
def cluster_codewords(codebooks: torch.Tensor, clusters: int, iterations: int) -> torch.Tensor:
    """k-means of each layer's codewords: codebooks (L, K, d) -> cluster of each codeword (L, K)."""
    return torch.stack(
        [nearest_code(codebook, kmeans(codebook.detach(), clusters, iterations)) for codebook in codebooks]
    )


def diversity_positives(codes: torch.Tensor, clusters: torch.Tensor) -> torch.Tensor:
    """A uniformly random other codeword of each chosen codeword's cluster: codes (B, L), clusters (L, K)
    -> (B, L) codeword indices, −1 where the chosen codeword is alone in its cluster."""
    own_cluster = clusters.gather(1, codes.T).T  # (B, L)
    candidates = clusters[None] == own_cluster[..., None]  # (B, L, K)
    candidates.scatter_(2, codes[..., None], False)
    draws = torch.rand(candidates.shape, device=codes.device).masked_fill(~candidates, -1.0)
    best, positives = draws.max(dim=2)
    return positives.masked_fill(best < 0, -1)


def diversity_loss(codebooks: torch.Tensor, codes: torch.Tensor, clusters: torch.Tensor) -> torch.Tensor:
    """L_div: codebooks (L, K, d), the items' codes (B, L), the codeword clusters (L, K) -> scalar."""
    positives = diversity_positives(codes, clusters)
    total = codebooks.new_zeros(())
    for layer, codebook in enumerate(codebooks):
        anchors = codebook[codes[:, layer]]  # (B, d)
        logits = (anchors @ codebook.T).scatter(1, codes[:, layer, None], float("-inf"))  # the anchor itself
        terms = F.cross_entropy(logits, positives[:, layer], ignore_index=-1, reduction="sum")
        total = total + terms / (positives[:, layer] >= 0).sum().clamp(min=1)
    return total
