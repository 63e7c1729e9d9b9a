"""Soft codebook assignment: log softmax_k(-||x[n,l] - C[l,k]||^2 / tau).

Forward (1 launch): a program owns a block of rows and one layer; an online log-sum-exp streams the
K tiles of codebook logits (``codebook_logits``: a tl.dot against the codebook) and a second pass
recomputes each tile and writes a - lse. Backward (2 launches), from the saved output log P and
G = dLoss/dlog P:

    dLoss/da_k = G_k - P_k sum_j G_j          (sums to 0 over k)

two passes over the K tiles (the row sums of G, then the logit gradient), projected onto the
residuals and the codebook (``log_softmax_backward_tile``); a program takes every P-th block of
rows, so that the codebook partials, summed in a fixed order by ``sum_partials``, stay few.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .autograd import register_backward
from .common import (
    LOGIT_PRECISION,
    code_tile,
    layer_logits,
    load_rows,
    log_softmax_backward_tile,
    log_sum_exp,
    store_rows,
    sum_partials,
    wide_operands,
)
from .launch import launch_config, plan_grid


@triton.jit
def _forward_kernel(
    x_ptr, codebooks_ptr, out_ptr, num_rows, num_layers, num_codes, dim, inv_temperature,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """Grid (row blocks, L). x_ptr: (N, L, d) residuals; codebooks_ptr: (L, K, d); writes
    out_ptr: (N, L, K) float32 log-probabilities."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < num_rows
    layer = tl.program_id(1)
    codebook_shape = (num_layers, num_codes, dim)
    lse = log_sum_exp(
        x_ptr, rows, row_mask, codebooks_ptr, codebook_shape, layer, inv_temperature, FROM_LOGITS=False,
        BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K, BLOCK_D=BLOCK_D, PRECISION=PRECISION,
    )
    for k_start in range(0, num_codes, BLOCK_K):
        codes, code_mask, tile_mask = code_tile(k_start, num_codes, row_mask, BLOCK_K)
        logits = layer_logits(
            x_ptr, rows, row_mask, codebooks_ptr, codebook_shape, layer, codes, code_mask, inv_temperature,
            FROM_LOGITS=False, BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K, BLOCK_D=BLOCK_D, PRECISION=PRECISION,
        )
        out = out_ptr + rows[:, None] * num_layers * num_codes + layer * num_codes + codes[None, :]
        tl.store(out, logits - lse[:, None], mask=tile_mask)


