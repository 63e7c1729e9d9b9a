"""Kernel launches of the Triton path per forward + backward, pinned per mode: a count, not a timing.

A change that adds glue around the kernels (or removes it) shows here. The count is
``bench.launches``' host-side one (leaf torch ops, each a GPU kernel, + Triton launches) under the
Triton interpreter, at the headline's shape (L = 3, K = 256, d = 128, bf16), with the Triton
launches recorded and not run (``execute_triton=False``), so that B = 4096 takes a moment; a small
case per mode runs the kernels and must count the same. Update ``PINNED`` when the kernels change.
The interpreter's launch settings are the CPU ones; the GPU run counts the CUDA kernels themselves.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import pytest
import torch

from bench.cases import HEADLINE, contender, float_inputs, make_inputs
from bench.launches import count_phases, interpreter_enabled

# Forward + backward launches of the Triton path at (B = 64, B = 4096). Targets of the kernel work:
# at most 12 in-batch ("items", "users", "both"), 10 sampled, 12 "mean".
PINNED = {
    "items": (11, 11),
    "users": (11, 11),
    "both": (11, 11),
    "mean": (11, 11),
    "sampled": (10, 10),
}
SAMPLES = 10  # negatives per row of the sampled case

pytestmark = pytest.mark.skipif(not interpreter_enabled(), reason="counts the interpreter's launches (CPU)")


def _case(mode: str, batch: int, **shape):
    return replace(HEADLINE, mode=mode, batch=batch, samples=SAMPLES if mode == "sampled" else 0, **shape)


def _launches(case, execute_triton: bool) -> dict:
    inputs = make_inputs(case, 0, torch.device("cpu"))
    run = contender("triton", case, torch.device("cpu"))
    return count_phases(lambda: run(inputs), lambda loss: torch.autograd.grad(loss, float_inputs(inputs)),
                        execute_triton=execute_triton)


@pytest.mark.parametrize("batch_index, batch", [(0, 64), (1, 4096)])
@pytest.mark.parametrize("mode", sorted(PINNED))
def test_launches_pinned(mode, batch_index, batch):
    counted = _launches(_case(mode, batch), execute_triton=False)
    summary = {phase: dict(Counter(counted[phase].names)) for phase in ("forward", "backward")}
    assert counted["full"].total == PINNED[mode][batch_index], (
        f"{mode} B={batch}: {summary}; update PINNED in bench/test_launches.py if the change is meant")


@pytest.mark.parametrize("mode", sorted(PINNED))
def test_skipping_the_kernels_counts_the_same(mode):
    small = _case(mode, 32, codes=32, dim=16)
    assert _launches(small, execute_triton=True) == _launches(small, execute_triton=False)
