"""The fused in-batch distributional BPR (Triton, ``negatives=None``) against the float64 reference."""

import itertools
import zlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import soda_kernels as sk

from .utils import DEVICE, compare_as_accurately_as_float32, compare_with_reference, make_bpr_inputs

MODES = ["items", "users", "both", "mean"]
REDUCTIONS = ["mean", "sum", "none"]


def _seeded(*key) -> torch.Generator:
    """A generator seeded from the test's parameters by a stable hash (the same on every run)."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


@pytest.mark.parametrize(
    "mode, symmetric, reduction, user_logits", list(itertools.product(MODES, [False, True], REDUCTIONS, [False, True]))
)
def test_every_option_matches_reference(mode, symmetric, reduction, user_logits):
    inputs = make_bpr_inputs(9, 13, 3, 7, 5, user_logits=user_logits,
                             generator=_seeded(mode, symmetric, reduction, user_logits))
    compare_with_reference(
        inputs, "triton", in_batch=mode, symmetric=symmetric, reduction=reduction, user_logits=user_logits,
        temperature=0.8, user_temperature=None if user_logits else 1.7, layer_weights=[1.0, 0.0, 2.5],
    )


@pytest.mark.parametrize("mode, symmetric", list(itertools.product(MODES, [False, True])))
def test_batches_spanning_several_tiles(mode, symmetric):
    # The interpreter's tiles are 16 rows and 32 features: 37 rows = 3 tiles (the last partial) in
    # both directions and 3 column splits forward; F = L K = 66 (132 symmetric) spans several
    # feature blocks and gradient chunks; repeated positives fall in different tiles.
    inputs = make_bpr_inputs(37, 40, 2, 33, 3, user_logits=symmetric, generator=_seeded(mode, symmetric))
    compare_with_reference(inputs, "triton", in_batch=mode, symmetric=symmetric, reduction="none",
                           user_logits=symmetric, temperature=0.6, layer_weights=[0.7, 1.3])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("positives", [[4], [2, 2], [5, 5, 5, 5], [1, 1, 3, 1, 3, 0], [3, 3, 3, 0, 3, 3]])
def test_edge_batches(mode, positives):
    """B = 1, B = 2 with equal positives, no valid negative anywhere, duplicate positives, one group
    holding all rows but one (the lone row's mean is over all the others, theirs is that one row)."""
    inputs = make_bpr_inputs(len(positives), 6, 2, 5, 3, generator=_seeded(mode, *positives))
    inputs["positives"] = torch.tensor(positives, device=DEVICE)
    for reduction in REDUCTIONS:
        compare_with_reference(inputs, "triton", in_batch=mode, symmetric=True, reduction=reduction)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_batch_without_terms_has_zero_loss_and_gradients(mode, reduction):
    """Every positive equal: no valid pair, so the loss and every gradient are exactly 0, never NaN."""
    inputs = make_bpr_inputs(6, 6, 2, 5, 3, generator=_seeded(mode, reduction, "no terms"))
    inputs["positives"] = torch.full((6,), 2, device=DEVICE)
    loss = sk.distributional_bpr(**inputs, backend="triton", in_batch=mode, symmetric=True, reduction=reduction)
    loss.sum().backward()
    assert not loss.any()
    for name in ("user", "items", "codebooks"):
        assert not inputs[name].grad.any(), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", MODES)
def test_half_precision_inputs(dtype, mode):
    inputs = make_bpr_inputs(11, 14, 2, 6, 4, dtype=dtype, generator=_seeded(mode, str(dtype)))
    compare_with_reference(inputs, "triton", in_batch=mode, symmetric=mode in ("users", "mean"), temperature=2.0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("temperature, scale, user_logits", [(1e-4, 1.0, False), (1e3, 1.0, False), (1.0, 1e4, True)])
def test_extreme_values_stay_finite(mode, temperature, scale, user_logits):
    inputs = make_bpr_inputs(8, 9, 2, 5, 3, scale=scale, user_logits=user_logits, generator=_seeded(mode, scale))
    loss = sk.distributional_bpr(**inputs, backend="triton", in_batch=mode, symmetric=True, user_logits=user_logits,
                                 temperature=temperature, reduction="sum")
    loss.backward()
    assert torch.isfinite(loss)
    for name in ("user", "items", "codebooks"):
        assert torch.isfinite(inputs[name].grad).all(), name


def _gradients(inputs, **options):
    for name in ("user", "items", "codebooks"):
        inputs[name].grad = None
    sk.distributional_bpr(**inputs, backend="triton", **options).sum().backward()
    return [inputs[name].grad.clone() for name in ("user", "items", "codebooks")]


@pytest.mark.parametrize("mode", MODES)
def test_backward_is_deterministic(mode):
    inputs = make_bpr_inputs(20, 12, 2, 6, 3, generator=_seeded(mode))
    first = _gradients(inputs, in_batch=mode, symmetric=True)
    second = _gradients(inputs, in_batch=mode, symmetric=True)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("user_logits", [False, True])
def test_saves_nothing_as_large_as_the_distributions(mode, user_logits):
    # B L K = 640 and B B = 400 exceed every non-input tensor the op may save ((B,) and (L,) ones).
    batch, layers, codes, dim = 20, 2, 16, 2
    inputs = make_bpr_inputs(batch, 30, layers, codes, dim, user_logits=user_logits, generator=_seeded(mode))
    input_pointers = {inputs[name].data_ptr() for name in ("user", "items", "codebooks", "positives")}
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = sk.distributional_bpr(**inputs, backend="triton", in_batch=mode, symmetric=True,
                                     user_logits=user_logits)
    loss.backward()
    assert saved
    limit = min(batch * layers * codes, batch * batch)
    new = [tuple(t.shape) for t in saved if t.data_ptr() not in input_pointers and t.numel() >= limit]
    assert not new, f"saved for backward: {new}"


@settings(max_examples=15, deadline=None, derandomize=True)
@given(
    batch=st.integers(1, 12), num_items=st.integers(1, 15), layers=st.integers(1, 4), codes=st.integers(2, 11),
    dim=st.integers(1, 6), mode=st.sampled_from(MODES), symmetric=st.booleans(),
    reduction=st.sampled_from(REDUCTIONS), user_logits=st.booleans(), seed=st.integers(0, 2**31 - 1),
    temperature=st.floats(0.1, 10.0),
)
def test_random_shapes_match_reference(batch, num_items, layers, codes, dim, mode, symmetric, reduction,
                                       user_logits, seed, temperature):
    def inputs():
        return make_bpr_inputs(batch, num_items, layers, codes, dim, user_logits=user_logits,
                               generator=torch.Generator().manual_seed(seed))

    compare_as_accurately_as_float32(inputs, "triton", in_batch=mode, symmetric=symmetric, reduction=reduction,
                                     user_logits=user_logits, temperature=temperature)


@pytest.mark.parametrize("mode", ["items", "users", "both", "mean"])
def test_no_transient_as_large_as_the_score_matrix(mode):
    """Forward + backward at B = 96 with F = L K = 4 features: every buffer the op allocates
    (operands B F, partials O(B), codebook partials) stays far below the B x B score matrix."""
    batch = 96
    inputs = make_bpr_inputs(batch, batch, 1, 4, 2, generator=_seeded(mode, "memory"))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        sk.distributional_bpr(**inputs, backend="triton", in_batch=mode, symmetric=True).backward()
    largest = max(event.cpu_memory_usage for event in prof.events())  # bytes one op allocated
    score_matrix = batch * batch * 4
    assert 0 < largest < score_matrix / 4, f"an op allocated {largest} bytes; B x B float32 is {score_matrix}"


@pytest.mark.parametrize("symmetric", [False, True])
def test_mean_of_uneven_groups_does_not_cancel(symmetric):
    """Five rows share a positive and put almost all their mass (1 - 1e-13) on code 0; the sixth
    row has its own positive and about e^-30 there. The mean user of each of the five is the lone
    row's distribution, whose mass at code 0 a sum over the batch minus the group's sum would bury
    under the rounding of the five ones; the positives' P put real mass on code 0, so log M there
    moves the loss. The sums over the other groups keep it to float32's accuracy."""
    layers, codes, dim = 2, 5, 3
    inputs = make_bpr_inputs(6, 6, layers, codes, dim, user_logits=True, generator=_seeded("uneven", symmetric))
    logits = torch.zeros(6, layers, codes, device=DEVICE)
    logits[:5, :, 0] = 30.0
    logits[5, :, 0] = -30.0
    inputs["user"] = logits.requires_grad_()
    inputs["positives"] = torch.tensor([0, 0, 0, 0, 0, 1], device=DEVICE)
    with torch.no_grad():  # item 0's residuals at codeword 0: its P peaks there
        inputs["items"][0] = inputs["codebooks"][:, 0, :] + 0.1
    compare_with_reference(inputs, "triton", in_batch="mean", symmetric=symmetric, user_logits=True, temperature=2.0)
