"""In-batch distributional BPR against the batch's mean user ("mean"): O(B L K) work and memory, in
kernels from end to end.

Row b has a user with code distributions Q_b and a positive item pos[b] with P_b (per layer, K
codes). The rows of the other groups (pos[m] != pos[b]) are its negatives; with c_b of them,

    M_b = others_b / c_b,   others_b = sum over the other groups' rows m of Q_m       (L, K)
    ps_b = s(Q_b, P_b),     ms_b = s(M_b, P_b),     term_b = softplus(ms_b - ps_b) if c_b > 0

with s(Q, P) = -sum_l w_l [KL(P || Q) (+ KL(Q || P))]; log M is taken as log max(others, tiny) -
log c (the PyTorch backend's clamp). The rows are ranked by (positive, row) -- position p holds row
order[p] -- so that each group is a run [start_p, end_p) of positions, and

    others_p = prefix[start_p - 1] + suffix[end_p]      prefix, suffix: inclusive sums over positions

two sums of distributions, so that nothing cancels however uneven the groups (the PyTorch backend's
prefix and suffix sums over groups, position by position).

Forward (4 launches). ``_rank_kernel`` ranks each row against the whole batch (an O(B^2) scan of
integer comparisons, no sort) and writes the run bounds, the permutation and the sorted positives;
``_prologue_kernel`` writes in sorted order log Q and log P (B, L K) float32 with the positive score
ps. ``_mean_scores_kernel``
(one program per chunk of the L K features) forms the prefix and suffix sums of Q over the
positions, gathers others_p at the run bounds, and sums its chunk's share of ms_p;
``_finish_kernel`` adds the chunks in order and reduces. Saved for backward: the permutation, the
sorted positives, the bounds and the two scores: O(B).

Backward (5 launches). With g_b = dLoss/dterm_b sigmoid(ms_b - ps_b) (0 without a term),
dLoss/dps = -g, dLoss/dms = g, and multiples of P or Q per (row, layer) dropped where a log-softmax
backward follows (it removes them), the identities of docs/maths.md section 5 give

    dlogP_b  = g w [P (log M - log Q) + (M - Q)]                 (the P log P terms cancel)
    dlogQ_b  = -g w [P - (Q (log Q - log P))] + Q_b (.) sum over the other groups' rows of G
    G_b      = dLoss/dlog M_b / others_b = g w [P - (M (log M - log P))] / others_b

(bracketed: symmetric; G is 0 where others_b was clamped; the -g w M in dLoss/dlog M reaches Q_m as
w g / c_b, a multiple of Q_m: dropped). ``_prologue_kernel`` runs again over sorted positions;
``_mean_grads_kernel`` forms others again, then G, and the other groups' sums of G by the same
prefix and suffix sums; ``_epilogue_kernel`` takes each side through the log-softmax backward
(dz = dlog - r sum_k dlog) onto its residuals and the codebook (``project_into_partial``), or
is the user gradient itself for ``user_logits=True``. The item rows come out in sorted order, so
``sum_rows_by_sorted_index`` sums repeated positives; ``sum_partials`` adds the codebook partials.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .autograd import register_backward
from .common import (
    LOGIT_PRECISION,
    clamp_rows,
    code_tile,
    feature_weights,
    finish_rows,
    layer_weight,
    load_rows,
    log_softmax_backward_tile,
    row_scale,
    sigmoid,
    softplus,
    store_reduction,
    store_rows,
    sum_partials,
    sum_rows_by_sorted_index,
    user_item_log_probs,
    user_item_log_sum_exps,
    wide_operands,
)
from .launch import launch_config, plan_grid, tune_if_asked

TINY = tl.constexpr(1.1754943508222875e-38)  # the smallest normal float32: where others is clamped


@triton.jit
def _rank_kernel(
    positives_ptr, order_ptr, sorted_positives_ptr, bounds_ptr, batch,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """A block of rows b ranked by (pos[b], b) against every row, BLOCK_C at a time: the rank p is
    the row's position. positives_ptr: (B,) int64. Writes order_ptr (B,) int64 <- b and
    sorted_positives_ptr (B,) int64 <- pos[b] at p, bounds_ptr (2, B) int32 <- the run [start, end)
    of p's group (the positions of the rows with positive pos[b])."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < batch
    positive = tl.load(positives_ptr + rows, mask=row_mask, other=0)
    rank = tl.zeros((BLOCK_R,), tl.int32)
    start = tl.zeros((BLOCK_R,), tl.int32)
    size = tl.zeros((BLOCK_R,), tl.int32)
    for other_start in range(0, batch, BLOCK_C):
        others = other_start + tl.arange(0, BLOCK_C)
        other_mask = others < batch
        other_positive = tl.load(positives_ptr + others, mask=other_mask, other=0)
        below = (other_positive[None, :] < positive[:, None]) & other_mask[None, :]
        same = (other_positive[None, :] == positive[:, None]) & other_mask[None, :]
        start += tl.sum(below.to(tl.int32), axis=1)
        size += tl.sum(same.to(tl.int32), axis=1)
        rank += tl.sum((below | (same & (others[None, :] < rows[:, None]))).to(tl.int32), axis=1)
    tl.store(order_ptr + rank, rows.to(tl.int64), mask=row_mask)
    tl.store(sorted_positives_ptr + rank, positive, mask=row_mask)
    tl.store(bounds_ptr + rank, start, mask=row_mask)
    tl.store(bounds_ptr + batch + rank, start + size, mask=row_mask)


