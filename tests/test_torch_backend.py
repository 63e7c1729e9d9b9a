"""The PyTorch backend against the float64 reference: every option, loss and gradients."""

import itertools
import resource
import zlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import soda_kernels as sk
from soda_kernels import reference

from .utils import DEVICE, compare_with_reference, make_bpr_inputs

MODES = ["items", "users", "both", "mean"]
REDUCTIONS = ["mean", "sum", "none"]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "mode, symmetric, reduction, user_logits",
    list(itertools.product(MODES + ["sampled"], [False, True], REDUCTIONS, [False, True])),
)
def test_every_option_matches_reference(dtype, mode, symmetric, reduction, user_logits):
    inputs = make_bpr_inputs(
        9, 13, 3, 7, 5, samples=4 if mode == "sampled" else None, dtype=dtype, user_logits=user_logits,
        generator=torch.Generator().manual_seed(zlib.crc32(repr((mode, symmetric, reduction, user_logits)).encode())),
    )
    compare_with_reference(
        inputs, "torch", in_batch="items" if mode == "sampled" else mode, symmetric=symmetric,
        reduction=reduction, user_logits=user_logits, temperature=0.8, user_temperature=None if user_logits else 1.7,
        layer_weights=[1.0, 0.0, 2.5],
    )


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 12), num_items=st.integers(1, 15), layers=st.integers(1, 5), codes=st.integers(2, 11),
    dim=st.integers(1, 9), samples=st.one_of(st.none(), st.integers(1, 5)), mode=st.sampled_from(MODES),
    symmetric=st.booleans(), reduction=st.sampled_from(REDUCTIONS), seed=st.integers(0, 2**31 - 1),
    temperature=st.floats(0.05, 20.0),
)
def test_random_shapes_match_reference(batch, num_items, layers, codes, dim, samples, mode, symmetric,
                                       reduction, seed, temperature):
    inputs = make_bpr_inputs(batch, num_items, layers, codes, dim, samples=samples, dtype=torch.float64,
                             generator=torch.Generator().manual_seed(seed))
    compare_with_reference(inputs, "torch", in_batch=mode, symmetric=symmetric, reduction=reduction,
                           temperature=temperature)


@pytest.mark.parametrize("mode", MODES + ["sampled"])
def test_gradcheck_float64(mode):
    inputs = make_bpr_inputs(5, 6, 2, 4, 3, samples=3 if mode == "sampled" else None, dtype=torch.float64,
                             generator=torch.Generator().manual_seed(3))

    def loss(user, items, codebooks):
        return sk.distributional_bpr(
            user, items, codebooks, inputs["positives"], inputs["negatives"], backend="torch",
            in_batch="items" if mode == "sampled" else mode, symmetric=True, temperature=0.9, reduction="none",
        )

    assert torch.autograd.gradcheck(loss, (inputs["user"], inputs["items"], inputs["codebooks"]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["both", "mean", "sampled"])
def test_half_precision_inputs(dtype, mode):
    inputs = make_bpr_inputs(10, 12, 3, 9, 6, samples=5 if mode == "sampled" else None, dtype=dtype,
                             generator=torch.Generator().manual_seed(5))
    compare_with_reference(inputs, "torch", in_batch="items" if mode == "sampled" else mode, symmetric=True)


def test_no_terms_gives_zero_loss_and_zero_gradients():
    inputs = make_bpr_inputs(4, 5, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    inputs["positives"] = torch.full((4,), 2, device=DEVICE)  # every row shares its positive: no valid negative
    for mode in MODES:
        loss = sk.distributional_bpr(**inputs, in_batch=mode, backend="torch")
        loss.backward()
        assert loss.item() == 0.0
        assert all(torch.equal(inputs[k].grad, torch.zeros_like(inputs[k])) for k in ("user", "items", "codebooks"))
    inputs["negatives"] = torch.full((4, 3), -1, device=DEVICE)
    assert sk.distributional_bpr(**inputs, backend="torch", reduction="none").eq(0).all()


def test_extreme_inputs_stay_finite():
    for temperature, scale in [(1e-4, 1.0), (1e3, 1.0), (1.0, 1e2)]:
        inputs = make_bpr_inputs(6, 8, 2, 5, 4, samples=3, generator=torch.Generator().manual_seed(7), scale=scale)
        for negatives in (inputs["negatives"], None):
            loss = sk.distributional_bpr(**dict(inputs, negatives=negatives), symmetric=True,
                                         temperature=temperature, in_batch="both", backend="torch")
            loss.backward()
            assert torch.isfinite(loss)
            assert all(torch.isfinite(inputs[k].grad).all() for k in ("user", "items", "codebooks"))
    logits = make_bpr_inputs(6, 8, 2, 5, 4, user_logits=True, generator=torch.Generator().manual_seed(8))
    logits["user"] = (logits["user"].detach() * 1e4).requires_grad_()
    loss = sk.distributional_bpr(**logits, user_logits=True, symmetric=True, in_batch="mean", backend="torch")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits["user"].grad).all()


def test_module_matches_function():
    inputs = make_bpr_inputs(6, 8, 2, 5, 4, generator=torch.Generator().manual_seed(9))
    options = dict(in_batch="users", symmetric=True, temperature=0.5, backend="torch")
    module = sk.DistributionalBPRLoss(**options)
    assert torch.equal(module(**inputs), sk.distributional_bpr(**inputs, **options))


def test_pairwise_kl_matches_reference():
    g = torch.Generator().manual_seed(11)
    p = torch.randn(7, 3, 6, generator=g, requires_grad=True)
    q = torch.randn(5, 3, 6, generator=g, requires_grad=True)
    out = sk.pairwise_kl(p, q, [0.5, 1.0, 2.0], backend="torch")
    ref = reference.pairwise_kl(p.detach().double().requires_grad_(), q.detach().double(), [0.5, 1.0, 2.0])
    assert out.shape == (7, 5)
    assert (out.double() - ref).norm() / ref.norm() < 1e-5


def test_large_in_batch_fits_in_memory():
    """B = 8192, L = 3, K = 256, d = 64, in_batch="both": forward + backward on the CPU."""
    inputs = make_bpr_inputs(8192, 8192, 3, 256, 64, duplicates=False, generator=torch.Generator().manual_seed(0))
    loss = sk.distributional_bpr(**inputs, in_batch="both", temperature=8.0, backend="torch")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(inputs["codebooks"].grad).all()
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss < 12 * 2**20  # KiB: under 12 GiB
