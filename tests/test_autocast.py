"""Inside torch.autocast the ops take the low-precision inputs autocast produces and still
compute in float32: the loss matches the float64 reference of those same inputs."""

import pytest
import torch

import soda_kernels as sk
from soda_kernels import reference

from .utils import DEVICE, make_bpr_inputs, rel_err


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_loss_under_autocast_matches_reference(backend):
    inputs = make_bpr_inputs(8, 10, 3, 11, 6, generator=torch.Generator().manual_seed(2))
    project = torch.nn.Linear(6, 6).to(DEVICE)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        user = project(inputs["user"])  # bfloat16, as a model under autocast would produce
        assert user.dtype == torch.bfloat16
        log_p = sk.codebook_log_softmax(inputs["items"], inputs["codebooks"], 0.5, backend=backend)
        if backend == "torch":  # the triton in-batch path is covered with its own kernels
            loss = sk.distributional_bpr(user, inputs["items"], inputs["codebooks"], inputs["positives"],
                                         in_batch="both", temperature=0.5, backend=backend)
    assert log_p.dtype == torch.float32
    ref_p = reference.log_soft_assignment(inputs["items"].detach().cpu(), inputs["codebooks"].detach().cpu(), 0.5)
    assert rel_err(log_p, ref_p) < 1e-4
    if backend == "torch":
        assert loss.dtype == torch.float32
        ref = reference.distributional_bpr(user.detach().cpu(), inputs["items"].detach().cpu(),
                                           inputs["codebooks"].detach().cpu(), inputs["positives"].cpu(),
                                           in_batch="both", temperature=0.5)
        assert rel_err(loss, ref) < 1e-4
        loss.backward()
        assert project.weight.grad is not None and torch.isfinite(project.weight.grad).all()


def test_pairwise_kl_under_autocast_stays_float32():
    g = torch.Generator().manual_seed(3)
    p = torch.randn(6, 2, 9, generator=g).to(DEVICE)
    q = torch.randn(5, 2, 9, generator=g).to(DEVICE)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        out = sk.pairwise_kl(p, q, backend="torch")
    assert out.dtype == torch.float32
    assert rel_err(out, reference.pairwise_kl(p.cpu(), q.cpu())) < 1e-5
