"""In-batch distributional BPR against the other rows ("items", "users", "both"), FlashAttention-2
style: a prologue, one streaming kernel forward, a row-direction and a column-direction pass
backward, an epilogue; nothing of B x B is ever stored.

Scores. Row b has a user with code distributions Q_b (its layers Q_b^l over K codes) and a
positive item pos[b] with P_b. Over the concatenated (layer, code) axis of F = L K features
(2 L K when symmetric) the score matrix S[b, m] = s(user b, item pos[m]) is one product:

    S = A Bm^T + rb[:, None] + cb[None, :]
    A[b]  = [w logQ_b, (w Q_b)]          Bm[m] = [P_m, (log P_m)]          (bracketed: symmetric)
    rb[b] = (-sum_l w_l Q_b^l . log Q_b^l)                 cb[m] = -sum_l w_l P_m^l . log P_m^l

(w_l repeated over layer l's codes). With valid(b, m) = (pos[m] != pos[b]) the terms of row b are

    "items": softplus(S[b, m] - S[b, b])     "users": softplus(S[m, b] - S[b, b])     valid m

and the loss reduces the per-row term sums t_b over the T_b = (1 or 2) sum_m valid(b, m) terms.

Forward (3 launches): ``_prologue_kernel`` writes A, Bm (B, F) in the operand dtype
(``operand_dtype``), rb, cb, the diagonal S[b, b] from the same rounded operands, and each
distribution's log-sum-exp; ``_forward_kernel`` streams the tiles of S, each program a strided
set of row blocks against a split of the column tiles, reducing softplus terms per row
("items") into per-split partials and per column ("users") into per-program partials, with the
valid counts (every buffer O(B)); ``finish`` (common) adds the partials in a fixed order and
applies the reduction. Saved for backward: the inputs, the counts T_b and their total: O(B).

Backward (5 launches). With g_b = dLoss/dt_b (``row_scale``), dLoss/dS off the diagonal is

    C[b, m] = valid(b, m) (g_b sigmoid(S[b, m] - S[b, b]) [items] + g_m sigmoid(S[b, m] - S[m, m]) [users])

and the diagonal collects dS[b, b] = -(sum_m C_items[b, m] + sum_m C_users[m, b]). Then

    dA = C Bm,   dBm = C^T A,   drb = C 1,   dcb = C^T 1       (plus the diagonal's own terms)

``_prologue_kernel`` runs again; ``_backward_kernel`` has two kinds of programs, like
FlashAttention-2's dQ and dK/dV passes: a row program owns a block of rows and streams every
block of columns, recomputing S and C on chip once per tile and accumulating dA (and the row
sums for rb and the diagonal) in its own rows; a column program does the same for dBm with
S^T = Bm A^T, which is the row program with the operands, the biases and the roles of "items"
and "users" swapped (``_stream_other_side`` serves both). F = L K is too wide for a program's
rows of dA to stay in registers, so they are accumulated in global memory (L2) chunk by chunk,
each row written by one program only: no atomics, a fixed order, no recomputation of S.
``_epilogue_kernel`` adds the diagonal's terms and takes each side to its inputs (below); the
item rows are summed over repeated positives by ``sum_rows_by_index`` and the codebook partials
(one per program and side, each program summing its row blocks) by ``sum_partials``.

Epilogue, one side, one layer, with G = that side's operand gradient (halves G1, G2) and db its
bias gradient. For the users (r = Q, X1 = w log r, X2 = w r, bias = -w r . log r, symmetric
only) and the items (r = P, X1 = r, X2 = log r, bias = -w r . log r):

    users: dlog r = w G1 + (w r G2 - w r log r db)        items: dlog r = r G1 - w r log r db + (G2)

(d(-r log r)/dlog r = -r (log r + 1): the -r is a multiple of r, which the log-softmax backward
removes, so it is dropped.) Then the logit gradient dz = dlog r - r sum_k dlog r_k (two passes
over K tiles, ``log_softmax_backward_tile``) goes onto the residuals and the codebook, or is the
user gradient itself for ``user_logits=True``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .autograd import register_backward
from .common import (
    LOGIT_PRECISION,
    SCORE_PRECISION,
    clamp_rows,
    code_tile,
    finish,
    layer_log_probs,
    layer_weight,
    load_rows,
    log_softmax_backward_tile,
    mma,
    operand_dtype,
    row_scale,
    sigmoid,
    softplus,
    store_rows,
    sum_partials,
    sum_rows_by_index,
    user_item_log_probs,
    user_item_log_sum_exps,
    wide_operands,
)
from .launch import launch_config, plan_grid, tune_if_asked

# Loss terms a valid (b, m) pair contributes in each in_batch mode (its item side, its user side or
# both): the count T_b that the mean divides by is this times the row's valid pairs (``finish``'s
# ``count_scale``).
TERMS_PER_PAIR = {"items": 1, "users": 1, "both": 2}


@triton.jit
def _store_operands(a_ptr, bm_ptr, offsets, a_values, bm_values, mask):
    """One (rows, codes) tile of A and of Bm stored at offsets, each rounded to its operand dtype;
    returns the tile's share of the diagonal, sum over the codes of A Bm from the rounded values."""
    a_values = a_values.to(a_ptr.dtype.element_ty)
    bm_values = bm_values.to(bm_ptr.dtype.element_ty)
    tl.store(a_ptr + offsets, a_values, mask=mask)
    tl.store(bm_ptr + offsets, bm_values, mask=mask)
    return tl.sum(a_values.to(tl.float32) * bm_values.to(tl.float32), axis=1)


