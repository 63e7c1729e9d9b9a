"""The error of each operand precision for the in-batch score products, emulated on the CPU.

    python -m bench.precision [--batch 2048] [--dtype bfloat16]

A tensor-core product of rounded operands is exact in float32 and accumulated in float32; this
script rounds the in-batch operands the way each ``tl.dot`` precision does (bf16 / fp16 / tf32
rounding; bf16x3 and tf32x3 split each operand into a high and a low part and add three
products), multiplies in float64, and reports against float64 the relative error of the score
matrix S = A Bm^T + cb, of the margins S[b, m] - S[b, b] the BPR terms see, of the "both" loss,
and of the backward products C Bm and C^T A (C = dLoss/dS, rounded like the operands). The
inputs are the benchmark's (unit-scale residuals and codebooks, temperature 4, L = 3, K = 256,
d = 128), rounded to the input dtype first. It is how soda_kernels/ops/common.py chose bf16
operands for 16-bit inputs and bf16x3 for float32 ones (docs/precision.md).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

MODES = ("bf16", "fp16", "tf32", "bf16x3", "tf32x3")


def round_to(x: torch.Tensor, mode: str) -> torch.Tensor:
    """x rounded to the operand format of ``mode`` (bf16, fp16 or tf32), back in float64."""
    if mode == "bf16":
        return x.to(torch.bfloat16).double()
    if mode == "fp16":
        return x.to(torch.float16).double()
    bits = x.float().view(torch.int32)  # tf32: float32 with 10 mantissa bits, rounded to nearest
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32).double()


def product(x: torch.Tensor, y: torch.Tensor, mode: str) -> torch.Tensor:
    """x @ y as a tensor core computes it at ``mode``: rounded operands, exact products."""
    if not mode.endswith("x3"):
        return round_to(x, mode) @ round_to(y, mode)
    base = mode[:-2]
    x_high, y_high = round_to(x, base), round_to(y, base)
    x_low, y_low = round_to(x - x_high, base), round_to(y - y_high, base)
    return x_high @ y_high + x_high @ y_low + x_low @ y_high


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).norm() / ref.norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    args = parser.parse_args()
    torch.manual_seed(0)
    batch, layers, codes, dim, temperature = args.batch, 3, 256, 128, 4.0
    dtype = getattr(torch, args.dtype)

    def log_soft_assignment(x, codebooks):
        return (-((x[:, :, None, :] - codebooks[None]) ** 2).sum(-1) / temperature).log_softmax(-1)

    codebooks = torch.randn(layers, codes, dim).to(dtype).double()
    log_q = log_soft_assignment(torch.randn(batch, layers, dim).to(dtype).double(), codebooks)
    log_p = log_soft_assignment(torch.randn(batch, layers, dim).to(dtype).double(), codebooks)
    a, bm = log_q.flatten(1), log_p.exp().flatten(1)  # unit layer weights, "both", not symmetric
    col_bias = -(log_p.exp() * log_p).sum((1, 2))
    positives = torch.randint(0, batch, (batch,))
    valid = positives[None, :] != positives[:, None]

    def loss_and_coeff(scores, diag):
        items, users = scores - diag[:, None], scores - diag[None, :]
        count = 2 * valid.sum()
        loss = ((F.softplus(items) + F.softplus(users)) * valid).sum() / count
        return loss, ((torch.sigmoid(items) + torch.sigmoid(users)) * valid) / count

    scores = a @ bm.T + col_bias
    diag = scores.diagonal()
    loss, coeff = loss_and_coeff(scores, diag)
    grad_a, grad_bm = coeff @ bm, coeff.T @ a
    print(f"B = {batch}, {args.dtype} inputs; relative error against float64")
    print("| operands | S | S[b, m] - S[b, b] | loss | C Bm | C^T A |")
    print("|---|---|---|---|---|---|")
    for mode in MODES:
        mode_scores = product(a, bm.T, mode) + col_bias
        if mode.endswith("x3"):
            mode_diag = mode_scores.diagonal()
        else:  # the prologue's diagonal: the same rounded operands, float32 products
            mode_diag = (round_to(a, mode) * round_to(bm, mode)).sum(1) + col_bias
        mode_loss, mode_coeff = loss_and_coeff(mode_scores, mode_diag)
        margins = rel_err(mode_scores - mode_diag[:, None], scores - diag[:, None])
        print(f"| {mode} | {rel_err(mode_scores, scores):.1e} | {margins:.1e} | {abs(float(mode_loss / loss) - 1):.1e} "
              f"| {rel_err(product(mode_coeff, bm, mode), grad_a):.1e} "
              f"| {rel_err(product(mode_coeff.T, a, mode), grad_bm):.1e} |")


if __name__ == "__main__":
    main()
