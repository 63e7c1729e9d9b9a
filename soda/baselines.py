"""Baselines on the same split and metrics: MostPop and SASRec.

Both follow the protocols of ``soda.train``: MostPop is a ``Recommender`` (it only ranks),
SASRec a ``Trainable``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from soda.data import PAD, Examples


class MostPop(nn.Module):
    """Recommends the items seen most often in training to everyone."""

    def __init__(self, train: Examples, num_items: int):
        super().__init__()
        # Every training item is some example's target, except each user's first item,
        # which is the whole history of that user's first example.
        first_items = train.histories[(train.histories != PAD).sum(1) == 1, -1]
        counts = torch.bincount(torch.cat([train.targets, first_items]), minlength=num_items + 1).float()
        counts[PAD] = -1.0
        self.register_buffer("ranking", counts.argsort(descending=True, stable=True))

    def recommend(self, histories: torch.Tensor, k: int) -> torch.Tensor:
        """(B, T) -> (B, k): the k most popular items for every row."""
        return self.ranking[:k].expand(histories.shape[0], k)


@dataclass
class SASRecConfig:
    """SASRec (Kang & McAuley, ICDM 2018): 2 blocks, 1 head, dropout 0.2 as published (ML-1M);
    hidden 64 and a full-softmax cross-entropy instead of one sampled negative."""

    num_layers: int = 2
    num_heads: int = 1
    hidden: int = 64
    dropout: float = 0.2
    max_history: int = 20


class SASRec(nn.Module):
    """Causal self-attention over the item history; scores = last state · item embeddings."""

    def __init__(self, num_items: int, config: SASRecConfig):
        super().__init__()
        self.config = config
        self.item_embedding = nn.Embedding(num_items + 1, config.hidden, padding_idx=PAD)
        self.position_embedding = nn.Embedding(config.max_history, config.hidden)
        layer = nn.TransformerEncoderLayer(
            config.hidden,
            config.num_heads,
            4 * config.hidden,
            config.dropout,
            batch_first=True,
            norm_first=True,
        )
        self.blocks = nn.TransformerEncoder(layer, config.num_layers, enable_nested_tensor=False)
        self.dropout = nn.Dropout(config.dropout)
        self.norm = nn.LayerNorm(config.hidden)

    def user_representation(self, histories: torch.Tensor) -> torch.Tensor:
        """Histories (B, T) left-padded -> the last position's state (B, hidden)."""
        batch, length = histories.shape
        positions = torch.arange(length, device=histories.device)
        x = self.item_embedding(histories) + self.position_embedding(positions + self.config.max_history - length)
        # Causal, and padding is never attended to except by itself (a row of only -inf is NaN).
        is_pad = histories == PAD
        blocked = torch.ones(length, length, dtype=torch.bool, device=histories.device).triu(1)
        blocked = blocked | (is_pad[:, None, :] & ~torch.eye(length, dtype=torch.bool, device=histories.device))
        mask = torch.zeros(blocked.shape, device=histories.device).masked_fill(blocked, float("-inf"))
        x = self.blocks(self.dropout(x), mask=mask.repeat_interleave(self.config.num_heads, 0))
        return self.norm(x[:, -1])

    def scores(self, histories: torch.Tensor) -> torch.Tensor:
        """(B, T) -> (B, N + 1) scores; padding scores -inf."""
        scores = self.user_representation(histories) @ self.item_embedding.weight.T
        scores[:, PAD] = float("-inf")
        return scores

    def param_groups(self) -> list[dict]:
        """One AdamW group: every parameter at the trainer's learning rate."""
        return [{"params": list(self.parameters())}]

    def start_epoch(self, epoch: int) -> None:
        """Nothing changes between epochs."""

    def loss(self, histories: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the target over all items: (B, T), (B,) -> scalar."""
        return F.cross_entropy(self.scores(histories), targets)

    @torch.no_grad()
    def recommend(self, histories: torch.Tensor, k: int) -> torch.Tensor:
        """(B, T) -> (B, k) highest-scoring items."""
        return self.scores(histories).topk(k, dim=1).indices
