"""Benchmark cases, their inputs, the contenders and the roofline floor of each case.

A case is one call of ``sk.distributional_bpr``; three contenders run it: the Triton backend,
the PyTorch backend eager, and the PyTorch backend under ``torch.compile``.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import torch

import soda_kernels as sk
from soda_kernels import torch_backend
from soda_kernels._validation import check_layer_weights

HEADLINE = "in-batch both B=4096 L=3 K=256 d=128 bf16"
COMPILE_MODE = "max-autotune-no-cudagraphs"


@dataclass(frozen=True)
class Case:
    mode: str  # an in_batch mode, or "sampled"
    batch: int
    layers: int = 3
    codes: int = 256
    dim: int = 128
    samples: int = 0  # negatives per row when mode == "sampled"
    dtype: str = "bfloat16"
    symmetric: bool = False
    compile: bool = False  # also time torch.compile (compiling is slow: a few chosen cases)

    @property
    def name(self) -> str:
        kind = f"sampled S={self.samples}" if self.mode == "sampled" else f"in-batch {self.mode}"
        sym = " sym" if self.symmetric else ""
        short = {"bfloat16": "bf16", "float32": "fp32", "float16": "fp16"}[self.dtype]
        return f"{kind}{sym} B={self.batch} L={self.layers} K={self.codes} d={self.dim} {short}"

    @property
    def num_items(self) -> int:
        return 4 * self.batch if self.mode == "sampled" else self.batch

    def options(self) -> dict:
        in_batch = "items" if self.mode == "sampled" else self.mode
        return dict(in_batch=in_batch, symmetric=self.symmetric, temperature=4.0)

    def record(self) -> dict:
        return dict(asdict(self), name=self.name)


def gpu_cases(full: bool) -> list[Case]:
    """The default grid fits one 10-minute device call; ``full`` adds the rest of the issue's grid."""
    cases = [
        Case("both", 4096, compile=True),  # the headline
        Case("items", 4096),
        Case("users", 4096),
        Case("mean", 4096, compile=True),
        Case("sampled", 4096, samples=10, compile=True),
        Case("both", 4096, symmetric=True),
        Case("both", 4096, dtype="float32", compile=True),
        *[Case("both", b) for b in (256, 1024, 16384)],
        *[Case("sampled", 4096, samples=s) for s in (1, 100)],
        Case("both", 4096, codes=1024),
        Case("both", 4096, dim=256),
        Case("both", 4096, layers=4),
    ]
    if full:
        cases += [
            Case(mode, b, codes=k, dim=d, layers=layers, dtype=dtype)
            for mode in ("items", "both", "mean")
            for b in (256, 1024, 4096, 16384)
            for k in (64, 256, 1024)
            for d in (32, 128, 256)
            for layers in (3, 4)
            for dtype in ("float32", "bfloat16")
        ] + [Case("sampled", b, samples=s) for b in (256, 1024, 16384) for s in (1, 10, 100)]
    return list(dict.fromkeys(cases))


def cpu_cases() -> list[Case]:
    """Smoke mode: small shapes, every mode; the Triton contender runs only the tiniest one."""
    return [
        Case("both", 64, codes=32, dim=16, dtype="float32"),
        Case("items", 64, codes=32, dim=16, dtype="float32", symmetric=True),
        Case("mean", 64, codes=32, dim=16, dtype="float32"),
        Case("sampled", 64, codes=32, dim=16, samples=8, dtype="float32"),
        Case("both", 12, codes=20, dim=6, dtype="float32"),
    ]


TINY = 12  # the batch size at which the interpreter runs the Triton contender on the CPU


def selected_cases() -> list[Case]:
    if not torch.cuda.is_available():
        return cpu_cases()
    return gpu_cases(full=os.environ.get("SODA_BENCH_FULL", "0") == "1")


def make_inputs(case: Case, seed: int, device: torch.device) -> dict:
    """Fresh random inputs (never zeros): residuals of unit scale, duplicates among positives."""
    g = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, case.dtype)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype).requires_grad_()

    inputs = dict(
        user=randn(case.batch, case.layers, case.dim),
        items=randn(case.num_items, case.layers, case.dim),
        codebooks=randn(case.layers, case.codes, case.dim),
        positives=torch.randint(0, case.num_items, (case.batch,), generator=g).to(device),
        negatives=None,
    )
    if case.mode == "sampled":
        inputs["negatives"] = torch.randint(0, case.num_items, (case.batch, case.samples), generator=g).to(device)
    return inputs


def contender(name: str, case: Case):
    """A function of the inputs computing the loss: "triton", "eager" or "compile"."""
    options = case.options()
    if name == "triton":
        return lambda inputs: sk.distributional_bpr(**inputs, backend="triton", **options)

    def torch_loss(user, items, codebooks, positives, negatives):
        weights = check_layer_weights(None, case.layers, user.device)
        return torch_backend.distributional_bpr(
            user, items, codebooks, positives, negatives, user_logits=False, user_temperature=options["temperature"],
            layer_weights=weights, reduction="mean", **options,
        )

    run = torch_loss if name == "eager" else torch.compile(torch_loss, mode=COMPILE_MODE, dynamic=False)
    return lambda inputs: run(**inputs)


def roofline(case: Case) -> dict:
    """The fewest floating-point operations and bytes forward + backward must spend.

    Soft assignments: 2 N L K d multiply-adds each way, forward and twice backward (dx, dC).
    In-batch pairwise modes: the score matrix B x B over F = L K (2 L K when symmetric)
    features once forward and three times backward at least (recompute, dA, dB); "mean" has none.
    Sampled: B (1 + S) item rows through the codebooks. Bytes: inputs read and gradients written once.
    """
    element = torch.finfo(getattr(torch, case.dtype)).bits // 8
    rows = case.batch + (case.batch * (1 + case.samples) if case.mode == "sampled" else case.batch)
    assignment = 2 * rows * case.layers * case.codes * case.dim * 3
    features = case.layers * case.codes * (2 if case.symmetric else 1)
    pairwise = 0 if case.mode in ("mean", "sampled") else 2 * case.batch**2 * features * 4
    inputs = (case.batch + case.num_items) * case.layers * case.dim + case.layers * case.codes * case.dim
    return dict(flops=assignment + pairwise, bytes=2 * inputs * element)
