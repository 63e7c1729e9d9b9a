"""Two more ways to evaluate a trained model with SODA's term: retrieval by its score, and fusion.

Retrieval. SODA trains a user head (``SODAAlignment.user_residuals``: mean-pooled encoder states
through an MLP, residual-quantised through the tokenizer's codebooks) so that the user's code
distributions Q_b come near its next item's P_n. The same score ranks the whole catalogue,

    s(b, n) = -sum_l KL(P_n^l || Q_b^l)        (+ KL(Q_b^l || P_n^l) when the run trained it symmetric)

with P_n from the tokenizer's quantisation of item n's embedding (as the term sees its targets)
at the term's temperature. The top 10 of every user come from ``sk.distributional_topk`` over
every item, under the beam search's protocol (``soda.train.rank_targets``): leave-one-out, the
full item set, nothing excluded (the beam search does not exclude the history either).

Fusion. The beam search's candidates (a beam of max(10, beam_size)) re-ranked by

    log p_beam(item) + w s(b, item)

with w from ``FUSION_WEIGHTS`` chosen by validation Recall@10 (ties to the smaller w), then
applied to the test set. w = 0 is the beam search's own order, so on validation fusion never
trails it; on test it may.
"""

from __future__ import annotations

import torch

import soda_kernels as sk
from soda.alignment import JointModel, SODAAlignment
from soda.data import Examples, Split
from soda.metrics import KS, ranking_metrics, target_ranks

