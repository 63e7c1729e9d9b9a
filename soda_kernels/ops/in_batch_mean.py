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

Each tile of S is computed once per pass and serves both directions: its row sums give the
"items" terms of its rows, its column sums the "users" terms of its columns. The rows are taken
in slabs of R rows (a multiple of BLOCK_B, R B <= MAX_SLAB_ELEMENTS unless R = BLOCK_B; R = B / 4
at B = 4096, so no slab is the whole B x B matrix beyond B = 2048) and every program of a slab
owns one (BLOCK_B, BLOCK_B) tile. Backward, with
g_b = dLoss/d(row b's term sum),

    C[b, m]  = g_b sigmoid(S[b, m] - S[b, b]) [items] + g_m sigmoid(S[b, m] - S[m, m]) [users]
    dS[b, b] = -g_b (sum_m sigmoid(S[b, m] - S[b, b]) [items] + sum_m sigmoid(S[m, b] - S[b, b]) [users])
    dA = C Bm,  dBm = C^T A,  drb = C 1,  dcb = C^T 1       (valid pairs; the diagonal added after)

a kernel writes a slab's rows of C, an (R, B) float32 transient (at most MAX_SLAB_ELEMENTS, 16 MB;
never saved), and the two products per slab are float32 ``torch.mm`` (cuBLAS; they follow torch's
float32 matmul precision setting, full float32 by default). So S costs one B x B x F product per
pass, backward two more. Cross-program sums go through per-program float32 partial buffers
(a slab's partials are at most R B / BLOCK_B floats) summed by ``torch.sum``, and slabs are added
in order: no atomics, deterministic. "mean" has one term per row against the in-batch mean user
distribution (O(B L K), no pairwise matrix): PyTorch ops on temporaries, recomputed in backward,
which applies their gradient derived by hand (``_mean_log_prob_grads``; the mean's share reaches
the users through the forward's group sums again). Gradients then go from the operands to the
log-probabilities, through log-softmax to the logits, and onto residuals and codebooks with
``project_logit_grad``; item rows are summed over repeated positives by a sort-based
``index_put_``, so two backward passes are bit-identical.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .. import torch_backend
from ._legacy import FP32_DOT_PRECISION, block_size, project_logit_grad
from .soft_assignment import codebook_log_softmax_forward

# Largest tile side (rows and columns of S) per program; tests lower it to span several tiles.
MAX_BLOCK_B = 64
# Most float32 elements of one row slab of C (16 MB); tests lower it to span several slabs.
MAX_SLAB_ELEMENTS = 2**22


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
    rows_ptr, cols_ptr, stride_row, row_bias_ptr, col_bias_ptr, pos_ptr, slab_start, batch, num_features,
    BLOCK_B: tl.constexpr, BLOCK_F: tl.constexpr, PRECISION: tl.constexpr,
):
    """This program's tile of S: (row indices, column indices, S tile, valid mask), the tile being
    rows[i] . cols[j] + row_bias[i] + col_bias[j] for i in row block program_id(0) of the slab
    starting at slab_start and j in column block program_id(1); valid(i, j) = both in range,
    j != i and pos[j] != pos[i]."""
    row = slab_start + tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    col = tl.program_id(1).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask, col_mask = row < batch, col < batch
    acc = tl.zeros((BLOCK_B, BLOCK_B), dtype=tl.float32)
    for f_start in range(0, num_features, BLOCK_F):
        offs_f = f_start + tl.arange(0, BLOCK_F)
        f_mask = offs_f < num_features
        a = tl.load(rows_ptr + row[:, None] * stride_row + offs_f[None, :],
                    mask=row_mask[:, None] & f_mask[None, :], other=0.0)
        b = tl.load(cols_ptr + col[None, :] * stride_row + offs_f[:, None],
                    mask=f_mask[:, None] & col_mask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    row_bias = tl.load(row_bias_ptr + row, mask=row_mask, other=0.0)
    col_bias = tl.load(col_bias_ptr + col, mask=col_mask, other=0.0)
    row_pos = tl.load(pos_ptr + row, mask=row_mask, other=-1)
    col_pos = tl.load(pos_ptr + col, mask=col_mask, other=-1)
    valid = (row_mask[:, None] & col_mask[None, :] & (col[None, :] != row[:, None])
             & (col_pos[None, :] != row_pos[:, None]))
    return row, col, acc + row_bias[:, None] + col_bias[None, :], valid


@triton.jit
def _in_batch_terms_kernel(
    rows_ptr, cols_ptr, stride_row, row_bias_ptr, col_bias_ptr, diag_ptr, pos_ptr,
    item_partial_ptr, user_partial_ptr, slab_start, slab_rows, batch, num_features,
    ITEMS: tl.constexpr, USERS: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_F: tl.constexpr, PRECISION: tl.constexpr,
):
    """One tile of S, both directions: for the slab's rows i and the columns j of the tile,

        item_partial[j-block, i - slab_start] = sum_(valid j) softplus(S[i, j] - S[i, i])   [ITEMS]
        user_partial[i-block, j]              = sum_(valid i) softplus(S[i, j] - S[j, j])   [USERS]

    (item_partial (num column blocks, slab_rows), user_partial (slab row blocks, B))."""
    row, col, scores, valid = _score_tile(
        rows_ptr, cols_ptr, stride_row, row_bias_ptr, col_bias_ptr, pos_ptr, slab_start, batch, num_features,
        BLOCK_B, BLOCK_F, PRECISION,
    )
    row_mask, col_mask = row < batch, col < batch
    if ITEMS:
        row_diag = tl.load(diag_ptr + row, mask=row_mask, other=0.0)
        terms = tl.where(valid, _softplus(scores - row_diag[:, None]), 0.0)
        tl.store(item_partial_ptr + tl.program_id(1) * slab_rows + (row - slab_start), tl.sum(terms, axis=1),
                 mask=row_mask)
    if USERS:
        col_diag = tl.load(diag_ptr + col, mask=col_mask, other=0.0)
        terms = tl.where(valid, _softplus(scores - col_diag[None, :]), 0.0)
        tl.store(user_partial_ptr + tl.program_id(0) * batch + col, tl.sum(terms, axis=0), mask=col_mask)


@triton.jit
def _in_batch_coeff_kernel(
    rows_ptr, cols_ptr, stride_row, row_bias_ptr, col_bias_ptr, diag_ptr, pos_ptr, scale_ptr,
    coeff_ptr, item_partial_ptr, user_partial_ptr, slab_start, slab_rows, batch, num_features,
    ITEMS: tl.constexpr, USERS: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_F: tl.constexpr, PRECISION: tl.constexpr,
):
    """One tile of C = dLoss/dS off the diagonal, and the tile's shares of the diagonal:

        coeff[i - slab_start, j] = g_i sigmoid(S[i, j] - S[i, i]) [ITEMS] + g_j sigmoid(S[i, j] - S[j, j]) [USERS]
        item_partial[j-block, i - slab_start] = sum_(valid j) sigmoid(S[i, j] - S[i, i])       [ITEMS]
        user_partial[i-block, j]              = sum_(valid i) sigmoid(S[i, j] - S[j, j])       [USERS]

    (valid pairs only, C = 0 elsewhere; coeff (slab_rows, B) row-major)."""
    row, col, scores, valid = _score_tile(
        rows_ptr, cols_ptr, stride_row, row_bias_ptr, col_bias_ptr, pos_ptr, slab_start, batch, num_features,
        BLOCK_B, BLOCK_F, PRECISION,
    )
    row_mask, col_mask = row < batch, col < batch
    coeff = tl.zeros((BLOCK_B, BLOCK_B), dtype=tl.float32)
    if ITEMS:
        row_diag = tl.load(diag_ptr + row, mask=row_mask, other=0.0)
        row_scale = tl.load(scale_ptr + row, mask=row_mask, other=0.0)
        sigmoids = tl.where(valid, _sigmoid(scores - row_diag[:, None]), 0.0)
        coeff += row_scale[:, None] * sigmoids
        tl.store(item_partial_ptr + tl.program_id(1) * slab_rows + (row - slab_start), tl.sum(sigmoids, axis=1),
                 mask=row_mask)
    if USERS:
        col_diag = tl.load(diag_ptr + col, mask=col_mask, other=0.0)
        col_scale = tl.load(scale_ptr + col, mask=col_mask, other=0.0)
        sigmoids = tl.where(valid, _sigmoid(scores - col_diag[None, :]), 0.0)
        coeff += col_scale[None, :] * sigmoids
        tl.store(user_partial_ptr + tl.program_id(0) * batch + col, tl.sum(sigmoids, axis=0), mask=col_mask)
    tl.store(coeff_ptr + (row[:, None] - slab_start) * batch + col[None, :], coeff,
             mask=row_mask[:, None] & col_mask[None, :])


@dataclass
class _Operands:
    """S = rows cols^T + row_bias[:, None] + col_bias[None, :]; diag[b] = S[b, b]. All float32."""

    rows: torch.Tensor  # (B, F)
    cols: torch.Tensor  # (B, F)
    row_bias: torch.Tensor  # (B,)
    col_bias: torch.Tensor  # (B,)
    diag: torch.Tensor  # (B,)


def _log_probs(user, items, codebooks, positives, user_logits, temperature, user_temperature):
    """log Q (B, L, K) of the users and log P (B, L, K) of their positive items, float32."""
    if user_logits:
        log_q = torch.log_softmax(user.float(), -1)
    else:
        log_q = codebook_log_softmax_forward(user, codebooks, user_temperature)
    log_p = codebook_log_softmax_forward(items[positives], codebooks, temperature)
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
    return dict(BLOCK_B=block_size(batch, high=MAX_BLOCK_B), BLOCK_F=block_size(num_features, high=64),
                PRECISION=FP32_DOT_PRECISION)


@dataclass(frozen=True)
class _Slabs:
    """The row slabs of S and the launch of one: every slab but the last has ``rows`` rows (a
    multiple of the tile side, R B <= MAX_SLAB_ELEMENTS where the tile allows)."""

    batch: int
    rows: int
    block_b: int

    @classmethod
    def of(cls, batch: int, block_b: int) -> _Slabs:
        rows = max(block_b, min(batch, MAX_SLAB_ELEMENTS // batch) // block_b * block_b)
        return cls(batch, rows, block_b)

    @property
    def num_col_blocks(self) -> int:
        return triton.cdiv(self.batch, self.block_b)

    @property
    def num_row_blocks(self) -> int:
        return triton.cdiv(self.rows, self.block_b)

    def partials(self, like: torch.Tensor):
        """The per-program float32 partial sums of one slab: by column block for its rows
        (num_col_blocks, rows) and by row block for the columns (num_row_blocks, B); zeroed, so
        the direction a kernel skips (ITEMS or USERS off) sums to 0."""
        return like.new_zeros((self.num_col_blocks, self.rows)), like.new_zeros((self.num_row_blocks, self.batch))

    def __iter__(self):
        """(first row, number of rows, launch grid) of each slab, in order."""
        for start in range(0, self.batch, self.rows):
            count = min(self.rows, self.batch - start)
            yield start, count, (triton.cdiv(count, self.block_b), self.num_col_blocks)


def _flags(in_batch: str) -> dict:
    return dict(ITEMS=in_batch in ("items", "both"), USERS=in_batch in ("users", "both"))


def _pair_term_sums(ops: _Operands, positives, in_batch: str) -> torch.Tensor:
    """Per row b, the sum of its "items" and/or "users" terms, (B,) float32."""
    batch, num_features = ops.rows.shape
    blocks = _launch_blocks(batch, num_features)
    slabs = _Slabs.of(batch, blocks["BLOCK_B"])
    item_partials, user_partials = slabs.partials(ops.rows)
    item_terms, user_terms = torch.zeros_like(ops.diag), torch.zeros_like(ops.diag)
    for start, count, grid in slabs:
        _in_batch_terms_kernel[grid](
            ops.rows, ops.cols, ops.rows.stride(0), ops.row_bias, ops.col_bias, ops.diag, positives,
            item_partials, user_partials, start, slabs.rows, batch, num_features, **_flags(in_batch), **blocks,
        )
        item_terms[start:start + count] = item_partials[:, :count].sum(0)
        user_terms += user_partials[: grid[0]].sum(0)
    return item_terms + user_terms


def _pair_operand_grads(ops: _Operands, positives, scale, in_batch: str):
    """dLoss/d(rows, cols, row_bias, col_bias) for dLoss/d(term sum of row b) = scale[b]."""
    batch, num_features = ops.rows.shape
    blocks = _launch_blocks(batch, num_features)
    slabs = _Slabs.of(batch, blocks["BLOCK_B"])
    item_partials, user_partials = slabs.partials(ops.rows)
    coeff = ops.rows.new_empty((slabs.rows, batch))
    grad_rows, grad_cols = torch.empty_like(ops.rows), torch.zeros_like(ops.cols)
    grad_row_bias, grad_col_bias = torch.empty_like(ops.diag), torch.zeros_like(ops.diag)
    item_sigmoids, user_sigmoids = torch.empty_like(ops.diag), torch.zeros_like(ops.diag)
    for start, count, grid in slabs:
        _in_batch_coeff_kernel[grid](
            ops.rows, ops.cols, ops.rows.stride(0), ops.row_bias, ops.col_bias, ops.diag, positives, scale,
            coeff, item_partials, user_partials, start, slabs.rows, batch, num_features,
            **_flags(in_batch), **blocks,
        )
        slab, rows = coeff[:count], slice(start, start + count)
        grad_rows[rows] = slab @ ops.cols
        grad_cols.addmm_(slab.T, ops.rows[rows])
        grad_row_bias[rows] = slab.sum(1)
        grad_col_bias += slab.sum(0)
        item_sigmoids[rows] = item_partials[:, :count].sum(0)
        user_sigmoids += user_partials[: grid[0]].sum(0)
    grads = _diag_grads(ops, -scale * (item_sigmoids + user_sigmoids))
    return tuple(off + on for off, on in zip((grad_rows, grad_cols, grad_row_bias, grad_col_bias), grads, strict=True))


def _diag_grads(ops: _Operands, grad_diag):
    """dLoss/d(rows, cols, row_bias, col_bias) through the diagonal alone, for dLoss/dS[b, b] = grad_diag[b]."""
    return grad_diag[:, None] * ops.cols, grad_diag[:, None] * ops.rows, grad_diag, grad_diag


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


@dataclass
class _MeanScores:
    """"mean" per row b: the positive score ps_b = s(Q_b, P_b) and the mean score ms_b = s(M_b, P_b)
    as the diagonals of their operands, M_b = others_b / count_b the mean of Q_m over the rows m
    whose positive differs (log M_b clamped like ``torch_backend.log_mean``), and
    term_b = softplus(ms_b - ps_b) h_b, h_b = 1 where count_b > 0 (else no term)."""

    positive: _Operands
    mean: _Operands
    log_mean: torch.Tensor  # (B, L, K)
    others: torch.Tensor  # (B, L, K) sum of Q_m over the rows m of the other groups
    group_of_row: torch.Tensor  # (B,)
    has_term: torch.Tensor  # (B,) h_b, float32

    @classmethod
    def of(cls, log_q, log_p, positives, weights, symmetric) -> _MeanScores:
        group_of_row, count = torch_backend.group_rows(positives)
        others = torch_backend.sum_over_other_groups(log_q.exp(), group_of_row)
        log_mean = torch_backend.log_mean(others, count)
        return cls(_operands(log_q, log_p, weights, symmetric), _operands(log_mean, log_p, weights, symmetric),
                   log_mean, others, group_of_row, (count > 0).float())

    @property
    def terms(self) -> torch.Tensor:
        return F.softplus(self.mean.diag - self.positive.diag) * self.has_term


def _mean_log_prob_grads(scores: _MeanScores, log_q, log_p, scale, weights, symmetric):
    """dLoss/dlogQ and dLoss/dlogP of "mean" for dLoss/d(term_b) = scale[b], up to multiples of
    Q and P per (row, layer) like ``_log_prob_grads``. With g_b = scale_b h_b sigmoid(ms_b - ps_b),
    ps takes -g_b and ms takes g_b: G_b = g_b ds(M_b, P_b)/dlogM_b reaches, through
    log M_b = log others_b - log count_b, the Q_m of every row m of another group,

        dLoss/dlogQ_m += Q_m sum_(b: pos_b != pos_m) G_b / others_b     (0 where others_b was clamped)

    the sum over the other groups like the forward's. The -g_b w M_b that ``_log_prob_grads``
    drops from G_b reaches Q_m as a multiple of Q_m (M_b / others_b = 1 / count_b): dropped too.
    """
    grad_terms = scale * scores.has_term * torch.sigmoid(scores.mean.diag - scores.positive.diag)
    grad_log_q, grad_log_p = _log_prob_grads(_diag_grads(scores.positive, -grad_terms), log_q, log_p, weights,
                                             symmetric)
    grad_log_mean, grad_log_p_mean = _log_prob_grads(_diag_grads(scores.mean, grad_terms), scores.log_mean, log_p,
                                                     weights, symmetric)
    tiny = torch.finfo(scores.others.dtype).tiny
    grad_others = torch.where(scores.others >= tiny, grad_log_mean / scores.others.clamp_min(tiny), 0.0)
    grad_log_q = grad_log_q + log_q.exp() * torch_backend.sum_over_other_groups(grad_others, scores.group_of_row)
    return grad_log_q, grad_log_p + grad_log_p_mean


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


@torch.library.custom_op("soda_kernels::in_batch_bpr", mutates_args=())
def in_batch_bpr_op(
    user: torch.Tensor, items: torch.Tensor, codebooks: torch.Tensor, positives: torch.Tensor, weights: torch.Tensor,
    in_batch: str, user_logits: bool, symmetric: bool, temperature: float, user_temperature: float, reduction: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(the reduced loss, the number of terms of each row (B,) float32, kept for backward)."""
    log_q, log_p = _log_probs(user, items, codebooks, positives, user_logits, temperature, user_temperature)
    if in_batch == "mean":
        scores = _MeanScores.of(log_q, log_p, positives, weights, symmetric)
        row_sums, row_counts = scores.terms, scores.has_term
    else:
        ops = _operands(log_q, log_p, weights, symmetric)
        row_sums = _pair_term_sums(ops, positives, in_batch)
        row_counts = torch_backend.group_rows(positives)[1].float() * (2 if in_batch == "both" else 1)
    return torch_backend.reduce_terms(row_sums, row_counts, reduction), row_counts


@in_batch_bpr_op.register_fake
def _(user, items, codebooks, positives, weights, in_batch, user_logits, symmetric, temperature,
      user_temperature, reduction):
    loss_shape = positives.shape if reduction == "none" else ()
    return user.new_empty(loss_shape, dtype=torch.float32), user.new_empty(positives.shape, dtype=torch.float32)


@torch.library.custom_op("soda_kernels::in_batch_bpr_backward", mutates_args=())
def in_batch_bpr_backward(
    grad_output: torch.Tensor, user: torch.Tensor, items: torch.Tensor, codebooks: torch.Tensor,
    positives: torch.Tensor, weights: torch.Tensor, row_counts: torch.Tensor,
    in_batch: str, user_logits: bool, symmetric: bool, temperature: float, user_temperature: float, reduction: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    scale = _row_scales(grad_output, row_counts, reduction)
    log_q, log_p = _log_probs(user, items, codebooks, positives, user_logits, temperature, user_temperature)
    if in_batch == "mean":
        scores = _MeanScores.of(log_q, log_p, positives, weights, symmetric)
        grad_log_q, grad_log_p = _mean_log_prob_grads(scores, log_q, log_p, scale, weights, symmetric)
    else:
        ops = _operands(log_q, log_p, weights, symmetric)
        grads = _pair_operand_grads(ops, positives, scale, in_batch)
        grad_log_q, grad_log_p = _log_prob_grads(grads, log_q, log_p, weights, symmetric)
    grad_user_logits = _log_softmax_backward(log_q, grad_log_q)
    grad_item_logits = _log_softmax_backward(log_p, grad_log_p)
    grad_rows, grad_codebooks = project_logit_grad(grad_item_logits, items[positives], codebooks, temperature)
    grad_items = torch.zeros(items.shape, dtype=torch.float32, device=items.device)
    grad_items.index_put_((positives,), grad_rows, accumulate=True)
    if user_logits:
        grad_user = grad_user_logits
    else:
        grad_user, grad_codebooks_users = project_logit_grad(grad_user_logits, user, codebooks, user_temperature)
        grad_codebooks = grad_codebooks + grad_codebooks_users
    return grad_user.to(user.dtype), grad_items.to(items.dtype), grad_codebooks.to(codebooks.dtype)


@in_batch_bpr_backward.register_fake
def _(grad_output, user, items, codebooks, positives, weights, row_counts, *options):
    return user.new_empty(user.shape), items.new_empty(items.shape), codebooks.new_empty(codebooks.shape)


def _setup_context(ctx, inputs, output):
    user, items, codebooks, positives, weights, *ctx.options = inputs
    ctx.save_for_backward(user, items, codebooks, positives, weights, output[1])
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_output, _grad_row_counts):
    grads = in_batch_bpr_backward(grad_output, *ctx.saved_tensors, *ctx.options)
    return *grads, None, None, None, None, None, None, None, None


in_batch_bpr_op.register_autograd(_backward, setup_context=_setup_context)


def in_batch_bpr(user, items, codebooks, positives, *, in_batch, user_logits, symmetric, temperature,
                 user_temperature, layer_weights, reduction):
    """In-batch distributional BPR on the Triton backend (arguments validated by the caller).

    user (B, L, d) residuals or (B, L, K) logits, items (N, L, d), codebooks (L, K, d),
    positives (B,); returns a float32 scalar, or (B,) with ``reduction="none"``.
    """
    loss, _ = in_batch_bpr_op(user, items, codebooks, positives.long().contiguous(), layer_weights, in_batch,
                              user_logits, symmetric, temperature, user_temperature, reduction)
    return loss
