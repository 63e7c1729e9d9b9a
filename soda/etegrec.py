"""ETEGRec: the tokenizer and the recommender trained end to end, alternating, with two alignments.

ETEGRec (Liu et al., "Generative Recommender with End-to-End Learnable Item Tokenization",
SIGIR 2025) is a ``JointModel`` with two alignment terms, each added to whichever side trains:

- sequence-item alignment (SIA): the user latent z_u = MLP(mean-pooled encoder states), one
  d-vector, is residual-quantised through the tokenizer's codebooks like an item latent; at every
  layer both it and the target item's latent get a soft assignment p_k = softmax_k(−‖r − C[l,k]‖²/τ)
  (``sk.codebook_log_softmax``: the nearer codeword, the higher the probability; ETEGRec's
  public code has the opposite sign, softmax of +distance, which is not what the paper says), and

      L_SIA = mean_b Σ_l [ KL(P_b^l ‖ Q_b^l) + KL(Q_b^l ‖ P_b^l) ]

- preference-semantic alignment (PSA): the decoder's first state h_b (at BOS, a linear map into
  the item-embedding space) against the target item's reconstruction ẑ_b by the tokenizer's
  decoder, cosine similarity over τ = 0.07, InfoNCE with the in-batch negatives both ways:

      L_PSA = InfoNCE(h → ẑ) + InfoNCE(ẑ → h)      (another row of the same item is no negative)

Published weights: 1e-4 (SIA) and 3e-4 (PSA), both inside the paper's tuning range {1e-4 .. 5e-3};
the tokenizer's learning rate 1e-4 (range {5e-5, 1e-4, 5e-4}). The schedule (``Schedule``):
alignment-free warm-up epochs that train the recommender only, then cycles of one tokenizer epoch
and cycle_length − 1 = 1 recommender epoch, then a finetune of the recommender with the tokenizer
frozen until validation stops improving (ETEGRec's code alternates until early stopping, then
finetunes from the best checkpoint; here the number of cycles is fixed). As in the paper (§4.1.4)
the tokenizer reads the item embeddings of a trained SASRec (``item_embeddings="sasrec"``; the
paper's are 256-d, ours SASRec's hidden size) and is pre-trained on them first (the plain
RQ-VAE). With ``soda``, SODA's term joins the two, on ETEGRec's schedule.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from soda.alignment import JointBatch, JointModel, Schedule, SODAAlignment, SODAConfig, info_nce
from soda.recommender import TIGER, mean_pool
from soda.tokenizer import RQVAE, mlp


@dataclass
class ETEGRecConfig:
    """ETEGRec's alignment weights, PSA temperature, cycle of 2 and tokenizer learning rate (Liu et
    al., SIGIR 2025) and its input, SASRec's item embeddings; the number of warm-up epochs and
    cycles, the SIA temperature and the user MLP are ours."""

    schedule: Schedule = field(default_factory=lambda: Schedule(warmup_epochs=10, cycles=20, cycle_length=2))
    item_embeddings: str = "sasrec"  # the tokenizer's input: sasrec | text
    sia_weight: float = 1e-4
    psa_weight: float = 3e-4
    sia_temperature: float = 1.0
    psa_temperature: float = 0.07
    user_hidden: int = 256  # the SIA user MLP: d_model -> user_hidden -> d
    backend: str = "auto"  # soda_kernels backend of the soft assignments: auto | triton | torch

    def __post_init__(self):
        if self.item_embeddings not in ("sasrec", "text"):
            raise ValueError(f"item_embeddings must be sasrec or text, got {self.item_embeddings!r}")


class SequenceItemAlignment(nn.Module):
    """L_SIA: symmetric KL, summed over layers, between the user latent's and the target item's codes."""

    def __init__(self, d_model: int, latent_dim: int, config: ETEGRecConfig):
        super().__init__()
        self.config, self.weight = config, config.sia_weight
        self.user_head = mlp([d_model, config.user_hidden, latent_dim])

    def forward(self, model: JointModel, batch: JointBatch) -> torch.Tensor:
        tokenizer, tau, backend = model.tokenizer, self.config.sia_temperature, self.config.backend
        user_residuals = tokenizer.quantize(self.user_head(mean_pool(batch.states, batch.mask))).residuals
        log_q = tokenizer.code_log_probs(user_residuals, tau, backend)  # (B, L, K)
        log_p = tokenizer.code_log_probs(batch.quantized.residuals, tau, backend)[batch.positives]
        # KL(P‖Q) + KL(Q‖P) = Σ_k (p_k − q_k)(log p_k − log q_k)
        return ((log_p.exp() - log_q.exp()) * (log_p - log_q)).sum(dim=(1, 2)).mean()


class PreferenceSemanticAlignment(nn.Module):
    """L_PSA: two-way in-batch InfoNCE between the decoder's first state and the item's reconstruction."""

    def __init__(self, d_model: int, embedding_dim: int, config: ETEGRecConfig):
        super().__init__()
        self.config, self.weight = config, config.psa_weight
        self.projection = nn.Linear(d_model, embedding_dim)

    def forward(self, model: JointModel, batch: JointBatch) -> torch.Tensor:
        preferences = F.normalize(
            self.projection(model.recommender.first_decoder_state(batch.states, batch.mask)), dim=-1
        )
        items = F.normalize(model.tokenizer.reconstruct(batch.quantized), dim=-1)[batch.positives]
        scores = preferences @ items.T / self.config.psa_temperature  # (B, B)
        same_item = batch.positives[:, None] == batch.positives[None, :]
        return info_nce(scores, same_item) + info_nce(scores.T, same_item)


class ETEGRec(JointModel):
    """ETEGRec: TIGER + its RQ-VAE with SIA and PSA on ETEGRec's schedule (+ SODA's term with ``soda``).

    item_embeddings (N, D): the semantic embeddings of items 1..N (the tokenizer's input).
    """

    def __init__(
        self,
        recommender: TIGER,
        tokenizer: RQVAE,
        item_embeddings: torch.Tensor,
        config: ETEGRecConfig,
        soda: SODAConfig | None = None,
    ):
        d_model = recommender.config.d_model
        alignments = [
            SequenceItemAlignment(d_model, tokenizer.config.latent_dim, config),
            PreferenceSemanticAlignment(d_model, item_embeddings.shape[1], config),
        ]
        if soda is not None:
            alignments.append(SODAAlignment(d_model, tokenizer.config, soda))
        super().__init__(recommender, tokenizer, item_embeddings, config.schedule, alignments)
