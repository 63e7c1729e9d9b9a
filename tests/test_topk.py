"""distributional_topk against a float64 brute force (the whole B x N score matrix), both backends.

Under the interpreter the kernel's tiles are 32 items wide (wider for k > 32) and the catalogue is cut into up to 4
splits, so N of a few dozen already crosses tiles, splits and the final merge."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import soda_kernels as sk
from soda_kernels import reference, torch_backend
from soda_kernels.reference import TOLERANCE

from .utils import DEVICE

BACKENDS = ["torch", "triton"]


def make_inputs(
    batch, num_items, layers=2, codes=8, dim=4, *, dtype=torch.float32, user_logits=False, seed=None, distinct=None
):
    """Random users, items and codebooks (``distinct``: items drawn from that many distinct rows, so
    that scores tie exactly); the seed is returned so a failure can be replayed."""
    seed = int(torch.randint(0, 2**31, ())) if seed is None else seed
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).to(DEVICE)

    user = randn(batch, layers, codes if user_logits else dim)
    items = randn(distinct or num_items, layers, dim)
    if distinct is not None:
        items = items[torch.randint(0, distinct, (num_items,), generator=g).to(DEVICE)]
    return user, items, randn(layers, codes, dim), seed


def brute_force(
    user,
    items,
    codebooks,
    *,
    user_logits=False,
    symmetric=False,
    temperature=1.0,
    user_temperature=None,
    layer_weights=None,
):
    """The (B, N) float64 scores s(b, n), straight from the definition."""
    tau_user = temperature if user_temperature is None else user_temperature
    if user_logits:
        log_q = torch.log_softmax(user.double().cpu(), -1)
    else:
        log_q = reference.log_soft_assignment(user.cpu(), codebooks.cpu(), tau_user)
    log_p = reference.log_soft_assignment(items.cpu(), codebooks.cpu(), temperature)
    weights = (
        torch.ones(log_q.shape[1], dtype=torch.float64)
        if layer_weights is None
        else (torch.as_tensor(layer_weights, dtype=torch.float64))
    )
    return reference.score(log_p[None], log_q[:, None], weights, symmetric)


def exclusion_mask(exclude, batch, num_items):
    mask = torch.zeros(batch, num_items, dtype=torch.bool)
    if exclude is not None:
        offsets, excluded = (t.cpu() for t in exclude)
        for b in range(batch):
            mask[b, excluded[offsets[b] : offsets[b + 1]]] = True
    return mask


def check_topk(scores, indices, ref, k, dtype, exclude=None, seed=None):
    """The returned lists against the float64 scores: shapes and dtypes, eligible distinct indices
    where there are enough, -inf / -1 padding after, scores descending and within the dtype's
    tolerance of the reference at the returned items, and no item left out that scores above the
    last one returned (beyond the tolerance)."""
    batch, num_items = ref.shape
    assert scores.shape == indices.shape == (batch, k), seed
    assert scores.dtype == torch.float32 and indices.dtype == torch.int64, seed
    scores, indices = scores.cpu(), indices.cpu()
    excluded = exclusion_mask(exclude, batch, num_items)
    tolerance = TOLERANCE[dtype] * ref.abs().max().item()
    for b in range(batch):
        eligible = int((~excluded[b]).sum())
        found = min(k, eligible)
        got, row = indices[b, :found], scores[b, :found]
        assert (indices[b, found:] == -1).all() and torch.isneginf(scores[b, found:]).all(), (seed, b)
        assert (got >= 0).all() and (got < num_items).all() and len(set(got.tolist())) == found, (seed, b)
        assert not excluded[b, got].any(), (seed, b)
        assert (row[:-1] >= row[1:]).all(), (seed, b)
        assert (row.double() - ref[b, got]).abs().max() <= tolerance, (seed, b)
        left_out = ~excluded[b].clone()
        left_out[got] = False
        if left_out.any():
            assert ref[b, left_out].max() <= row[-1].double() + tolerance, (seed, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"symmetric": True},
        {"layer_weights": [0.25, 2.0]},
        {"user_logits": True},
        {"temperature": 0.5, "user_temperature": 2.0},
    ],
)
def test_matches_brute_force(backend, dtype, options):
    user, items, codebooks, seed = make_inputs(5, 75, dtype=dtype, user_logits=options.get("user_logits", False))
    ref = brute_force(user, items, codebooks, **options)
    for k in (1, 7, 75):
        scores, indices = sk.distributional_topk(user, items, codebooks, k, backend=backend, **options)
        check_topk(scores, indices, ref, k, dtype, seed=seed)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_order_is_exact(backend):
    """float32 scores rank as the float64 ones do (no near-ties at this size): the whole order."""
    user, items, codebooks, seed = make_inputs(4, 37)
    ref = brute_force(user, items, codebooks)
    _, indices = sk.distributional_topk(user, items, codebooks, 37, backend=backend)
    assert torch.equal(indices.cpu(), ref.argsort(dim=1, descending=True, stable=True)), seed


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("k", [10, 45])
def test_ties_go_to_the_lower_index(backend, symmetric, k):
    """Items drawn from 4 distinct rows: every score ties with many others, across tiles and splits
    (k = 10: 32-item tiles, two splits under the interpreter); the order must be (score descending,
    index ascending) exactly, and equal items score bit-equally."""
    user, items, codebooks, seed = make_inputs(3, 45, distinct=4)
    scores, indices = sk.distributional_topk(user, items, codebooks, k, symmetric=symmetric, backend=backend)
    group = brute_force(user, items, codebooks, symmetric=symmetric)
    for b in range(3):
        expected = sorted(range(45), key=lambda n: (-round(group[b, n].item(), 9), n))[:k]
        assert indices[b].tolist() == expected, seed
        for n in expected:  # equal items, bit-equal scores
            same = [i for i in expected if torch.equal(items[i], items[n])]
            values = {scores[b, expected.index(i)].item() for i in same}
            assert len(values) == 1, seed


@pytest.mark.parametrize("backend", BACKENDS)
def test_exclusions_and_short_rows(backend):
    """Histories excluded (with a repeat), a row left with fewer than k items, an empty history, k > N."""
    user, items, codebooks, seed = make_inputs(4, 70)
    ref = brute_force(user, items, codebooks)
    offsets = torch.tensor([0, 3, 3, 70, 72], device=DEVICE)
    excluded = torch.cat([torch.tensor([69, 0, 69]), torch.arange(3, 70).flip(0), torch.tensor([40, 5])]).to(DEVICE)
    for k in (2, 5, 70, 80):
        scores, indices = sk.distributional_topk(
            user, items, codebooks, k, exclude=(offsets, excluded), backend=backend
        )
        check_topk(scores, indices, ref, k, torch.float32, exclude=(offsets, excluded), seed=seed)
    assert sorted(indices[2, :3].tolist()) == [0, 1, 2] and (indices[2, 3:] == -1).all()  # all row 2 keeps


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_precomputed_catalogue_equals_raw_items(backend, dtype):
    user, items, codebooks, seed = make_inputs(3, 40, dtype=dtype)
    catalogue = sk.ItemDistributions.from_items(items, codebooks, 0.5, backend=backend)
    raw = sk.distributional_topk(user, items, codebooks, 9, temperature=0.5, backend=backend)
    pre = sk.distributional_topk(user, catalogue, codebooks, 9, temperature=0.5, backend=backend)
    assert torch.equal(raw[0], pre[0]) and torch.equal(raw[1], pre[1]), seed
    assert len(catalogue) == 40 and catalogue.probs.shape == (40, 16)


def test_backends_agree_and_float64():
    user, items, codebooks, seed = make_inputs(4, 50, user_logits=True)
    torch_out = sk.distributional_topk(user, items, codebooks, 10, user_logits=True, backend="torch")
    triton_out = sk.distributional_topk(user, items, codebooks, 10, user_logits=True, backend="triton")
    assert torch.equal(torch_out[1], triton_out[1]), seed
    torch.testing.assert_close(torch_out[0], triton_out[0], rtol=1e-5, atol=1e-5)
    double = sk.distributional_topk(
        user.double(), items.double(), codebooks.double(), 10, user_logits=True, backend="torch"
    )
    check_topk(*double, brute_force(user, items, codebooks, user_logits=True), 10, torch.float64, seed=seed)


def test_triton_list_width_limit():
    user, items, codebooks, _ = make_inputs(2, 20)
    with pytest.raises(ValueError, match="k <= 128"):
        sk.distributional_topk(user, items, codebooks, 129, backend="triton")


class LargestTensor(TorchDispatchMode):
    """The largest tensor (in bytes) any operator creates while the mode is on."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in torch.utils._pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel() * tensor.element_size())
        return out


