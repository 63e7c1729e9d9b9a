"""Every bad input raises before any computation, with the offending argument named."""

import pytest
import torch

import soda_kernels as sk
from soda_kernels.ops.common import index_bounds


def _inputs(**overrides):
    g = torch.Generator().manual_seed(1)
    base = dict(
        user=torch.randn(4, 2, 3, generator=g),
        items=torch.randn(6, 2, 3, generator=g),
        codebooks=torch.randn(2, 5, 3, generator=g),
        positives=torch.tensor([0, 1, 2, 3]),
        negatives=None,
    )
    base.update(overrides)
    return base


BAD_CALLS = [
    ({"user": torch.randn(4, 3)}, {}, ValueError, "user"),
    ({"user": torch.randn(4, 3, 3)}, {}, ValueError, "user"),
    ({"user": torch.randn(4, 2, 4)}, {}, ValueError, "user"),
    ({"user": torch.randn(4, 2, 3)}, {"user_logits": True}, ValueError, "user"),
    ({"user": torch.ones(4, 2, 3, dtype=torch.int64)}, {}, TypeError, "user"),
    ({"user": [[0.0]]}, {}, TypeError, "user"),
    ({"items": torch.randn(6, 2, 4)}, {}, ValueError, "items"),
    ({"items": torch.randn(6, 3, 3)}, {}, ValueError, "items"),
    ({"items": torch.ones(6, 2, 3, dtype=torch.int32)}, {}, TypeError, "items"),
    ({"codebooks": torch.randn(2, 1, 3)}, {}, ValueError, "K >= 2"),
    ({"codebooks": torch.randn(5, 3)}, {}, ValueError, "codebooks"),
    ({"codebooks": torch.randn(2, 5, 3).bool()}, {}, TypeError, "codebooks"),
    ({"positives": torch.tensor([0, 1, 2])}, {}, ValueError, "positives"),
    ({"positives": torch.tensor([0, 1, 2, -1])}, {}, IndexError, "positives"),
    ({"positives": torch.tensor([0, 1, 2, 6])}, {}, IndexError, "positives"),
    ({"positives": torch.tensor([0.0, 1.0, 2.0, 3.0])}, {}, TypeError, "positives"),
    ({"positives": torch.tensor([[0, 1, 2, 3]])}, {}, ValueError, "positives"),
    ({"negatives": torch.tensor([[0], [1], [2]])}, {}, ValueError, "negatives"),
    ({"negatives": torch.tensor([[0], [1], [2], [-2]])}, {}, IndexError, "negatives"),
    ({"negatives": torch.tensor([[0], [1], [2], [6]])}, {}, IndexError, "negatives"),
    ({"negatives": torch.tensor([0, 1, 2, 3])}, {}, ValueError, "negatives"),
    ({"negatives": torch.rand(4, 2)}, {}, TypeError, "negatives"),
    ({}, {"temperature": 0.0}, ValueError, "temperature"),
    ({}, {"temperature": -1.0}, ValueError, "temperature"),
    ({}, {"temperature": float("nan")}, ValueError, "temperature"),
    ({}, {"temperature": "1"}, TypeError, "temperature"),
    ({}, {"user_temperature": 0.0}, ValueError, "user_temperature"),
    ({}, {"layer_weights": [1.0, -0.5]}, ValueError, "layer_weights"),
    ({}, {"layer_weights": [1.0]}, ValueError, "layer_weights"),
    ({}, {"layer_weights": [1.0, float("inf")]}, ValueError, "layer_weights"),
    ({}, {"layer_weights": ["a", "b"]}, TypeError, "layer_weights"),
    ({}, {"in_batch": "pairs"}, ValueError, "in_batch"),
    ({}, {"reduction": "max"}, ValueError, "reduction"),
    ({}, {"backend": "cuda"}, ValueError, "backend"),
    ({}, {"symmetric": "yes"}, TypeError, "symmetric"),
    ({}, {"user_logits": 1}, TypeError, "user_logits"),
]


@pytest.mark.parametrize("overrides, options, error, name", BAD_CALLS)
def test_bad_input_names_the_argument(overrides, options, error, name):
    with pytest.raises(error, match=name):
        sk.distributional_bpr(**_inputs(**overrides), **options)


def test_mixed_devices_are_refused():
    meta = torch.randn(6, 2, 3, device="meta")
    with pytest.raises(ValueError, match="items on meta"):
        sk.distributional_bpr(**_inputs(items=meta))


