"""Ranking metrics with one held-out item per user, over the full item set."""

from __future__ import annotations

import torch

KS = (5, 10)
METRICS = ("recall@5", "recall@10", "ndcg@5", "ndcg@10")  # the order of every table


def ranking_metrics(ranked_items: torch.Tensor, targets: torch.Tensor, ks: tuple[int, ...] = KS) -> dict[str, float]:
    """Recall@k and NDCG@k averaged over users.

    ranked_items (B, >= max(ks)): item ids best first (0 = no item); targets (B,).
    With one relevant item, Recall@k is 1 if it is in the top k, and NDCG@k is
    1 / log2(rank + 2) for its 0-based rank < k (the ideal DCG is 1).
    """
    hits = ranked_items[:, : max(ks)] == targets[:, None]
    discounts = 1.0 / torch.log2(torch.arange(hits.shape[1], dtype=torch.float) + 2.0)
    metrics = {}
    for k in ks:
        metrics[f"recall@{k}"] = hits[:, :k].any(1).float().mean().item()
        metrics[f"ndcg@{k}"] = (hits[:, :k].float() * discounts[:k]).sum(1).mean().item()
    return metrics
