"""Recall@k and NDCG@k on a case worked out by hand, from each user's rank of its target."""

import math

import pytest
import torch

from soda.metrics import ranking_metrics, target_ranks


def test_ranking_metrics_hand_computed():
    ranked = torch.tensor(
        [
            [7, 3, 9, 1, 2, 4, 5, 6, 8, 10],  # target 7 at rank 0
            [1, 2, 3, 4, 5, 6, 8, 9, 10, 11],  # target 8 at rank 6: a hit at 10, not at 5
            [1, 2, 5, 4, 6, 0, 0, 0, 0, 0],  # target 5 at rank 2; 0 pads a short list
            [1, 2, 3, 4, 5, 6, 7, 8, 9, 10],  # target 12 missing
        ]
    )
    ranks = target_ranks(ranked, torch.tensor([7, 8, 5, 12]))
    assert ranks.tolist() == [0, 6, 2, -1]
    metrics = ranking_metrics(ranks)
    assert metrics["recall@5"] == pytest.approx(2 / 4)
    assert metrics["recall@10"] == pytest.approx(3 / 4)
    assert metrics["ndcg@5"] == pytest.approx((1 + 1 / math.log2(4)) / 4)
    assert metrics["ndcg@10"] == pytest.approx((1 + 1 / math.log2(8) + 1 / math.log2(4)) / 4)


def test_padding_never_hits():
    ranks = target_ranks(torch.zeros(2, 10, dtype=torch.long), torch.tensor([1, 2]))
    assert ranks.tolist() == [-1, -1]
    assert ranking_metrics(ranks) == {"recall@5": 0.0, "ndcg@5": 0.0, "recall@10": 0.0, "ndcg@10": 0.0}