FUSION_WEIGHTS = (0.0, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
SELECTION = "recall@10"  # as soda.train selects checkpoints
PARTS = ("valid", "test")


def soda_term(model: JointModel) -> SODAAlignment:
    """The model's SODA alignment term (TIGER + SODA, LETTER + SODA, ETEGRec + SODA)."""
    for term in model.alignments:
        if isinstance(term, SODAAlignment):
            return term
    raise ValueError(f"{type(model).__name__} has no SODA term to retrieve with")


@torch.no_grad()
def item_distributions(model: JointModel, term: SODAAlignment) -> sk.ItemDistributions:
    """The catalogue's code distributions: every item's tokenizer residuals (items 1..N in rows 0..N-1)."""
    tokenizer = model.tokenizer
    residuals = tokenizer.quantize(tokenizer.encoder(model.item_embeddings)).residuals
    return sk.ItemDistributions.from_items(
        residuals, tokenizer.codebooks, term.config.temperature, backend=term.config.backend
    )


def _user_residuals(model: JointModel, term: SODAAlignment, histories: torch.Tensor) -> torch.Tensor:
    states, mask = model.recommender.encode(histories)
    return term.user_residuals(model.tokenizer, states, mask)


def candidate_scores(
    model: JointModel, term: SODAAlignment, catalogue: sk.ItemDistributions, users: torch.Tensor, items: torch.Tensor
) -> torch.Tensor:
    """s(b, items[b, j]) for user residuals (B, L, d) and item ids (B, C) (0 = none, scored -inf)."""
    log_q = sk.codebook_log_softmax(
        users, model.tokenizer.codebooks, term.config.temperature, backend=term.config.backend
    )
    shape = (*items.shape, catalogue.num_layers, catalogue.num_codes)
    rows = (items - 1).clamp(min=0)
    p = catalogue.probs[rows].float().view(shape)
    log_p = catalogue.log_probs[rows].float().view(shape)
    divergence = (p * (log_p - log_q[:, None])).sum(-1)
    if term.config.symmetric:
        divergence = divergence + (log_q.exp()[:, None] * (log_q[:, None] - log_p)).sum(-1)
    return (-divergence.sum(-1)).masked_fill(items == 0, float("-inf"))


@torch.no_grad()
def retrieval_ranks(model: JointModel, examples: Examples, batch_size: int, device: torch.device) -> torch.Tensor:
    """Each example's 0-based rank of its target in the SODA score's top max(KS) over the whole
    catalogue, -1 when it is not there: (E,) int64."""
    model.eval()
    term = soda_term(model)
    catalogue = item_distributions(model, term)
    ranked = []
    for histories in examples.histories.split(batch_size):
        _, indices = sk.distributional_topk(
            _user_residuals(model, term, histories.to(device)),
            catalogue,
            model.tokenizer.codebooks,
            max(KS),
            symmetric=term.config.symmetric,
            temperature=term.config.temperature,
            backend=term.config.backend,
        )
        ranked.append((indices + 1).cpu())  # item ids; -1 (no item) becomes 0
    return target_ranks(torch.cat(ranked), examples.targets)


@torch.no_grad()
def beam_candidates(
    model: JointModel, examples: Examples, batch_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The beam search's candidates of every example with their beam log-probabilities and SODA
    scores: items (E, beam) (0 = none), log_probs (E, beam), scores (E, beam)."""
    model.eval()
    model.refresh_codes()
    term = soda_term(model)
    catalogue = item_distributions(model, term)
    beam = max(max(KS), model.recommender.config.beam_size)
    parts = []
    for histories in examples.histories.split(batch_size):
        histories = histories.to(device)
        items, log_probs = model.recommender.beam_search(histories, beam)
        scores = candidate_scores(model, term, catalogue, _user_residuals(model, term, histories), items)
        parts.append((items.cpu(), log_probs.cpu(), scores.cpu()))
    return tuple(torch.cat(column) for column in zip(*parts, strict=True))


def fused_ranks(candidates, targets: torch.Tensor, weight: float) -> torch.Tensor:
    """Ranks of the targets after re-ranking ``beam_candidates``' output by log p + weight s."""
    items, log_probs, scores = candidates
    fused = log_probs + weight * scores.nan_to_num(neginf=0.0)  # a dead beam (item 0) stays at log p = -inf
    order = fused.argsort(dim=1, descending=True, stable=True)[:, : max(KS)]
    return target_ranks(items.gather(1, order), targets)


def evaluate_retrieval_and_fusion(model: JointModel, split: Split, batch_size: int, device: torch.device) -> dict:
    """{"retrieval": {"valid": metrics, "test": metrics, "ranks": ranks}, "fusion": {"valid":
    metrics, "test": metrics, "ranks": ranks, "weight": the chosen w, "valid_by_weight": {w:
    validation Recall@10}}}; ranks as ``soda.train.evaluate`` gives the beam search's: {"valid",
    "test": each user's 0-based rank of its target, -1 outside the top 10}."""
    retrieved = {part: retrieval_ranks(model, getattr(split, part), batch_size, device) for part in PARTS}
    candidates = {part: beam_candidates(model, getattr(split, part), batch_size, device) for part in PARTS}
    valid_by_weight = {
        weight: fused_ranks(candidates["valid"], split.valid.targets, weight) for weight in FUSION_WEIGHTS
    }
    by_weight = {weight: ranking_metrics(ranks) for weight, ranks in valid_by_weight.items()}
    best = max(FUSION_WEIGHTS, key=lambda weight: (by_weight[weight][SELECTION], -weight))
    fused = {"valid": valid_by_weight[best], "test": fused_ranks(candidates["test"], split.test.targets, best)}
    fusion = {
        **metrics_and_ranks(fused),
        "weight": best,
        "valid_by_weight": {str(weight): metrics[SELECTION] for weight, metrics in by_weight.items()},
    }
    return {"retrieval": metrics_and_ranks(retrieved), "fusion": fusion}


def metrics_and_ranks(ranks: dict[str, torch.Tensor]) -> dict:
    """Each part's metrics and its ranks as lists, the layout of a record's beam search."""
    return {
        **{part: ranking_metrics(part_ranks) for part, part_ranks in ranks.items()},
        "ranks": {part: part_ranks.tolist() for part, part_ranks in ranks.items()},
    }
