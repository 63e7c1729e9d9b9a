"""torch.compile: the Triton paths are custom ops (opcheck), a model calling the ops compiles with
fullgraph=True on both backends and matches eager in loss and gradients, and validate=False skips
only the value checks.

On CPU the Triton backend runs under the interpreter inside the compiled graph: the custom ops are
opaque to the compiler, which traces their fake implementations and calls the real op at run time.
"""

import pytest
import torch

import soda_kernels as sk
from soda_kernels.ops.in_batch_mean import in_batch_mean_backward, in_batch_mean_op
from soda_kernels.ops.in_batch_pairs import in_batch_pairs_backward, in_batch_pairs_op
from soda_kernels.ops.pairwise_kl import pairwise_kl_backward, pairwise_kl_op
from soda_kernels.ops.sampled_negatives import sampled_bpr_backward, sampled_bpr_op
from soda_kernels.ops.soft_assignment import codebook_log_softmax_backward, codebook_log_softmax_op

from .utils import DEVICE, make_bpr_inputs, rel_err


def _randn(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def _opcheck_cases():
    user, items, codebooks = _randn(4, 2, 3, seed=1), _randn(6, 2, 3, seed=2), _randn(2, 5, 3, seed=3)
    logits = _randn(4, 2, 5, seed=4)
    weights = torch.tensor([1.0, 0.5], device=DEVICE)
    positives = torch.tensor([0, 1, 1, 3], device=DEVICE)
    negatives = torch.tensor([[2, -1], [5, 4], [0, 0], [-1, 2]], device=DEVICE)
    log_probs = codebook_log_softmax_op(items, codebooks, 0.5)
    cases = [
        (codebook_log_softmax_op, (items, codebooks, 0.5)),
        (codebook_log_softmax_backward, (_randn(6, 2, 5), items, codebooks, log_probs, 0.5)),
        (pairwise_kl_op, (logits, _randn(3, 2, 5), weights)),
        (pairwise_kl_backward, (_randn(4, 3), logits, _randn(3, 2, 5), weights)),
        (pairwise_kl_op, (logits, _randn(3, 2, 5), None)),  # None: all ones, no weights loaded
    ]
    # Each op also once without layer weights (None).
    for user_rows, user_logits, reduction, w in ((user, False, "mean", weights), (logits, True, "none", None)):
        sampled = (user_rows, items, codebooks, positives, negatives, w)
        options = (user_logits, True, 0.5, 0.7, reduction)
        saved = sampled_bpr_op(*sampled, *options)[1:]
        grad = _randn(*(() if reduction != "none" else (4,)))
        cases += [(sampled_bpr_op, (*sampled, *options)), (sampled_bpr_backward, (grad, *sampled, *saved, *options))]
    for mode, reduction, symmetric in (("both", "mean", False), ("items", "none", True), ("users", "sum", False)):
        in_batch = (user, items, codebooks, positives, None if mode == "users" else weights)
        options = (mode, False, symmetric, 0.5, 0.7, reduction)
        _, counts, total = in_batch_pairs_op(*in_batch, *options)
        grad = _randn(*(() if reduction != "none" else (4,)))
        cases += [(in_batch_pairs_op, (*in_batch, *options)),
                  (in_batch_pairs_backward, (grad, *in_batch, counts, total, *options))]
    for user_rows, user_logits, reduction, w in ((user, False, "none", weights), (logits, True, "sum", None)):
        mean = (user_rows, items, codebooks, positives, w)
        options = (user_logits, True, 0.5, 0.7, reduction)
        saved = in_batch_mean_op(*mean, *options)[1:]
        grad = _randn(*(() if reduction != "none" else (4,)))
        cases += [(in_batch_mean_op, (*mean, *options)), (in_batch_mean_backward, (grad, *mean, *saved, *options))]
    return cases


@pytest.mark.parametrize("op, args", _opcheck_cases(), ids=lambda case: getattr(case, "_name", ""))
def test_opcheck(op, args):
    """All four checks (schema, autograd registration, fake tensor, AOT dispatch) on every op: the
    forward ops with gradients on their float inputs; the backward ops have no autograd formula
    (no double backward), so theirs take none."""
    differentiable = not op._name.endswith("_backward")
    args = tuple(a.detach().requires_grad_(differentiable and a.is_floating_point())
                 if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(op, args)


class _Model(torch.nn.Module):
    """A tower over user residuals, the ops on its output, and the loss: what a trainer compiles."""

    def __init__(self, backend, **options):
        super().__init__()
        self.tower = torch.nn.Linear(6, 6)
        self.loss = sk.DistributionalBPRLoss(backend=backend, **options)
        self.backend = backend

    def forward(self, user, items, codebooks, positives, negatives):
        user = self.tower(user)
        log_q = sk.codebook_log_softmax(user, codebooks, 0.5, backend=self.backend)
        divergence = sk.pairwise_kl(log_q, log_q, [1.0, 0.5, 2.0], backend=self.backend)
        return self.loss(user, items, codebooks, positives, negatives) + 1e-3 * divergence.mean()


CASES = [dict(in_batch="items"), dict(in_batch="both", symmetric=True), dict(in_batch="mean"),
         dict(sampled=True, symmetric=True, layer_weights=[1.0, 0.5, 2.0])]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "sampled" if "sampled" in c else c["in_batch"])
def test_compiled_model_matches_eager(backend, case):
    options = {k: v for k, v in case.items() if k != "sampled"}
    inputs = make_bpr_inputs(8, 10, 3, 11, 6, samples=4 if "sampled" in case else None,
                             generator=torch.Generator().manual_seed(5))
    model = _Model(backend, temperature=0.5, **options).to(DEVICE)
    # The custom ops inside an Inductor graph; the PyTorch backend traced whole (fullgraph) through
    # AOT autograd, without Inductor's C++ build on a CPU (the benchmark's compile-default
    # contender runs it through Inductor).
    compiled = torch.compile(model, fullgraph=True, backend="inductor" if backend == "triton" else "aot_eager")
    params = [model.tower.weight, inputs["items"], inputs["codebooks"]]
    results = []
    for run in (model, compiled):
        loss = run(**inputs)
        results.append((loss.detach(), *torch.autograd.grad(loss, params)))
    # The project's measure, ‖compiled − eager‖ / ‖eager‖: inductor reorders float32 sums, which moves
    # near-zero gradient elements by a few 1e-6 (an elementwise atol flakes on them).
    for eager, compiled_result in zip(*results, strict=True):
        assert rel_err(compiled_result, eager) < 1e-5


def test_validate_false_skips_value_checks_only():
    inputs = make_bpr_inputs(4, 6, 2, 5, 3, samples=2, generator=torch.Generator().manual_seed(1))
    inputs["negatives"][0, 0] = 6  # out of range: caught only by the value checks
    with pytest.raises(IndexError, match="negatives"):
        sk.distributional_bpr(**inputs, backend="torch")
    with pytest.raises(ValueError, match="layer_weights"):
        sk.pairwise_kl(inputs["user"], inputs["user"], [1.0, -1.0], backend="torch")
    sk.pairwise_kl(inputs["user"], inputs["user"], [1.0, -1.0], backend="torch", validate=False)
    inputs["negatives"][0, 0] = 5
    sk.distributional_bpr(**inputs, layer_weights=[1.0, -1.0], backend="torch", validate=False)
    with pytest.raises(ValueError, match="negatives"):
        sk.distributional_bpr(**dict(inputs, negatives=inputs["negatives"][:2]), validate=False)
    with pytest.raises(TypeError, match="validate"):
        sk.distributional_bpr(**inputs, validate=1)
