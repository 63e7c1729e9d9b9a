"""codebook_log_softmax on both backends against the float64 reference, gradients included."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import soda_kernels as sk
from soda_kernels import reference

from .utils import DEVICE, TOLERANCE, rel_err

BACKENDS = ["triton", "torch"]


def _check(num_rows, layers, codes, dim, dtype, backend, temperature=0.7, scale=1.0, seed=0, transpose=False):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(num_rows, layers, dim, generator=g) * scale).to(dtype).to(DEVICE)
    if transpose:  # non-contiguous strides
        x = x.transpose(0, 1).contiguous().transpose(0, 1)
    codebooks = (torch.randn(layers, codes, dim, generator=g) * scale).to(dtype).to(DEVICE)
    x.requires_grad_()
    codebooks.requires_grad_()
    out = sk.codebook_log_softmax(x, codebooks, temperature, backend=backend)
    assert out.shape == (num_rows, layers, codes) and out.dtype == torch.float32
    upstream = torch.randn(out.shape, generator=g, dtype=torch.float64)
    (out * upstream.to(out)).sum().backward()
    x_ref = x.detach().double().cpu().requires_grad_()
    c_ref = codebooks.detach().double().cpu().requires_grad_()
    ref = reference.log_soft_assignment(x_ref, c_ref, temperature)
    (ref * upstream).sum().backward()
    assert x.grad.dtype == dtype and codebooks.grad.dtype == dtype
    tol = TOLERANCE[dtype]
    errors = rel_err(out, ref), rel_err(x.grad, x_ref.grad), rel_err(codebooks.grad, c_ref.grad)
    assert max(errors) <= tol, errors


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(5, 2, 3, 7), (37, 3, 130, 20), (3, 1, 2, 1), (70, 2, 17, 80)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_reference(backend, shape, dtype):
    _check(*shape, dtype, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature, scale", [(1e-4, 1.0), (1e3, 1.0), (1.0, 30.0)])
def test_extreme_temperatures_and_distances(backend, temperature, scale):
    _check(9, 2, 11, 5, torch.float32, backend, temperature=temperature, scale=scale)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_input(backend):
    _check(6, 3, 10, 4, torch.float32, backend, transpose=True)


@settings(max_examples=15, deadline=None)
@given(num_rows=st.integers(1, 20), layers=st.integers(1, 4), codes=st.integers(2, 40), dim=st.integers(1, 24),
       seed=st.integers(0, 2**31 - 1), temperature=st.floats(0.1, 10.0))
def test_random_shapes_triton(num_rows, layers, codes, dim, seed, temperature):
    _check(num_rows, layers, codes, dim, torch.float32, "triton", temperature=temperature, seed=seed)


def test_deterministic_gradients():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(20, 2, 6, generator=g).to(DEVICE).requires_grad_()
    codebooks = torch.randn(2, 9, 6, generator=g).to(DEVICE).requires_grad_()
    grads = []
    for _ in range(2):
        x.grad = codebooks.grad = None
        sk.codebook_log_softmax(x, codebooks, backend="triton").exp().square().sum().backward()
        grads.append((x.grad.clone(), codebooks.grad.clone()))
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))