def test_triton_backend_refuses_float64():
    inputs = _inputs()
    inputs = {k: v.double() if k in ("user", "items", "codebooks") else v for k, v in inputs.items()}
    with pytest.raises(TypeError, match="float64"):
        sk.distributional_bpr(**inputs, backend="triton")


def test_module_refuses_unknown_options():
    with pytest.raises(TypeError, match="tempreature"):
        sk.DistributionalBPRLoss(tempreature=1.0)


@pytest.mark.parametrize(
    "call, error, name",
    [
        (lambda: sk.codebook_log_softmax(torch.randn(3, 2, 4), torch.randn(2, 5, 3)), ValueError, "x has d=4"),
        (lambda: sk.codebook_log_softmax(torch.randn(3, 4), torch.randn(2, 5, 3)), ValueError, "x must have"),
        (lambda: sk.codebook_log_softmax(torch.randn(3, 2, 3), torch.randn(2, 5, 3), 0), ValueError, "temperature"),
        (lambda: sk.codebook_log_softmax(torch.randn(3, 2, 3), torch.randn(2, 5, 3), backend="x"), ValueError,
         "backend"),
        (lambda: sk.pairwise_kl(torch.randn(3, 2, 4), torch.randn(5, 2, 5)), ValueError, "agree on L and K"),
        (lambda: sk.pairwise_kl(torch.randn(3, 2, 4), torch.randn(5, 2, 4), [1.0]), ValueError, "layer_weights"),
        (lambda: sk.pairwise_kl(torch.ones(3, 2, 4, dtype=torch.long), torch.randn(5, 2, 4)), TypeError, "p_logits"),
        (lambda: sk.pairwise_kl(torch.randn(3, 2, 4), torch.randn(5, 4)), ValueError, "q_logits"),
    ],
)
def test_other_ops_name_the_argument(call, error, name):
    with pytest.raises(error, match=name):
        call()


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("sizes", [(1, None), (300, 7), (5, 301), (129, 0)])
def test_index_bounds_match_aminmax(dtype, sizes):
    """One launch for the index checks of positives and negatives: every program's strided share
    (sizes over 2 programs x 64 in the interpreter), an empty second tensor, int32 and int64."""
    g = torch.Generator().manual_seed(sum(s or 0 for s in sizes))
    tensors = [torch.randint(-50, 10**6, (size,), generator=g, dtype=dtype) for size in sizes if size is not None]
    bounds = index_bounds(*tensors)
    expected = [(int(t.min()), int(t.max())) if t.numel() else (2**63 - 1, -(2**63)) for t in tensors]
    assert bounds == expected


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("in_batch, samples", [("both", None), ("mean", None), ("items", 3)])
def test_int32_indices_give_the_int64_results(backend, in_batch, samples):
    """The messages say "int64 or int32": int32 positives and negatives reach every op (pairwise and
    mean in-batch, sampled) and give the int64 loss and gradients exactly."""
    g = torch.Generator().manual_seed(5)
    negatives = None if samples is None else torch.randint(-1, 6, (4, samples), generator=g)
    results = []
    for dtype in (torch.int64, torch.int32):
        inputs = _inputs(
            positives=torch.tensor([0, 3, 3, 5], dtype=dtype),
            negatives=None if negatives is None else negatives.to(dtype),
        )
        floats = [inputs[name].requires_grad_() for name in ("user", "items", "codebooks")]
        loss = sk.distributional_bpr(**inputs, in_batch=in_batch, backend=backend)
        results.append([loss.detach(), *torch.autograd.grad(loss, floats)])
    for int64_result, int32_result in zip(*results, strict=True):
        assert torch.equal(int64_result, int32_result)


def test_index_message_names_both_dtypes():
    with pytest.raises(TypeError, match="positives must be an int64 or int32 torch.Tensor"):
        sk.distributional_bpr(**_inputs(positives=[0, 1, 2, 3]))


def test_bad_negative_in_the_last_block_is_found():
    """An out-of-range negative at the very end of a table that spans several blocks and programs."""
    negatives = torch.randint(-1, 6, (4, 97), generator=torch.Generator().manual_seed(3))
    negatives[-1, -1] = 6
    with pytest.raises(IndexError, match="negatives holds 6"):
        sk.distributional_bpr(**_inputs(negatives=negatives), backend="triton")
