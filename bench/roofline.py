"""The roofline floor of a case: the least work forward + backward must do, over measured ceilings.

FLOPs (every one of them matrix-product shaped, so counted at the tensor-core rate):

* soft assignments: the codebook logits x C^T of the B user rows and the item rows (B in-batch,
  min(N, B (1 + S)) sampled), 2 R L K d each, once forward and twice backward (dx, dC);
* in-batch "items" / "users" / "both": the score matrix S = A Bm^T over F = L K features (2 L K when
  symmetric), 2 B^2 F, once forward and twice backward (dA = dS Bm, dBm = dS^T A); "mean" has none;
* sampled: each row's 1 + S scores, a batched matrix-vector product of 2 B (1 + S) F, three times.

Rates: the residual-codebook products at the input dtype's fastest rate (bf16 tensor cores for 16-bit
inputs, tf32 for float32); the score products at the bf16 rate for 16-bit inputs (bf16 operands meet
their accuracy target) and at a third of it for float32 inputs (three bf16 products, bf16x3, are the
least that meets the float32 target; docs/precision.md). Bytes: every input read once and every
gradient written once. The floor is the larger of FLOPs / rate and bytes / copy bandwidth;
elementwise work (exp, log, softplus) is not counted, so the floor is optimistic.
"""

from __future__ import annotations

import time

import torch

from bench.cases import Case

MATMUL_SIZE = {"cuda": 8192, "cpu": 512}
COPY_ELEMENTS = {"cuda": 2**28, "cpu": 2**22}


def work(case: Case) -> dict:
    features = case.layers * case.codes * (2 if case.symmetric else 1)
    sampled = case.mode == "sampled"
    item_rows = min(case.num_items, case.batch * (1 + case.samples)) if sampled else case.batch
    assignment = 3 * 2 * (case.batch + item_rows) * case.layers * case.codes * case.dim
    if sampled:
        scores = 3 * 2 * case.batch * (1 + case.samples) * features
    elif case.mode == "mean":
        scores = 0
    else:
        scores = 3 * 2 * case.batch**2 * features
    element = torch.finfo(getattr(torch, case.dtype)).bits // 8
    residuals = (case.batch + case.num_items) * case.layers * case.dim + case.layers * case.codes * case.dim
    indices = 8 * case.batch * (1 + case.samples)
    return dict(assignment_flops=assignment, score_flops=scores, bytes=2 * residuals * element + indices)


def kernel_work(case: Case) -> dict[str, dict]:
    """Each Triton kernel's own work per launch on the in-batch pair path ("items", "users",
    "both"; empty for the other modes), counted like ``work``: its products (the score products
    the design recomputes included) and the fewest bytes it must read and write, intermediates
    included. Kernel names as the profiler shows them (``soda_kernels/ops/in_batch_pairs.py``).

    * ``_prologue_kernel`` (forward, and again in backward): the logits of B user and B item rows;
      reads the residuals and codebooks, writes the operands A, Bm (B, F) in the operand dtype;
    * ``_forward_kernel``: S = A Bm^T once; reads A and Bm;
    * ``_backward_kernel``: row programs recompute S and form dA = C Bm, column programs S^T and
      dBm = C^T A (4 products); reads A and Bm twice, writes dA and dBm in float32;
    * ``_epilogue_kernel``: recomputed logits, the residual and codebook projections (3 products of
      the logits' size); reads residuals, codebooks, operands and their gradients, writes the user
      gradient, the item rows' float32 gradient and at least one float32 codebook partial per side;
    * ``_sum_rows_by_index_kernel`` / ``_sum_partials_kernel``: the item rows and the codebook
      partials summed (bytes only, the partials counted once: a lower bound).

    ``_finish_kernel`` (O(B) partial sums) has no floor worth counting and is left out.
    """
    if case.mode not in ("items", "users", "both"):
        return {}
    batch = case.batch
    features = case.layers * case.codes * (2 if case.symmetric else 1)
    element = torch.finfo(getattr(torch, case.dtype)).bits // 8
    operand = 4 if case.dtype == "float32" else 2  # soda_kernels.ops.common.operand_dtype
    rows = batch * case.layers * case.dim  # one side's residuals
    codebook = case.layers * case.codes * case.dim
    logits = 2 * (2 * batch) * case.layers * case.codes * case.dim
    score = 2 * batch**2 * features
    operands = 2 * batch * features

    def kernel(assignment=0, scores=0, moved=0):
        return dict(assignment_flops=assignment, score_flops=scores, bytes=moved)

    return {
        "_prologue_kernel": kernel(logits, 0, (2 * rows + codebook) * element + operands * operand),
        "_forward_kernel": kernel(0, score, operands * operand),
        "_backward_kernel": kernel(0, 4 * score, 2 * operands * operand + operands * 4),
        "_epilogue_kernel": kernel(3 * logits, 0, (2 * rows + codebook) * element + operands * (operand + 4)
                                   + rows * (element + 4) + 2 * codebook * 4),
        "_sum_rows_by_index_kernel": kernel(0, 0, rows * (4 + element)),
        "_sum_partials_kernel": kernel(0, 0, codebook * (2 * 4 + element)),
    }


def floor_ms(case: Case, ceilings: dict, counts: dict | None = None) -> dict:
    """The floor in ms and what bounds it ("compute" or "memory"): of the whole forward + backward
    (``work``), or of the ``counts`` given (one kernel's, ``kernel_work``)."""
    counts = work(case) if counts is None else counts
    assignment_rate = ceilings["tf32_flops_per_s" if case.dtype == "float32" else "bf16_flops_per_s"]
    score_rate = ceilings["bf16_flops_per_s"] / (3 if case.dtype == "float32" else 1)
    compute_s = counts["assignment_flops"] / assignment_rate + counts["score_flops"] / score_rate
    memory_s = counts["bytes"] / ceilings["copy_bytes_per_s"]
    return dict(counts, ms=1e3 * max(compute_s, memory_s), bound="compute" if compute_s >= memory_s else "memory")


def _median_s(fn, device: torch.device) -> float:
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, return_mode="median") * 1e-3
    times = []
    for _ in range(5):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[2]


def measure_ceilings(device: torch.device) -> dict:
    """Copy bandwidth (bytes read + written) and dense matmul rates (bf16, tf32, fp32), measured now."""
    source = torch.randn(COPY_ELEMENTS[device.type], device=device)
    target = torch.empty_like(source)
    ceilings = {"copy_bytes_per_s": 2 * source.nbytes / _median_s(lambda: target.copy_(source), device)}
    n = MATMUL_SIZE[device.type]
    allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    for key, dtype, tf32 in (("bf16", torch.bfloat16, False), ("tf32", torch.float32, True),
                             ("fp32", torch.float32, False)):
        a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
        torch.backends.cuda.matmul.allow_tf32 = tf32
        try:
            ceilings[f"{key}_flops_per_s"] = 2 * n**3 / _median_s(lambda a=a, b=b: a @ b, device)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    return ceilings