@triton.jit
def _prologue_kernel(
    user_ptr, items_ptr, codebooks_ptr, weights_ptr, order_ptr, sorted_positives_ptr,
    log_q_ptr, log_p_ptr, scores_ptr,
    batch, num_items, num_layers, num_codes, dim, inv_user_temperature, inv_temperature,
    USER_LOGITS: tl.constexpr, SYMMETRIC: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """Both sides' log-distributions at a block of positions p (rows order[p], items
    sorted_positives[p]), and the positive score ps there.

    user_ptr: (B, L, d) residuals or (B, L, K) logits (USER_LOGITS); items_ptr: (N, L, d);
    codebooks_ptr: (L, K, d); weights_ptr: (L,) float32 or None (all ones); order_ptr, sorted_positives_ptr: (B,)
    int64 from ``_rank_kernel``. Writes log_q_ptr, log_p_ptr: (B, L K) float32 by position and
    scores_ptr[0] (2, B) float32; a positive outside [0, N) is read clamped (``clamp_rows``) and
    gets a NaN score.
    """
    positions = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = positions < batch
    rows = tl.load(order_ptr + positions, mask=row_mask, other=0)
    positive = clamp_rows(tl.load(sorted_positives_ptr + positions, mask=row_mask, other=0), num_items)
    num_features = num_layers * num_codes
    codebook_shape = (num_layers, num_codes, dim)
    sides, inv_temperatures = (user_ptr, items_ptr), (inv_user_temperature, inv_temperature)
    score = tl.zeros((BLOCK_R,), tl.float32)
    for layer in range(0, num_layers):
        lse_q, lse_p = user_item_log_sum_exps(
            sides, rows, positive, row_mask, codebooks_ptr, codebook_shape, layer, inv_temperatures,
            USER_LOGITS=USER_LOGITS, BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K, BLOCK_D=BLOCK_D, PRECISION=PRECISION,
        )
        divergence = tl.zeros((BLOCK_R,), tl.float32)
        for k_start in range(0, num_codes, BLOCK_K):
            codes, code_mask, tile_mask = code_tile(k_start, num_codes, row_mask, BLOCK_K)
            log_q, q, log_p, p = user_item_log_probs(
                sides, rows, positive, row_mask, codebooks_ptr, codebook_shape, layer, codes, code_mask,
                inv_temperatures, lse_q, lse_p, USER_LOGITS=USER_LOGITS, BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K,
                BLOCK_D=BLOCK_D, PRECISION=PRECISION,
            )
            feature = positions[:, None] * num_features + layer * num_codes + codes[None, :]
            tl.store(log_q_ptr + feature, log_q, mask=tile_mask)
            tl.store(log_p_ptr + feature, log_p, mask=tile_mask)
            divergence += tl.sum(p * (log_p - log_q), axis=1)
            if SYMMETRIC:
                divergence += tl.sum(q * (log_q - log_p), axis=1)
        score -= layer_weight(weights_ptr, layer) * divergence
    positive = tl.load(sorted_positives_ptr + positions, mask=row_mask, other=0)  # read again: nothing kept
    tl.store(scores_ptr + positions, tl.where((positive >= 0) & (positive < num_items), score, float("nan")),
             mask=row_mask)


@triton.jit
def _load_terms(ptr, mask, FROM_LOG: tl.constexpr):
    """A tile of the summed values: the floats at ptr, or their exp when FROM_LOG; 0 where masked."""
    x = tl.load(ptr, mask=mask, other=0.0)
    if FROM_LOG:
        x = tl.where(mask, tl.exp(x), 0.0)
    return x


@triton.jit
def _position_tile(start, batch, features, feature_mask, num_features, BLOCK_R: tl.constexpr):
    """The block of positions at start (BLOCK_R,) int64, their mask, and the (positions, features)
    tile's mask and offsets into a (B, F) row-major table."""
    positions = start + tl.arange(0, BLOCK_R).to(tl.int64)
    row_mask = positions < batch
    tile = positions[:, None] * num_features + features[None, :]
    return positions, row_mask, row_mask[:, None] & feature_mask[None, :], tile


@triton.jit
def _runs(bounds_ptr, positions, row_mask, batch):
    """The runs [start, end) of the positions' groups, from bounds_ptr (2, B) int32."""
    return (tl.load(bounds_ptr + positions, mask=row_mask, other=0),
            tl.load(bounds_ptr + batch + positions, mask=row_mask, other=0))


@triton.jit
def _other_groups(
    src_ptr, out_ptr, prefix_ptr, suffix_ptr, bounds_ptr, features, feature_mask, batch, num_features,
    FROM_LOG: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr,
):
    """out[p, f] = sum of x[p', f] over the positions p' outside p's run, for this program's features
    (BLOCK_F,): x = src (or exp(src) when FROM_LOG), all (B, F) float32 row-major; prefix_ptr and
    suffix_ptr (B, F) scratch for the inclusive prefix and suffix sums over the positions; bounds_ptr
    (2, B) int32 the runs. out may be src itself (it is read in the first two passes only)."""
    carry = tl.zeros((BLOCK_F,), tl.float32)
    for start in range(0, batch, BLOCK_R):  # inclusive prefix sums, first block first
        _, _, mask, tile = _position_tile(start, batch, features, feature_mask, num_features, BLOCK_R)
        x = _load_terms(src_ptr + tile, mask, FROM_LOG)
        tl.store(prefix_ptr + tile, carry[None, :] + tl.cumsum(x, axis=0), mask=mask)
        carry += tl.sum(x, axis=0)
    carry = tl.zeros((BLOCK_F,), tl.float32)
    num_blocks = tl.cdiv(batch, BLOCK_R)
    for step in range(0, num_blocks):  # inclusive suffix sums, last block first
        _, _, mask, tile = _position_tile((num_blocks - 1 - step) * BLOCK_R, batch, features, feature_mask,
                                          num_features, BLOCK_R)
        x = _load_terms(src_ptr + tile, mask, FROM_LOG)
        tl.store(suffix_ptr + tile, carry[None, :] + tl.cumsum(x, axis=0, reverse=True), mask=mask)
        carry += tl.sum(x, axis=0)
    tl.debug_barrier()  # the gathers below read sums that other threads stored
    for start in range(0, batch, BLOCK_R):
        positions, row_mask, mask, tile = _position_tile(start, batch, features, feature_mask, num_features, BLOCK_R)
        run_start, run_end = _runs(bounds_ptr, positions, row_mask, batch)
        run_start, run_end = run_start.to(tl.int64), run_end.to(tl.int64)
        before = tl.load(prefix_ptr + (run_start - 1)[:, None] * num_features + features[None, :],
                         mask=mask & (run_start > 0)[:, None], other=0.0)
        after = tl.load(suffix_ptr + run_end[:, None] * num_features + features[None, :],
                        mask=mask & (run_end < batch)[:, None], other=0.0)
        tl.store(out_ptr + tile, before + after, mask=mask)
    tl.debug_barrier()  # the caller reads out back, maybe in other threads


@triton.jit
def _feature_chunk(weights_ptr, num_codes, num_features, BLOCK_F: tl.constexpr):
    """The program's chunk of the L K features (BLOCK_F,), their mask and their layers' weights."""
    features = tl.program_id(0) * BLOCK_F + tl.arange(0, BLOCK_F)
    feature_mask = features < num_features
    return features, feature_mask, feature_weights(weights_ptr, features, num_codes, feature_mask)


@triton.jit
def _mean_distribution(others, run_start, run_end, batch):
    """(M, log M) of a tile of others (BLOCK_R, BLOCK_F) for runs (BLOCK_R,): others / c and
    log max(others, tiny) - log c, c = max(B - run size, 1)."""
    count = tl.maximum((batch - (run_end - run_start)).to(tl.float32), 1.0)[:, None]
    return others / count, tl.log(tl.maximum(others, TINY)) - tl.log(count)


@triton.jit
def _row_gradients(scores_ptr, bounds_ptr, order_ptr, grad_ptr, counts_ptr, total_ptr, positions, mask, batch,
                   REDUCTION: tl.constexpr):
    """g = dLoss/dterm sigmoid(ms - ps) at positions (BLOCK_R,), 0 without a term, and the runs."""
    run_start, run_end = _runs(bounds_ptr, positions, mask, batch)
    rows = tl.load(order_ptr + positions, mask=mask, other=0)
    margin = tl.load(scores_ptr + batch + positions, mask=mask, other=0.0) - tl.load(scores_ptr + positions,
                                                                                   mask=mask, other=0.0)
    scale = row_scale(grad_ptr, counts_ptr, total_ptr, rows, mask, REDUCTION)
    return tl.where(run_end - run_start < batch, scale * sigmoid(margin), 0.0), run_start, run_end


@triton.jit
def _mean_scores_kernel(
    log_q_ptr, log_p_ptr, prefix_ptr, suffix_ptr, bounds_ptr, weights_ptr, part_ptr,
    batch, num_codes, num_features,
    SYMMETRIC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr,
):
    """One chunk of BLOCK_F of the L K features: others (over log_q_ptr, which it overwrites), then
    part_ptr[chunk] (chunks, B) <- sum over the chunk of w [P (log P - log M) (+ M (log M - log P))].
    log_q_ptr, log_p_ptr: (B, L K) float32 by position; prefix_ptr, suffix_ptr: (B, L K) scratch;
    bounds_ptr: (2, B) int32; weights_ptr: (L,) float32 or None (all ones)."""
    features, feature_mask, weight = _feature_chunk(weights_ptr, num_codes, num_features, BLOCK_F)
    _other_groups(log_q_ptr, log_q_ptr, prefix_ptr, suffix_ptr, bounds_ptr, features, feature_mask, batch,
                  num_features, FROM_LOG=True, BLOCK_R=BLOCK_R, BLOCK_F=BLOCK_F)
    for start in range(0, batch, BLOCK_R):
        positions, row_mask, mask, tile = _position_tile(start, batch, features, feature_mask, num_features, BLOCK_R)
        run_start, run_end = _runs(bounds_ptr, positions, row_mask, batch)
        mean, log_mean = _mean_distribution(tl.load(log_q_ptr + tile, mask=mask, other=0.0), run_start, run_end,
                                            batch)
        log_p = tl.load(log_p_ptr + tile, mask=mask, other=0.0)
        term = tl.exp(log_p) * (log_p - log_mean)
        if SYMMETRIC:
            term += mean * (log_mean - log_p)
        tl.store(part_ptr + tl.program_id(0) * batch + positions,
                 tl.sum(tl.where(mask, weight[None, :] * term, 0.0), axis=1), mask=row_mask)


@triton.jit
def _finish_kernel(
    part_ptr, scores_ptr, bounds_ptr, order_ptr, loss_ptr, counts_ptr, total_ptr, batch, num_chunks,
    REDUCTION: tl.constexpr, BLOCK: tl.constexpr,
):
    """One program: ms = -(the chunks' parts (chunks, B) added in order) -> scores_ptr[1] (2, B);
    the terms softplus(ms - ps) of the positions with negatives; counts_ptr (B,) <- 1 or 0 per row,
    total_ptr () <- their sum, loss_ptr () <- the mean or the sum of the terms, or (B,) per row."""
    term_sum = tl.zeros((BLOCK,), tl.float32)
    count_sum = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, batch, BLOCK):
        positions = start + tl.arange(0, BLOCK)
        mask = positions < batch
        mean_score = tl.zeros((BLOCK,), tl.float32)
        for chunk in range(0, num_chunks):
            mean_score -= tl.load(part_ptr + chunk * batch + positions, mask=mask, other=0.0)
        tl.store(scores_ptr + batch + positions, mean_score, mask=mask)
        run_start, run_end = _runs(bounds_ptr, positions, mask, batch)
        has_term = (mask & (run_end - run_start < batch)).to(tl.float32)
        term = has_term * softplus(mean_score - tl.load(scores_ptr + positions, mask=mask, other=0.0))
        rows = tl.load(order_ptr + positions, mask=mask, other=0)
        term_sum, count_sum = finish_rows(loss_ptr, counts_ptr, rows, mask, terms=term, count=has_term,
                                          term_sum=term_sum, count_sum=count_sum, REDUCTION=REDUCTION)
    store_reduction(loss_ptr, total_ptr, term_sum, count_sum, REDUCTION)


