"""Fused in-batch distributional BPR (``negatives=None``): the B x B score matrix streamed like attention.

Per row b, Q_b = the user's code distributions and P_b = those of its positive item pos[b]
(both (L, K)). Over the concatenated (layer, code) axis of F = L K (2 L K when symmetric)
features the score matrix S[b, m] = s(b, pos[m]) is one matrix product plus row/column terms:

    S = A Bm^T + rb[:, None] + cb[None, :]
    A[b]  = [w logQ_b, (w Q_b)]      Bm[m] = [P_m, (log P_m)]      (bracketed: symmetric only)
    rb[b] = (-sum_l w_l Q_b^l . log Q_b^l)    cb[m] = -sum_l w_l P_m^l . log P_m^l

The operands A, Bm (B, F) are float32 temporaries built from the log-probabilities, never saved:
backward rebuilds them. With valid(b, m) = m != b and pos[m] != pos[b], the terms of row b are

    "items": softplus(S[b, m] - S[b, b])      "users": softplus(S[m, b] - S[b, b])      (valid m)

One streaming kernel serves both directions: a program owns a block of rows of X and loops over
tiles of Y, with (X, Y) = (A, Bm) for the row direction ("items") and (Bm, A) for the column
direction ("users", the transposed tile). Backward, with g_b = dLoss/d(row b's term sum),

    dS[b, m] = g_b sigmoid(S[b, m] - S[b, b]) [items] + g_m sigmoid(S[b, m] - S[m, m]) [users]
    dS[b, b] = -g_b (sum_m sigmoid(S[b, m] - S[b, b]) [items] + sum_m sigmoid(S[m, b] - S[b, b]) [users])

dA = dS Bm and drb = dS 1 come from the row-direction pass, dBm = dS^T A and dcb = dS^T 1 from the
column-direction pass (no atomics), the diagonal added afterwards. "mean" has one term per row
against the in-batch mean user distribution (O(B L K), no pairwise matrix): PyTorch ops on
temporaries, differentiated by recomputation in backward. Gradients then go from the operands to
the log-probabilities, through log-softmax to the logits, and onto residuals and codebooks with
``project_logit_grad``; item rows are summed over repeated positives by a sort-based
``index_put_``, so two backward passes are bit-identical.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import torch_backend
from ._triton_utils import FP32_DOT_PRECISION, block_size, project_logit_grad
from .codebook_log_softmax import codebook_log_softmax_forward

# Largest tile of rows (and of the streamed rows) per program; tests lower it to span several tiles.
MAX_BLOCK_B = 64
# Largest block of gradient features per backward program (each block recomputes its score tiles).
MAX_BLOCK_FO = 256


@triton.jit
def _softplus(x):
    """log(1 + e^x) = max(x, 0) + log1p(e^-|x|), the log1p by its series where e^-|x| is tiny."""
    e = tl.exp(-tl.abs(x))
    return tl.maximum(x, 0.0) + tl.where(e < 1e-4, e * (1.0 - 0.5 * e), tl.log(1.0 + e))


@triton.jit
def _sigmoid(x):
    """1 / (1 + e^-x) from e^-|x|, which never overflows."""
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0, e) / (1.0 + e)


@triton.jit
def _score_tile(
    x_ptr, y_ptr, stride_row, own, own_mask, other, other_mask, y_bias_ptr, num_features,
    BLOCK_OWN: tl.constexpr, BLOCK_OTHER: tl.constexpr, BLOCK_F: tl.constexpr, PRECISION: tl.constexpr,
):
    """X[own] . Y[other] + y_bias[other], a (BLOCK_OWN, BLOCK_OTHER) float32 tile (add x_bias[own])."""
    acc = tl.zeros((BLOCK_OWN, BLOCK_OTHER), dtype=tl.float32)
    for f_start in range(0, num_features, BLOCK_F):
        offs_f = f_start + tl.arange(0, BLOCK_F)
        f_mask = offs_f < num_features
        x = tl.load(x_ptr + own[:, None] * stride_row + offs_f[None, :],
                    mask=own_mask[:, None] & f_mask[None, :], other=0.0)
        y = tl.load(y_ptr + other[None, :] * stride_row + offs_f[:, None],
                    mask=f_mask[:, None] & other_mask[None, :], other=0.0)
        acc = tl.dot(x, y, acc, input_precision=PRECISION)
    y_bias = tl.load(y_bias_ptr + other, mask=other_mask, other=0.0)
    return acc + y_bias[None, :]


@triton.jit
def _valid_pairs(pos_ptr, own, own_pos, other, other_mask):
    """(BLOCK_OWN, BLOCK_OTHER) mask of the pairs that make a term: other != own, pos differs."""
    other_pos = tl.load(pos_ptr + other, mask=other_mask, other=-1)
    distinct = (other[None, :] != own[:, None]) & (other_pos[None, :] != own_pos[:, None])
    return other_mask[None, :] & distinct


@triton.jit
def _in_batch_terms_kernel(
    x_ptr, y_ptr, stride_row, x_bias_ptr, y_bias_ptr, diag_ptr, pos_ptr, term_sum_ptr,
    batch, num_features,
    BLOCK_OWN: tl.constexpr, BLOCK_OTHER: tl.constexpr, BLOCK_F: tl.constexpr, PRECISION: tl.constexpr,
):
    """term_sum[i] = sum_(valid j) softplus(T[i, j] - T[i, i]), T = X Y^T + x_bias + y_bias (S or S^T)."""
    own = tl.program_id(0).to(tl.int64) * BLOCK_OWN + tl.arange(0, BLOCK_OWN)
    own_mask = own < batch
    own_pos = tl.load(pos_ptr + own, mask=own_mask, other=-1)
    own_shift = tl.load(x_bias_ptr + own, mask=own_mask, other=0.0) - tl.load(diag_ptr + own, mask=own_mask)
    total = tl.zeros((BLOCK_OWN,), dtype=tl.float32)
    for start in range(0, batch, BLOCK_OTHER):
        other = start + tl.arange(0, BLOCK_OTHER).to(tl.int64)
        other_mask = other < batch
        scores = _score_tile(
            x_ptr, y_ptr, stride_row, own, own_mask, other, other_mask, y_bias_ptr, num_features,
            BLOCK_OWN, BLOCK_OTHER, BLOCK_F, PRECISION,
        )
        valid = _valid_pairs(pos_ptr, own, own_pos, other, other_mask)
        total += tl.sum(tl.where(valid, _softplus(scores + own_shift[:, None]), 0.0), axis=1)
    tl.store(term_sum_ptr + own, total, mask=own_mask)


@triton.jit
def _in_batch_grad_kernel(
    x_ptr, y_ptr, stride_row, x_bias_ptr, y_bias_ptr, diag_ptr, pos_ptr, scale_ptr,
    grad_x_ptr, grad_bias_ptr, grad_diag_ptr, batch, num_features,
    OWN_TERMS: tl.constexpr, OTHER_TERMS: tl.constexpr,
    BLOCK_OWN: tl.constexpr, BLOCK_OTHER: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_FO: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """For T = X Y^T + biases (S or S^T) and the terms softplus(T[i, j] - T[i, i]) of row i
    (OWN_TERMS) and softplus(T[i, j] - T[j, j]) of row j (OTHER_TERMS), each scaled by its row's g:

        c[i, j] = g_i sigmoid(T[i, j] - T[i, i]) [OWN] + g_j sigmoid(T[i, j] - T[j, j]) [OTHER]
        grad_x[i] = sum_j c[i, j] Y[j]   grad_bias[i] = sum_j c[i, j]
        grad_diag[i] = -g_i sum_j sigmoid(T[i, j] - T[i, i]) [OWN]     (the off-tile dT[i, i] share)

    Program (i-block, f-block) writes the features f-block of grad_x; the tile T is recomputed per
    f-block, so every output has one writer."""
    own = tl.program_id(0).to(tl.int64) * BLOCK_OWN + tl.arange(0, BLOCK_OWN)
    out_f = tl.program_id(1).to(tl.int64) * BLOCK_FO + tl.arange(0, BLOCK_FO)
    own_mask = own < batch
    out_f_mask = out_f < num_features
    own_pos = tl.load(pos_ptr + own, mask=own_mask, other=-1)
    own_diag = tl.load(diag_ptr + own, mask=own_mask, other=0.0)
    own_bias = tl.load(x_bias_ptr + own, mask=own_mask, other=0.0)
    own_scale = tl.load(scale_ptr + own, mask=own_mask, other=0.0)
    grad_x = tl.zeros((BLOCK_OWN, BLOCK_FO), dtype=tl.float32)
    grad_bias = tl.zeros((BLOCK_OWN,), dtype=tl.float32)
    own_sigmoid_sum = tl.zeros((BLOCK_OWN,), dtype=tl.float32)
    for start in range(0, batch, BLOCK_OTHER):
        other = start + tl.arange(0, BLOCK_OTHER).to(tl.int64)
        other_mask = other < batch
        scores = own_bias[:, None] + _score_tile(
            x_ptr, y_ptr, stride_row, own, own_mask, other, other_mask, y_bias_ptr, num_features,
            BLOCK_OWN, BLOCK_OTHER, BLOCK_F, PRECISION,
        )
        valid = _valid_pairs(pos_ptr, own, own_pos, other, other_mask)
        coeff = tl.zeros((BLOCK_OWN, BLOCK_OTHER), dtype=tl.float32)
        if OWN_TERMS:
            own_sigmoid = tl.where(valid, _sigmoid(scores - own_diag[:, None]), 0.0)
            own_sigmoid_sum += tl.sum(own_sigmoid, axis=1)
            coeff += own_scale[:, None] * own_sigmoid
        if OTHER_TERMS:
            other_diag = tl.load(diag_ptr + other, mask=other_mask, other=0.0)
            other_scale = tl.load(scale_ptr + other, mask=other_mask, other=0.0)
            coeff += tl.where(valid, other_scale[None, :] * _sigmoid(scores - other_diag[None, :]), 0.0)
        grad_bias += tl.sum(coeff, axis=1)
        y = tl.load(y_ptr + other[:, None] * stride_row + out_f[None, :],
                    mask=other_mask[:, None] & out_f_mask[None, :], other=0.0)
        grad_x = tl.dot(coeff, y, grad_x, input_precision=PRECISION)
    tl.store(grad_x_ptr + own[:, None] * stride_row + out_f[None, :], grad_x,
             mask=own_mask[:, None] & out_f_mask[None, :])
    first_f_block = tl.program_id(1) == 0
    tl.store(grad_bias_ptr + own, grad_bias, mask=own_mask & first_f_block)
    tl.store(grad_diag_ptr + own, -own_scale * own_sigmoid_sum, mask=own_mask & first_f_block)


@dataclass(frozen=True)
class _Options:
    in_batch: str
    user_logits: bool
    symmetric: bool
    temperature: float
    user_temperature: float
    reduction: str


@dataclass
class _Operands:
    """S = rows cols^T + row_bias[:, None] + col_bias[None, :]; diag[b] = S[b, b]. All float32."""

    rows: torch.Tensor  # (B, F)
    cols: torch.Tensor  # (B, F)
    row_bias: torch.Tensor  # (B,)
    col_bias: torch.Tensor  # (B,)
    diag: torch.Tensor  # (B,)


def _log_probs(user, items, codebooks, positives, options: _Options):
    """log Q (B, L, K) of the users and log P (B, L, K) of their positive items, float32."""
    if options.user_logits:
        log_q = torch.log_softmax(user.float(), -1)
    else:
        log_q = codebook_log_softmax_forward(user, codebooks, options.user_temperature)
    log_p = codebook_log_softmax_forward(items[positives], codebooks, options.temperature)
    return log_q, log_p


def _operands(log_q, log_p, weights, symmetric) -> _Operands:
    users = torch_backend._Side(log_q, weights)
    items = torch_backend._Side(log_p, weights)
    rows, cols = torch_backend._score_operands(users, items, weights, symmetric)
    row_bias = -users.negative_entropy if symmetric else torch.zeros_like(users.negative_entropy)
    col_bias = -items.negative_entropy
    diag = (rows * cols).sum(1) + row_bias + col_bias
    return _Operands(rows.contiguous(), cols.contiguous(), row_bias, col_bias, diag)


def _launch_blocks(batch: int, num_features: int) -> dict:
    block_b = block_size(batch, high=MAX_BLOCK_B)
    return dict(BLOCK_OWN=block_b, BLOCK_OTHER=block_b, BLOCK_F=block_size(num_features, high=64),
                PRECISION=FP32_DOT_PRECISION)


def _directions(ops: _Operands):
    """(x, y, x_bias, y_bias) of the row direction (T = S) and the column direction (T = S^T)."""
    return (ops.rows, ops.cols, ops.row_bias, ops.col_bias), (ops.cols, ops.rows, ops.col_bias, ops.row_bias)


def _pair_term_sums(ops: _Operands, positives, in_batch: str) -> torch.Tensor:
    """Per row b, the sum of its "items" and/or "users" terms, (B,) float32."""
    batch, num_features = ops.rows.shape
    blocks = _launch_blocks(batch, num_features)
    row_direction, col_direction = _directions(ops)
    term_sums = torch.zeros(batch, dtype=torch.float32, device=ops.rows.device)
    for (x, y, x_bias, y_bias), wanted in ((row_direction, ("items", "both")), (col_direction, ("users", "both"))):
        if in_batch in wanted:
            out = torch.empty_like(term_sums)
            _in_batch_terms_kernel[(triton.cdiv(batch, blocks["BLOCK_OWN"]),)](
                x, y, x.stride(0), x_bias, y_bias, ops.diag, positives, out, batch, num_features, **blocks,
            )
            term_sums += out
    return term_sums


def _pair_operand_grads(ops: _Operands, positives, scale, in_batch: str):
    """dLoss/d(rows, cols, row_bias, col_bias) for dLoss/d(term sum of row b) = scale[b]."""
    batch, num_features = ops.rows.shape
    blocks = _launch_blocks(batch, num_features)
    block_fo = block_size(num_features, high=MAX_BLOCK_FO)
    grid = (triton.cdiv(batch, blocks["BLOCK_OWN"]), triton.cdiv(num_features, block_fo))
    items, users = in_batch in ("items", "both"), in_batch in ("users", "both")
    grads = []
    flags = ((items, users), (users, items))  # (OWN_TERMS, OTHER_TERMS) of the row, column direction
    for (x, y, x_bias, y_bias), (own_terms, other_terms) in zip(_directions(ops), flags, strict=True):
        grad_x = torch.empty_like(x)
        grad_bias, grad_diag = torch.empty_like(scale), torch.empty_like(scale)
        _in_batch_grad_kernel[grid](
            x, y, x.stride(0), x_bias, y_bias, ops.diag, positives, scale, grad_x, grad_bias, grad_diag,
            batch, num_features, OWN_TERMS=own_terms, OTHER_TERMS=other_terms, BLOCK_FO=block_fo, **blocks,
        )
        grads.append((grad_x, grad_bias, grad_diag))
    (grad_rows, grad_row_bias, diag_from_rows), (grad_cols, grad_col_bias, diag_from_cols) = grads
    grad_diag = (diag_from_rows + diag_from_cols)[:, None]
    return (grad_rows + grad_diag * ops.cols, grad_cols + grad_diag * ops.rows,
            grad_row_bias + grad_diag[:, 0], grad_col_bias + grad_diag[:, 0])


def _log_prob_grads(grads, log_q, log_p, weights, symmetric):
    """dLoss/dlogQ and dLoss/dlogP (each (B, L, K), Q = exp logQ, P = exp logP) from the operand
    gradients, up to a multiple of p per (row, layer), which the log-softmax backward removes:
    d(-p log p)/dlog p = -p (log p + 1) enters as -p log p (the nearly cancelling -p dropped)."""
    grad_rows, grad_cols, grad_row_bias, grad_col_bias = grads
    shape, w = log_q.shape, weights[:, None]
    q, p = log_q.exp(), log_p.exp()
    grad_log_q = w * grad_rows[:, : shape[1] * shape[2]].view(shape)
    grad_log_p = p * grad_cols[:, : shape[1] * shape[2]].view(shape)
    grad_log_p = grad_log_p - w * p * log_p * grad_col_bias[:, None, None]
    if symmetric:
        grad_log_q = grad_log_q + w * q * grad_rows[:, shape[1] * shape[2]:].view(shape)
        grad_log_q = grad_log_q - w * q * log_q * grad_row_bias[:, None, None]
        grad_log_p = grad_log_p + grad_cols[:, shape[1] * shape[2]:].view(shape)
    return grad_log_q, grad_log_p


def _groups(positives):
    """Rows grouped by equal positives: (group index of each row (B,), number of groups, number of
    rows whose positive differs (B,))."""
    _, group_of_row, group_size = torch.unique(positives, return_inverse=True, return_counts=True)
    return group_of_row, len(group_size), len(positives) - group_size[group_of_row]


def _mean_user_terms(log_q, log_p, positives, weights, symmetric):
    """(term (B,), has_term (B,)) of "mean": softplus(s(mean of Q_m over valid m, P_b) - S[b, b]).

    The mean by group sums over equal positives and prefix/suffix sums over the groups (no
    subtraction, so no cancellation); the group sums by a deterministic, sort-based index_put_.
    """
    group_of_row, num_groups, count = _groups(positives)
    probs = log_q.exp()
    group_sum = probs.new_zeros((num_groups,) + probs.shape[1:]).index_put_((group_of_row,), probs, accumulate=True)
    zero = torch.zeros_like(group_sum[:1])
    before = torch.cat([zero, torch.cumsum(group_sum, 0)[:-1]])
    after = torch.cat([torch.flip(torch.cumsum(torch.flip(group_sum, [0]), 0), [0])[1:], zero])
    others = (before + after)[group_of_row]
    log_mean = others.clamp_min(torch.finfo(torch.float32).tiny).log() - count.clamp_min(1).float().log()[:, None, None]
    users, items = torch_backend._Side(log_q, weights), torch_backend._Side(log_p, weights)
    positive_score = torch_backend.score_rows(users, items, weights, symmetric)
    mean_score = torch_backend.score_rows(torch_backend._Side(log_mean, weights), items, weights, symmetric)
    has_term = (count > 0).float()
    return F.softplus(mean_score - positive_score) * has_term, has_term


def _row_scales(grad_output, row_counts, reduction):
    """dLoss/d(term sum of row b), (B,) float32."""
    grad_output = grad_output.float()
    if reduction == "none":
        return grad_output / row_counts.clamp_min(1)
    if reduction == "mean":
        grad_output = grad_output / row_counts.sum().clamp_min(1)
    return grad_output.expand(row_counts.shape).contiguous()


def _log_softmax_backward(log_probs, grad_log_probs):
    return grad_log_probs - log_probs.exp() * grad_log_probs.sum(-1, keepdim=True)


class InBatchBPR(torch.autograd.Function):
    @staticmethod
    def forward(ctx, user, items, codebooks, positives, weights, options: _Options):
        log_q, log_p = _log_probs(user, items, codebooks, positives, options)
        if options.in_batch == "mean":
            row_sums, row_counts = _mean_user_terms(log_q, log_p, positives, weights, options.symmetric)
        else:
            ops = _operands(log_q, log_p, weights, options.symmetric)
            row_sums = _pair_term_sums(ops, positives, options.in_batch)
            row_counts = _groups(positives)[2].float() * (2 if options.in_batch == "both" else 1)
        ctx.save_for_backward(user, items, codebooks, positives, weights, row_counts)
        ctx.options = options
        return torch_backend.reduce_terms(row_sums, row_counts, options.reduction)

    @staticmethod
    def backward(ctx, grad_output):
        user, items, codebooks, positives, weights, row_counts = ctx.saved_tensors
        options = ctx.options
        scale = _row_scales(grad_output, row_counts, options.reduction)
        log_q, log_p = _log_probs(user, items, codebooks, positives, options)
        if options.in_batch == "mean":
            with torch.enable_grad():
                log_q, log_p = log_q.requires_grad_(), log_p.requires_grad_()
                terms, _ = _mean_user_terms(log_q, log_p, positives, weights, options.symmetric)
                grad_log_q, grad_log_p = torch.autograd.grad(terms, (log_q, log_p), scale)
        else:
            ops = _operands(log_q, log_p, weights, options.symmetric)
            grads = _pair_operand_grads(ops, positives, scale, options.in_batch)
            grad_log_q, grad_log_p = _log_prob_grads(grads, log_q, log_p, weights, options.symmetric)
        grad_user_logits = _log_softmax_backward(log_q.detach(), grad_log_q)
        grad_item_logits = _log_softmax_backward(log_p.detach(), grad_log_p)
        grad_rows, grad_codebooks = project_logit_grad(grad_item_logits, items[positives], codebooks,
                                                       options.temperature)
        grad_items = torch.zeros(items.shape, dtype=torch.float32, device=items.device)
        grad_items.index_put_((positives,), grad_rows, accumulate=True)
        if options.user_logits:
            grad_user = grad_user_logits
        else:
            grad_user, grad_codebooks_users = project_logit_grad(grad_user_logits, user, codebooks,
                                                                 options.user_temperature)
            grad_codebooks = grad_codebooks + grad_codebooks_users
        return (grad_user.to(user.dtype), grad_items.to(items.dtype), grad_codebooks.to(codebooks.dtype),
                None, None, None)


def in_batch_bpr(user, items, codebooks, positives, *, in_batch, user_logits, symmetric, temperature,
                 user_temperature, layer_weights, reduction):
    """In-batch distributional BPR on the Triton backend (arguments validated by the caller).

    user (B, L, d) residuals or (B, L, K) logits, items (N, L, d), codebooks (L, K, d),
    positives (B,); returns a float32 scalar, or (B,) with ``reduction="none"``.
    """
    options = _Options(in_batch, user_logits, symmetric, temperature, user_temperature, reduction)
    return InBatchBPR.apply(user, items, codebooks, positives.long().contiguous(), layer_weights, options)
