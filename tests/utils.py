"""Shared test tools: inputs, relative errors and the float64-reference comparison."""

from __future__ import annotations

import zlib

import torch

import soda_kernels as sk
from soda_kernels import reference
from soda_kernels.reference import TOLERANCE

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    assert torch.isfinite(out).all(), "output holds NaN or inf"
    norm = ref.norm()
    return float((out - ref).norm() / norm) if norm > 0 else float((out - ref).norm())


class BPRInputs(dict):
    """The keyword arguments of distributional_bpr, and the seed they were drawn from (``seed``),
    which a failing comparison prints so that the case can be replayed: ``make_bpr_inputs`` with
    ``generator=torch.Generator().manual_seed(seed)`` draws the same inputs, and
    ``compare_with_reference`` the same upstream gradient."""

    seed: int


def make_bpr_inputs(batch, num_items, layers, codes, dim, *, samples=None, dtype=torch.float32,
                    user_logits=False, duplicates=True, scale=1.0, generator=None, device=DEVICE):
    """Fresh random inputs for distributional_bpr; positives drawn with repeats when ``duplicates``."""
    g = generator or torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()).item()))
    seed = g.initial_seed()

    def randn(*shape):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)

    user = randn(batch, layers, codes if user_logits else dim)
    items = randn(num_items, layers, dim)
    codebooks = randn(layers, codes, dim)
    high = max(1, batch // 2) if duplicates else num_items
    positives = torch.randint(0, min(high, num_items), (batch,), generator=g)
    if not duplicates:
        positives = torch.randperm(num_items, generator=g)[:batch]
    negatives = None
    if samples is not None:
        negatives = torch.randint(-1, num_items, (batch, samples), generator=g)
    inputs = BPRInputs(
        user=user.requires_grad_(), items=items.requires_grad_(), codebooks=codebooks.requires_grad_(),
        positives=positives.to(device), negatives=None if negatives is None else negatives.to(device),
    )
    inputs.seed = seed
    return inputs


def upstream_gradient(shape, seed: int) -> torch.Tensor:
    """The random upstream gradient of a comparison, float64 in [0.5, 1.5), drawn from a generator
    seeded from the inputs' seed (a stream apart from the inputs' own), not from the global one."""
    generator = torch.Generator().manual_seed(zlib.crc32(f"upstream {seed}".encode()))
    return torch.rand(shape, generator=generator, dtype=torch.float64) + 0.5


def _float_inputs(inputs):
    return {k: inputs[k] for k in ("user", "items", "codebooks")}


def compare_with_reference(inputs, backend, tolerance=None, **options):
    """Loss and the gradients of every floating input against the float64 reference.

    The upstream gradient is random (not 1), so a wrong reduction scale cannot hide, and drawn
    from ``inputs.seed`` (``inputs`` from ``make_bpr_inputs``), which a failure prints.
    Returns the relative errors by name.
    """
    seed = inputs.seed
    floats = _float_inputs(inputs)
    for t in floats.values():
        t.grad = None
    loss = sk.distributional_bpr(**inputs, backend=backend, **options)
    ref_floats = {k: v.detach().double().cpu().requires_grad_() for k, v in floats.items()}
    ref_inputs = dict(inputs, **ref_floats)
    ref_inputs["positives"] = inputs["positives"].cpu()
    if inputs["negatives"] is not None:
        ref_inputs["negatives"] = inputs["negatives"].cpu()
    ref_loss = reference.distributional_bpr(**ref_inputs, **options)
    upstream = upstream_gradient(ref_loss.shape, seed)
    (loss * upstream.to(loss.device, loss.dtype)).sum().backward()
    (ref_loss * upstream).sum().backward()
    assert loss.dtype == (torch.float64 if inputs["user"].dtype == torch.float64 else torch.float32)
    errors = {"loss": rel_err(loss, ref_loss)}
    for name, tensor in floats.items():
        assert tensor.grad is not None and tensor.grad.dtype == tensor.dtype, name
        ref_grad = ref_floats[name].grad  # None where the reference has no term touching it
        errors[name] = rel_err(tensor.grad, torch.zeros_like(ref_floats[name]) if ref_grad is None else ref_grad)
    tol = tolerance if tolerance is not None else TOLERANCE[inputs["user"].dtype]
    assert all(e <= tol for e in errors.values()), f"relative errors {errors} over {tol} for {options} (seed {seed})"
    return errors


def compare_as_accurately_as_float32(make_inputs, backend, **options):
    """``compare_with_reference`` within 1e-4, or within 4x float32 PyTorch's own error on the same
    inputs: tiny random shapes can make a gradient the small difference of O(1) terms (L = 1 and
    K = 2, or a negative equal to the positive), where any float32 computation reaches ~1e-3."""
    torch_error = max(compare_with_reference(make_inputs(), "torch", tolerance=1.0, **options).values())
    return compare_with_reference(make_inputs(), backend, tolerance=max(TOLERANCE[torch.float32], 4 * torch_error),
                                  **options)
