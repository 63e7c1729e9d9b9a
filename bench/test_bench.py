"""Speed, peak memory and launches of ``distributional_bpr`` for every contender of ``bench.cases``,
as pytest-benchmark tests: each test is ``bench.measure.run_contender`` (the check against eager,
the medians, the memory, the launches; see there), its record written into the run's results, then
five synchronised forward + backward steps for pytest-benchmark's own table.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from bench.cases import Case, contender, float_inputs
from bench.measure import DEVICE, GPU, CaseSetup, run_contender


def test_distributional_bpr(benchmark, bench, case: Case, contender_name: str):
    results, budget = bench
    outcome = run_contender(case, contender_name, budget)
    if outcome.failed:
        results.skip(case, contender_name, outcome.failed)
        pytest.fail(f"{contender_name}: {outcome.failed}")
    if outcome.skipped:
        results.skip(case, contender_name, outcome.skipped)
        pytest.skip(f"{contender_name}: {outcome.skipped}")
    results.add(case, contender_name, outcome.record)

    setup = CaseSetup.of(case)
    run = contender(contender_name, case, DEVICE)
    rotation = itertools.cycle(setup.inputs)

    def synchronised_step():
        inputs = next(rotation)
        torch.autograd.grad(run(inputs), float_inputs(inputs))
        if GPU:
            torch.cuda.synchronize()

    benchmark.extra_info.update(outcome.record)
    benchmark.pedantic(synchronised_step, rounds=5 if GPU else 1, iterations=1)