@triton.jit
def _mean_grads_kernel(
    log_q_ptr, log_p_ptr, others_ptr, group_grad_ptr, prefix_ptr, suffix_ptr, bounds_ptr, order_ptr, weights_ptr,
    scores_ptr, grad_ptr, counts_ptr, total_ptr, batch, num_codes, num_features,
    SYMMETRIC: tl.constexpr, REDUCTION: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr,
):
    """One chunk of BLOCK_F features: others_ptr (B, L K) <- others; then G, and group_grad_ptr
    (B, L K) <- the other groups' sums of G at each position (the module docstring). Inputs as
    ``_mean_scores_kernel``, and the saved scores (2, B), order (B,), counts (B,) and total ();
    grad_ptr: () or, for "none", (B,) float32 dLoss/dloss."""
    features, feature_mask, weight = _feature_chunk(weights_ptr, num_codes, num_features, BLOCK_F)
    _other_groups(log_q_ptr, others_ptr, prefix_ptr, suffix_ptr, bounds_ptr, features, feature_mask, batch,
                  num_features, FROM_LOG=True, BLOCK_R=BLOCK_R, BLOCK_F=BLOCK_F)
    for start in range(0, batch, BLOCK_R):
        positions, row_mask, mask, tile = _position_tile(start, batch, features, feature_mask, num_features, BLOCK_R)
        row_grad, run_start, run_end = _row_gradients(
            scores_ptr, bounds_ptr, order_ptr, grad_ptr, counts_ptr, total_ptr, positions=positions, mask=row_mask,
            batch=batch, REDUCTION=REDUCTION,
        )
        others = tl.load(others_ptr + tile, mask=mask, other=0.0)
        mean, log_mean = _mean_distribution(others, run_start, run_end, batch)
        log_p = tl.load(log_p_ptr + tile, mask=mask, other=0.0)
        grad_log_mean = tl.exp(log_p)
        if SYMMETRIC:
            grad_log_mean -= mean * (log_mean - log_p)
        grad_log_mean *= row_grad[:, None] * weight[None, :]
        tl.store(group_grad_ptr + tile, tl.where(others >= TINY, grad_log_mean / tl.maximum(others, TINY), 0.0),
                 mask=mask)
    tl.debug_barrier()
    _other_groups(group_grad_ptr, group_grad_ptr, prefix_ptr, suffix_ptr, bounds_ptr, features, feature_mask, batch,
                  num_features, FROM_LOG=False, BLOCK_R=BLOCK_R, BLOCK_F=BLOCK_F)


