"""Ranking metrics with one held-out item per user, over the full item set."""

from __future__ import annotations

import torch

KS = (5, 10)
METRICS = ("recall@5", "recall@10", "ndcg@5", "ndcg@10")  # the order of every table


def target_ranks(ranked_items: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Where each target sits in its list: ranked_items (B, n) item ids best first (0 = no item),
    targets (B,) -> (B,) int64, the 0-based rank, −1 when the target is not in the list."""
    hits = ranked_items == targets[:, None]
    return torch.where(hits.any(1), hits.int().argmax(1), -1).long()


def ranking_metrics(ranks: torch.Tensor, ks: tuple[int, ...] = KS) -> dict[str, float]:
    """Recall@k and NDCG@k averaged over users, from each user's rank of its target (``target_ranks``).

    With one relevant item, Recall@k is 1 if its 0-based rank is below k, and NDCG@k is
    1 / log2(rank + 2) for such a rank (the ideal DCG is 1).
    """
    found = ranks >= 0
    discounts = torch.where(found, 1.0 / torch.log2(ranks.clamp(min=0).double() + 2.0), 0.0)
    metrics = {}
    for k in ks:
        hit = found & (ranks < k)
        metrics[f"recall@{k}"] = hit.double().mean().item()
        metrics[f"ndcg@{k}"] = torch.where(hit, discounts, 0.0).mean().item()
    return metrics
