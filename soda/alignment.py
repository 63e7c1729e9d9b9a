"""SODA: distributional alignment between the recommender's users and the tokenizer's items.

Semantic-Oriented Distributional Alignment (arXiv 2603.00700, RecSys 2026), as a switch
on a backbone (here TIGER). The user latent is the mean-pooled encoder states through an
MLP into one d-vector per layer, residual-quantised through the tokenizer's codebooks
(``RQVAE.layer_residuals``); the target items' residuals come from the tokenizer and are
differentiable in its encoder and codebooks. Both go through the same codebooks into
per-layer code distributions, and

    alignment = soda_kernels.distributional_bpr(user_residuals, item_residuals, codebooks, positives)

(negative KL as the BPR score, in-batch negatives) is added with weight λ to whichever
side is training. Training alternates by epoch (``SODAConfig.phase``):

    warm-up     recommender only, no alignment
    cycles      one tokenizer epoch  (recommender frozen; RQ-VAE loss + λ·alignment),
                then recommender epochs (tokenizer frozen; code cross-entropy + λ·alignment)
    final       recommender epochs with the tokenizer frozen (+ λ·alignment)

After a tokenizer epoch the items' semantic IDs are re-derived and the trie rebuilt.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

import soda_kernels as sk
from soda.recommender import TIGER, mean_pool
from soda.tokenizer import RQVAE, mlp

TOKENIZER, RECOMMENDER = "tokenizer", "recommender"


@dataclass
class SODAConfig:
    """The SODA switch. The paper fixes the loss (BPR on negative KL between code distributions)
    and the alternation; λ, the temperature, the in-batch mode, the KL direction and the schedule
    are its open choices, offered here (see soda_kernels.distributional_bpr)."""

    weight: float = 0.1  # λ
    temperature: float = 1.0
    in_batch: str = "items"  # items | users | both | mean
    symmetric: bool = False
    backend: str = "auto"  # soda_kernels backend: auto | triton | torch
    user_hidden: int = 256  # the user MLP: d_model -> user_hidden -> L·d
    warmup_epochs: int = 1  # recommender only, no alignment
    cycle_length: int = 2  # one tokenizer epoch, then cycle_length - 1 recommender epochs
    final_frozen_epochs: int = 1  # recommender with the tokenizer frozen, at the end

    def phase(self, epoch: int, epochs: int) -> tuple[str, bool]:
        """Which side trains in epoch (0-based) of epochs, and whether the alignment loss is on."""
        if epoch < self.warmup_epochs:
            return RECOMMENDER, False
        if epoch >= epochs - self.final_frozen_epochs:
            return RECOMMENDER, True
        return (TOKENIZER if (epoch - self.warmup_epochs) % self.cycle_length == 0 else RECOMMENDER), True


class SODA(nn.Module):
    """TIGER + its RQ-VAE trained together with the alignment loss; a recommender for ``fit``.

    item_embeddings (N, D): the semantic embeddings of items 1..N (the tokenizer's input).
    """

    def __init__(self, recommender: TIGER, tokenizer: RQVAE, item_embeddings: torch.Tensor, config: SODAConfig):
        super().__init__()
        self.config = config
        self.recommender, self.tokenizer = recommender, tokenizer
        self.layers, self.latent_dim = tokenizer.config.num_layers, tokenizer.config.latent_dim
        self.user_head = mlp([recommender.config.d_model, config.user_hidden, self.layers * self.latent_dim])
        self.register_buffer("item_embeddings", item_embeddings, persistent=False)
        self.phase, self.align = RECOMMENDER, False
        self.codes_stale = False  # the tokenizer changed since the recommender's codes were derived
        self.register_load_state_dict_post_hook(lambda module, _: setattr(module, "codes_stale", True))

    def start_epoch(self, epoch: int, epochs: int) -> None:
        """Set the phase of this epoch and freeze the side that does not train."""
        self.refresh_codes()
        self.phase, self.align = self.config.phase(epoch, epochs)
        self.tokenizer.requires_grad_(self.phase == TOKENIZER)
        for side in (self.recommender, self.user_head):
            side.requires_grad_(self.phase == RECOMMENDER)

    @torch.no_grad()
    def refresh_codes(self) -> None:
        """Re-derive the items' semantic IDs from the tokenizer and rebuild the trie, if it changed."""
        if self.codes_stale:
            self.recommender.set_semantic_ids(self.tokenizer.semantic_ids(self.item_embeddings))
            self.codes_stale = False

    def user_residuals(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Encoder states (B, T, d_model) and mask (B, T) -> per-layer user residuals (B, L, d)."""
        latents = self.user_head(mean_pool(states, mask)).unflatten(-1, (self.layers, self.latent_dim))
        return self.tokenizer.layer_residuals(latents)

    def loss(self, histories: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The training side's loss (+ λ·alignment): histories (B, T), targets (B,) -> scalar."""
        states, mask = self.recommender.encode(histories)
        items, positives = targets.unique(return_inverse=True)  # a repeated target is one item
        if self.phase == TOKENIZER:
            loss, quantized = self.tokenizer(self.item_embeddings[items - 1])
            self.codes_stale = True
        else:
            loss = self.recommender.decoder_loss(states, mask, targets)
            if not self.align:
                return loss
            with torch.no_grad():
                quantized = self.tokenizer.quantize(self.tokenizer.encoder(self.item_embeddings[items - 1]))
        alignment = sk.distributional_bpr(
            self.user_residuals(states, mask),
            quantized.residuals,
            self.tokenizer.codebooks,
            positives,
            in_batch=self.config.in_batch,
            symmetric=self.config.symmetric,
            temperature=self.config.temperature,
            backend=self.config.backend,
        )
        return loss + self.config.weight * alignment

    @torch.no_grad()
    def recommend(self, histories: torch.Tensor, k: int) -> torch.Tensor:
        """TIGER's constrained beam search over the current codes: (B, T) -> (B, k)."""
        self.refresh_codes()
        return self.recommender.recommend(histories, k)
