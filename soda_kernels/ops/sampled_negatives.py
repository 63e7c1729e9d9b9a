"""Fused distributional BPR with explicit (sampled) negatives: Triton kernels.

Row b scores its items n_bj = samples[b, j] (j = 0 the positive, then the S negatives,
-1 = padding). Per layer l, with a = item logits, z = user logits, P = softmax(a),
Q = softmax(z), one online pass over K tiles (running maxima m_a, m_z) accumulates

    sum_a = sum_k e^(a_k - m_a)              sum_z = sum_k e^(z_k - m_z)
    t_a   = sum_k e^(a_k - m_a) (a_k - z_k)   t_z   = sum_k e^(z_k - m_z) (z_k - a_k)

so that, with lse_a = m_a + log sum_a and lse_z = m_z + log sum_z,

    KL(P || Q) = t_a / sum_a - (lse_a - lse_z)      KL(Q || P) = t_z / sum_z - (lse_z - lse_a)
    s_bj = -sum_l w_l [KL(P || Q) (+ KL(Q || P))]   row_sum_b = sum_(valid j>0) softplus(s_bj - s_b0)

(t_a / sum_a = sum_k P_k (a_k - z_k): the log-sum-exps cancel from log P - log Q - KL below).

The forward saves the inputs, the sample indices and the scores (B, 1 + S); never a
distribution. Backward, for c_bj = dLoss/ds_bj (c_bj = g_b sigmoid(s_bj - s_b0) for a valid
negative, c_b0 = -sum_j c_bj, g_b = dLoss/drow_sum_b), recomputes the layer statistics and
each tile, and with dLoss/dKL = -c_bj w_l applies (SPEC section 2)

    dKL/dz = Q - P                     dKL/da = P (log P - log Q - KL) = P (a - z - t_a / sum_a)
    dKL'/dz = Q (log Q - log P - KL') = Q (z - a - t_z / sum_z)      dKL'/da = P - Q

User-logit gradients accumulate in the program owning the user rows (no atomics); item-logit
gradients go to one row per occurrence (b, j), are projected onto residuals and codebooks by
``project_logit_grad``, and summed over repeated items by a sort-based ``index_put_``, so two
backward passes are bit-identical.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import torch_backend
from ._legacy import (
    FP32_DOT_PRECISION,
    block_size,
    distribution_logits_tile,
    project_logit_grad,
)


@triton.jit
def _pair_logits_tile(
    user_ptr, users, user_mask, stride_ub, stride_ul, stride_ud,
    items_ptr, item_rows, stride_in, stride_il, stride_id,
    c_ptr, stride_cl, stride_ck, stride_cd,
    layer, codes, code_mask, dim, inv_user_temperature, inv_temperature,
    USER_LOGITS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """(user logits z, item logits a), each (BLOCK_B, BLOCK_K) float32, -inf on masked codes."""
    z = distribution_logits_tile(
        user_ptr, users, user_mask, stride_ub, stride_ul, stride_ud,
        c_ptr, layer, codes, code_mask, stride_cl, stride_ck, stride_cd,
        dim, inv_user_temperature, USER_LOGITS, BLOCK_B, BLOCK_K, BLOCK_D, PRECISION,
    )
    a = distribution_logits_tile(
        items_ptr, item_rows, user_mask, stride_in, stride_il, stride_id,
        c_ptr, layer, codes, code_mask, stride_cl, stride_ck, stride_cd,
        dim, inv_temperature, False, BLOCK_B, BLOCK_K, BLOCK_D, PRECISION,
    )
    return z, a


@triton.jit
def _pair_layer_stats(
    user_ptr, users, user_mask, stride_ub, stride_ul, stride_ud,
    items_ptr, item_rows, stride_in, stride_il, stride_id,
    c_ptr, stride_cl, stride_ck, stride_cd,
    layer, num_codes, dim, inv_user_temperature, inv_temperature,
    USER_LOGITS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """(lse_z, lse_a, sum_k P (a - z), sum_k Q (z - a)) per row for one layer, one pass over K."""
    max_z = tl.full((BLOCK_B,), float("-inf"), tl.float32)
    max_a = tl.full((BLOCK_B,), float("-inf"), tl.float32)
    sum_z = tl.zeros((BLOCK_B,), tl.float32)
    sum_a = tl.zeros((BLOCK_B,), tl.float32)
    t_z = tl.zeros((BLOCK_B,), tl.float32)
    t_a = tl.zeros((BLOCK_B,), tl.float32)
    for k_start in range(0, num_codes, BLOCK_K):
        codes = k_start + tl.arange(0, BLOCK_K)
        code_mask = codes < num_codes
        z, a = _pair_logits_tile(
            user_ptr, users, user_mask, stride_ub, stride_ul, stride_ud,
            items_ptr, item_rows, stride_in, stride_il, stride_id,
            c_ptr, stride_cl, stride_ck, stride_cd,
            layer, codes, code_mask, dim, inv_user_temperature, inv_temperature,
            USER_LOGITS, BLOCK_B, BLOCK_K, BLOCK_D, PRECISION,
        )
        diff = tl.where(code_mask[None, :], a - z, 0.0)
        new_max_z = tl.maximum(max_z, tl.max(z, axis=1))
        new_max_a = tl.maximum(max_a, tl.max(a, axis=1))
        rescale_z = tl.exp(max_z - new_max_z)
        rescale_a = tl.exp(max_a - new_max_a)
        exp_z = tl.exp(z - new_max_z[:, None])
        exp_a = tl.exp(a - new_max_a[:, None])
        sum_z = sum_z * rescale_z + tl.sum(exp_z, axis=1)
        sum_a = sum_a * rescale_a + tl.sum(exp_a, axis=1)
        t_z = t_z * rescale_z - tl.sum(exp_z * diff, axis=1)
        t_a = t_a * rescale_a + tl.sum(exp_a * diff, axis=1)
        max_z = new_max_z
        max_a = new_max_a
    return max_z + tl.log(sum_z), max_a + tl.log(sum_a), t_a / sum_a, t_z / sum_z


@triton.jit
def _sample_score(
    user_ptr, users, user_mask, stride_ub, stride_ul, stride_ud,
    items_ptr, item_rows, stride_in, stride_il, stride_id,
    c_ptr, stride_cl, stride_ck, stride_cd, weight_ptr,
    num_layers, num_codes, dim, inv_user_temperature, inv_temperature,
    USER_LOGITS: tl.constexpr, SYMMETRIC: tl.constexpr, BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """s(b, item_rows[b]) = -sum_l w_l [KL(P||Q) (+ KL(Q||P))] for a block of user rows."""
    score = tl.zeros((BLOCK_B,), tl.float32)
    for layer in range(0, num_layers):
        lse_z, lse_a, mean_p_diff, mean_q_diff = _pair_layer_stats(
            user_ptr, users, user_mask, stride_ub, stride_ul, stride_ud,
            items_ptr, item_rows, stride_in, stride_il, stride_id,
            c_ptr, stride_cl, stride_ck, stride_cd,
            layer, num_codes, dim, inv_user_temperature, inv_temperature,
            USER_LOGITS, BLOCK_B, BLOCK_K, BLOCK_D, PRECISION,
        )
        divergence = mean_p_diff - (lse_a - lse_z)
        if SYMMETRIC:
            divergence += mean_q_diff - (lse_z - lse_a)
        score -= tl.load(weight_ptr + layer) * divergence
    return score


@triton.jit
def _sampled_bpr_forward_kernel(
    user_ptr, stride_ub, stride_ul, stride_ud,
    items_ptr, stride_in, stride_il, stride_id,
    c_ptr, stride_cl, stride_ck, stride_cd,
    samples_ptr, weight_ptr, score_ptr, row_sum_ptr,
    batch, num_samples, num_layers, num_codes, dim, inv_user_temperature, inv_temperature,
    USER_LOGITS: tl.constexpr, SYMMETRIC: tl.constexpr, BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """Scores (B, 1 + S) and row_sum_b = sum over valid negatives of softplus(s_bj - s_b0)."""
    users = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    user_mask = users < batch
    positives = tl.load(samples_ptr + users * num_samples, mask=user_mask, other=0)
    positive_score = _sample_score(
        user_ptr, users, user_mask, stride_ub, stride_ul, stride_ud,
        items_ptr, positives, stride_in, stride_il, stride_id,
        c_ptr, stride_cl, stride_ck, stride_cd, weight_ptr,
        num_layers, num_codes, dim, inv_user_temperature, inv_temperature,
        USER_LOGITS, SYMMETRIC, BLOCK_B, BLOCK_K, BLOCK_D, PRECISION,
    )
    tl.store(score_ptr + users * num_samples, positive_score, mask=user_mask)
    row_sum = tl.zeros((BLOCK_B,), tl.float32)
    for j in range(1, num_samples):
        item = tl.load(samples_ptr + users * num_samples + j, mask=user_mask, other=-1)
        score = _sample_score(
            user_ptr, users, user_mask, stride_ub, stride_ul, stride_ud,
            items_ptr, tl.maximum(item, 0), stride_in, stride_il, stride_id,
            c_ptr, stride_cl, stride_ck, stride_cd, weight_ptr,
            num_layers, num_codes, dim, inv_user_temperature, inv_temperature,
            USER_LOGITS, SYMMETRIC, BLOCK_B, BLOCK_K, BLOCK_D, PRECISION,
        )
        tl.store(score_ptr + users * num_samples + j, score, mask=user_mask)
        margin = score - positive_score
        softplus = tl.maximum(margin, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(margin)))
        row_sum += tl.where(item >= 0, softplus, 0.0)
    tl.store(row_sum_ptr + users, row_sum, mask=user_mask)


@triton.jit
def _sampled_bpr_backward_kernel(
    user_ptr, stride_ub, stride_ul, stride_ud,
    items_ptr, stride_in, stride_il, stride_id,
    c_ptr, stride_cl, stride_ck, stride_cd,
    samples_ptr, weight_ptr, coef_ptr, grad_user_ptr, grad_item_ptr,
    batch, num_samples, num_layers, num_codes, dim, inv_user_temperature, inv_temperature,
    USER_LOGITS: tl.constexpr, SYMMETRIC: tl.constexpr, BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """dLoss/dz into grad_user (B, L, K) and dLoss/da into grad_item (B * (1 + S), L, K)."""
    users = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    user_mask = users < batch
    for j in range(0, num_samples):
        occurrence = users * num_samples + j
        item = tl.load(samples_ptr + occurrence, mask=user_mask, other=-1)
        item_rows = tl.maximum(item, 0)
        coef = tl.load(coef_ptr + occurrence, mask=user_mask, other=0.0)
        for layer in range(0, num_layers):
            lse_z, lse_a, mean_p_diff, mean_q_diff = _pair_layer_stats(
                user_ptr, users, user_mask, stride_ub, stride_ul, stride_ud,
                items_ptr, item_rows, stride_in, stride_il, stride_id,
                c_ptr, stride_cl, stride_ck, stride_cd,
                layer, num_codes, dim, inv_user_temperature, inv_temperature,
                USER_LOGITS, BLOCK_B, BLOCK_K, BLOCK_D, PRECISION,
            )
            grad_kl = tl.where(item >= 0, -coef * tl.load(weight_ptr + layer), 0.0)[:, None]
            for k_start in range(0, num_codes, BLOCK_K):
                codes = k_start + tl.arange(0, BLOCK_K)
                code_mask = codes < num_codes
                z, a = _pair_logits_tile(
                    user_ptr, users, user_mask, stride_ub, stride_ul, stride_ud,
                    items_ptr, item_rows, stride_in, stride_il, stride_id,
                    c_ptr, stride_cl, stride_ck, stride_cd,
                    layer, codes, code_mask, dim, inv_user_temperature, inv_temperature,
                    USER_LOGITS, BLOCK_B, BLOCK_K, BLOCK_D, PRECISION,
                )
                q = tl.exp(z - lse_z[:, None])
                p = tl.exp(a - lse_a[:, None])
                diff = tl.where(code_mask[None, :], a - z, 0.0)
                grad_z = q - p
                grad_a = p * (diff - mean_p_diff[:, None])
                if SYMMETRIC:
                    grad_z -= q * (diff + mean_q_diff[:, None])
                    grad_a += p - q
                tile_mask = user_mask[:, None] & code_mask[None, :]
                offset = layer * num_codes + codes[None, :]
                item_out = grad_item_ptr + occurrence[:, None] * num_layers * num_codes + offset
                tl.store(item_out, grad_kl * grad_a, mask=tile_mask)
                user_out = grad_user_ptr + users[:, None] * num_layers * num_codes + offset
                previous = tl.load(user_out, mask=tile_mask, other=0.0)
                tl.store(user_out, previous + grad_kl * grad_z, mask=tile_mask)


def _launch(kernel, user, items, codebooks, samples, weights, *extra, user_logits, symmetric,
            temperature, user_temperature):
    batch, num_samples = samples.shape
    num_layers, num_codes, dim = codebooks.shape
    block_b = block_size(batch, high=32)
    kernel[(triton.cdiv(batch, block_b),)](
        user, *user.stride(), items, *items.stride(), codebooks, *codebooks.stride(),
        samples, weights, *extra,
        batch, num_samples, num_layers, num_codes, dim, 1.0 / user_temperature, 1.0 / temperature,
        USER_LOGITS=user_logits, SYMMETRIC=symmetric, BLOCK_B=block_b,
        BLOCK_K=block_size(num_codes, high=64), BLOCK_D=block_size(dim, high=64),
        PRECISION=FP32_DOT_PRECISION,
    )


@torch.library.custom_op("soda_kernels::sampled_bpr", mutates_args=())
def sampled_bpr_op(
    user: torch.Tensor, items: torch.Tensor, codebooks: torch.Tensor, samples: torch.Tensor, weights: torch.Tensor,
    user_logits: bool, symmetric: bool, temperature: float, user_temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row sums of the BPR terms (B,) and the scores (B, 1 + S), float32; the reduction runs
    outside in torch and the scores are kept for backward."""
    scores = torch.empty(samples.shape, dtype=torch.float32, device=user.device)
    row_sums = torch.empty(samples.shape[0], dtype=torch.float32, device=user.device)
    _launch(_sampled_bpr_forward_kernel, user, items, codebooks, samples, weights, scores, row_sums,
            user_logits=user_logits, symmetric=symmetric, temperature=temperature,
            user_temperature=user_temperature)
    return row_sums, scores