@triton.jit
def _epilogue_side(
    src_ptr, codebooks_ptr, partial_ptr, positions, row_mask, src_rows, row_grad, run_start, run_end, weight, layer,
    log_q_ptr, log_p_ptr, others_ptr, group_grad_ptr, grad_out_ptr, out_rows, first_block,
    batch, num_layers, num_codes, dim, inv_temperature,
    IS_USER: tl.constexpr, FROM_LOGITS: tl.constexpr, SYMMETRIC: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DIM: tl.constexpr, PRECISION: tl.constexpr,
):
    """One side, layer and block of positions: dlog (module docstring) -> dz = dlog - r sum_k dlog,
    written as it is (FROM_LOGITS) or projected (``log_softmax_backward_tile``): grad_out_ptr's rows
    out_rows (R, L, d) <- dz C (times 2 / tau) and the program's codebook partial of the layer,
    partial_ptr (K, d) float32, set (``first_block``) or added dz^T x - (sum dz) C. src_ptr: the
    side's residuals (R, L, d), read at rows src_rows."""
    num_features = num_layers * num_codes
    codebook_shape = (num_layers, num_codes, dim)
    if FROM_LOGITS:
        x = None
    else:
        x = load_rows(src_ptr + layer * dim, num_layers * dim, src_rows, row_mask, dim, BLOCK_DIM)
    grad_log_sum = tl.zeros((BLOCK_R,), tl.float32)
    grad_x = tl.zeros((BLOCK_R, BLOCK_DIM), tl.float32)
    for step in range(0, 2):  # 0: sum_k dlog; 1: dz = dlog - r sum_k dlog, projected
        for k_start in range(0, num_codes, BLOCK_K):
            codes, code_mask, tile_mask = code_tile(k_start, num_codes, row_mask, BLOCK_K)
            tile = positions[:, None] * num_features + layer * num_codes + codes[None, :]
            log_q = tl.load(log_q_ptr + tile, mask=tile_mask, other=0.0)
            log_p = tl.load(log_p_ptr + tile, mask=tile_mask, other=0.0)
            q = tl.where(tile_mask, tl.exp(log_q), 0.0)
            p = tl.where(tile_mask, tl.exp(log_p), 0.0)
            if IS_USER:
                grad_log = -p
                if SYMMETRIC:
                    grad_log += q * (log_q - log_p)
                grad_log = weight * row_grad[:, None] * grad_log
                grad_log += q * tl.load(group_grad_ptr + tile, mask=tile_mask, other=0.0)
                r = q
            else:
                mean, log_mean = _mean_distribution(tl.load(others_ptr + tile, mask=tile_mask, other=0.0),
                                                    run_start, run_end, batch)
                grad_log = p * (log_mean - log_q)
                if SYMMETRIC:
                    grad_log += mean - q
                grad_log = weight * row_grad[:, None] * grad_log
                r = p
            grad_log_sum, grad_x = log_softmax_backward_tile(
                step, grad_log, r, tile_mask, grad_log_sum, grad_x, x, codebooks_ptr, codebook_shape, layer, codes,
                code_mask, partial_ptr, first_block, scale=2.0 * inv_temperature, out_ptr=grad_out_ptr,
                out_rows=out_rows, FROM_LOGITS=FROM_LOGITS, BLOCK_DIM=BLOCK_DIM, PRECISION=PRECISION,
            )
    if not FROM_LOGITS:
        store_rows(grad_out_ptr + layer * dim, num_layers * dim, out_rows, row_mask, dim, grad_x)


