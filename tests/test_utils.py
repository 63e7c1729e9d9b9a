"""The test tools themselves: the seed a failing comparison prints replays the failure."""

import re

import pytest
import torch

from .utils import compare_with_reference, make_bpr_inputs


def test_printed_seed_replays_a_failure():
    """Inputs drawn with a seed from the global generator fail (tolerance 0); the seed printed in
    the message, given back to ``make_bpr_inputs``, fails with the very same errors: the inputs and
    the upstream gradient both come from it."""

    def failure(generator=None) -> str:
        inputs = make_bpr_inputs(5, 7, 2, 4, 3, samples=2, generator=generator)
        with pytest.raises(AssertionError) as failed:
            compare_with_reference(inputs, "torch", tolerance=0.0, symmetric=True, reduction="sum")
        return str(failed.value).splitlines()[0]

    torch.manual_seed(0)
    first = failure()
    seed = int(re.search(r"\(seed (\d+)\)", first).group(1))
    torch.rand(100)  # the global generator moves on between the failure and its replay
    assert failure(torch.Generator().manual_seed(seed)) == first