@sampled_bpr_op.register_fake
def _(user, items, codebooks, samples, weights, user_logits, symmetric, temperature, user_temperature):
    return user.new_empty(samples.shape[:1], dtype=torch.float32), user.new_empty(samples.shape, dtype=torch.float32)


@torch.library.custom_op("soda_kernels::sampled_bpr_backward", mutates_args=())
def sampled_bpr_backward(
    grad_row_sums: torch.Tensor, user: torch.Tensor, items: torch.Tensor, codebooks: torch.Tensor,
    samples: torch.Tensor, weights: torch.Tensor, scores: torch.Tensor,
    user_logits: bool, symmetric: bool, temperature: float, user_temperature: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    negative = samples[:, 1:] >= 0
    coef_negative = grad_row_sums.float()[:, None] * torch.sigmoid(scores[:, 1:] - scores[:, :1])
    coef_negative = coef_negative * negative
    coef = torch.cat([-coef_negative.sum(1, keepdim=True), coef_negative], 1).contiguous()
    num_layers, num_codes, _ = codebooks.shape
    grad_user_logits = torch.zeros((user.shape[0], num_layers, num_codes),
                                   dtype=torch.float32, device=user.device)
    grad_item_logits = torch.empty((samples.numel(), num_layers, num_codes),
                                   dtype=torch.float32, device=user.device)
    _launch(_sampled_bpr_backward_kernel, user, items, codebooks, samples, weights,
            coef, grad_user_logits, grad_item_logits, user_logits=user_logits, symmetric=symmetric,
            temperature=temperature, user_temperature=user_temperature)

    occurrences = samples.flatten().clamp_min(0)
    grad_item_occurrences, grad_codebooks = project_logit_grad(
        grad_item_logits, items[occurrences], codebooks, temperature
    )
    grad_items = torch.zeros(items.shape, dtype=torch.float32, device=items.device)
    grad_items.index_put_((occurrences,), grad_item_occurrences, accumulate=True)
    if user_logits:
        grad_user = grad_user_logits
    else:
        grad_user, grad_codebooks_user = project_logit_grad(grad_user_logits, user, codebooks, user_temperature)
        grad_codebooks = grad_codebooks + grad_codebooks_user
    return grad_user.to(user.dtype), grad_items.to(items.dtype), grad_codebooks.to(codebooks.dtype)


@sampled_bpr_backward.register_fake
def _(grad_row_sums, user, items, codebooks, samples, weights, scores, *options):
    return user.new_empty(user.shape), items.new_empty(items.shape), codebooks.new_empty(codebooks.shape)


def _setup_context(ctx, inputs, output):
    user, items, codebooks, samples, weights, *ctx.options = inputs
    ctx.save_for_backward(user, items, codebooks, samples, weights, output[1])
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_row_sums, _grad_scores):
    grads = sampled_bpr_backward(grad_row_sums, *ctx.saved_tensors, *ctx.options)
    return *grads, None, None, None, None, None, None


sampled_bpr_op.register_autograd(_backward, setup_context=_setup_context)


def sampled_bpr(user, items, codebooks, positives, negatives, *, user_logits, symmetric, temperature,
                user_temperature, layer_weights, reduction):
    """Distributional BPR against explicit negatives on the Triton kernels (arguments validated).

    user (B, L, d) residuals or (B, L, K) logits, items (N, L, d), codebooks (L, K, d),
    positives (B,), negatives (B, S) with -1 padding -> float32 scalar, or (B,) for "none".
    """
    samples = torch.cat([positives[:, None], negatives], 1).to(torch.int64).contiguous()
    weights = layer_weights.to(torch.float32).contiguous()
    row_sums, _ = sampled_bpr_op(user, items, codebooks, samples, weights, user_logits, symmetric,
                                 temperature, user_temperature)
    row_counts = (negatives >= 0).sum(1)
    return torch_backend.reduce_terms(row_sums, row_counts, reduction)
