"""Speed, peak memory and launches of ``distributional_bpr`` for every contender of ``bench.cases``.

One setup per case (rotated input sets and the eager reference) serves every contender, and within
a contender the correctness check, the speed and the memory measurement. Each contender is first
run once (which compiles it, outside the timing) and checked against eager: loss and the gradients
of user, items and codebooks, ||out - eager|| / ||eager|| within the project's one tolerance table,
``soda_kernels.reference.TOLERANCE`` (1e-4 for fp32, 3e-2 for 16-bit inputs).
Then forward, backward and forward + backward are timed separately:

* on a GPU with CUDA events: ``triton.testing.do_bench`` medians (warm-up first, L2 flushed before
  every call) for forward and forward + backward; backward alone as the median over passes whose
  graph is built outside the events; then the peak memory of one forward + backward above what the
  inputs already hold (``torch.cuda.max_memory_allocated`` after a reset);
* on the CPU with the host clock (smoke mode: the numbers only show that everything runs).

Last, the launches of one forward, one backward and both (``bench.launches.count_launches``):
on a GPU the CUDA kernels the profiler saw, with the host-side count beside them; on the CPU the
host-side count (leaf torch ops + Triton launches + torch.compile's kernels).

Calls rotate among several fresh random input sets (at least 2x the L2 cache together). Gradients
come from ``torch.autograd.grad``, so nothing accumulates between calls.
"""

from __future__ import annotations

import itertools
import math
import time

import pytest
import torch

from bench.cases import Case, contender, float_inputs, make_inputs, naive_skip_reason
from bench.launches import count_launches
from soda_kernels.reference import TOLERANCE

GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")
MAX_INPUT_SETS = 8
CPU_REPEATS = 1  # smoke mode: the CPU times only show that everything runs
WARM_UP_PASSES = 3 if GPU else 1


class CaseSetup:
    """The inputs of one case, rotated among several sets, and eager PyTorch's loss and gradients."""

    current: CaseSetup | None = None

    def __init__(self, case: Case):
        first = make_inputs(case, 0, DEVICE)
        size = 2 * sum(t.nbytes for t in float_inputs(first))  # inputs and their gradients
        l2 = torch.cuda.get_device_properties(DEVICE).L2_cache_size if GPU else 0
        count = min(MAX_INPUT_SETS, max(3, math.ceil(2 * l2 / size)))
        self.case = case
        self.inputs = [first] + [make_inputs(case, seed, DEVICE) for seed in range(1, count)]
        self.reference = loss_and_grads(contender("eager", case, DEVICE), first)

    @classmethod
    def of(cls, case: Case) -> CaseSetup:
        if cls.current is None or cls.current.case != case:
            cls.current = None  # free the previous case's tensors first
            cls.current = cls(case)
        return cls.current


def loss_and_grads(run, inputs) -> list[torch.Tensor]:
    loss = run(inputs)
    return [loss.detach(), *torch.autograd.grad(loss, float_inputs(inputs))]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def median_ms(fn) -> float:
    if GPU:
        from triton.testing import do_bench

        return float(do_bench(fn, return_mode="median"))
    times = []
    for _ in range(CPU_REPEATS):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[CPU_REPEATS // 2]


def backward_median_ms(run, input_sets: list[dict], full_ms: float) -> float:
    """Median of backward passes alone; each graph is built before the start event."""
    repeats = min(50, max(5, int(200 / max(full_ms, 1e-3)))) if GPU else CPU_REPEATS
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device=DEVICE) if GPU else None
    times = []
    for step in range(WARM_UP_PASSES + repeats):
        inputs = input_sets[step % len(input_sets)]
        loss = run(inputs)
        if GPU:
            flush.zero_()  # the L2 holds nothing of this pass, as in do_bench
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.autograd.grad(loss, float_inputs(inputs))
            end.record()
            torch.cuda.synchronize()
            elapsed = start.elapsed_time(end)
        else:
            begin = time.perf_counter()
            torch.autograd.grad(loss, float_inputs(inputs))
            elapsed = (time.perf_counter() - begin) * 1e3
        if step >= WARM_UP_PASSES:
            times.append(elapsed)
    return float(torch.tensor(times).median())


def peak_mib(step) -> float | None:
    """Peak memory of ``step`` above what was allocated before it (None without a GPU)."""
    if not GPU:
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - baseline) / 2**20


def measure(run, setup: CaseSetup) -> dict:
    """Forward, forward + backward and backward medians (ms) and the peak memory (MiB)."""
    rotation = itertools.cycle(setup.inputs)

    def forward():
        return run(next(rotation))

    def forward_backward():
        inputs = next(rotation)
        torch.autograd.grad(run(inputs), float_inputs(inputs))

    record = dict(forward_ms=median_ms(forward), full_ms=median_ms(forward_backward))
    record["backward_ms"] = backward_median_ms(run, setup.inputs, record["full_ms"])
    record["peak_mib"] = peak_mib(forward_backward)
    return record


def launches(run, setup: CaseSetup) -> dict:
    """Launches of one forward, one backward and both, after the warm-up the timing gave."""
    inputs = setup.inputs[0]
    return count_launches(lambda: run(inputs), lambda loss: torch.autograd.grad(loss, float_inputs(inputs)))


def test_distributional_bpr(benchmark, bench, case: Case, contender_name: str):
    results, budget = bench
    reason = budget.reason_to_skip(case, contender_name)
    if not reason and contender_name == "naive":
        reason = naive_skip_reason(case, DEVICE)
    if reason:
        results.skip(case, contender_name, reason)
        pytest.skip(reason)
    started = time.monotonic()
    try:
        setup = CaseSetup.of(case)
        run = contender(contender_name, case, DEVICE)
        first_call = time.perf_counter()
        got = loss_and_grads(run, setup.inputs[0])  # compiles (Triton JIT, torch.compile) outside the timing
        first_call_s = time.perf_counter() - first_call
        errors = dict(zip(("loss", "user", "items", "codebooks"), map(rel_err, got, setup.reference), strict=True))
        tolerance = TOLERANCE[getattr(torch, case.dtype)]
        if not all(math.isfinite(e) and e <= tolerance for e in errors.values()):
            results.skip(case, contender_name, f"disagrees with eager: {errors}")
            pytest.fail(f"{contender_name} disagrees with eager beyond {tolerance}: {errors}")
        record = dict(errors=errors, first_call_s=first_call_s, **measure(run, setup), launches=launches(run, setup))
    except NotImplementedError as error:
        reason = f"not implemented yet: {error}"
    except torch.OutOfMemoryError:
        reason = "out of device memory"
    if reason:  # skipped outside the except block, so that the failed call's tensors are freed
        results.skip(case, contender_name, reason)
        pytest.skip(f"{contender_name}: {reason}")
    results.add(case, contender_name, record)

    rotation = itertools.cycle(setup.inputs)

    def synchronised_step():
        inputs = next(rotation)
        torch.autograd.grad(run(inputs), float_inputs(inputs))
        if GPU:
            torch.cuda.synchronize()

    benchmark.extra_info.update(record)
    benchmark.pedantic(synchronised_step, rounds=5 if GPU else 1, iterations=1)
    budget.observe(case, contender_name, time.monotonic() - started)
