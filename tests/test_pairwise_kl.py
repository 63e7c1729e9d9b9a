"""Triton pairwise KL against the float64 reference, forward and backward."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import soda_kernels as sk
from soda_kernels import reference
from tests.utils import DEVICE, TOLERANCE, rel_err


def check(num_p, num_q, layers, codes, *, dtype=torch.float32, scale=3.0, layer_weights=None,
          seed=0, tolerance=None):
    g = torch.Generator().manual_seed(seed)
    p = (torch.randn(num_p, layers, codes, generator=g, dtype=torch.float64) * scale).to(dtype)
    q = (torch.randn(num_q, layers, codes, generator=g, dtype=torch.float64) * scale).to(dtype)
    p, q = p.to(DEVICE).requires_grad_(), q.to(DEVICE).requires_grad_()
    out = sk.pairwise_kl(p, q, layer_weights, backend="triton")
    p_ref = p.detach().double().cpu().requires_grad_()
    q_ref = q.detach().double().cpu().requires_grad_()
    ref = reference.pairwise_kl(p_ref, q_ref, layer_weights)
    upstream = torch.rand(ref.shape, generator=g, dtype=torch.float64) + 0.5
    (out * upstream.to(DEVICE, torch.float32)).sum().backward()
    (ref * upstream).sum().backward()
    assert out.dtype == torch.float32 and out.shape == (num_p, num_q)
    assert p.grad.dtype == dtype and q.grad.dtype == dtype
    errors = [rel_err(out, ref), rel_err(p.grad, p_ref.grad), rel_err(q.grad, q_ref.grad)]
    tol = tolerance if tolerance is not None else TOLERANCE[dtype]
    assert max(errors) <= tol, errors


@pytest.mark.parametrize(
    "shape, layer_weights",
    [((5, 7, 3, 37), None), ((70, 3, 2, 130), [1.0, 0.0]), ((1, 1, 1, 2), None),
     ((17, 66, 4, 5), [0.5, 2.0, 0.0, 1.0])],
)
def test_matches_reference(shape, layer_weights):
    check(*shape, layer_weights=layer_weights)


@settings(max_examples=8, deadline=None, derandomize=True)
@given(num_p=st.integers(1, 20), num_q=st.integers(1, 20), layers=st.integers(1, 4),
       codes=st.integers(2, 40), seed=st.integers(0, 2**16))
def test_property_matches_reference(num_p, num_q, layers, codes, seed):
    check(num_p, num_q, layers, codes, seed=seed)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype):
    check(6, 5, 2, 33, dtype=dtype)


def test_extreme_logits_stay_finite():
    check(4, 6, 2, 9, scale=1e4, tolerance=1e-3)
