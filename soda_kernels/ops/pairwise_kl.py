"""Pairwise layer-weighted KL between two sets of per-layer code distributions.

    out[i, j] = sum_l w_l KL(P_i^l || Q_j^l),  P = softmax(p_logits), Q = softmax(q_logits)
              = sum_l w_l sum_k P_i,k log P_i,k  -  sum_(l,k) w_l P_i,k log Q_j,k

The second term is one matrix product over the concatenated (layer, code) axis: the Triton
kernel takes per-row (lse, sum_k P log P) from ``distribution_stats`` and streams (layer, K)
tiles of both sides through tl.dot(w_l P_i, (log Q_j)^T) for a (BLOCK_M, BLOCK_B) output tile.

Backward, for G = dLoss/dout (M, B), per layer (the weight w_l multiplies both):

    dout_ij/dq_j = w_l (Q_j - P_i)
        -> grad_q_j = w_l (Q_j sum_i G_ij - (G^T P)_j)
    dout_ij/dp_i = w_l P_i (log P_i - log Q_j - KL_ij),  KL_ij = P_i . log P_i - P_i . log Q_j
        -> grad_p_i = w_l P_i (g_i (log P_i - P_i . log P_i) - H_i + P_i . H_i),
           g_i = sum_j G_ij, H = G log Q (M, K)

two matrix products over recomputed log-softmaxes (backward temporaries, nothing saved).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._legacy import FP32_DOT_PRECISION, block_size, distribution_logits_tile, distribution_stats


@triton.jit
def _pairwise_kl_kernel(
    p_ptr, stride_pm, stride_pl, stride_pk, q_ptr, stride_qb, stride_ql, stride_qk,
    p_lse_ptr, p_negent_ptr, q_lse_ptr, weight_ptr, out_ptr, stride_om, stride_ob,
    num_p, num_q, num_layers, num_codes,
    BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    """out = sum_l w_l (P . log P)_i - sum_(l,k) w_l P_ik log Q_jk for a (BLOCK_M, BLOCK_B) tile."""
    rows_p = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_q = tl.program_id(1).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_p = rows_p < num_p
    mask_q = rows_q < num_q
    cross = tl.zeros((BLOCK_M, BLOCK_B), tl.float32)
    negative_entropy = tl.zeros((BLOCK_M,), tl.float32)
    for layer in range(0, num_layers):
        weight = tl.load(weight_ptr + layer)
        p_lse = tl.load(p_lse_ptr + rows_p * num_layers + layer, mask=mask_p, other=0.0)
        q_lse = tl.load(q_lse_ptr + rows_q * num_layers + layer, mask=mask_q, other=0.0)
        p_negent = tl.load(p_negent_ptr + rows_p * num_layers + layer, mask=mask_p, other=0.0)
        negative_entropy += weight * p_negent
        for k_start in range(0, num_codes, BLOCK_K):
            codes = k_start + tl.arange(0, BLOCK_K)
            code_mask = codes < num_codes
            p_logits = distribution_logits_tile(
                p_ptr, rows_p, mask_p, stride_pm, stride_pl, stride_pk,
                p_ptr, layer, codes, code_mask, 0, 0, 0, 1, 1.0,
                True, BLOCK_M, BLOCK_K, 16, PRECISION,
            )
            q_logits = distribution_logits_tile(
                q_ptr, rows_q, mask_q, stride_qb, stride_ql, stride_qk,
                q_ptr, layer, codes, code_mask, 0, 0, 0, 1, 1.0,
                True, BLOCK_B, BLOCK_K, 16, PRECISION,
            )
            weighted_p = weight * tl.exp(p_logits - p_lse[:, None])
            log_q = tl.where(code_mask[None, :], q_logits - q_lse[:, None], 0.0)
            cross = tl.dot(weighted_p, tl.trans(log_q), cross, input_precision=PRECISION)
    out = out_ptr + rows_p[:, None] * stride_om + rows_q[None, :] * stride_ob
    tl.store(out, negative_entropy[:, None] - cross, mask=mask_p[:, None] & mask_q[None, :])


def _logit_stats(logits: torch.Tensor):
    """(lse, sum_k P log P), each (R, L) float32, of softmax(logits) for (R, L, K) logits."""
    num_layers, num_codes = logits.shape[1:]
    shape_only = logits.new_empty((num_layers, num_codes, 1))  # L and K for the stats launch
    return distribution_stats(logits, shape_only, 1.0, from_logits=True)


@torch.library.custom_op("soda_kernels::pairwise_kl", mutates_args=())
def pairwise_kl_op(p_logits: torch.Tensor, q_logits: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    (num_p, num_layers, num_codes), num_q = p_logits.shape, q_logits.shape[0]
    p_lse, p_negent = _logit_stats(p_logits)
    q_lse, _ = _logit_stats(q_logits)
    out = torch.empty((num_p, num_q), dtype=torch.float32, device=p_logits.device)
    block_m, block_b = block_size(num_p, high=64), block_size(num_q, high=64)
    _pairwise_kl_kernel[(triton.cdiv(num_p, block_m), triton.cdiv(num_q, block_b))](
        p_logits, *p_logits.stride(), q_logits, *q_logits.stride(),
        p_lse, p_negent, q_lse, weights, out, *out.stride(),
        num_p, num_q, num_layers, num_codes,
        BLOCK_M=block_m, BLOCK_B=block_b, BLOCK_K=block_size(num_codes, high=64),
        PRECISION=FP32_DOT_PRECISION,
    )
    return out


@pairwise_kl_op.register_fake
def _(p_logits, q_logits, weights):
    return p_logits.new_empty((p_logits.shape[0], q_logits.shape[0]), dtype=torch.float32)


@torch.library.custom_op("soda_kernels::pairwise_kl_backward", mutates_args=())
def pairwise_kl_backward(
    grad_out: torch.Tensor, p_logits: torch.Tensor, q_logits: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    grad_out = grad_out.float()
    log_p = p_logits.float().log_softmax(-1)
    log_q = q_logits.float().log_softmax(-1)
    p = log_p.exp()
    w = weights[:, None]
    h = torch.einsum("mb,blk->mlk", grad_out, log_q)
    row_grad = grad_out.sum(1)[:, None, None]
    negative_entropy = (p * log_p).sum(-1, keepdim=True)
    grad_p = w * p * (row_grad * (log_p - negative_entropy) - h + (p * h).sum(-1, keepdim=True))
    grad_q = w * (log_q.exp() * grad_out.sum(0)[:, None, None] - torch.einsum("mb,mlk->blk", grad_out, p))
    return grad_p.to(p_logits.dtype), grad_q.to(q_logits.dtype)


@pairwise_kl_backward.register_fake
def _(grad_out, p_logits, q_logits, weights):
    return p_logits.new_empty(p_logits.shape), q_logits.new_empty(q_logits.shape)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_out):
    return *pairwise_kl_backward(grad_out, *ctx.saved_tensors), None


pairwise_kl_op.register_autograd(_backward, setup_context=_setup_context)