@triton.jit
def _prologue_kernel(
    user_ptr, items_ptr, codebooks_ptr, positives_ptr, weights_ptr,
    a_ptr, bm_ptr, rb_ptr, cb_ptr, diag_ptr, lse_ptr,
    batch, num_items, num_layers, num_codes, dim, inv_user_temperature, inv_temperature,
    USER_LOGITS: tl.constexpr, SYMMETRIC: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """The score operands of a block of rows, both sides.

    user_ptr: (B, L, d) residuals or (B, L, K) logits (USER_LOGITS); items_ptr: (N, L, d);
    codebooks_ptr: (L, K, d); positives_ptr: (B,) int64; weights_ptr: (L,) float32 or None (all ones).
    Writes a_ptr, bm_ptr: (B, F) operands in their dtype; rb_ptr, cb_ptr: (B,) biases (rb = 0
    unless SYMMETRIC); diag_ptr: (B,) S[b, b] = A[b] . Bm[b] + rb[b] + cb[b] with the rounded
    operands; lse_ptr: (2, B, L) log-sum-exps of the users' (0) and the items' (1) logits. A
    positive outside [0, N) is read clamped (``clamp_rows``) and gets a NaN cb (and S[b, b]), so
    that every score of its item is NaN.
    """
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < batch
    item_rows = clamp_rows(tl.load(positives_ptr + rows, mask=row_mask, other=0), num_items)
    half = num_layers * num_codes
    num_features = half * (2 if SYMMETRIC else 1)
    codebook_shape = (num_layers, num_codes, dim)
    sides, inv_temperatures = (user_ptr, items_ptr), (inv_user_temperature, inv_temperature)
    row_bias = tl.zeros((BLOCK_R,), tl.float32)
    col_bias = tl.zeros((BLOCK_R,), tl.float32)
    diag = tl.zeros((BLOCK_R,), tl.float32)
    for layer in range(0, num_layers):
        weight = layer_weight(weights_ptr, layer)
        lse_q, lse_p = user_item_log_sum_exps(
            sides, rows, item_rows, row_mask, codebooks_ptr, codebook_shape, layer, inv_temperatures,
            USER_LOGITS=USER_LOGITS, BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K, BLOCK_D=BLOCK_D, PRECISION=PRECISION,
        )
        tl.store(lse_ptr + rows * num_layers + layer, lse_q, mask=row_mask)
        tl.store(lse_ptr + (batch + rows) * num_layers + layer, lse_p, mask=row_mask)
        for k_start in range(0, num_codes, BLOCK_K):
            codes, code_mask, tile_mask = code_tile(k_start, num_codes, row_mask, BLOCK_K)
            log_q, q, log_p, p = user_item_log_probs(
                sides, rows, item_rows, row_mask, codebooks_ptr, codebook_shape, layer, codes, code_mask,
                inv_temperatures, lse_q, lse_p, USER_LOGITS=USER_LOGITS, BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K,
                BLOCK_D=BLOCK_D, PRECISION=PRECISION,
            )
            offsets = rows[:, None] * num_features + layer * num_codes + codes[None, :]
            diag += _store_operands(a_ptr, bm_ptr, offsets, weight * log_q, p, tile_mask)
            col_bias -= weight * tl.sum(p * log_p, axis=1)
            if SYMMETRIC:
                diag += _store_operands(a_ptr, bm_ptr, offsets + half, weight * q, log_p, tile_mask)
                row_bias -= weight * tl.sum(q * log_q, axis=1)
    positive = tl.load(positives_ptr + rows, mask=row_mask, other=0)  # read again: nothing kept across the loop
    col_bias = tl.where((positive >= 0) & (positive < num_items), col_bias, float("nan"))
    tl.store(rb_ptr + rows, row_bias, mask=row_mask)
    tl.store(cb_ptr + rows, col_bias, mask=row_mask)
    tl.store(diag_ptr + rows, diag + row_bias + col_bias, mask=row_mask)


@triton.jit
def _score_tile(
    own_ptr, other_ptr, own_start, other_start, batch, num_features,
    BLOCK_O: tl.constexpr, BLOCK_X: tl.constexpr, BLOCK_F: tl.constexpr, PRECISION: tl.constexpr,
):
    """own_ops[own_start:][:BLOCK_O] . other_ops[other_start:][:BLOCK_X] over the F features, a
    (BLOCK_O, BLOCK_X) float32 tile of A Bm^T (own: rows of A) or of Bm A^T (own: rows of Bm),
    zero outside the batch. Operands (B, F) row-major; a block's base pointer is a 64-bit scalar
    and the offsets inside the tile 32-bit, which keeps the address tensors small."""
    own_rows, other_rows = tl.arange(0, BLOCK_O), tl.arange(0, BLOCK_X)
    own_mask, other_mask = own_start + own_rows < batch, other_start + other_rows < batch
    own_base = own_ptr + tl.cast(own_start, tl.int64) * num_features
    other_base = other_ptr + tl.cast(other_start, tl.int64) * num_features
    offs_f = tl.arange(0, BLOCK_F)
    acc = tl.zeros((BLOCK_O, BLOCK_X), dtype=tl.float32)
    for f_start in range(0, num_features, BLOCK_F):
        f_mask = f_start + offs_f < num_features
        x = tl.load(own_base + f_start + own_rows[:, None] * num_features + offs_f[None, :],
                    mask=own_mask[:, None] & f_mask[None, :], other=0.0)
        y = tl.load(other_base + f_start + other_rows[:, None] * num_features + offs_f[None, :],
                    mask=other_mask[:, None] & f_mask[None, :], other=0.0)
        acc = mma(x, tl.trans(y), acc, PRECISION)
    return acc


@triton.jit
def _forward_kernel(
    a_ptr, bm_ptr, rb_ptr, cb_ptr, diag_ptr, positives_ptr,
    item_part_ptr, user_part_ptr, count_part_ptr,
    batch, num_features, tiles_per_split,
    ITEMS: tl.constexpr, USERS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr, PRECISION: tl.constexpr,
):
    """Program (p, split) takes the row blocks p, p + P, ... (P = num_programs(0)), each against
    the split's column tiles:

        item_part[split, b]  = sum over the split's columns m of valid softplus(S[b, m] - S[b, b])   [ITEMS]
        count_part[split, b] = sum over the split's columns m of valid(b, m)
        user_part[p, m]      = sum over the program's rows b of valid softplus(S[b, m] - S[m, m])   [USERS]

    Operands and biases as the prologue writes them; item_part, count_part (splits, B) and
    user_part (P, B) float32, so every partial buffer is O(B).
    """
    program, split = tl.program_id(0), tl.program_id(1)
    first_tile = split * tiles_per_split
    last_tile = tl.minimum(first_tile + tiles_per_split, tl.cdiv(batch, BLOCK_N))
    for row_start in range(program * BLOCK_M, batch, tl.num_programs(0) * BLOCK_M):
        rows = row_start + tl.arange(0, BLOCK_M)
        row_mask = rows < batch
        row_pos = tl.load(positives_ptr + rows, mask=row_mask, other=-1).to(tl.int32)
        row_diag = tl.load(diag_ptr + rows, mask=row_mask, other=0.0)
        row_bias = tl.load(rb_ptr + rows, mask=row_mask, other=0.0)
        row_terms = tl.zeros((BLOCK_M,), tl.float32)
        row_count = tl.zeros((BLOCK_M,), tl.float32)
        for tile in range(first_tile, last_tile):
            cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
            col_mask = cols < batch
            col_pos = tl.load(positives_ptr + cols, mask=col_mask, other=-2).to(tl.int32)
            scores = _score_tile(a_ptr, bm_ptr, own_start=row_start, other_start=tile * BLOCK_N, batch=batch,
                                 num_features=num_features, BLOCK_O=BLOCK_M, BLOCK_X=BLOCK_N, BLOCK_F=BLOCK_F,
                                 PRECISION=PRECISION)
            scores += row_bias[:, None] + tl.load(cb_ptr + cols, mask=col_mask, other=0.0)[None, :]
            valid = row_pos[:, None] != col_pos[None, :]  # padding rows and columns hold -1 and -2
            valid = valid & row_mask[:, None] & col_mask[None, :]
            row_count += tl.sum(valid.to(tl.float32), axis=1)
            if ITEMS:
                row_terms += tl.sum(tl.where(valid, softplus(scores - row_diag[:, None]), 0.0), axis=1)
            if USERS:
                col_diag = tl.load(diag_ptr + cols, mask=col_mask, other=0.0)
                col_terms = tl.sum(tl.where(valid, softplus(scores - col_diag[None, :]), 0.0), axis=0)
                user_sums = user_part_ptr + program * batch + cols
                col_terms += tl.load(user_sums, mask=col_mask & (row_start != program * BLOCK_M), other=0.0)
                tl.store(user_sums, col_terms, mask=col_mask)
        if ITEMS:
            tl.store(item_part_ptr + split * batch + rows, row_terms, mask=row_mask)
        tl.store(count_part_ptr + split * batch + rows, row_count, mask=row_mask)
        tl.debug_barrier()  # the next row block adds to these column sums, possibly in other threads


@triton.jit
def _stream_other_side(
    own_ptr, other_ptr, own_bias_ptr, other_bias_ptr, diag_ptr, positives_ptr,
    grad_ptr, counts_ptr, total_ptr, grad_own_ptr, own_sum_ptr, own_diag_ptr,
    block, batch, num_features,
    OWN_TERMS: tl.constexpr, OTHER_TERMS: tl.constexpr, REDUCTION: tl.constexpr,
    BLOCK_O: tl.constexpr, BLOCK_X: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_G: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One backward program: a block of "own" rows (rows of A, or rows of Bm) streaming the other
    side in blocks of BLOCK_X rows.

    With T = own_ops other_ops^T + own_bias + other_bias (a tile of S, or of S^T) and
    C = valid (g_own sigmoid(T - diag_own) [OWN_TERMS] + g_other sigmoid(T - diag_other) [OTHER_TERMS]):

        grad_own[own]  = sum over other of C other_ops              (B, F) float32
        own_sum[own]   = sum over other of C                         (B,)
        own_diag[own]  = sum over other of the OWN_TERMS part of C   (B,)

    Each tile of T and C is computed once; grad_own's rows, which only this program touches, are
    accumulated through global memory (L2) in chunks of BLOCK_G features, one read-modify-write a
    chunk and other block, so F may be large without recomputing T. Rows of A own the "items"
    terms (anchored at S[b, b] of their row), rows of Bm the "users" terms (anchored at the
    diagonal of their column).
    """
    own_start = block * BLOCK_O
    own = own_start + tl.arange(0, BLOCK_O)
    own_mask = own < batch
    own_pos = tl.load(positives_ptr + own, mask=own_mask, other=-1).to(tl.int32)
    own_diag = tl.load(diag_ptr + own, mask=own_mask, other=0.0)
    own_bias = tl.load(own_bias_ptr + own, mask=own_mask, other=0.0)
    own_scale = row_scale(grad_ptr, counts_ptr, total_ptr, own, own_mask, REDUCTION)
    grad_base = grad_own_ptr + tl.cast(own_start, tl.int64) * num_features
    offs_g = tl.arange(0, BLOCK_G)
    coeff_sum = tl.zeros((BLOCK_O,), tl.float32)
    diag_sum = tl.zeros((BLOCK_O,), tl.float32)
    for other_start in range(0, batch, BLOCK_X):
        other = other_start + tl.arange(0, BLOCK_X)
        other_mask = other < batch
        other_pos = tl.load(positives_ptr + other, mask=other_mask, other=-2).to(tl.int32)
        scores = _score_tile(own_ptr, other_ptr, own_start=own_start, other_start=other_start, batch=batch,
                             num_features=num_features, BLOCK_O=BLOCK_O, BLOCK_X=BLOCK_X, BLOCK_F=BLOCK_F,
                             PRECISION=PRECISION)
        scores += own_bias[:, None] + tl.load(other_bias_ptr + other, mask=other_mask, other=0.0)[None, :]
        valid = (own_pos[:, None] != other_pos[None, :]) & own_mask[:, None] & other_mask[None, :]
        coeff = tl.zeros((BLOCK_O, BLOCK_X), tl.float32)
        if OWN_TERMS:
            coeff = tl.where(valid, own_scale[:, None] * sigmoid(scores - own_diag[:, None]), 0.0)
            diag_sum += tl.sum(coeff, axis=1)
        if OTHER_TERMS:
            other_diag = tl.load(diag_ptr + other, mask=other_mask, other=0.0)
            other_scale = row_scale(grad_ptr, counts_ptr, total_ptr, other, other_mask, REDUCTION)
            coeff += tl.where(valid, other_scale[None, :] * sigmoid(scores - other_diag[None, :]), 0.0)
        coeff_sum += tl.sum(coeff, axis=1)
        coeff = coeff.to(other_ptr.dtype.element_ty)
        other_base = other_ptr + tl.cast(other_start, tl.int64) * num_features
        for g_start in range(0, num_features, BLOCK_G):
            g_mask = g_start + offs_g < num_features
            grad_tile = grad_base + g_start + tl.arange(0, BLOCK_O)[:, None] * num_features + offs_g[None, :]
            tile_mask = own_mask[:, None] & g_mask[None, :]
            grad = tl.load(grad_tile, mask=tile_mask & (other_start > 0), other=0.0)  # the first block starts at 0
            other_chunk = tl.load(other_base + g_start + tl.arange(0, BLOCK_X)[:, None] * num_features
                                  + offs_g[None, :], mask=other_mask[:, None] & g_mask[None, :], other=0.0)
            grad = mma(coeff, other_chunk, grad, PRECISION)
            tl.store(grad_tile, grad, mask=tile_mask)
        tl.debug_barrier()  # the next block reads these rows back, possibly in other threads
    tl.store(own_sum_ptr + own, coeff_sum, mask=own_mask)
    tl.store(own_diag_ptr + own, diag_sum, mask=own_mask)


@triton.jit
def _backward_kernel(
    a_ptr, bm_ptr, rb_ptr, cb_ptr, diag_ptr, positives_ptr, grad_ptr, counts_ptr, total_ptr,
    grad_a_ptr, grad_bm_ptr, sums_ptr, diag_parts_ptr,
    batch, num_features, num_row_blocks,
    ITEMS: tl.constexpr, USERS: tl.constexpr, REDUCTION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_G: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Row programs (program_id(0) < num_row_blocks: dA, drb) and column programs (the rest:
    dBm, dcb) in one launch; grid (row blocks + column blocks,).

    grad_a_ptr, grad_bm_ptr: (B, F) float32; sums_ptr: (2, B) <- (C 1 = drb off the diagonal,
    C^T 1 = dcb off the diagonal); diag_parts_ptr: (2, B) <- the "items" and "users" shares of
    -dS[b, b].
    """
    block = tl.program_id(0)
    if block < num_row_blocks:
        _stream_other_side(
            own_ptr=a_ptr, other_ptr=bm_ptr, own_bias_ptr=rb_ptr, other_bias_ptr=cb_ptr, diag_ptr=diag_ptr,
            positives_ptr=positives_ptr, grad_ptr=grad_ptr, counts_ptr=counts_ptr, total_ptr=total_ptr,
            grad_own_ptr=grad_a_ptr, own_sum_ptr=sums_ptr, own_diag_ptr=diag_parts_ptr, block=block, batch=batch,
            num_features=num_features, OWN_TERMS=ITEMS, OTHER_TERMS=USERS, REDUCTION=REDUCTION,
            BLOCK_O=BLOCK_M, BLOCK_X=BLOCK_N, BLOCK_F=BLOCK_F, BLOCK_G=BLOCK_G, PRECISION=PRECISION,
        )
    else:
        _stream_other_side(
            own_ptr=bm_ptr, other_ptr=a_ptr, own_bias_ptr=cb_ptr, other_bias_ptr=rb_ptr, diag_ptr=diag_ptr,
            positives_ptr=positives_ptr, grad_ptr=grad_ptr, counts_ptr=counts_ptr, total_ptr=total_ptr,
            grad_own_ptr=grad_bm_ptr, own_sum_ptr=sums_ptr + batch, own_diag_ptr=diag_parts_ptr + batch,
            block=block - num_row_blocks, batch=batch, num_features=num_features, OWN_TERMS=USERS,
            OTHER_TERMS=ITEMS, REDUCTION=REDUCTION, BLOCK_O=BLOCK_M, BLOCK_X=BLOCK_N, BLOCK_F=BLOCK_F,
            BLOCK_G=BLOCK_G, PRECISION=PRECISION,
        )


@triton.jit
def _epilogue_side(
    src_ptr, rows, row_mask, src_rows, codebooks_ptr, weight, lse, own_grad_ptr, partner_ptr, grad_diag, bias_grad,
    grad_out_ptr, partial_ptr, first_block, layer, num_layers, num_codes, dim, inv_temperature,
    IS_USER: tl.constexpr, FROM_LOGITS: tl.constexpr, SYMMETRIC: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DIM: tl.constexpr, PRECISION: tl.constexpr,
):
    """The epilogue of one side and layer for a block of rows (the module docstring's formulas).

    src_ptr: the side's residuals (R, L, d) (or the users' logits (B, L, K) when FROM_LOGITS),
    read at rows src_rows; lse (BLOCK_R,) this layer's log-sum-exp; own_grad_ptr, partner_ptr:
    (B, F) this side's operand gradient and the other side's operands (for the diagonal's terms);
    grad_diag, bias_grad (BLOCK_R,) dS[b, b] and the side's full bias gradient. Writes
    grad_out_ptr: the side's gradient rows (B, L, d) (or dz (B, L, K) when FROM_LOGITS) and,
    for residuals, sets (``first_block``) or adds to the program's codebook partial of the layer,
    partial_ptr (K, d) float32 (``log_softmax_backward_tile``).
    """
    half = num_layers * num_codes
    num_features = half * (2 if SYMMETRIC else 1)
    codebook_shape = (num_layers, num_codes, dim)
    grad_log_sum = tl.zeros((BLOCK_R,), tl.float32)
    grad_rows = tl.zeros((BLOCK_R, BLOCK_DIM), tl.float32)
    if FROM_LOGITS:
        x = None
    else:
        x = load_rows(src_ptr + layer * dim, num_layers * dim, src_rows, row_mask, dim, BLOCK_DIM)
    for step in range(0, 2):  # 0: sum_k dlog r_k; 1: dz = dlog r - r sum_k dlog r_k, projected
        for k_start in range(0, num_codes, BLOCK_K):
            codes, code_mask, tile_mask = code_tile(k_start, num_codes, row_mask, BLOCK_K)
            log_r, r = layer_log_probs(
                src_ptr, src_rows, row_mask, codebooks_ptr, codebook_shape, layer, codes, code_mask, inv_temperature,
                lse, FROM_LOGITS=FROM_LOGITS, BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K, BLOCK_D=BLOCK_D, PRECISION=PRECISION,
            )
            first = rows[:, None] * num_features + layer * num_codes + codes[None, :]
            g1 = tl.load(own_grad_ptr + first, mask=tile_mask, other=0.0).to(tl.float32)
            g1 += grad_diag[:, None] * tl.load(partner_ptr + first, mask=tile_mask, other=0.0).to(tl.float32)
            if IS_USER:
                grad_log = weight * g1
            else:
                grad_log = r * g1
            if SYMMETRIC or not IS_USER:  # the side's bias -w r . log r
                grad_log -= weight * r * log_r * bias_grad[:, None]
            if SYMMETRIC:
                g2 = tl.load(own_grad_ptr + half + first, mask=tile_mask, other=0.0).to(tl.float32)
                g2 += grad_diag[:, None] * tl.load(partner_ptr + half + first, mask=tile_mask, other=0.0).to(tl.float32)
                if IS_USER:
                    grad_log += weight * r * g2
                else:
                    grad_log += g2
            grad_log_sum, grad_rows = log_softmax_backward_tile(
                step, grad_log, r, tile_mask, grad_log_sum, grad_rows, x, codebooks_ptr, codebook_shape, layer, codes,
                code_mask, partial_ptr, first_block, scale=2.0 * inv_temperature, out_ptr=grad_out_ptr, out_rows=rows,
                FROM_LOGITS=FROM_LOGITS, BLOCK_DIM=BLOCK_DIM, PRECISION=PRECISION,
            )
    if not FROM_LOGITS:
        store_rows(grad_out_ptr + layer * dim, num_layers * dim, rows, row_mask, dim, grad_rows)


@triton.jit
def _epilogue_kernel(
    user_ptr, items_ptr, codebooks_ptr, positives_ptr, weights_ptr, lse_ptr,
    a_ptr, bm_ptr, grad_a_ptr, grad_bm_ptr, sums_ptr, diag_parts_ptr,
    grad_user_ptr, item_row_grad_ptr, codebook_part_ptr,
    batch, num_items, num_layers, num_codes, dim, inv_user_temperature, inv_temperature,
    USER_LOGITS: tl.constexpr, SYMMETRIC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DIM: tl.constexpr, PRECISION: tl.constexpr,
):
    """Grid (P, L, 2 sides: 0 users, 1 items); program p takes the row blocks p, p + P, ... in
    order: operand gradients -> log-probability gradients -> logit gradients -> residual
    gradients, and its partial of the codebook gradient summed over its blocks.

    Inputs as the prologue and the backward kernel write them. Writes grad_user_ptr: (B, L, d) in
    the user's dtype, or (B, L, K) for USER_LOGITS; item_row_grad_ptr: (B, L, d) float32, the
    gradient of row b's positive (summed over repeated positives afterwards); codebook_part_ptr:
    (sides with residuals, P, L, K, d) float32, the users' partials first.
    """
    program, layer, side = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    weight = layer_weight(weights_ptr, layer)
    part_index = program if USER_LOGITS else side * tl.num_programs(0) + program
    partial_ptr = codebook_part_ptr + (part_index.to(tl.int64) * num_layers + layer) * num_codes * dim
    for block in range(program, tl.cdiv(batch, BLOCK_R), tl.num_programs(0)):
        rows = (block * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
        row_mask = rows < batch
        grad_diag = -(tl.load(diag_parts_ptr + rows, mask=row_mask, other=0.0)
                      + tl.load(diag_parts_ptr + batch + rows, mask=row_mask, other=0.0))
        lse = tl.load(lse_ptr + (side * batch + rows) * num_layers + layer, mask=row_mask, other=0.0)
        bias_grad = tl.load(sums_ptr + side * batch + rows, mask=row_mask, other=0.0) + grad_diag
        if side == 0:
            _epilogue_side(
                src_ptr=user_ptr, rows=rows, row_mask=row_mask, src_rows=rows, codebooks_ptr=codebooks_ptr,
                weight=weight, lse=lse, own_grad_ptr=grad_a_ptr, partner_ptr=bm_ptr, grad_diag=grad_diag,
                bias_grad=bias_grad, grad_out_ptr=grad_user_ptr, partial_ptr=partial_ptr,
                first_block=block == program, layer=layer, num_layers=num_layers, num_codes=num_codes, dim=dim,
                inv_temperature=inv_user_temperature, IS_USER=True, FROM_LOGITS=USER_LOGITS, SYMMETRIC=SYMMETRIC,
                BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K, BLOCK_D=BLOCK_D, BLOCK_DIM=BLOCK_DIM, PRECISION=PRECISION,
            )
        else:
            item_rows = clamp_rows(tl.load(positives_ptr + rows, mask=row_mask, other=0), num_items)
            _epilogue_side(
                src_ptr=items_ptr, rows=rows, row_mask=row_mask, src_rows=item_rows, codebooks_ptr=codebooks_ptr,
                weight=weight, lse=lse, own_grad_ptr=grad_bm_ptr, partner_ptr=a_ptr, grad_diag=grad_diag,
                bias_grad=bias_grad, grad_out_ptr=item_row_grad_ptr, partial_ptr=partial_ptr,
                first_block=block == program, layer=layer, num_layers=num_layers, num_codes=num_codes, dim=dim,
                inv_temperature=inv_temperature, IS_USER=False, FROM_LOGITS=False, SYMMETRIC=SYMMETRIC,
                BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K, BLOCK_D=BLOCK_D, BLOCK_DIM=BLOCK_DIM, PRECISION=PRECISION,
            )
        tl.debug_barrier()  # this block's partial stores are seen by every thread of the next block


def _operands(user, items, codebooks, positives, weights, user_logits, symmetric, temperature, user_temperature):
    """Run the prologue: (A, Bm, rb, cb, diag, lse) of the module docstring."""
    batch = positives.shape[0]
    num_layers, num_codes, dim = codebooks.shape
    features = num_layers * num_codes * (2 if symmetric else 1)
    wide = wide_operands(user, items, codebooks)
    a = torch.empty((batch, features), dtype=operand_dtype(wide), device=user.device)
    bm = torch.empty_like(a)
    rb, cb, diag = (torch.empty(batch, dtype=torch.float32, device=user.device) for _ in range(3))
    lse = torch.empty((2, batch, num_layers), dtype=torch.float32, device=user.device)
    config = launch_config("prologue", device=user.device, batch=batch, codes=num_codes, dim=dim, wide=wide)
    _prologue_kernel[(triton.cdiv(batch, config["BLOCK_R"]),)](
        user_ptr=user, items_ptr=items, codebooks_ptr=codebooks, positives_ptr=positives, weights_ptr=weights,
        a_ptr=a, bm_ptr=bm, rb_ptr=rb, cb_ptr=cb, diag_ptr=diag, lse_ptr=lse,
        batch=batch, num_items=items.shape[0], num_layers=num_layers, num_codes=num_codes, dim=dim,
        inv_user_temperature=1.0 / user_temperature, inv_temperature=1.0 / temperature,
        USER_LOGITS=user_logits, SYMMETRIC=symmetric, PRECISION=LOGIT_PRECISION, **config,
    )
    return a, bm, rb, cb, diag, lse


FAMILIES = ("prologue", "scores", "grads", "epilogue")  # the launch families SODA_TUNE tunes for this op


@torch.library.custom_op("soda_kernels::in_batch_pairs", mutates_args=())
def in_batch_pairs_op(
    user: torch.Tensor, items: torch.Tensor, codebooks: torch.Tensor, positives: torch.Tensor,
    weights: torch.Tensor | None,
    in_batch: str, user_logits: bool, symmetric: bool, temperature: float, user_temperature: float, reduction: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(the reduced loss, T_b (B,) and sum_b T_b (), float32; the counts are kept for backward)."""
    tune_if_asked(FAMILIES, device=user.device, batch=positives.shape[0], wide=wide_operands(user, items, codebooks),
                  run=lambda: forward_backward(user, items, codebooks, positives, weights, in_batch, user_logits,
                                               symmetric, temperature, user_temperature, reduction))
    a, bm, rb, cb, diag, _ = _operands(user, items, codebooks, positives, weights, user_logits, symmetric,
                                       temperature, user_temperature)
    batch, features = a.shape
    config = launch_config("scores", device=a.device, batch=batch, wide=a.dtype == torch.float32)
    grid = plan_grid("scores", config, a.device, batch=batch)
    row_programs, splits = grid["row_programs"], grid["splits"]
    items_on, users_on = in_batch in ("items", "both"), in_batch in ("users", "both")
    # The rows' term sums: the splits' "items" partials, then the row programs' "users" partials.
    term_part = a.new_empty((splits + row_programs, batch), dtype=torch.float32)
    count_part = a.new_empty((splits, batch), dtype=torch.float32)
    _forward_kernel[(row_programs, splits)](
        a_ptr=a, bm_ptr=bm, rb_ptr=rb, cb_ptr=cb, diag_ptr=diag, positives_ptr=positives,
        item_part_ptr=term_part, user_part_ptr=term_part[splits:], count_part_ptr=count_part,
        batch=batch, num_features=features, tiles_per_split=grid["tiles_per_split"],
        ITEMS=items_on, USERS=users_on, PRECISION=SCORE_PRECISION, **config,
    )
    terms = term_part[0 if items_on else splits:splits + row_programs if users_on else splits]
    loss, counts, total, _ = finish(terms, count_part, reduction, count_scale=TERMS_PER_PAIR[in_batch])
    return loss, counts, total


@in_batch_pairs_op.register_fake
def _(user, items, codebooks, positives, weights, in_batch, user_logits, symmetric, temperature,
      user_temperature, reduction):
    loss_shape = positives.shape if reduction == "none" else ()
    counts = user.new_empty(positives.shape, dtype=torch.float32)
    return user.new_empty(loss_shape, dtype=torch.float32), counts, user.new_empty((), dtype=torch.float32)


@torch.library.custom_op("soda_kernels::in_batch_pairs_backward", mutates_args=())
def in_batch_pairs_backward(
    grad_output: torch.Tensor, user: torch.Tensor, items: torch.Tensor, codebooks: torch.Tensor,
    positives: torch.Tensor, weights: torch.Tensor | None, counts: torch.Tensor, total: torch.Tensor,
    in_batch: str, user_logits: bool, symmetric: bool, temperature: float, user_temperature: float, reduction: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    a, bm, rb, cb, diag, lse = _operands(user, items, codebooks, positives, weights, user_logits, symmetric,
                                         temperature, user_temperature)
    batch, features = a.shape
    num_layers, num_codes, dim = codebooks.shape
    wide = a.dtype == torch.float32
    grads = launch_config("grads", device=a.device, batch=batch, wide=wide)
    row_blocks = triton.cdiv(batch, grads["BLOCK_M"])
    grad_a = torch.empty((batch, features), dtype=torch.float32, device=a.device)
    grad_bm = torch.empty_like(grad_a)
    sums, diag_parts = rb.new_empty((2, batch)), rb.new_empty((2, batch))
    _backward_kernel[(2 * row_blocks,)](
        a_ptr=a, bm_ptr=bm, rb_ptr=rb, cb_ptr=cb, diag_ptr=diag, positives_ptr=positives,
        grad_ptr=grad_output.float().contiguous(), counts_ptr=counts, total_ptr=total, grad_a_ptr=grad_a,
        grad_bm_ptr=grad_bm, sums_ptr=sums, diag_parts_ptr=diag_parts, batch=batch, num_features=features,
        num_row_blocks=row_blocks, ITEMS=in_batch in ("items", "both"), USERS=in_batch in ("users", "both"),
        REDUCTION=reduction, PRECISION=SCORE_PRECISION, **grads,
    )
    rows = launch_config("epilogue", device=a.device, batch=batch, codes=num_codes, dim=dim, wide=wide)
    programs = plan_grid("epilogue", rows, a.device, batch=batch, blocks_per_program=2 * num_layers)["programs"]
    grad_user = torch.empty(user.shape, dtype=user.dtype, device=user.device)
    item_row_grad = torch.empty((batch, num_layers, dim), dtype=torch.float32, device=items.device)
    codebook_part = torch.empty((1 if user_logits else 2, programs, num_layers, num_codes, dim),
                                dtype=torch.float32, device=items.device)
    _epilogue_kernel[(programs, num_layers, 2)](
        user_ptr=user, items_ptr=items, codebooks_ptr=codebooks, positives_ptr=positives, weights_ptr=weights,
        lse_ptr=lse, a_ptr=a, bm_ptr=bm, grad_a_ptr=grad_a, grad_bm_ptr=grad_bm, sums_ptr=sums,
        diag_parts_ptr=diag_parts, grad_user_ptr=grad_user, item_row_grad_ptr=item_row_grad,
        codebook_part_ptr=codebook_part, batch=batch, num_items=items.shape[0], num_layers=num_layers,
        num_codes=num_codes, dim=dim, inv_user_temperature=1.0 / user_temperature, inv_temperature=1.0 / temperature,
        USER_LOGITS=user_logits, SYMMETRIC=symmetric, PRECISION=LOGIT_PRECISION, **rows,
    )
    grad_items = sum_rows_by_index(item_row_grad, positives, items.shape[0], items.dtype)
    grad_codebooks = sum_partials(codebook_part.flatten(0, 1), codebooks.dtype)
    return grad_user, grad_items, grad_codebooks


# Saved: user, items, codebooks, positives, weights (and the counts); gradients for the first three.
forward_backward = register_backward(in_batch_pairs_op, in_batch_pairs_backward, saved_inputs=5, grads=3)


def in_batch_pairs(user, items, codebooks, positives, *, in_batch, user_logits, symmetric, temperature,
                   user_temperature, layer_weights, reduction):
    """In-batch distributional BPR ("items", "users", "both") on the Triton kernels; arguments
    validated by the caller. user (B, L, d) residuals or (B, L, K) logits, items (N, L, d),
    codebooks (L, K, d), positives (B,) -> a float32 scalar, or (B,) for ``reduction="none"``.
    Non-contiguous inputs are copied once (the kernels index row-major tensors)."""
    loss, _, _ = in_batch_pairs_op(
        user.contiguous(), items.contiguous(), codebooks.contiguous(), positives.long().contiguous(),
        layer_weights, in_batch, user_logits, symmetric, temperature, user_temperature, reduction,
    )
    return loss
