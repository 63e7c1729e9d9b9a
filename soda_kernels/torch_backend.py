"""The pure-PyTorch backend: the whole API on any device, differentiated by autograd.

Memory-sane formulations of docs/maths.md (the float64 ``reference`` is the
definition; this is what users run without Triton):

* distance logits by the expansion -||x - c||^2 = 2 x.c - ||c||^2 - ||x||^2,
  dropping ||x||^2 which cancels in the softmax;
* every pairwise score as one matrix product over the concatenated (layer, code)
  axis,  s(b, n) = -sum_l w_l KL(P_n^l || Q_b^l)
                 = (w logQ_b) . P_n - sum_l w_l P_n^l . log P_n^l
  (plus (w Q_b) . logP_n - sum_l w_l Q_b^l . log Q_b^l when symmetric), so the
  in-batch score matrix is B x B, never B x B x L x K;
* the in-batch mean user distribution by group sums over equal positives and
  prefix/suffix sums over the groups (no subtraction, so no cancellation).

Arithmetic runs in float32 (float64 when an input is float64), whatever mix of dtypes comes in.

Indices are never trusted (the value checks may have been skipped): an index outside its range
reads row 0 instead and makes that item's distribution NaN, as the Triton kernels do, so the terms
that use it are NaN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def codebook_logits(x: torch.Tensor, codebooks: torch.Tensor, temperature: float) -> torch.Tensor:
    """(2 x.C[l,k] - ||C[l,k]||^2) / tau: (N, L, d), (L, K, d) -> (N, L, K)."""
    dtype = compute_dtype(x, codebooks)
    x, codebooks = x.to(dtype), codebooks.to(dtype)
    cross = torch.einsum("nld,lkd->nlk", x, codebooks)
    return (2.0 * cross - codebooks.square().sum(-1)) / temperature


def codebook_log_softmax(x: torch.Tensor, codebooks: torch.Tensor, temperature: float) -> torch.Tensor:
    return codebook_logits(x, codebooks, temperature).log_softmax(-1)


def _negative_entropy(log_p: torch.Tensor, layer_weights: torch.Tensor) -> torch.Tensor:
    """sum_l w_l sum_k P log P: (R, L, K) -> (R,)."""
    return ((log_p.exp() * log_p).sum(-1) * layer_weights).sum(-1)


def _layer_weights(layer_weights: torch.Tensor | None, num_layers: int, dtype, device) -> torch.Tensor:
    """The (L,) weights in ``dtype``; None is all ones."""
    if layer_weights is None:
        return torch.ones(num_layers, dtype=dtype, device=device)
    return layer_weights.to(dtype)


def pairwise_kl(p_logits, q_logits, layer_weights: torch.Tensor | None) -> torch.Tensor:
    dtype = compute_dtype(p_logits, q_logits)
    log_p = p_logits.to(dtype).log_softmax(-1)
    log_q = q_logits.to(dtype).log_softmax(-1)
    weights = _layer_weights(layer_weights, p_logits.shape[1], dtype, p_logits.device)
    cross = (log_p.exp() * weights[:, None]).flatten(1) @ log_q.flatten(1).T
    return _negative_entropy(log_p, weights)[:, None] - cross


class _Side:
    """One side of the score: log-distributions (R, L, K) with their weighted negative entropy."""

    def __init__(self, log_probs: torch.Tensor, layer_weights: torch.Tensor):
        self.log_probs = log_probs
        self.negative_entropy = _negative_entropy(log_probs, layer_weights)


def _score_operands(user: _Side, item: _Side, weights: torch.Tensor, symmetric: bool):
    """Flattened (layer, code) operands with s = rows . cols - [user negent] - item negent."""
    w = weights[:, None]
    rows = [(user.log_probs * w).flatten(-2)]
    cols = [item.log_probs.exp().flatten(-2)]
    if symmetric:
        rows.append((user.log_probs.exp() * w).flatten(-2))
        cols.append(item.log_probs.flatten(-2))
    return torch.cat(rows, -1), torch.cat(cols, -1)


def score_matrix(user: _Side, item: _Side, weights: torch.Tensor, symmetric: bool) -> torch.Tensor:
    """S[b, m] = s(user b, item m): (B, L, K) x (M, L, K) -> (B, M)."""
    rows, cols = _score_operands(user, item, weights, symmetric)
    scores = rows @ cols.T - item.negative_entropy[None, :]
    if symmetric:
        scores = scores - user.negative_entropy[:, None]
    return scores


def score_rows(user: _Side, item: _Side, weights: torch.Tensor, symmetric: bool) -> torch.Tensor:
    """s(user b, item [b, ...]) row by row: (B, L, K) x (B, ..., L, K) -> (B, ...)."""
    rows, cols = _score_operands(user, item, weights, symmetric)
    scores = torch.einsum("bf,b...f->b...", rows, cols) - item.negative_entropy
    if symmetric:
        user_negent = user.negative_entropy
        scores = scores - user_negent.view(user_negent.shape + (1,) * (scores.dim() - 1))
    return scores


def group_rows(positives: torch.Tensor):
    """Rows grouped by equal positives: (group index of each row (B,), number of rows whose positive
    differs (B,)). Static shapes (torch.compile traces it whole): group g is the g-th smallest
    positive, found by a sort, so the indices lie in [0, B)."""
    ordered, order = torch.sort(positives)
    group_starts = torch.cat([ordered.new_ones(1, dtype=torch.bool), ordered[1:] != ordered[:-1]])
    group_of_row = torch.empty_like(order).scatter_(0, order, torch.cumsum(group_starts, 0) - 1)
    group_size = torch.zeros_like(positives).index_add_(0, group_of_row, torch.ones_like(positives))
    return group_of_row, len(positives) - group_size[group_of_row]


def sum_over_other_groups(values: torch.Tensor, group_of_row: torch.Tensor) -> torch.Tensor:
    """Per row b, the sum of values[m] over the rows m of the other groups: (B, ...) -> (B, ...).

    Group sums in B slots (a sort-based, deterministic index_put_; the slots past the last group
    stay zero), then prefix and suffix sums over the groups: no subtraction, so no cancellation.
    """
    group_sum = values.new_zeros(values.shape).index_put_((group_of_row,), values, accumulate=True)
    zero = torch.zeros_like(group_sum[:1])
    before = torch.cat([zero, torch.cumsum(group_sum, 0)[:-1]])  # groups strictly before
    after = torch.cat([torch.flip(torch.cumsum(torch.flip(group_sum, [0]), 0), [0])[1:], zero])
    return (before + after)[group_of_row]


def log_mean(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """log(total / count) for totals (B, L, K) of count (B,) terms: the total clamped at the
    smallest normal number of its dtype, the count at 1 (finite where count is 0)."""
    tiny = torch.finfo(total.dtype).tiny
    return total.clamp_min(tiny).log() - count.clamp_min(1).to(total.dtype).log()[:, None, None]


def in_batch_mean_user(log_q: torch.Tensor, positives: torch.Tensor):
    """log of the mean user distribution over the rows whose positive differs from row b's.

    Returns (log_mean (B, L, K), count (B,)); rows with count 0 get an arbitrary finite value.
    """
    group_of_row, count = group_rows(positives)
    return log_mean(sum_over_other_groups(log_q.exp(), group_of_row), count), count


def checked_item_rows(items, index: torch.Tensor, codebooks, temperature: float, padding: bool):
    """log P of the items ``index`` names, (*index.shape, L, K): NaN where the index lies outside
    [0, N) (-1 with ``padding``: a finite distribution nothing uses), computed from row 0 there, so
    no index outside the table is ever read."""
    outside = (index < (-1 if padding else 0)) | (index >= items.shape[0])
    rows = torch.where(outside | (index < 0), 0, index)
    log_p = codebook_log_softmax(items[rows.flatten()], codebooks, temperature).unflatten(0, index.shape)
    return torch.where(outside[..., None, None], float("nan"), log_p)


def reduce_terms(row_sums: torch.Tensor, row_counts: torch.Tensor, reduction: str) -> torch.Tensor:
    """mean over all terms / sum / per-row mean; 0 (with zero gradients) where there are no terms."""
    if reduction == "sum":
        return row_sums.sum()
    if reduction == "mean":
        return row_sums.sum() / row_counts.sum().clamp_min(1)
    return row_sums / row_counts.clamp_min(1)


def distributional_bpr(user, items, codebooks, positives, negatives, *, user_logits, in_batch,
                       symmetric, temperature, user_temperature, layer_weights, reduction):
    dtype = compute_dtype(user, items, codebooks)
    weights = _layer_weights(layer_weights, codebooks.shape[0], dtype, codebooks.device)
    if user_logits:
        log_q = user.to(dtype).log_softmax(-1)
    else:
        log_q = codebook_log_softmax(user, codebooks, user_temperature).to(dtype)
    users = _Side(log_q, weights)
    positive_items = _Side(checked_item_rows(items, positives, codebooks, temperature, padding=False).to(dtype),
                           weights)
    positive_score = score_rows(users, positive_items, weights, symmetric)

    # Terms by torch.where (not a product with the 0/1 mask), so that a NaN score outside the
    # terms stays out of the loss, as in the kernels.
    if negatives is not None:
        mask = negatives != -1
        negative_items = _Side(checked_item_rows(items, negatives, codebooks, temperature, padding=True).to(dtype),
                               weights)
        negative_score = score_rows(users, negative_items, weights, symmetric)
        terms = torch.where(mask, F.softplus(negative_score - positive_score[:, None]), 0.0)
        return reduce_terms(terms.sum(1), mask.sum(1), reduction)

    if in_batch == "mean":
        log_mean, count = in_batch_mean_user(log_q, positives)
        mean_score = score_rows(_Side(log_mean, weights), positive_items, weights, symmetric)
        has_term = count > 0
        terms = torch.where(has_term, F.softplus(mean_score - positive_score), 0.0)
        return reduce_terms(terms, has_term.to(terms.dtype), reduction)

    scores = score_matrix(users, positive_items, weights, symmetric)
    valid = positives[None, :] != positives[:, None]
    row_sums = scores.new_zeros(len(positives))
    row_counts = valid.sum(1) * (2 if in_batch == "both" else 1)
    if in_batch in ("items", "both"):
        row_sums = row_sums + torch.where(valid, F.softplus(scores - positive_score[:, None]), 0.0).sum(1)
    if in_batch in ("users", "both"):
        row_sums = row_sums + torch.where(valid, F.softplus(scores.T - positive_score[:, None]), 0.0).sum(1)
    return reduce_terms(row_sums, row_counts, reduction)


# ----------------------------------------------------------------------------------------------
# distributional_topk: the catalogue streamed in chunks, a running top-k per row.
#
# Ranking key. Each candidate (score, item) becomes one int64: the float32 score's bits mapped
# to an order-preserving int32 in the high half, 2^31 - 1 - item in the low half. Keys are then
# unique, larger for a higher score and, at an exactly equal score, for the lower item index, so
# a plain top-k of keys has no ties left to break (torch.topk's order among equal values is not
# specified; among distinct keys there is nothing to specify). An ineligible slot (excluded, past
# the catalogue, padding) is TOPK_EMPTY, below every real key; it decodes to (-inf, -1). The
# Triton kernel builds the same keys on chip and ends with ``decode_topk_keys``. Scores are
# ranked at float32 resolution (float64 inputs included): the output is float32.

TOPK_EMPTY = -(2**63)
# The chunked path's budget for one chunk: its buffers (scores, keys, the merge and their
# temporaries, at most 64 bytes a (user, item) pair) and its slice of the catalogue upcast (8
# bytes a feature): a chunk of C items takes C (64 B + 8 F) bytes, so C = budget / (64 B + 8 F).
TOPK_MEMORY_BYTES = 256 * 2**20


def encode_topk_keys(scores: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """int64 ranking keys of float32 ``scores`` (..., C) at item indices ``items`` (C,) in [0, 2^31)."""
    bits = (scores.float() + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into +0.0: equal scores, equal bits
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int64)
    return (ordered << 32) | (0x7FFFFFFF - items)


def decode_topk_keys(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores float32, indices int64) of ranking keys; TOPK_EMPTY gives (-inf, -1)."""
    ordered = (keys >> 32).to(torch.int32)
    scores = torch.where(ordered < 0, ordered ^ 0x7FFFFFFF, ordered).view(torch.float32)
    items = 0x7FFFFFFF - (keys & 0xFFFFFFFF)
    empty = keys == TOPK_EMPTY
    return scores.masked_fill(empty, float("-inf")), items.masked_fill(empty, -1)


