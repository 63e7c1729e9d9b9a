"""Soft codebook assignment: log softmax_k(-||x[n,l] - C[l,k]||^2 / tau).

Forward, per tile of rows and one layer: pass 1 streams K tiles of distance logits
(a tl.dot against the codebook) through an online log-sum-exp; pass 2 recomputes
each tile and writes a - lse. Backward, from the saved output log P:

    dLoss/da_k = G_k - P_k sum_j G_j          (G = dLoss/dlog P; sums to 0 over k)

then onto x and C with ``project_logit_grad``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._legacy import (
    FP32_DOT_PRECISION,
    block_size,
    codebook_logits_tile,
    project_logit_grad,
    row_log_sum_exp,
)


@triton.jit
def _codebook_log_softmax_kernel(
    x_ptr, stride_xn, stride_xl, stride_xd,
    c_ptr, stride_cl, stride_ck, stride_cd,
    out_ptr, stride_on, stride_ol, stride_ok,
    num_rows, num_codes, dim, inv_temperature,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    layer = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < num_rows
    log_sum_exp = row_log_sum_exp(
        x_ptr, rows, row_mask, stride_xn, stride_xl, stride_xd, c_ptr, layer, stride_cl, stride_ck, stride_cd,
        num_codes, dim, inv_temperature, False, BLOCK_R, BLOCK_K, BLOCK_D, PRECISION,
    )
    for k_start in range(0, num_codes, BLOCK_K):
        codes = k_start + tl.arange(0, BLOCK_K)
        code_mask = codes < num_codes
        logits = codebook_logits_tile(
            x_ptr, rows, row_mask, stride_xn, stride_xl, stride_xd,
            c_ptr, layer, codes, code_mask, stride_cl, stride_ck, stride_cd,
            dim, inv_temperature, BLOCK_R, BLOCK_K, BLOCK_D, PRECISION,
        )
        out = out_ptr + rows[:, None] * stride_on + layer * stride_ol + codes[None, :] * stride_ok
        tl.store(out, logits - log_sum_exp[:, None], mask=row_mask[:, None] & code_mask[None, :])


def codebook_log_softmax_forward(x: torch.Tensor, codebooks: torch.Tensor, temperature: float) -> torch.Tensor:
    num_rows, num_layers, dim = x.shape
    num_codes = codebooks.shape[1]
    out = torch.empty((num_rows, num_layers, num_codes), dtype=torch.float32, device=x.device)
    block_r = block_size(num_rows, high=64)
    grid = (triton.cdiv(num_rows, block_r), num_layers)
    _codebook_log_softmax_kernel[grid](
        x, *x.stride(), codebooks, *codebooks.stride(), out, *out.stride(),
        num_rows, num_codes, dim, 1.0 / temperature,
        BLOCK_R=block_r, BLOCK_K=block_size(num_codes), BLOCK_D=block_size(dim, high=64),
        PRECISION=FP32_DOT_PRECISION,
    )
    return out


@torch.library.custom_op("soda_kernels::codebook_log_softmax", mutates_args=())
def codebook_log_softmax_op(x: torch.Tensor, codebooks: torch.Tensor, temperature: float) -> torch.Tensor:
    return codebook_log_softmax_forward(x, codebooks, temperature)


@codebook_log_softmax_op.register_fake
def _(x, codebooks, temperature):
    return x.new_empty((x.shape[0], x.shape[1], codebooks.shape[1]), dtype=torch.float32)


@torch.library.custom_op("soda_kernels::codebook_log_softmax_backward", mutates_args=())
def codebook_log_softmax_backward(
    grad_log_probs: torch.Tensor, x: torch.Tensor, codebooks: torch.Tensor, log_probs: torch.Tensor,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    grad_log_probs = grad_log_probs.float()
    grad_logits = grad_log_probs - log_probs.exp() * grad_log_probs.sum(-1, keepdim=True)
    grad_x, grad_c = project_logit_grad(grad_logits, x, codebooks, temperature)
    return grad_x.to(x.dtype), grad_c.to(codebooks.dtype)


@codebook_log_softmax_backward.register_fake
def _(grad_log_probs, x, codebooks, log_probs, temperature):
    return x.new_empty(x.shape), codebooks.new_empty(codebooks.shape)


def _setup_context(ctx, inputs, output):
    x, codebooks, ctx.temperature = inputs
    ctx.save_for_backward(x, codebooks, output)


def _backward(ctx, grad_log_probs):
    return *codebook_log_softmax_backward(grad_log_probs, *ctx.saved_tensors, ctx.temperature), None


codebook_log_softmax_op.register_autograd(_backward, setup_context=_setup_context)
