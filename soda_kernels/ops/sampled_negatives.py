"""Distributional BPR against sampled negatives: the user side once per row block, and nothing of
B (1 + S) L K anywhere, forward or backward.

Row b scores 1 + S items n_bj: j = 0 is its positive, j >= 1 the negatives[b, j - 1] (-1 is
padding: no term). At layer l, with z the user's logits and a the item's over the K codes (codebook
logits of the residuals, or the user's logits as given) and log q = z - lse(z),

    s_bj = -sum_l w_l (D_bjl + [D'_bjl])        D = KL(P || Q),  D' = KL(Q || P)   [symmetric]

and row b's terms are softplus(s_bj - s_b0) over its valid j >= 1, reduced like the in-batch op
(T_b of them, t_b their sum).

Forward (2 launches). ``_forward_kernel`` (grid: row blocks x splits of the negatives) takes the
layers in turn: the users' log-sum-exp, then the K tiles, each tile's user log-probabilities formed
once and used by every sample of the split (its negatives and, first, the positive). A sample's
item logits update an online summary of its divergences, with m the running max of a:

    s   = sum_k e^(a_k - m)
    t_p = sum_k e^(a_k - m) ((a_k - m) - log q_k)
    t_q = sum_k q_k (log q_k - a_k)
    lse_a = m + log s,        D = t_p / s - log s,        D' = t_q + lse_a

(a tile with a larger max m' rescales by r = e^(m - m'): s <- r s, t_p <- r (t_p - (m' - m) s)).
Summaries live in ``summary`` (B, 1 + S, L, SUMMARY = 4) float32, O(B S L), read back and
rewritten per K tile by the program that owns them (every split needs the positive's: split 0 keeps it there, the
others in a spare copy). A last pass over the split's samples forms the scores and the split's
partial sums of the terms, of their count and of sigmoid(s_bj - s_b0); ``finish`` (common) adds the
splits in a fixed order and reduces. Saved for backward: the summaries, the scores (B, 1 + S), the
users' log-sum-exps (B, L) and per row T_b and sigma_b = sum_j sigmoid(s_bj - s_b0): nothing of K.

Backward (4 launches). With g_b = dLoss/dt_b (``row_scale``), dLoss/ds_bj = g_b sigmoid(s_bj - s_b0)
for a valid j >= 1 and -g_b sigma_b for j = 0, and e_bjl = -w_l dLoss/ds_bj the gradient reaching
D (and D'), the identities of docs/maths.md section 5 give, per tile of codes,

    dz += e [(Q - P) + (Q (log Q - log P - D'))]        da = e [P (log P - log Q - D) + (P - Q)]

(bracketed: symmetric; both sum to 0 over k). ``_backward_kernel`` (grid: row blocks x layers x
chunks of d) streams the K tiles (outer loop) and every sample (inner): dz accumulates on chip over
the samples; each da is projected at once with the tile's codewords (``project_logit_grad_into``)
into the occurrence's residual gradient, (B, 1 + S, L, d) float32 (the sum over the K tiles read
back and added by the program that owns it), and into the program's codebook partial, to which the
users' share is added once per tile, as dz C is to the user's residual gradient. The logits take
all of d, the projections the program's chunk of it, so the partial (K tile, chunk) and the rows
(rows, chunk) stay on chip. The kernel writes each occurrence's item (-1: none) as its sort key: a
stable ``torch.sort`` and ``sum_rows_by_sorted_index`` add up the occurrences of each item in a
fixed order, ``sum_partials`` the codebook partials; two backward passes are bit-identical.
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
    codebook_logits,
    finish,
    layer_log_probs,
    layer_weight,
    load_rows,
    log_sum_exp,
    project_logit_grad_into,
    row_scale,
    sigmoid,
    softplus,
    sum_partials,
    sum_rows_by_sorted_index,
    wide_operands,
)
from .launch import launch_config, plan_grid, tune_if_asked

SUMMARY = 4  # floats in a divergence summary (m, s, t_p, t_q)
_SUMMARY = tl.constexpr(SUMMARY)


@triton.jit
def _sample_items(positives_ptr, negatives_ptr, rows, row_mask, sample, num_negatives):
    """The items of sample ``sample`` for rows (BLOCK_R,), int64: positives (B,) for sample 0,
    column sample - 1 of negatives (B, S) otherwise; -1 for padding and masked rows, any value for
    an index the value checks did not see (the callers read ``clamp_rows``)."""
    positive = tl.load(positives_ptr + rows, mask=row_mask & (sample == 0), other=-1)
    negative = tl.load(negatives_ptr + rows * num_negatives + (sample - 1), mask=row_mask & (sample > 0), other=-1)
    return tl.where(sample == 0, positive, negative)


@triton.jit
def _update_summary(m, s, t_p, t_q, a, log_q, q, tile_mask):
    """The divergence summary (m, s, t_p, t_q), each (BLOCK_R,), after one more K tile of item
    logits ``a`` (BLOCK_R, BLOCK_K) (-inf on masked codes) against the user's log q and q (0 on
    masked codes). The empty summary is (-inf, 0, 0, 0)."""
    m_new = tl.maximum(m, tl.max(a, axis=1))
    rescale = tl.exp(m - m_new)
    shifted = tl.where(tile_mask, a - m_new[:, None], 0.0)
    e = tl.where(tile_mask, tl.exp(shifted), 0.0)
    shift = tl.where(s > 0, m_new - m, 0.0)  # 0 for the empty summary, whose m is -inf
    t_p = rescale * (t_p - shift * s) + tl.sum(e * (shifted - log_q), axis=1)
    s = rescale * s + tl.sum(e, axis=1)
    t_q += tl.sum(q * tl.where(tile_mask, log_q - a, 0.0), axis=1)
    return m_new, s, t_p, t_q


@triton.jit
def _load_summary(summary_ptr, mask):
    """(m, s, t_p, t_q) at summary_ptr, (BLOCK_R,) pointers to SUMMARY floats; the empty summary where
    masked."""
    m = tl.load(summary_ptr, mask=mask, other=float("-inf"))
    s = tl.load(summary_ptr + 1, mask=mask, other=0.0)
    t_p = tl.load(summary_ptr + 2, mask=mask, other=0.0)
    t_q = tl.load(summary_ptr + 3, mask=mask, other=0.0)
    return m, s, t_p, t_q


@triton.jit
def _store_summary(summary_ptr, m, s, t_p, t_q, mask):
    tl.store(summary_ptr, m, mask=mask)
    tl.store(summary_ptr + 1, s, mask=mask)
    tl.store(summary_ptr + 2, t_p, mask=mask)
    tl.store(summary_ptr + 3, t_q, mask=mask)


@triton.jit
def _divergences(m, s, t_p, t_q):
    """(lse_a, D, D') of finished summaries, (BLOCK_R,) each; 0 for the empty summary (a real one
    has s >= 1: its largest logit counts e^0)."""
    filled = s > 0
    s = tl.where(filled, s, 1.0)
    m = tl.where(filled, m, 0.0)
    log_s = tl.log(s)
    return m + log_s, t_p / s - log_s, t_q + m + log_s


@triton.jit
def _divergence(m, s, t_p, t_q, SYMMETRIC: tl.constexpr):
    """D (+ D' when SYMMETRIC) of finished summaries."""
    _, forward, reverse = _divergences(m, s, t_p, t_q)
    if SYMMETRIC:
        forward += reverse
    return forward


@triton.jit
def _forward_kernel(
    user_ptr, items_ptr, codebooks_ptr, positives_ptr, negatives_ptr, weights_ptr,
    summary_ptr, spare_ptr, user_lse_ptr, scores_ptr, part_ptr,
    batch, num_items, num_negatives, split_size, num_layers, num_codes, dim, inv_user_temperature, inv_temperature,
    USER_LOGITS: tl.constexpr, SYMMETRIC: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """A block of rows and split program_id(1) of the negatives (split_size of them, the last split
    fewer), through every layer; the split's samples are its negatives and, as its sample 0, the
    positive.

    user_ptr: (B, L, d) residuals or (B, L, K) logits (USER_LOGITS); items_ptr: (N, L, d);
    codebooks_ptr: (L, K, d); positives_ptr: (B,) int64; negatives_ptr: (B, S) int64, -1 padding;
    weights_ptr: (L,) float32 or None (all ones). Writes summary_ptr: (B, 1 + S, L, SUMMARY) float32
    the divergence summaries of the split's negatives and, split 0, of the positive; spare_ptr:
    (splits, B, L, SUMMARY) the other
    splits' own copies of the positive's; user_lse_ptr: (B, L) (split 0); scores_ptr: (B, 1 + S)
    s_bj (0 for padding; s_b0 by split 0); part_ptr: (3, splits, B) the split's sums of the terms,
    of their count and of sigmoid(s_bj - s_b0).
    """
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < batch
    split = tl.program_id(1)
    first = 1 + split * split_size
    count = tl.minimum(split_size, num_negatives + 1 - first)  # the split's negatives
    samples = 1 + num_negatives
    codebook_shape = (num_layers, num_codes, dim)
    positive_summary = tl.where(split == 0, summary_ptr + rows * samples * num_layers * _SUMMARY,
                                spare_ptr + (split * batch + rows) * num_layers * _SUMMARY)
    for layer in range(0, num_layers):
        lse_z = log_sum_exp(
            user_ptr, rows, row_mask, codebooks_ptr, codebook_shape, layer, inv_user_temperature,
            FROM_LOGITS=USER_LOGITS, BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K, BLOCK_D=BLOCK_D, PRECISION=PRECISION,
        )
        tl.store(user_lse_ptr + rows * num_layers + layer, lse_z, mask=row_mask & (split == 0))
        for k_start in range(0, num_codes, BLOCK_K):
            codes, code_mask, tile_mask = code_tile(k_start, num_codes, row_mask, BLOCK_K)
            log_q, q = layer_log_probs(
                user_ptr, rows, row_mask, codebooks_ptr, codebook_shape, layer, codes, code_mask,
                inv_user_temperature, lse_z, FROM_LOGITS=USER_LOGITS, BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K,
                BLOCK_D=BLOCK_D, PRECISION=PRECISION,
            )
            for t in range(0, 1 + count):
                sample = tl.where(t == 0, 0, first + t - 1)
                item = _sample_items(positives_ptr, negatives_ptr, rows, row_mask, sample, num_negatives)
                valid = item >= 0  # past N: a summary of row N - 1, whose score the last pass makes NaN
                a = codebook_logits(
                    items_ptr + layer * dim, num_layers * dim, clamp_rows(item, num_items), valid,
                    codebooks_ptr + layer * num_codes * dim, codes, code_mask, dim, inv_temperature,
                    BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K, BLOCK_D=BLOCK_D, PRECISION=PRECISION,
                )
                summary = tl.where(t == 0, positive_summary,
                                   summary_ptr + (rows * samples + sample) * num_layers * _SUMMARY)
                summary += layer * _SUMMARY
                m, s, t_p, t_q = _load_summary(summary, valid & (k_start > 0))
                m, s, t_p, t_q = _update_summary(m, s, t_p, t_q, a, log_q, q, valid[:, None] & code_mask[None, :])
                _store_summary(summary, m, s, t_p, t_q, row_mask)  # padding: a finite summary nothing reads
            tl.debug_barrier()  # the next tile (or the last pass) reads these summaries, maybe in other threads
    positive_score = tl.zeros((BLOCK_R,), tl.float32)
    for layer in range(0, num_layers):
        m, s, t_p, t_q = _load_summary(positive_summary + layer * _SUMMARY, row_mask)
        positive_score -= layer_weight(weights_ptr, layer) * _divergence(m, s, t_p, t_q, SYMMETRIC)
    # An index outside [0, N) was not read (``clamp_rows``): its score is NaN.
    positive = _sample_items(positives_ptr, negatives_ptr, rows, row_mask, 0, num_negatives)
    positive_score = tl.where((positive >= 0) & (positive < num_items), positive_score, float("nan"))
    tl.store(scores_ptr + rows * samples, positive_score, mask=row_mask & (split == 0))
    terms = tl.zeros((BLOCK_R,), tl.float32)
    terms_count = tl.zeros((BLOCK_R,), tl.float32)
    sigmoids = tl.zeros((BLOCK_R,), tl.float32)
    for sample in range(first, first + count):
        item = _sample_items(positives_ptr, negatives_ptr, rows, row_mask, sample, num_negatives)
        valid = item != -1
        inside = (item >= 0) & (item < num_items)
        score = tl.zeros((BLOCK_R,), tl.float32)
        for layer in range(0, num_layers):
            summary = summary_ptr + ((rows * samples + sample) * num_layers + layer) * _SUMMARY
            m, s, t_p, t_q = _load_summary(summary, valid)
            score -= layer_weight(weights_ptr, layer) * _divergence(m, s, t_p, t_q, SYMMETRIC)
        score = tl.where(valid, tl.where(inside, score, float("nan")), 0.0)
        tl.store(scores_ptr + rows * samples + sample, score, mask=row_mask)
        terms += tl.where(valid, softplus(score - positive_score), 0.0)
        sigmoids += tl.where(valid, sigmoid(score - positive_score), 0.0)
        terms_count += valid.to(tl.float32)
    splits = tl.num_programs(1)
    tl.store(part_ptr + split * batch + rows, terms, mask=row_mask)
    tl.store(part_ptr + (splits + split) * batch + rows, terms_count, mask=row_mask)
    tl.store(part_ptr + (2 * splits + split) * batch + rows, sigmoids, mask=row_mask)


@triton.jit
def _backward_kernel(
    user_ptr, items_ptr, codebooks_ptr, positives_ptr, negatives_ptr, weights_ptr,
    summary_ptr, user_lse_ptr, scores_ptr, sigmoid_sums_ptr, grad_ptr, counts_ptr, total_ptr,
    grad_user_ptr, occurrence_grad_ptr, keys_ptr, codebook_part_ptr,
    batch, num_items, num_negatives, num_layers, num_codes, dim, inv_user_temperature, inv_temperature,
    USER_LOGITS: tl.constexpr, SYMMETRIC: tl.constexpr, REDUCTION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Grid (row blocks, L, chunks): a block of rows, one layer and one chunk of BLOCK_G of the d
    residual features (the logits take all of d, the projections this chunk) through every
    sample, the module docstring's backward.

    Inputs as ``_forward_kernel`` takes and writes them; grad_ptr: () or, for "none", (B,) float32
    dLoss/dloss; counts_ptr (B,) T_b, total_ptr () sum_b T_b, sigmoid_sums_ptr (B,) sigma_b. Writes
    grad_user_ptr: (B, L, d) (or (B, L, K) for USER_LOGITS, chunk 0) in the user's dtype;
    occurrence_grad_ptr: (B, 1 + S, L, d) float32 each valid occurrence's item-residual gradient;
    keys_ptr: (B, 1 + S) int32 each occurrence's item, -1 for padding and an index outside [0, N)
    (layer 0, chunk 0);
    codebook_part_ptr: (row blocks, L, K, d) float32 the program's codebook gradient partial.
    """
    block, layer, chunk = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = block.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < batch
    samples = 1 + num_negatives
    user_width = num_codes if USER_LOGITS else dim
    item_layer = items_ptr + layer * dim
    codebook = codebooks_ptr + layer * num_codes * dim
    weight = layer_weight(weights_ptr, layer)
    row_grad = row_scale(grad_ptr, counts_ptr, total_ptr, rows, row_mask, REDUCTION)
    positive_score = tl.load(scores_ptr + rows * samples, mask=row_mask, other=0.0)
    sigmoid_sum = tl.load(sigmoid_sums_ptr + rows, mask=row_mask, other=0.0)
    lse_z = tl.load(user_lse_ptr + rows * num_layers + layer, mask=row_mask, other=0.0)
    d_start = chunk * BLOCK_G
    offs_g = d_start + tl.arange(0, BLOCK_G)
    g_mask = offs_g < dim
    grad_user_out = grad_user_ptr + rows[:, None] * num_layers * user_width
    grad_user_rows = tl.zeros((BLOCK_R, BLOCK_G), tl.float32)
    partial_ptr = codebook_part_ptr + (block * num_layers + layer) * num_codes * dim
    codebook_shape = (num_layers, num_codes, dim)
    for k_start in range(0, num_codes, BLOCK_K):
        codes, code_mask, tile_mask = code_tile(k_start, num_codes, row_mask, BLOCK_K)
        log_q, q = layer_log_probs(
            user_ptr, rows, row_mask, codebooks_ptr, codebook_shape, layer, codes, code_mask, inv_user_temperature,
            lse_z, FROM_LOGITS=USER_LOGITS, BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K, BLOCK_D=BLOCK_D, PRECISION=PRECISION,
        )
        grad_z = tl.zeros((BLOCK_R, BLOCK_K), tl.float32)
        grad_c = tl.zeros((BLOCK_K, BLOCK_G), tl.float32)
        column_sum = tl.zeros((BLOCK_K,), tl.float32)
        for sample in range(0, samples):
            item = _sample_items(positives_ptr, negatives_ptr, rows, row_mask, sample, num_negatives)
            item_rows = clamp_rows(item, num_items)
            valid = tl.where(sample == 0, row_mask, item != -1)  # a term or the positive, in range or not
            score = tl.load(scores_ptr + rows * samples + sample, mask=valid, other=0.0)
            # e = -w dLoss/ds: -w g sigmoid(s - s_0) for a negative, w g sigma for the positive
            grad_kl = tl.where(sample == 0, weight * row_grad * sigmoid_sum,
                               -weight * row_grad * sigmoid(score - positive_score))
            grad_kl = tl.where(valid, grad_kl, 0.0)[:, None]
            summary = summary_ptr + ((rows * samples + sample) * num_layers + layer) * _SUMMARY
            m, s, t_p, t_q = _load_summary(summary, valid)
            lse_a, kl, reverse_kl = _divergences(m, s, t_p, t_q)
            sample_mask = valid[:, None] & code_mask[None, :]
            log_p, p = layer_log_probs(
                items_ptr, item_rows, valid, codebooks_ptr, codebook_shape, layer, codes, code_mask, inv_temperature,
                lse_a, FROM_LOGITS=False, BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K, BLOCK_D=BLOCK_D, PRECISION=PRECISION,
            )
            grad_a = p * (log_p - log_q - kl[:, None])
            sample_grad_z = q - p
            if SYMMETRIC:
                grad_a += p - q
                sample_grad_z += q * (log_q - log_p - reverse_kl[:, None])
            grad_a = tl.where(sample_mask, 2.0 * inv_temperature * grad_kl * grad_a, 0.0)
            grad_z += tl.where(sample_mask, grad_kl * sample_grad_z, 0.0)
            x = load_rows(item_layer + d_start, num_layers * dim, item_rows, valid, dim - d_start, BLOCK_G)
            c = load_rows(codebook + d_start, dim, codes, code_mask, dim - d_start, BLOCK_G)
            occurrence = (rows * samples + sample) * num_layers + layer
            out = occurrence_grad_ptr + occurrence[:, None] * dim + offs_g[None, :]
            out_mask = valid[:, None] & g_mask[None, :]
            grad_x = tl.load(out, mask=out_mask & (k_start > 0), other=0.0)  # the tiles before this one
            grad_x, grad_c, sample_sum = project_logit_grad_into(grad_a, x, c, grad_x, grad_c, PRECISION)
            column_sum += sample_sum
            tl.store(out, grad_x, mask=out_mask)
            tl.store(keys_ptr + rows * samples + sample, tl.where(item_rows == item, item, -1).to(tl.int32),
                     mask=row_mask & (layer == 0) & (chunk == 0) & (k_start == 0))
        c = load_rows(codebook + d_start, dim, codes, code_mask, dim - d_start, BLOCK_G)
        if USER_LOGITS:
            tl.store(grad_user_out + layer * num_codes + codes[None, :], grad_z.to(grad_user_ptr.dtype.element_ty),
                     mask=tile_mask & (chunk == 0))
        else:
            x_user = load_rows(user_ptr + layer * dim + d_start, num_layers * dim, rows, row_mask, dim - d_start,
                               BLOCK_G)
            grad_user_rows, grad_c, user_sum = project_logit_grad_into(
                2.0 * inv_user_temperature * grad_z, x_user, c, grad_user_rows, grad_c, PRECISION)
            column_sum += user_sum
        grad_c -= column_sum[:, None] * c.to(tl.float32)
        tl.store(partial_ptr + codes[:, None] * dim + offs_g[None, :], grad_c,
                 mask=code_mask[:, None] & g_mask[None, :])
        tl.debug_barrier()  # the next tile adds to these occurrence rows, maybe in other threads
    if not USER_LOGITS:
        tl.store(grad_user_out + layer * dim + offs_g[None, :], grad_user_rows.to(grad_user_ptr.dtype.element_ty),
                 mask=row_mask[:, None] & g_mask[None, :])


FAMILIES = ("samples", "sample_grads")  # the launch families SODA_TUNE tunes for this op


@torch.library.custom_op("soda_kernels::sampled_bpr", mutates_args=())
def sampled_bpr_op(
    user: torch.Tensor, items: torch.Tensor, codebooks: torch.Tensor, positives: torch.Tensor,
    negatives: torch.Tensor, weights: torch.Tensor | None,
    user_logits: bool, symmetric: bool, temperature: float, user_temperature: float, reduction: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(the reduced loss, and for backward: the summaries (B, 1 + S, L, SUMMARY), the scores (B, 1 + S),
    the users' log-sum-exps (B, L), T_b (B,), sum_b T_b (), sigma_b (B,); all float32)."""
    (batch, num_negatives), (num_layers, num_codes, dim) = negatives.shape, codebooks.shape
    wide = wide_operands(user, items, codebooks)
    tune_if_asked(FAMILIES, device=user.device, batch=batch, wide=wide,
                  run=lambda: forward_backward(user, items, codebooks, positives, negatives, weights, user_logits,
                                               symmetric, temperature, user_temperature, reduction))
    config = launch_config("samples", device=user.device, batch=batch, codes=num_codes, dim=dim, wide=wide)
    row_blocks = triton.cdiv(batch, config["BLOCK_R"])
    grid = plan_grid("samples", config, user.device, row_blocks=row_blocks, negatives=num_negatives)
    split_size, splits = grid["split_size"], grid["splits"]
    summary = user.new_empty((batch, 1 + num_negatives, num_layers, SUMMARY), dtype=torch.float32)
    user_lse = user.new_empty((batch, num_layers), dtype=torch.float32)
    scores = user.new_empty((batch, 1 + num_negatives), dtype=torch.float32)
    spare = user.new_empty((splits, batch, num_layers, SUMMARY), dtype=torch.float32)
    part = user.new_empty((3, splits, batch), dtype=torch.float32)
    _forward_kernel[(row_blocks, splits)](
        user_ptr=user, items_ptr=items, codebooks_ptr=codebooks, positives_ptr=positives, negatives_ptr=negatives,
        weights_ptr=weights, summary_ptr=summary, spare_ptr=spare, user_lse_ptr=user_lse, scores_ptr=scores,
        part_ptr=part, batch=batch, num_items=items.shape[0], num_negatives=num_negatives, split_size=split_size,
        num_layers=num_layers, num_codes=num_codes, dim=dim, inv_user_temperature=1.0 / user_temperature,
        inv_temperature=1.0 / temperature, USER_LOGITS=user_logits, SYMMETRIC=symmetric, PRECISION=LOGIT_PRECISION,
        **config,
    )
    loss, counts, total, sigmoid_sums = finish(part[0], part[1], reduction, extra_parts=part[2])
    return loss, summary, scores, user_lse, counts, total, sigmoid_sums


@sampled_bpr_op.register_fake
def _(user, items, codebooks, positives, negatives, weights, user_logits, symmetric, temperature, user_temperature,
      reduction):
    (batch, num_negatives), num_layers = negatives.shape, codebooks.shape[0]

    def floats(*shape):
        return user.new_empty(shape, dtype=torch.float32)

    return (
        floats(*(positives.shape if reduction == "none" else ())),
        floats(batch, 1 + num_negatives, num_layers, SUMMARY),
        floats(batch, 1 + num_negatives),
        floats(batch, num_layers),
        floats(batch),
        floats(),
        floats(batch),
    )


@torch.library.custom_op("soda_kernels::sampled_bpr_backward", mutates_args=())
def sampled_bpr_backward(
    grad_output: torch.Tensor, user: torch.Tensor, items: torch.Tensor, codebooks: torch.Tensor,
    positives: torch.Tensor, negatives: torch.Tensor, weights: torch.Tensor | None, summary: torch.Tensor,
    scores: torch.Tensor, user_lse: torch.Tensor, counts: torch.Tensor, total: torch.Tensor,
    sigmoid_sums: torch.Tensor,
    user_logits: bool, symmetric: bool, temperature: float, user_temperature: float, reduction: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    (batch, num_negatives), (num_layers, num_codes, dim) = negatives.shape, codebooks.shape
    config = launch_config("sample_grads", device=user.device, batch=batch, codes=num_codes, dim=dim,
                           wide=wide_operands(user, items, codebooks))
    row_blocks = triton.cdiv(batch, config["BLOCK_R"])
    grad_user = torch.empty_like(user)
    occurrence_grad = items.new_empty((batch, 1 + num_negatives, num_layers, dim), dtype=torch.float32)
    keys = negatives.new_empty((batch, 1 + num_negatives), dtype=torch.int32)  # items < 2^31
    codebook_part = codebooks.new_empty((row_blocks, num_layers, num_codes, dim), dtype=torch.float32)
    _backward_kernel[(row_blocks, num_layers, triton.cdiv(dim, config["BLOCK_G"]))](
        user_ptr=user, items_ptr=items, codebooks_ptr=codebooks, positives_ptr=positives, negatives_ptr=negatives,
        weights_ptr=weights, summary_ptr=summary, user_lse_ptr=user_lse, scores_ptr=scores,
        sigmoid_sums_ptr=sigmoid_sums, grad_ptr=grad_output.float().contiguous(), counts_ptr=counts, total_ptr=total,
        grad_user_ptr=grad_user, occurrence_grad_ptr=occurrence_grad, keys_ptr=keys, codebook_part_ptr=codebook_part,
        batch=batch, num_items=items.shape[0], num_negatives=num_negatives, num_layers=num_layers,
        num_codes=num_codes, dim=dim, inv_user_temperature=1.0 / user_temperature, inv_temperature=1.0 / temperature,
        USER_LOGITS=user_logits, SYMMETRIC=symmetric, REDUCTION=reduction, PRECISION=LOGIT_PRECISION, **config,
    )
    sorted_keys, order = torch.sort(keys.flatten(), stable=True)
    grad_items = sum_rows_by_sorted_index(occurrence_grad.flatten(0, 1), sorted_keys, order, items.shape[0],
                                          items.dtype)
    return grad_user, grad_items, sum_partials(codebook_part, codebooks.dtype)


# Saved: user, items, codebooks, positives, negatives, weights; gradients for the first three.
forward_backward = register_backward(sampled_bpr_op, sampled_bpr_backward, saved_inputs=6, grads=3)


def sampled_bpr(user, items, codebooks, positives, negatives, *, user_logits, symmetric, temperature,
                user_temperature, layer_weights, reduction):
    """Distributional BPR against explicit negatives on the Triton kernels; arguments validated by
    the caller. user (B, L, d) residuals or (B, L, K) logits, items (N, L, d), codebooks (L, K, d),
    positives (B,), negatives (B, S) with -1 padding -> a float32 scalar, or (B,) for "none".
    Non-contiguous inputs are copied once (the kernels index row-major tensors)."""
    loss, *_ = sampled_bpr_op(
        user.contiguous(), items.contiguous(), codebooks.contiguous(), positives.long().contiguous(),
        negatives.long().contiguous(), layer_weights, user_logits, symmetric, temperature,
        user_temperature, reduction,
    )
    return loss