def test_torch_path_memory_stays_below_batch_by_items(monkeypatch):
    """With a 64 KiB budget no tensor of the torch path's call reaches the budget, let alone the
    B x N float32 scores (128 KB here): the catalogue is streamed, never scored whole."""
    batch, num_items, budget = 8, 4000, 64 * 1024
    user, items, codebooks, seed = make_inputs(batch, num_items)
    catalogue = sk.ItemDistributions.from_items(items, codebooks)
    monkeypatch.setattr(torch_backend, "TOPK_MEMORY_BYTES", budget)
    offsets = torch.arange(0, 2 * batch + 1, 2, device=DEVICE)
    excluded = torch.randint(0, num_items, (2 * batch,), device=DEVICE)
    with LargestTensor() as tracker:
        scores, indices = sk.distributional_topk(
            user, catalogue, codebooks, 10, exclude=(offsets, excluded), backend="torch"
        )
    assert tracker.largest <= budget < batch * num_items * 4, (seed, tracker.largest)
    check_topk(
        scores, indices, brute_force(user, items, codebooks), 10, torch.float32, exclude=(offsets, excluded), seed=seed
    )


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(k=0), ValueError, "k must be >= 1"),
        (dict(k=-3), ValueError, "k must be >= 1"),
        (dict(k=2.0), TypeError, "k must be a positive int"),
        (dict(k=True), TypeError, "k must be a positive int"),
        (dict(user=torch.randn(3, 3, 4)), ValueError, "user has L=3"),
        (dict(items=torch.randn(10, 2, 5)), ValueError, "items has d=5"),
        (dict(exclude=(torch.tensor([0, 1]), torch.tensor([1]))), ValueError, "B\\+1=4 entries"),
        (dict(exclude=(torch.tensor([0, 2, 1, 2]), torch.tensor([1, 2]))), ValueError, "non-decreasing"),
        (dict(exclude=(torch.tensor([0, 1, 1, 3]), torch.tensor([1, 2]))), ValueError, "end at E=2"),
        (dict(exclude=(torch.tensor([0, 1, 1, 2]), torch.tensor([1, 10]))), IndexError, "exclude items holds 10"),
        (dict(exclude=(torch.tensor([0, 1, 1, 2]), torch.tensor([-1, 2]))), IndexError, "exclude items holds -1"),
        (dict(exclude=(torch.tensor([0, 1, 1, 2]), torch.tensor([0.0, 2.0]))), TypeError, "exclude items"),
        (dict(exclude=torch.tensor([0, 1])), TypeError, "exclude must be a pair"),
        (dict(layer_weights=[1.0, -1.0]), ValueError, "layer_weights"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(backend="cuda"), ValueError, "backend"),
    ],
)
def test_bad_input_is_named(change, error, match):
    user, items, codebooks, _ = make_inputs(3, 10)
    args = dict(user=user, items=items, codebooks=codebooks, k=2)
    args.update(
        {name: value.to(DEVICE) if isinstance(value, torch.Tensor) else value for name, value in change.items()}
    )
    if isinstance(args.get("exclude"), tuple):
        args["exclude"] = tuple(t.to(DEVICE) for t in args["exclude"])
    with pytest.raises(error, match=match):
        sk.distributional_topk(**args)


def test_catalogue_must_match_the_codebooks():
    user, items, codebooks, _ = make_inputs(2, 10)
    catalogue = sk.ItemDistributions.from_items(items, codebooks, 0.5)
    with pytest.raises(ValueError, match="K=8 but codebooks has L=2, K=4"):
        sk.distributional_topk(user, catalogue, codebooks[:, :4], 2)
    with pytest.raises(ValueError, match="temperature=0.25 disagrees"):
        sk.distributional_topk(user, catalogue, codebooks, 2, temperature=0.25)