@triton.jit
def _epilogue_blocks(
    src_ptr, codebooks_ptr, weights_ptr, partial_ptr, program, layer, log_q_ptr, log_p_ptr, others_ptr,
    group_grad_ptr, bounds_ptr, order_ptr, src_rows_ptr, scores_ptr, grad_ptr, counts_ptr, total_ptr, grad_out_ptr,
    batch, num_src_rows, num_layers, num_codes, dim, inv_temperature,
    IS_USER: tl.constexpr, FROM_LOGITS: tl.constexpr, SYMMETRIC: tl.constexpr, REDUCTION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DIM: tl.constexpr, PRECISION: tl.constexpr,
):
    """One side: the blocks of positions program, + programs, ... through ``_epilogue_side``; the
    side's rows of src_ptr (num_src_rows of them) are src_rows_ptr[position] (the permutation
    order_ptr for the users, the sorted positives for the items), its gradient rows those (users)
    or the positions (items)."""
    weight = layer_weight(weights_ptr, layer)
    for block in range(program, tl.cdiv(batch, BLOCK_R), tl.num_programs(0)):
        positions = (block * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
        row_mask = positions < batch
        row_grad, run_start, run_end = _row_gradients(
            scores_ptr, bounds_ptr, order_ptr, grad_ptr, counts_ptr, total_ptr, positions=positions, mask=row_mask,
            batch=batch, REDUCTION=REDUCTION,
        )
        src_rows = clamp_rows(tl.load(src_rows_ptr + positions, mask=row_mask, other=0), num_src_rows)
        _epilogue_side(
            src_ptr=src_ptr, codebooks_ptr=codebooks_ptr, partial_ptr=partial_ptr, positions=positions,
            row_mask=row_mask, src_rows=src_rows, row_grad=row_grad, run_start=run_start, run_end=run_end,
            weight=weight, layer=layer, log_q_ptr=log_q_ptr, log_p_ptr=log_p_ptr, others_ptr=others_ptr,
            group_grad_ptr=group_grad_ptr, grad_out_ptr=grad_out_ptr, out_rows=src_rows if IS_USER else positions,
            first_block=block == program, batch=batch, num_layers=num_layers, num_codes=num_codes, dim=dim,
            inv_temperature=inv_temperature, IS_USER=IS_USER, FROM_LOGITS=FROM_LOGITS, SYMMETRIC=SYMMETRIC,
            BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K, BLOCK_DIM=BLOCK_DIM, PRECISION=PRECISION,
        )
        tl.debug_barrier()  # the next block adds to this program's partial, maybe in other threads


@triton.jit
def _epilogue_kernel(
    user_ptr, items_ptr, codebooks_ptr, weights_ptr, log_q_ptr, log_p_ptr, others_ptr, group_grad_ptr,
    bounds_ptr, order_ptr, sorted_positives_ptr, scores_ptr, grad_ptr, counts_ptr, total_ptr,
    grad_user_ptr, item_row_grad_ptr, codebook_part_ptr,
    batch, num_items, num_layers, num_codes, dim, inv_user_temperature, inv_temperature,
    USER_LOGITS: tl.constexpr, SYMMETRIC: tl.constexpr, REDUCTION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DIM: tl.constexpr, PRECISION: tl.constexpr,
):
    """Grid (programs, L, 2 sides: 0 users, 1 items); a program takes the blocks of positions
    program_id(0), + programs, ... through ``_epilogue_side``, its codebook partial summed over them.

    Inputs as the other kernels write them. Writes grad_user_ptr: (B, L, d) in the user's dtype, or
    dz (B, L, K) for USER_LOGITS; item_row_grad_ptr: (B, L, d) float32 by position (the gradient of
    the positive at each position); codebook_part_ptr: (programs, sides with residuals, L, K, d)
    float32.
    """
    program, layer = tl.program_id(0), tl.program_id(1)
    sides = 1 if USER_LOGITS else 2
    if tl.program_id(2) == 0:
        partial_ptr = codebook_part_ptr + (program * sides * num_layers + layer) * num_codes * dim
        _epilogue_blocks(
            src_ptr=user_ptr, codebooks_ptr=codebooks_ptr, weights_ptr=weights_ptr, partial_ptr=partial_ptr,
            program=program, layer=layer, log_q_ptr=log_q_ptr, log_p_ptr=log_p_ptr, others_ptr=others_ptr,
            group_grad_ptr=group_grad_ptr, bounds_ptr=bounds_ptr, order_ptr=order_ptr, src_rows_ptr=order_ptr,
            scores_ptr=scores_ptr, grad_ptr=grad_ptr, counts_ptr=counts_ptr, total_ptr=total_ptr,
            grad_out_ptr=grad_user_ptr, batch=batch, num_src_rows=batch, num_layers=num_layers, num_codes=num_codes,
            dim=dim, inv_temperature=inv_user_temperature, IS_USER=True, FROM_LOGITS=USER_LOGITS,
            SYMMETRIC=SYMMETRIC, REDUCTION=REDUCTION, BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K, BLOCK_DIM=BLOCK_DIM,
            PRECISION=PRECISION,
        )
    else:
        partial_ptr = codebook_part_ptr + ((program * sides + sides - 1) * num_layers + layer) * num_codes * dim
        _epilogue_blocks(
            src_ptr=items_ptr, codebooks_ptr=codebooks_ptr, weights_ptr=weights_ptr, partial_ptr=partial_ptr,
            program=program, layer=layer, log_q_ptr=log_q_ptr, log_p_ptr=log_p_ptr, others_ptr=others_ptr,
            group_grad_ptr=group_grad_ptr, bounds_ptr=bounds_ptr, order_ptr=order_ptr,
            src_rows_ptr=sorted_positives_ptr, scores_ptr=scores_ptr, grad_ptr=grad_ptr, counts_ptr=counts_ptr,
            total_ptr=total_ptr, grad_out_ptr=item_row_grad_ptr, batch=batch, num_src_rows=num_items,
            num_layers=num_layers, num_codes=num_codes, dim=dim, inv_temperature=inv_temperature, IS_USER=False,
            FROM_LOGITS=False, SYMMETRIC=SYMMETRIC, REDUCTION=REDUCTION, BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K,
            BLOCK_DIM=BLOCK_DIM, PRECISION=PRECISION,
        )


FAMILIES = ("mean_logits", "groups", "mean_grads")  # the launch families SODA_TUNE tunes for this op


def _rank(positives):
    """(order, sorted positives, bounds) of ``_rank_kernel``."""
    batch = positives.shape[0]
    order, sorted_positives = torch.empty_like(positives), torch.empty_like(positives)
    bounds = positives.new_empty((2, batch), dtype=torch.int32)
    config = launch_config("rank")
    _rank_kernel[(triton.cdiv(batch, config["BLOCK_R"]),)](
        positives_ptr=positives, order_ptr=order, sorted_positives_ptr=sorted_positives, bounds_ptr=bounds,
        batch=batch, **config,
    )
    return order, sorted_positives, bounds


def _prologue(user, items, codebooks, weights, order, sorted_positives, user_logits, symmetric, temperature,
              user_temperature):
    """Run the prologue: (log Q, log P, scores) by position, ps in scores[0]."""
    batch = order.shape[0]
    num_layers, num_codes, dim = codebooks.shape
    log_q = items.new_empty((batch, num_layers * num_codes), dtype=torch.float32)
    log_p = torch.empty_like(log_q)
    scores = log_q.new_empty((2, batch))
    config = launch_config("mean_logits", device=items.device, batch=batch, codes=num_codes, dim=dim,
                           wide=wide_operands(user, items, codebooks))
    _prologue_kernel[(triton.cdiv(batch, config["BLOCK_R"]),)](
        user_ptr=user, items_ptr=items, codebooks_ptr=codebooks, weights_ptr=weights, order_ptr=order,
        sorted_positives_ptr=sorted_positives, log_q_ptr=log_q, log_p_ptr=log_p, scores_ptr=scores,
        batch=batch, num_items=items.shape[0], num_layers=num_layers, num_codes=num_codes, dim=dim,
        inv_user_temperature=1.0 / user_temperature, inv_temperature=1.0 / temperature,
        USER_LOGITS=user_logits, SYMMETRIC=symmetric, PRECISION=LOGIT_PRECISION, **config,
    )
    return log_q, log_p, scores


@torch.library.custom_op("soda_kernels::in_batch_mean", mutates_args=())
def in_batch_mean_op(
    user: torch.Tensor, items: torch.Tensor, codebooks: torch.Tensor, positives: torch.Tensor,
    weights: torch.Tensor | None,
    user_logits: bool, symmetric: bool, temperature: float, user_temperature: float, reduction: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(the reduced loss, and for backward: order (B,), sorted positives (B,), bounds (2, B) int32,
    scores (2, B) (ps, ms by position), counts (B,) and total (); the counts 0 or 1 per row)."""
    tune_if_asked(FAMILIES, device=user.device, batch=positives.shape[0], wide=wide_operands(user, items, codebooks),
                  run=lambda: forward_backward(user, items, codebooks, positives, weights, user_logits, symmetric,
                                               temperature, user_temperature, reduction))
    order, sorted_positives, bounds = _rank(positives)
    log_q, log_p, scores = _prologue(user, items, codebooks, weights, order, sorted_positives, user_logits,
                                     symmetric, temperature, user_temperature)
    batch, num_features = log_q.shape
    config = launch_config("groups", device=log_q.device, batch=batch)
    chunks = triton.cdiv(num_features, config["BLOCK_F"])
    part = log_q.new_empty((chunks, batch))
    _mean_scores_kernel[(chunks,)](
        log_q_ptr=log_q, log_p_ptr=log_p, prefix_ptr=torch.empty_like(log_q), suffix_ptr=torch.empty_like(log_q),
        bounds_ptr=bounds, weights_ptr=weights, part_ptr=part, batch=batch, num_codes=codebooks.shape[1],
        num_features=num_features, SYMMETRIC=symmetric, **config,
    )
    loss = log_q.new_empty(positives.shape if reduction == "none" else ())
    counts, total = log_q.new_empty((batch,)), log_q.new_empty(())
    _finish_kernel[(1,)](
        part_ptr=part, scores_ptr=scores, bounds_ptr=bounds, order_ptr=order, loss_ptr=loss, counts_ptr=counts,
        total_ptr=total, batch=batch, num_chunks=chunks, REDUCTION=reduction, **launch_config("reduce"),
    )
    return loss, order, sorted_positives, bounds, scores, counts, total


@in_batch_mean_op.register_fake
def _(user, items, codebooks, positives, weights, user_logits, symmetric, temperature, user_temperature, reduction):
    batch = positives.shape[0]
    floats = dict(dtype=torch.float32)
    return (user.new_empty(positives.shape if reduction == "none" else (), **floats), torch.empty_like(positives),
            torch.empty_like(positives), positives.new_empty((2, batch), dtype=torch.int32),
            user.new_empty((2, batch), **floats), user.new_empty((batch,), **floats), user.new_empty((), **floats))


@torch.library.custom_op("soda_kernels::in_batch_mean_backward", mutates_args=())
def in_batch_mean_backward(
    grad_output: torch.Tensor, user: torch.Tensor, items: torch.Tensor, codebooks: torch.Tensor,
    positives: torch.Tensor, weights: torch.Tensor | None, order: torch.Tensor, sorted_positives: torch.Tensor,
    bounds: torch.Tensor, scores: torch.Tensor, counts: torch.Tensor, total: torch.Tensor,
    user_logits: bool, symmetric: bool, temperature: float, user_temperature: float, reduction: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    log_q, log_p, _ = _prologue(user, items, codebooks, weights, order, sorted_positives, user_logits, symmetric,
                                temperature, user_temperature)
    batch, num_features = log_q.shape
    num_layers, num_codes, dim = codebooks.shape
    grad_output = grad_output.float().contiguous()
    groups = launch_config("groups", device=log_q.device, batch=batch)
    others, group_grad = torch.empty_like(log_q), torch.empty_like(log_q)
    _mean_grads_kernel[(triton.cdiv(num_features, groups["BLOCK_F"]),)](
        log_q_ptr=log_q, log_p_ptr=log_p, others_ptr=others, group_grad_ptr=group_grad,
        prefix_ptr=torch.empty_like(log_q), suffix_ptr=torch.empty_like(log_q), bounds_ptr=bounds, order_ptr=order,
        weights_ptr=weights, scores_ptr=scores, grad_ptr=grad_output, counts_ptr=counts, total_ptr=total,
        batch=batch, num_codes=num_codes, num_features=num_features, SYMMETRIC=symmetric, REDUCTION=reduction,
        **groups,
    )
    rows = launch_config("mean_grads", device=items.device, batch=batch, codes=num_codes, dim=dim,
                         wide=wide_operands(user, items, codebooks))
    grad_user = torch.empty_like(user)
    item_row_grad = items.new_empty((batch, num_layers, dim), dtype=torch.float32)
    programs = plan_grid("mean_grads", rows, items.device, batch=batch, blocks_per_program=2 * num_layers)["programs"]
    codebook_part = codebooks.new_empty((programs, 1 if user_logits else 2, num_layers, num_codes, dim),
                                        dtype=torch.float32)
    _epilogue_kernel[(programs, num_layers, 2)](
        user_ptr=user, items_ptr=items, codebooks_ptr=codebooks, weights_ptr=weights, log_q_ptr=log_q,
        log_p_ptr=log_p, others_ptr=others, group_grad_ptr=group_grad, bounds_ptr=bounds, order_ptr=order,
        sorted_positives_ptr=sorted_positives, scores_ptr=scores, grad_ptr=grad_output, counts_ptr=counts,
        total_ptr=total, grad_user_ptr=grad_user, item_row_grad_ptr=item_row_grad, codebook_part_ptr=codebook_part,
        batch=batch, num_items=items.shape[0], num_layers=num_layers, num_codes=num_codes, dim=dim,
        inv_user_temperature=1.0 / user_temperature, inv_temperature=1.0 / temperature,
        USER_LOGITS=user_logits, SYMMETRIC=symmetric, REDUCTION=reduction, PRECISION=LOGIT_PRECISION, **rows,
    )
    grad_items = sum_rows_by_sorted_index(item_row_grad, sorted_positives, None, items.shape[0], items.dtype)
    return grad_user, grad_items, sum_partials(codebook_part.flatten(0, 1), codebooks.dtype)


# Saved: user, items, codebooks, positives, weights; gradients for the first three.
forward_backward = register_backward(in_batch_mean_op, in_batch_mean_backward, saved_inputs=5, grads=3)


def in_batch_mean(user, items, codebooks, positives, *, user_logits, symmetric, temperature, user_temperature,
                  layer_weights, reduction):
    """In-batch distributional BPR against the mean user ("mean") on the Triton kernels; arguments
    validated by the caller. user (B, L, d) residuals or (B, L, K) logits, items (N, L, d),
    codebooks (L, K, d), positives (B,) -> a float32 scalar, or (B,) for ``reduction="none"``.
    Non-contiguous inputs are copied once (the kernels index row-major tensors)."""
    loss, *_ = in_batch_mean_op(
        user.contiguous(), items.contiguous(), codebooks.contiguous(), positives.long().contiguous(),
        layer_weights, user_logits, symmetric, temperature, user_temperature, reduction,
    )
    return loss