@triton.jit
def _backward_kernel(
    grad_ptr, log_probs_ptr, x_ptr, codebooks_ptr, grad_x_ptr, codebook_part_ptr,
    num_rows, num_layers, num_codes, dim, inv_temperature,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DIM: tl.constexpr, PRECISION: tl.constexpr,
):
    """Grid (programs, L); a program takes the row blocks program_id(0), + programs, ...

    grad_ptr, log_probs_ptr: (N, L, K) float32 G and log P; x_ptr: (N, L, d); codebooks_ptr:
    (L, K, d). Writes grad_x_ptr: (N, L, d) in x's dtype; codebook_part_ptr: (programs, L, K, d)
    float32 the program's partial of the codebook gradient.
    """
    program, layer = tl.program_id(0), tl.program_id(1)
    num_features = num_layers * num_codes
    codebook_shape = (num_layers, num_codes, dim)
    partial_ptr = codebook_part_ptr + (program * num_layers + layer) * num_codes * dim
    for block in range(program, tl.cdiv(num_rows, BLOCK_R), tl.num_programs(0)):
        rows = (block * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
        row_mask = rows < num_rows
        x = load_rows(x_ptr + layer * dim, num_layers * dim, rows, row_mask, dim, BLOCK_DIM)
        grad_sum = tl.zeros((BLOCK_R,), tl.float32)
        grad_x = tl.zeros((BLOCK_R, BLOCK_DIM), tl.float32)
        for step in range(0, 2):  # 0: sum_k G_k; 1: dLoss/da = G - P sum_k G_k, projected
            for k_start in range(0, num_codes, BLOCK_K):
                codes, code_mask, tile_mask = code_tile(k_start, num_codes, row_mask, BLOCK_K)
                tile = rows[:, None] * num_features + layer * num_codes + codes[None, :]
                grad = tl.load(grad_ptr + tile, mask=tile_mask, other=0.0)
                used = tile_mask & (step > 0)  # P only in the second pass
                p = tl.where(used, tl.exp(tl.load(log_probs_ptr + tile, mask=used, other=0.0)), 0.0)
                grad_sum, grad_x = log_softmax_backward_tile(
                    step, grad, p, tile_mask, grad_sum, grad_x, x, codebooks_ptr, codebook_shape, layer, codes,
                    code_mask, partial_ptr, block == program, scale=2.0 * inv_temperature, out_ptr=None,
                    out_rows=rows, FROM_LOGITS=False, BLOCK_DIM=BLOCK_DIM, PRECISION=PRECISION,
                )
        store_rows(grad_x_ptr + layer * dim, num_layers * dim, rows, row_mask, dim, grad_x)
        tl.debug_barrier()  # the next block adds to this program's partial, maybe in other threads


def _config(kind: str, x: torch.Tensor, codebooks: torch.Tensor) -> dict:
    num_codes, dim = codebooks.shape[1:]
    return launch_config(kind, codes=num_codes, dim=dim, wide=wide_operands(x, codebooks))


@torch.library.custom_op("soda_kernels::codebook_log_softmax", mutates_args=())
def codebook_log_softmax_op(x: torch.Tensor, codebooks: torch.Tensor, temperature: float) -> torch.Tensor:
    (num_rows, num_layers, dim), num_codes = x.shape, codebooks.shape[1]
    out = x.new_empty((num_rows, num_layers, num_codes), dtype=torch.float32)
    config = _config("log_softmax", x, codebooks)
    _forward_kernel[(triton.cdiv(num_rows, config["BLOCK_R"]), num_layers)](
        x_ptr=x, codebooks_ptr=codebooks, out_ptr=out, num_rows=num_rows, num_layers=num_layers, num_codes=num_codes,
        dim=dim, inv_temperature=1.0 / temperature, PRECISION=LOGIT_PRECISION, **config,
    )
    return out


@codebook_log_softmax_op.register_fake
def _(x, codebooks, temperature):
    return x.new_empty((x.shape[0], x.shape[1], codebooks.shape[1]), dtype=torch.float32)


@torch.library.custom_op("soda_kernels::codebook_log_softmax_backward", mutates_args=())
def codebook_log_softmax_backward(
    grad_log_probs: torch.Tensor, x: torch.Tensor, codebooks: torch.Tensor, log_probs: torch.Tensor,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    (num_rows, num_layers, dim), num_codes = x.shape, codebooks.shape[1]
    config = _config("log_softmax_grads", x, codebooks)
    grid = plan_grid("log_softmax_grads", config, x.device, batch=num_rows, blocks_per_program=num_layers)
    programs = grid["programs"]
    grad_x = torch.empty_like(x)
    codebook_part = codebooks.new_empty((programs, num_layers, num_codes, dim), dtype=torch.float32)
    _backward_kernel[(programs, num_layers)](
        grad_ptr=grad_log_probs.float().contiguous(), log_probs_ptr=log_probs, x_ptr=x, codebooks_ptr=codebooks,
        grad_x_ptr=grad_x, codebook_part_ptr=codebook_part, num_rows=num_rows, num_layers=num_layers,
        num_codes=num_codes, dim=dim, inv_temperature=1.0 / temperature, PRECISION=LOGIT_PRECISION, **config,
    )
    return grad_x, sum_partials(codebook_part, codebooks.dtype)


# Saved: x, codebooks and the log-probabilities; the temperature gets no gradient.
register_backward(codebook_log_softmax_op, codebook_log_softmax_backward, saved_inputs=2, grads=2, save_result=True)


def log_soft_assignment(x: torch.Tensor, codebooks: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax_k(-||x[n,l] - C[l,k]||^2 / tau) on the Triton kernels; arguments validated by the
    caller. x (N, L, d), codebooks (L, K, d) -> (N, L, K) float32. Non-contiguous inputs are copied
    once (the kernels index row-major tensors)."""
    return codebook_log_softmax_op(x.contiguous(), codebooks.contiguous(), temperature)
