"""Joint tokenizer + recommender training with alignment terms, and SODA's term.

``JointModel`` trains a TIGER recommender and its RQ-VAE tokenizer together, alternating by
epoch (``Schedule.phase``):

    warm-up     recommender only, no alignment
    cycles      one tokenizer epoch  (recommender frozen; RQ-VAE loss + Σ weight·alignment),
                then recommender epochs (tokenizer frozen; code cross-entropy + Σ weight·alignment),
                a fixed number of times
    frozen      recommender epochs with the tokenizer frozen (+ Σ weight·alignment) to the end of
                the run: its epoch budget, or early stopping on validation (as ETEGRec finetunes)

After a tokenizer epoch the items' semantic IDs are re-derived and the trie rebuilt. The
alignment terms (each a module with a ``weight``) see one ``JointBatch``: the encoder states, the
distinct target items and the tokenizer's quantisation of them. The backbones:

    TIGER + SODA     [SODA]                       on RunConfig.schedule      (``SODA``)
    LETTER + SODA    the same, the tokenizer with LETTER's losses            (``SODA``)
    ETEGRec          [SIA, PSA]                   on ETEGRec's schedule      (``soda.etegrec``)
    ETEGRec + SODA   [SIA, PSA, SODA]             on ETEGRec's schedule

SODA, Semantic-Oriented Distributional Alignment (arXiv 2603.00700, RecSys 2026), as a switch
on a backbone. The user latent is the mean-pooled encoder states through an
MLP into one d-vector per layer, residual-quantised through the tokenizer's codebooks
(``RQVAE.layer_residuals``); the target items' residuals come from the tokenizer and are
differentiable in its encoder and codebooks. Both go through the same codebooks into
per-layer code distributions, and

    alignment = soda_kernels.distributional_bpr(user_residuals, item_residuals, codebooks, positives)

(negative KL as the BPR score, in-batch negatives) is added with weight λ to whichever side is
training, or to one side only (``SODAConfig.side``): "recommender" (on TIGER and LETTER the
tokenizer then never trains, so the codes never change) or "tokenizer" (the user head still
learns to read the encoder in recommender epochs, but no gradient of the term reaches the encoder).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import soda_kernels as sk
from soda.recommender import TIGER, mean_pool
from soda.tokenizer import RQVAE, Quantized, TokenizerConfig, mlp

TOKENIZER, RECOMMENDER = "tokenizer", "recommender"


@dataclass
class Schedule:
    """The alternation of a joint run, by epoch: warm-up, ``cycles`` cycles, then frozen to the end."""

    warmup_epochs: int = 1  # recommender only, no alignment
    cycles: int = 2  # each one tokenizer epoch, then cycle_length - 1 recommender epochs
    cycle_length: int = 2
    # The tokenizer's peak learning rate in its epochs (the recommender keeps TrainConfig.lr): at the
    # recommender's rate (3e-3 in the CPU preset) one tokenizer epoch re-derives most items' codes
    # and the frozen recommender's validation Recall@10 falls by three quarters.
    tokenizer_lr: float = 1e-4

    def __post_init__(self):
        if self.cycle_length < 2:
            raise ValueError(
                f"cycle_length must be at least 2 (a tokenizer and a recommender epoch), got {self.cycle_length}"
            )
        if self.warmup_epochs < 0 or self.cycles < 0:
            raise ValueError("warmup_epochs and cycles must be non-negative")

    @property
    def alternation_epochs(self) -> int:
        """The epochs before the frozen phase: warm-up and cycles."""
        return self.warmup_epochs + self.cycles * self.cycle_length

    def epochs(self, recommender_epochs: int) -> int:
        """The length of a joint run whose recommender trains recommender_epochs epochs, as a plain
        backbone's does: the tokenizer epochs (one per cycle that has a recommender epoch after
        it) come on top, so a joint model and its base model get the same recommender budget."""
        after_warmup = max(0, recommender_epochs - self.warmup_epochs)
        return recommender_epochs + min(self.cycles, math.ceil(after_warmup / (self.cycle_length - 1)))

    def phase(self, epoch: int) -> tuple[str, bool]:
        """Which side trains in epoch (0-based), and whether the alignment loss is on."""
        if epoch < self.warmup_epochs:
            return RECOMMENDER, False
        if epoch >= self.alternation_epochs:
            return RECOMMENDER, True
        return (TOKENIZER if (epoch - self.warmup_epochs) % self.cycle_length == 0 else RECOMMENDER), True


SIDES = ("both", RECOMMENDER, TOKENIZER)


@dataclass
class SODAConfig:
    """The SODA switch. The paper fixes the loss (BPR on negative KL between code distributions)
    and the alternation; λ, the temperature, the in-batch mode, the KL direction, the side the term
    trains and the schedule (``Schedule``, not part of this config) are its open choices, offered
    here (see soda_kernels.distributional_bpr)."""

    weight: float = 0.1  # λ
    temperature: float = 1.0
    in_batch: str = "items"  # items | users | both | mean
    symmetric: bool = False
    side: str = "both"  # both | recommender | tokenizer: whose objective the term joins
    backend: str = "auto"  # soda_kernels backend: auto | triton | torch
    user_hidden: int = 256  # the user MLP: d_model -> user_hidden -> L·d

    def __post_init__(self):
        if self.side not in SIDES:
            raise ValueError(f"side must be one of {', '.join(SIDES)}, got {self.side!r}")


@dataclass
class JointBatch:
    """What the alignment terms of one step share.

    states (B, T, d_model), mask (B, T): the recommender's encoder over the histories;
    items (U,): the distinct target items; positives (B,): each row's target as an index into items;
    quantized: the tokenizer's residual quantisation of the items' latents (U rows), differentiable
    in the tokenizer during its epochs.
    """

    states: torch.Tensor
    mask: torch.Tensor
    items: torch.Tensor
    positives: torch.Tensor
    quantized: Quantized


class JointModel(nn.Module):
    """TIGER and its RQ-VAE trained together, alternating by ``schedule``; a recommender for ``fit``.

    item_embeddings (N, D): the semantic embeddings of items 1..N (the tokenizer's input);
    alignments: modules with a ``weight`` and ``forward(model, batch: JointBatch) -> scalar``,
    whose own parameters (heads over the encoder states) train with the recommender.
    """

    def __init__(
        self,
        recommender: TIGER,
        tokenizer: RQVAE,
        item_embeddings: torch.Tensor,
        schedule: Schedule,
        alignments: list[nn.Module],
    ):
        super().__init__()
        self.schedule = schedule
        self.recommender, self.tokenizer = recommender, tokenizer
        self.alignments = nn.ModuleList(alignments)
        self.register_buffer("item_embeddings", item_embeddings, persistent=False)
        self.phase, self.align = RECOMMENDER, False
        self.codes_stale = False  # the tokenizer changed since the recommender's codes were derived
        self.register_load_state_dict_post_hook(lambda module, _: setattr(module, "codes_stale", True))

    def start_epoch(self, epoch: int) -> None:
        """Set the phase of this epoch and freeze the side that does not train."""
        self.refresh_codes()
        self.phase, self.align = self.schedule.phase(epoch)
        self.tokenizer.requires_grad_(self.phase == TOKENIZER)
        for side in (self.recommender, self.alignments):
            side.requires_grad_(self.phase == RECOMMENDER)

    def param_groups(self) -> list[dict]:
        """AdamW groups: the tokenizer at ``schedule.tokenizer_lr``, the rest at the trainer's rate."""
        tokenizer = list(self.tokenizer.parameters())
        rest = [p for p in self.parameters() if all(p is not q for q in tokenizer)]
        return [{"params": rest}, {"params": tokenizer, "peak_lr": self.schedule.tokenizer_lr}]

    @torch.no_grad()
    def refresh_codes(self) -> None:
        """Re-derive the items' semantic IDs from the tokenizer and rebuild the trie, if it changed."""
        if self.codes_stale:
            self.recommender.set_semantic_ids(self.tokenizer.semantic_ids(self.item_embeddings))
            self.codes_stale = False

    def loss(self, histories: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The training side's loss (+ Σ weight·alignment): histories (B, T), targets (B,) -> scalar."""
        states, mask = self.recommender.encode(histories)
        items, positives = targets.unique(return_inverse=True)  # a repeated target is one item
        rows = items - 1
        if self.phase == TOKENIZER:
            loss, quantized = self.tokenizer(self.item_embeddings[rows], rows)
            self.codes_stale = True
        else:
            loss = self.recommender.decoder_loss(states, mask, targets)
            if not self.align:
                return loss
            with torch.no_grad():
                quantized = self.tokenizer.quantize(self.tokenizer.encoder(self.item_embeddings[rows]))
        batch = JointBatch(states, mask, items, positives, quantized)
        return loss + sum(term.weight * term(self, batch) for term in self.alignments)

    @torch.no_grad()
    def recommend(self, histories: torch.Tensor, k: int) -> torch.Tensor:
        """TIGER's constrained beam search over the current codes: (B, T) -> (B, k)."""
        self.refresh_codes()
        return self.recommender.recommend(histories, k)


class SODAAlignment(nn.Module):
    """SODA's term: distributional BPR between the user latent's and the target items' code distributions."""

    def __init__(self, d_model: int, tokenizer_config: TokenizerConfig, config: SODAConfig):
        super().__init__()
        self.config, self.weight = config, config.weight
        self.layers, self.latent_dim = tokenizer_config.num_layers, tokenizer_config.latent_dim
        self.user_head = mlp([d_model, config.user_hidden, self.layers * self.latent_dim])

    def user_residuals(self, tokenizer: RQVAE, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Encoder states (B, T, d_model) and mask (B, T) -> per-layer user residuals (B, L, d)."""
        latents = self.user_head(mean_pool(states, mask)).unflatten(-1, (self.layers, self.latent_dim))
        return tokenizer.layer_residuals(latents)

    def forward(self, model: JointModel, batch: JointBatch) -> torch.Tensor:
        states = batch.states
        if model.phase == TOKENIZER and self.config.side == RECOMMENDER:
            return states.new_zeros(())
        if model.phase == RECOMMENDER and self.config.side == TOKENIZER:
            states = states.detach()  # the term trains the user head, not the encoder
        # data-parallel: every rank aligns the global batch (on one process, the batch as it is)
        user_residuals, item_residuals, positives = sk.gather_in_batch(
            self.user_residuals(model.tokenizer, states, batch.mask),
            batch.quantized.residuals,
            batch.positives,
            item_ids=batch.items,
        )
        return sk.distributional_bpr(
            user_residuals,
            item_residuals,
            model.tokenizer.codebooks,
            positives,
            in_batch=self.config.in_batch,
            symmetric=self.config.symmetric,
            temperature=self.config.temperature,
            backend=self.config.backend,
        )


class SODA(JointModel):
    """TIGER + SODA on ``schedule`` (LETTER + SODA: a tokenizer with LETTER's losses)."""

    def __init__(
        self,
        recommender: TIGER,
        tokenizer: RQVAE,
        item_embeddings: torch.Tensor,
        config: SODAConfig,
        schedule: Schedule,
    ):
        alignment = SODAAlignment(recommender.config.d_model, tokenizer.config, config)
        super().__init__(recommender, tokenizer, item_embeddings, schedule, [alignment])


def info_nce(scores: torch.Tensor, same_item: torch.Tensor | None = None) -> torch.Tensor:
    """In-batch InfoNCE with the positives on the diagonal: scores (B, B) -> scalar,

        mean_b −log( exp(scores[b, b]) / Σ_m exp(scores[b, m]) )

    the sum over m leaving out the columns m ≠ b where same_item (B, B) is True (another row
    of the same item is no negative)."""
    diagonal = torch.arange(len(scores), device=scores.device)
    if same_item is not None:
        scores = scores.masked_fill(same_item & (diagonal[:, None] != diagonal), float("-inf"))
    return F.cross_entropy(scores, diagonal)
