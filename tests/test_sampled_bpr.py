"""Triton distributional BPR with explicit negatives against the float64 reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import soda_kernels as sk
from soda_kernels import reference
from tests.utils import (
    DEVICE,
    TOLERANCE,
    compare_as_accurately_as_float32,
    compare_with_reference,
    make_bpr_inputs,
    rel_err,
)

OPTIONS = [
    dict(),
    dict(symmetric=True),
    dict(user_logits=True),
    dict(user_logits=True, symmetric=True, reduction="none"),
    dict(reduction="sum", temperature=0.5, user_temperature=2.0),
    dict(symmetric=True, layer_weights=[1.0, 0.0, 2.5], reduction="none", temperature=3.0),
    dict(user_logits=True, layer_weights=[0.0, 1.0, 0.5], reduction="sum", temperature=0.25),
]


def inputs(batch=5, num_items=9, layers=3, codes=21, dim=11, samples=4, seed=0, **kwargs):
    return make_bpr_inputs(batch, num_items, layers, codes, dim, samples=samples,
                           generator=torch.Generator().manual_seed(seed), **kwargs)


@pytest.mark.parametrize("options", OPTIONS, ids=repr)
def test_every_option_matches_reference(options):
    # Odd sizes: K = 21 (two of the interpreter's 16-code tiles) and d = 11 are not powers of two;
    # repeated positives and negatives.
    data = inputs(user_logits=options.get("user_logits", False))
    compare_with_reference(data, "triton", **options)


def test_tiles_over_codes_and_dims():
    # The interpreter's tiles are 16 rows and 16 codes and the backward projects d in chunks of 64:
    # K = 40 spans three code tiles (the summaries and the occurrence gradients carried from tile to
    # tile), d = 67 two chunks, B = 17 two row blocks, S = 4 two splits of the negatives.
    data = inputs(batch=17, num_items=12, layers=2, codes=40, dim=67, samples=4, seed=1)
    compare_with_reference(data, "triton", symmetric=True, temperature=8.0)


def test_float32_many_samples_and_duplicates():
    # Every item sampled many times over (N = 3), the positive among the negatives, K = 33 in three
    # tiles: the sorted segmented sum adds up to 12 occurrences per item.
    data = inputs(batch=6, num_items=3, layers=2, codes=33, dim=5, samples=5, seed=11)
    data["negatives"][0] = data["positives"][0]
    compare_with_reference(data, "triton", symmetric=True, reduction="sum", temperature=0.7)


@settings(max_examples=8, deadline=None, derandomize=True)
@given(
    batch=st.integers(1, 6), num_items=st.integers(1, 8), layers=st.integers(1, 3),
    codes=st.integers(2, 20), dim=st.integers(1, 5), samples=st.integers(1, 4),
    user_logits=st.booleans(), symmetric=st.booleans(),
    reduction=st.sampled_from(["mean", "sum", "none"]), seed=st.integers(0, 2**16),
)
def test_property_matches_reference(batch, num_items, layers, codes, dim, samples, user_logits,
                                    symmetric, reduction, seed):
    compare_as_accurately_as_float32(
        lambda: inputs(batch, num_items, layers, codes, dim, samples, seed, user_logits=user_logits),
        "triton", user_logits=user_logits, symmetric=symmetric, reduction=reduction,
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("user_logits", [False, True])
def test_half_precision_inputs(dtype, user_logits):
    # compare_with_reference checks each gradient comes back in its input's dtype.
    data = inputs(dtype=dtype, user_logits=user_logits, seed=2)
    compare_with_reference(data, "triton", user_logits=user_logits, symmetric=True)


def test_padding_single_sample_single_row():
    data = inputs(batch=1, samples=1, seed=3)
    data["negatives"] = torch.tensor([[4]], device=DEVICE)
    compare_with_reference(data, "triton")
    data = inputs(batch=4, samples=3, seed=4)
    data["negatives"][1] = -1  # a row with no terms: 0 in "none", left out of "mean"
    data["negatives"][2, 0] = data["positives"][2]  # the positive itself as a negative
    for reduction in ("mean", "none"):
        compare_with_reference(data, "triton", reduction=reduction, symmetric=True)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("samples", [0, 3])
def test_no_terms_gives_zero_and_zero_gradients(reduction, samples):
    # All negatives padding, or none at all (S = 0).
    data = inputs(seed=5)
    data["negatives"] = torch.full((data["positives"].shape[0], samples), -1, device=DEVICE)
    loss = sk.distributional_bpr(**data, reduction=reduction, backend="triton")
    loss.sum().backward()
    assert torch.count_nonzero(loss) == 0
    for name in ("user", "items", "codebooks"):
        assert torch.count_nonzero(data[name].grad) == 0, name


@pytest.mark.parametrize("symmetric", [False, True])
def test_extreme_temperatures(symmetric):
    # tau = 1e3: nearly uniform distributions, still within the float32 tolerance.
    compare_with_reference(inputs(seed=6), "triton", temperature=1e3, symmetric=symmetric)
    # tau = 1e-4: logits ~ 1e4 and nearly one-hot distributions. The loss and the user gradients
    # still match; the item-side logit gradients P (a - z - E_P[a - z]) are exponentially small
    # differences of ~1e4-sized float32 logits scaled by 2 / tau, so there only finiteness holds.
    data = inputs(seed=6)
    loss = sk.distributional_bpr(**data, temperature=1e-4, symmetric=symmetric, backend="triton")
    loss.backward()
    ref_inputs = dict(data, **{k: data[k].detach().double() for k in ("user", "items", "codebooks")})
    ref_inputs = {k: v.cpu() for k, v in ref_inputs.items()}
    ref_loss = reference.distributional_bpr(**ref_inputs, temperature=1e-4, symmetric=symmetric)
    assert rel_err(loss, ref_loss) <= TOLERANCE[torch.float32]
    for name in ("user", "items", "codebooks"):
        assert torch.isfinite(data[name].grad).all(), name


@pytest.mark.parametrize("symmetric", [False, True])
def test_extreme_logits_stay_finite(symmetric):
    data = inputs(user_logits=True, seed=7)
    data["user"] = (data["user"].detach().sign() * 1e4).requires_grad_()
    compare_with_reference(data, "triton", user_logits=True, symmetric=symmetric, tolerance=1e-3)


@pytest.mark.parametrize("user_logits", [False, True])
def test_backward_is_deterministic(user_logits):
    data = inputs(batch=16, num_items=5, samples=6, seed=8, user_logits=user_logits)

    def gradients():
        for name in ("user", "items", "codebooks"):
            data[name].grad = None
        sk.distributional_bpr(**data, user_logits=user_logits, symmetric=True,
                              backend="triton").backward()
        return [data[name].grad.clone() for name in ("user", "items", "codebooks")]

    for first, second in zip(gradients(), gradients(), strict=True):
        assert torch.equal(first, second)


@pytest.mark.parametrize("user_logits", [False, True])
def test_saves_nothing_as_large_as_b_l_k(user_logits):
    batch, layers, codes = 4, 2, 64
    data = inputs(batch=batch, num_items=10, layers=layers, codes=codes, dim=3, samples=2,
                  user_logits=False, seed=9)
    if user_logits:  # logits are an input of (B, L, K) elements: saved as given, not new
        data["user"] = torch.randn(batch, layers, codes, device=DEVICE).requires_grad_()
    inputs_by_id = {id(data[name]) for name in ("user", "items", "codebooks")}
    new_sizes = []

    def pack(tensor):
        if id(tensor) not in inputs_by_id:
            new_sizes.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = sk.distributional_bpr(**data, user_logits=user_logits, symmetric=True,
                                     backend="triton")
    loss.backward()
    assert new_sizes and max(new_sizes) < batch * layers * codes


@pytest.mark.parametrize("user_logits", [False, True])
def test_no_transient_as_large_as_the_occurrence_logits(user_logits):
    """Forward + backward with K = 64 codes and d = 2: every buffer the op allocates (the summaries
    B (1 + S) L 4, the occurrence gradients B (1 + S) L d, the codebook partials) stays far below
    one float32 logit per occurrence, code and layer, B (1 + S) L K, which the PyTorch backend
    allocates (checked too, so that the measure is known to see such a buffer)."""
    batch, samples, layers, codes = 16, 7, 2, 64
    data = inputs(batch=batch, num_items=40, layers=layers, codes=codes, dim=2, samples=samples, seed=12,
                  user_logits=user_logits)
    occurrence_logits = batch * (1 + samples) * layers * codes * 4

    def largest_allocation(backend):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            sk.distributional_bpr(**data, user_logits=user_logits, symmetric=True, backend=backend).backward()
        return max(event.cpu_memory_usage for event in prof.events())  # bytes one op allocated

    assert largest_allocation("torch") >= occurrence_logits * samples / (1 + samples)
    largest = largest_allocation("triton")
    assert 0 < largest < occurrence_logits / 4, f"an op allocated {largest} bytes; B (1 + S) L K is {occurrence_logits}"