def topk_user_operands(log_q: torch.Tensor, layer_weights: torch.Tensor | None, symmetric: bool):
    """The user side of s(b, n) = rows[b] . [P_n, (log P_n)] + row_bias[b] - item_bias[n]:
    rows (B, F or 2F) = [w log Q_b, (w Q_b)] and row_bias (B,) = -sum_l w_l Q_b^l . log Q_b^l
    (0 unless symmetric), from log_q (B, L, K), in its dtype; F = L K."""
    weights = _layer_weights(layer_weights, log_q.shape[1], log_q.dtype, log_q.device)
    w = weights[:, None]
    rows = [(log_q * w).flatten(1)]
    row_bias = torch.zeros(log_q.shape[0], dtype=log_q.dtype, device=log_q.device)
    if symmetric:
        rows.append((log_q.exp() * w).flatten(1))
        row_bias = -_negative_entropy(log_q, weights)
    return torch.cat(rows, 1), row_bias


def topk_item_bias(negative_entropy: torch.Tensor, layer_weights: torch.Tensor | None, dtype) -> torch.Tensor:
    """item_bias (N,) = sum_l w_l P_n^l . log P_n^l in ``dtype``, from the catalogue's (N, L) terms."""
    weights = _layer_weights(layer_weights, negative_entropy.shape[1], dtype, negative_entropy.device)
    return negative_entropy.to(dtype) @ weights


