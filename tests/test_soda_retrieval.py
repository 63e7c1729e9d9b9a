"""Retrieval by SODA's score and fusion with the beam search (soda/retrieval.py), on a tiny trained
TIGER + SODA over the cyclic split: retrieval against a float64 brute force over every item, fusion
at weight 0 against the beam search itself, and the weight chosen on validation."""

import pytest
import torch

from soda.experiment import hits
from soda.metrics import KS, ranking_metrics, target_ranks
from soda.retrieval import (
    FUSION_WEIGHTS,
    beam_candidates,
    evaluate_retrieval_and_fusion,
    fused_ranks,
    retrieval_ranks,
    soda_term,
)
from soda.train import rank_targets
from soda_kernels import reference
from tests.test_soda_parity import train_tiny_soda
from tests.test_soda_train import NUM_ITEMS, cyclic_split

DEVICE = torch.device("cpu")


@pytest.fixture(scope="module", params=[False, True], ids=["kl", "symmetric"])
def trained(request):
    model = train_tiny_soda("torch")
    soda_term(model).config.symmetric = request.param  # retrieval reads the term's options
    return model, cyclic_split()


def brute_force_ranks(model, examples):
    """Targets' ranks in the float64 scores of every item, straight from the definition."""
    term = soda_term(model)
    with torch.no_grad():
        states, mask = model.recommender.encode(examples.histories)
        users = term.user_residuals(model.tokenizer, states, mask)
        items = model.tokenizer.quantize(model.tokenizer.encoder(model.item_embeddings)).residuals
        codebooks, tau = model.tokenizer.codebooks, term.config.temperature
        log_q, log_p = (reference.log_soft_assignment(x, codebooks, tau) for x in (users, items))
    scores = reference.score(
        log_p[None], log_q[:, None], torch.ones(log_q.shape[1], dtype=torch.float64), term.config.symmetric
    )
    ranked = scores.argsort(dim=1, descending=True, stable=True)[:, : max(KS)] + 1
    return target_ranks(ranked, examples.targets), scores


def test_retrieval_ranks_the_whole_catalogue_as_the_brute_force(trained):
    model, split = trained
    ranks = retrieval_ranks(model, split.test, batch_size=16, device=DEVICE)
    expected, scores = brute_force_ranks(model, split.test)
    top = scores.sort(dim=1, descending=True).values
    clear = (top[:, : max(KS)] - top[:, 1 : max(KS) + 1]).min(1).values > 1e-5  # rows without near-ties
    assert clear.float().mean() > 0.5
    assert torch.equal(ranks[clear], expected[clear])
    assert ranks.shape == (len(split.test),) and (ranks >= -1).all() and (ranks < max(KS)).all()


def test_fusion_at_weight_zero_is_the_beam_search(trained):
    model, split = trained
    candidates = beam_candidates(model, split.valid, batch_size=16, device=DEVICE)
    items, log_probs, scores = candidates
    assert items.shape == log_probs.shape == scores.shape and items.shape[1] >= max(KS)
    assert torch.isneginf(scores[items == 0]).all() and torch.isfinite(scores[items > 0]).all()
    beam = rank_targets(model, split.valid, batch_size=16, device=DEVICE)
    assert torch.equal(fused_ranks(candidates, split.valid.targets, 0.0), beam)
    # a huge weight orders the candidates by the SODA score alone
    by_score = scores.argsort(dim=1, descending=True, stable=True)[:, : max(KS)]
    expected = target_ranks(items.gather(1, by_score), split.valid.targets)
    assert torch.equal(fused_ranks(candidates, split.valid.targets, 1e6), expected)


def test_evaluation_reports_both_and_picks_the_best_validation_weight(trained):
    model, split = trained
    result = evaluate_retrieval_and_fusion(model, split, batch_size=16, device=DEVICE)
    assert set(result) == {"retrieval", "fusion"}
    for part in ("valid", "test"):
        for block in (result["retrieval"], result["fusion"]):
            assert set(block[part]) == {"recall@5", "recall@10", "ndcg@5", "ndcg@10"}
            assert all(0.0 <= value <= 1.0 for value in block[part].values())
    fusion = result["fusion"]
    assert fusion["weight"] in FUSION_WEIGHTS
    assert fusion["valid"]["recall@10"] == max(fusion["valid_by_weight"].values())
    assert len(fusion["valid_by_weight"]) == len(FUSION_WEIGHTS)
    # each part's ranks, laid out as the beam search's (what the bootstraps read), agree with the metrics
    for block in (result["retrieval"], fusion):
        for part in ("valid", "test"):
            ranks = torch.tensor(block["ranks"][part])
            assert ranks.shape == (len(getattr(split, part)),) and ranking_metrics(ranks) == block[part]
        assert hits(block).mean().item() == pytest.approx(block["test"]["recall@10"])
    test_ranks = retrieval_ranks(model, split.test, batch_size=16, device=DEVICE)
    assert result["retrieval"]["ranks"]["test"] == test_ranks.tolist()
    candidates = beam_candidates(model, split.test, batch_size=16, device=DEVICE)
    assert fusion["ranks"]["test"] == fused_ranks(candidates, split.test.targets, fusion["weight"]).tolist()
    print(f"\nretrieval {result['retrieval']}\nfusion {fusion}")
    assert NUM_ITEMS == len(model.item_embeddings)
