"""Pieces every Triton op shares: the codebook logits tile, launch settings, and the
projection of logit gradients onto residuals and codebooks.

Distance logits by the expansion (the ||x||^2 term cancels in every softmax):

    a_k = -||x - C_k||^2 / tau  ~  (2 x.C_k - ||C_k||^2) / tau

and their gradients, for g = dLoss/da (a row of K values):

    dLoss/dx   = (2/tau) sum_k g_k C_k           (the -||x||^2/tau term contributes -(2/tau) x sum_k g_k,
                                                   which vanishes since every g here sums to 0 over k)
    dLoss/dC_k = (2/tau) g_k (x - C_k)
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Precision of tl.dot on float32 operands, chosen once per process with SODA_FP32_DOT_PRECISION
# (before import). "tf32x3" (the default) splits each operand into a tf32 high and low part and
# sums three tensor-core products: float32-level accuracy (about 5e-6 relative on the in-batch
# scores, well inside the 1e-4 target) at several times the speed of "ieee" (plain float32 FMAs,
# no tensor cores). "tf32" (a single tensor-core product, about 1e-3) is faster still but breaks
# the float32 target: an explicit opt-in. The interpreter computes every dot in float32.
FP32_DOT_PRECISION = os.environ.get("SODA_FP32_DOT_PRECISION", "tf32x3")
if FP32_DOT_PRECISION not in ("ieee", "tf32x3", "tf32"):
    raise ValueError(f"SODA_FP32_DOT_PRECISION must be ieee, tf32x3 or tf32, got {FP32_DOT_PRECISION!r}")

# bfloat16 / float16 residuals and codebooks go into tl.dot as they are on the GPU (their products
# are exact in float32, so this only gains speed). The Triton interpreter mis-computes bfloat16
# dots, so there they are upcast first.
NATIVE_16BIT_DOT = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") != "1")


def block_size(n: int, low: int = 16, high: int = 128) -> int:
    """Power-of-two tile covering ``n`` within [low, high] (tl.dot needs at least 16)."""
    return max(low, min(high, triton.next_power_of_2(max(int(n), 1))))


@triton.jit
def codebook_logits_tile(
    x_ptr, rows, row_mask, stride_xn, stride_xl, stride_xd,
    c_ptr, layer, codes, code_mask, stride_cl, stride_ck, stride_cd,
    dim, inv_temperature,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """(2 x[rows, layer] . C[layer, codes] - ||C[layer, codes]||^2) / tau as a (BLOCK_R, BLOCK_K)
    float32 tile; masked codes hold -inf, so they vanish from every softmax."""
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    squared_norm = tl.zeros((BLOCK_K,), dtype=tl.float32)
    x_base = x_ptr + rows[:, None] * stride_xn + layer * stride_xl
    c_base = c_ptr + layer * stride_cl + codes[None, :] * stride_ck
    for d_start in range(0, dim, BLOCK_D):
        offs_d = d_start + tl.arange(0, BLOCK_D)
        d_mask = offs_d < dim
        x = tl.load(x_base + offs_d[None, :] * stride_xd, mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        c = tl.load(c_base + offs_d[:, None] * stride_cd, mask=d_mask[:, None] & code_mask[None, :], other=0.0)
        if NATIVE_16BIT_DOT and x.dtype == c.dtype and x.dtype != tl.float32:
            acc = tl.dot(x, c, acc)  # 16-bit operands: exact products, float32 accumulation
        else:
            acc = tl.dot(x.to(tl.float32), c.to(tl.float32), acc, input_precision=PRECISION)
        c = c.to(tl.float32)
        squared_norm += tl.sum(c * c, axis=0)
    logits = (2.0 * acc - squared_norm[None, :]) * inv_temperature
    return tl.where(code_mask[None, :], logits, float("-inf"))


def project_logit_grad(grad_logits: torch.Tensor, x: torch.Tensor, codebooks: torch.Tensor, temperature: float):
    """Gradients of residuals and codebooks from dLoss/da, with a = codebook logits of x.

    grad_logits (R, L, K) float32 (each row summing to 0 over K), x (R, L, d) -> dx (R, L, d) float32,
    dC (L, K, d) float32, both contiguous (custom-op outputs need strides their fake impls can state).
    Plain batched matrix products: deterministic.
    """
    scale = 2.0 / temperature
    x32, c32 = x.float(), codebooks.float()
    grad_x = scale * torch.einsum("rlk,lkd->rld", grad_logits, c32)
    grad_c = scale * (torch.einsum("rlk,rld->lkd", grad_logits, x32) - grad_logits.sum(0)[..., None] * c32)
    return grad_x.contiguous(), grad_c.contiguous()


@triton.jit
def distribution_logits_tile(
    src_ptr, rows, row_mask, stride_sn, stride_sl, stride_sd,
    c_ptr, layer, codes, code_mask, stride_cl, stride_ck, stride_cd,
    dim, inv_temperature,
    FROM_LOGITS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """Logits of one side's code distributions, (BLOCK_R, BLOCK_K) float32, -inf on masked codes:
    read as given (FROM_LOGITS, src (R, L, K)) or as codebook distance logits (src (R, L, d))."""
    if FROM_LOGITS:
        ptrs = src_ptr + rows[:, None] * stride_sn + layer * stride_sl + codes[None, :] * stride_sd
        logits = tl.load(ptrs, mask=row_mask[:, None] & code_mask[None, :], other=0.0).to(tl.float32)
        logits = tl.where(code_mask[None, :], logits, float("-inf"))
    else:
        logits = codebook_logits_tile(
            src_ptr, rows, row_mask, stride_sn, stride_sl, stride_sd,
            c_ptr, layer, codes, code_mask, stride_cl, stride_ck, stride_cd,
            dim, inv_temperature, BLOCK_R, BLOCK_K, BLOCK_D, PRECISION,
        )
    return logits


@triton.jit
def row_log_sum_exp(
    src_ptr, rows, row_mask, stride_sn, stride_sl, stride_sd,
    c_ptr, layer, stride_cl, stride_ck, stride_cd,
    num_codes, dim, inv_temperature,
    FROM_LOGITS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """log sum_k exp(a_k) per row of one layer, (BLOCK_R,): an online log-sum-exp over K tiles."""
    running_max = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    running_sum = tl.zeros((BLOCK_R,), tl.float32)
    for k_start in range(0, num_codes, BLOCK_K):
        codes = k_start + tl.arange(0, BLOCK_K)
        logits = distribution_logits_tile(
            src_ptr, rows, row_mask, stride_sn, stride_sl, stride_sd,
            c_ptr, layer, codes, codes < num_codes, stride_cl, stride_ck, stride_cd,
            dim, inv_temperature, FROM_LOGITS, BLOCK_R, BLOCK_K, BLOCK_D, PRECISION,
        )
        new_max = tl.maximum(running_max, tl.max(logits, axis=1))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(logits - new_max[:, None]), axis=1)
        running_max = new_max
    return running_max + tl.log(running_sum)


@triton.jit
def _distribution_stats_kernel(
    src_ptr, stride_sn, stride_sl, stride_sd, index_ptr,
    c_ptr, stride_cl, stride_ck, stride_cd,
    lse_ptr, negent_ptr,
    num_rows, num_codes, dim, inv_temperature,
    FROM_LOGITS: tl.constexpr, GATHER: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """Per (row, layer): lse = log sum_k exp(a_k) and negent = sum_k p_k log p_k = sum_k p_k a_k - lse.

    Pass 1 is an online log-sum-exp over K tiles; pass 2 recomputes each tile for sum_k p_k a_k.
    Row r reads source row index[r] when GATHER.
    """
    layer = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = offs < num_rows
    rows = tl.load(index_ptr + offs, mask=row_mask, other=0).to(tl.int64) if GATHER else offs
    lse = row_log_sum_exp(
        src_ptr, rows, row_mask, stride_sn, stride_sl, stride_sd, c_ptr, layer, stride_cl, stride_ck, stride_cd,
        num_codes, dim, inv_temperature, FROM_LOGITS, BLOCK_R, BLOCK_K, BLOCK_D, PRECISION,
    )
    expected_logit = tl.zeros((BLOCK_R,), tl.float32)
    for k_start in range(0, num_codes, BLOCK_K):
        codes = k_start + tl.arange(0, BLOCK_K)
        code_mask = codes < num_codes
        logits = distribution_logits_tile(
            src_ptr, rows, row_mask, stride_sn, stride_sl, stride_sd,
            c_ptr, layer, codes, code_mask, stride_cl, stride_ck, stride_cd,
            dim, inv_temperature, FROM_LOGITS, BLOCK_R, BLOCK_K, BLOCK_D, PRECISION,
        )
        finite_logits = tl.where(code_mask[None, :], logits, 0.0)
        expected_logit += tl.sum(tl.exp(logits - lse[:, None]) * finite_logits, axis=1)
    tl.store(lse_ptr + offs * tl.num_programs(1) + layer, lse, mask=row_mask)
    tl.store(negent_ptr + offs * tl.num_programs(1) + layer, expected_logit - lse, mask=row_mask)


def distribution_stats(source: torch.Tensor, codebooks: torch.Tensor, temperature: float,
                       from_logits: bool, index: torch.Tensor | None = None):
    """Per-row, per-layer (lse, sum_k p log p) of a side's distributions, each (R, L) float32.

    source: (N, L, d) residuals soft-assigned through ``codebooks`` at ``temperature``, or
    (N, L, K) logits when ``from_logits``; rows are source[index] when ``index`` (R,) is given.
    """
    num_layers, num_codes = codebooks.shape[0], codebooks.shape[1]
    num_rows = source.shape[0] if index is None else index.shape[0]
    lse = torch.empty((num_rows, num_layers), dtype=torch.float32, device=source.device)
    negent = torch.empty_like(lse)
    block_r = block_size(num_rows, high=64)
    _distribution_stats_kernel[(triton.cdiv(num_rows, block_r), num_layers)](
        source, *source.stride(), source if index is None else index,
        codebooks, *codebooks.stride(), lse, negent,
        num_rows, num_codes, codebooks.shape[2], 1.0 / temperature,
        FROM_LOGITS=from_logits, GATHER=index is not None,
        BLOCK_R=block_r, BLOCK_K=block_size(num_codes), BLOCK_D=block_size(codebooks.shape[2], high=64),
        PRECISION=FP32_DOT_PRECISION,
    )
    return lse, negent