def topk_chunk_items(batch: int, num_features: int, memory_bytes: int) -> int:
    """Catalogue items a chunk of the torch path holds within ``memory_bytes`` (at least 1)."""
    return max(1, memory_bytes // (64 * batch + 8 * num_features))


def distributional_topk(rows, row_bias, probs, log_probs, item_bias, excluded_rows, excluded_items, k):
    """The k best items per row, catalogue chunk by chunk, on any device.

    rows (B, F or 2F) and row_bias (B,) from ``topk_user_operands``; probs, log_probs (N, F) the
    catalogue; item_bias (N,) sum_l w_l P_n^l . log P_n^l; excluded_rows, excluded_items (E,) int64
    the (row, item) pairs never returned; k >= 1. Scores in rows' dtype, ranked as float32.
    Memory: one chunk of ``topk_chunk_items`` items within TOPK_MEMORY_BYTES (read at each call)
    at a time, plus the (B, k) running keys.
    Returns scores (B, k) float32 descending and indices (B, k) int64, -inf / -1 past the eligible.
    """
    batch, (num_items, num_features) = rows.shape[0], probs.shape
    symmetric = rows.shape[1] == 2 * num_features
    chunk = topk_chunk_items(batch, num_features, TOPK_MEMORY_BYTES)
    by_item = torch.argsort(excluded_items)
    excluded_rows, excluded_items = excluded_rows[by_item], excluded_items[by_item]
    starts = torch.arange(0, num_items + chunk, chunk, device=rows.device)
    bounds = torch.searchsorted(excluded_items, starts).tolist()
    best = torch.full((batch, k), TOPK_EMPTY, dtype=torch.int64, device=rows.device)
    for step, start in enumerate(range(0, num_items, chunk)):
        stop = min(start + chunk, num_items)
        scores = torch.addmm(row_bias[:, None] - item_bias[None, start:stop], rows[:, :num_features],
                             probs[start:stop].to(rows.dtype).T)
        if symmetric:
            scores.addmm_(rows[:, num_features:], log_probs[start:stop].to(rows.dtype).T)
        keys = encode_topk_keys(scores, torch.arange(start, stop, device=rows.device))
        low, high = bounds[step], bounds[step + 1]
        keys[excluded_rows[low:high], excluded_items[low:high] - start] = TOPK_EMPTY
        best = torch.cat([best, keys], 1).topk(k, dim=1).values
    return decode_topk_keys(best)
