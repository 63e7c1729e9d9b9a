"""Pairwise layer-weighted KL between two sets of per-layer code distributions.

    out[i, j] = sum_l w_l KL(P_i^l || Q_j^l),  P = softmax(p_logits), Q = softmax(q_logits)
              = sum_l w_l sum_k P_ik log P_ik  -  sum_(l,k) w_l P_ik log Q_jk

The second term is one matrix product over the concatenated (layer, code) axis. Forward (1 launch):
a program owns a (BLOCK_M, BLOCK_N) tile of out; per layer it takes both sides' log-sum-exps by an
online pass over the K tiles of logits, then streams the K tiles again through
tl.dot(w_l P_i, (log Q_j)^T), adding the negative entropies of its P rows.

Backward, for G = dLoss/dout (M, B), per layer (the weight w_l multiplies both):

    dout_ij/dq_j = w_l (Q_j - P_i)
        -> grad_q_j = w_l (Q_j sum_i G_ij - (G^T P)_j)
    dout_ij/dp_i = w_l P_i (log P_i - log Q_j - KL_ij),  KL_ij = P_i . log P_i - P_i . log Q_j
        -> grad_p_i = w_l P_i (g_i (log P_i - P_i . log P_i) - H_i + P_i . H_i),
           g_i = sum_j G_ij, H = G log Q (M, K)

two matrix products over recomputed log-softmaxes, in PyTorch (backward temporaries, nothing saved
but the inputs).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .autograd import register_backward
from .common import SCORE_PRECISION, layer_weight, load_logits, log_sum_exp_update
from .launch import launch_config


@triton.jit
def _pairwise_kl_kernel(
    p_ptr, q_ptr, weights_ptr, out_ptr, num_p, num_q, num_layers, num_codes,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    """Grid (row blocks of P, column blocks of Q). p_ptr: (M, L, K) and q_ptr: (B, L, K) logits;
    weights_ptr: (L,) float32 or None (all ones); writes out_ptr: (M, B) float32, the tile's out[i, j]."""
    rows_p = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_q = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_p, mask_q = rows_p < num_p, rows_q < num_q
    row_stride = num_layers * num_codes
    cross = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    negative_entropy = tl.zeros((BLOCK_M,), tl.float32)
    for layer in range(0, num_layers):
        weight = layer_weight(weights_ptr, layer)
        p_layer, q_layer = p_ptr + layer * num_codes, q_ptr + layer * num_codes
        max_p = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        sum_p = tl.zeros((BLOCK_M,), tl.float32)
        max_q = tl.full((BLOCK_N,), float("-inf"), tl.float32)
        sum_q = tl.zeros((BLOCK_N,), tl.float32)
        for k_start in range(0, num_codes, BLOCK_K):
            codes = k_start + tl.arange(0, BLOCK_K)
            code_mask = codes < num_codes
            max_p, sum_p = log_sum_exp_update(max_p, sum_p, load_logits(p_layer, row_stride, rows_p, mask_p, codes,
                                                                        code_mask))
            max_q, sum_q = log_sum_exp_update(max_q, sum_q, load_logits(q_layer, row_stride, rows_q, mask_q, codes,
                                                                        code_mask))
        lse_p, lse_q = max_p + tl.log(sum_p), max_q + tl.log(sum_q)
        for k_start in range(0, num_codes, BLOCK_K):
            codes = k_start + tl.arange(0, BLOCK_K)
            code_mask = codes < num_codes
            log_p = load_logits(p_layer, row_stride, rows_p, mask_p, codes, code_mask) - lse_p[:, None]
            log_q = load_logits(q_layer, row_stride, rows_q, mask_q, codes, code_mask) - lse_q[:, None]
            weighted_p = tl.where(code_mask[None, :], weight * tl.exp(log_p), 0.0)
            negative_entropy += tl.sum(weighted_p * tl.where(code_mask[None, :], log_p, 0.0), axis=1)
            log_q = tl.where(code_mask[None, :], log_q, 0.0)
            cross = tl.dot(weighted_p, tl.trans(log_q), cross, input_precision=PRECISION)
    out = out_ptr + rows_p[:, None] * num_q + rows_q[None, :]
    tl.store(out, negative_entropy[:, None] - cross, mask=mask_p[:, None] & mask_q[None, :])


@torch.library.custom_op("soda_kernels::pairwise_kl", mutates_args=())
def pairwise_kl_op(p_logits: torch.Tensor, q_logits: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    (num_p, num_layers, num_codes), num_q = p_logits.shape, q_logits.shape[0]
    out = p_logits.new_empty((num_p, num_q), dtype=torch.float32)
    config = launch_config("pairwise", codes=num_codes)
    _pairwise_kl_kernel[(triton.cdiv(num_p, config["BLOCK_M"]), triton.cdiv(num_q, config["BLOCK_N"]))](
        p_ptr=p_logits, q_ptr=q_logits, weights_ptr=weights, out_ptr=out, num_p=num_p, num_q=num_q,
        num_layers=num_layers, num_codes=num_codes, PRECISION=SCORE_PRECISION, **config,
    )
    return out


@pairwise_kl_op.register_fake
def _(p_logits, q_logits, weights):
    return p_logits.new_empty((p_logits.shape[0], q_logits.shape[0]), dtype=torch.float32)


@torch.library.custom_op("soda_kernels::pairwise_kl_backward", mutates_args=())
def pairwise_kl_backward(
    grad_out: torch.Tensor, p_logits: torch.Tensor, q_logits: torch.Tensor, weights: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    grad_out = grad_out.float()
    log_p = p_logits.float().log_softmax(-1)
    log_q = q_logits.float().log_softmax(-1)
    p = log_p.exp()
    w = 1.0 if weights is None else weights[:, None]
    h = torch.einsum("mb,blk->mlk", grad_out, log_q)
    row_grad = grad_out.sum(1)[:, None, None]
    negative_entropy = (p * log_p).sum(-1, keepdim=True)
    grad_p = w * p * (row_grad * (log_p - negative_entropy) - h + (p * h).sum(-1, keepdim=True))
    grad_q = w * (log_q.exp() * grad_out.sum(0)[:, None, None] - torch.einsum("mb,mlk->blk", grad_out, p))
    return grad_p.to(p_logits.dtype), grad_q.to(q_logits.dtype)


register_backward(pairwise_kl_op, pairwise_kl_backward, saved_inputs=3, grads=2)  # p, q, weights


def pairwise_kl(p_logits: torch.Tensor, q_logits: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """out[i, j] = sum_l w_l KL(softmax(p_logits[i, l]) || softmax(q_logits[j, l])) on the Triton
    kernel; arguments validated by the caller. p_logits (M, L, K), q_logits (B, L, K), weights (L,)
    float32 or None (all ones) -> (M, B) float32. Non-contiguous inputs are copied once."""
    return pairwise_kl_op(p_logits.contiguous(), q_logits.contiguous(), weights)
