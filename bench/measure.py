"""How one contender of one case is measured: inputs, correctness against eager, medians, memory,
launches; and the time budget that skips what would not fit. Used by the pytest benchmark
(``bench/test_bench.py``) and by the GPU stages (``bench/stage.py``).

One setup per case (rotated input sets and the eager reference) serves every contender, and within
a contender the correctness check, the speed and the memory measurement. Each contender is first
run once (which compiles it, outside the timing; its seconds are ``first_call_s``) and checked
against eager: loss and the gradients of user, items and codebooks, ||out - eager|| / ||eager||
within the project's one tolerance table, ``soda_kernels.reference.TOLERANCE`` (1e-4 for fp32, 3e-2
for 16-bit inputs). Then forward, backward and forward + backward are timed separately:

* on a GPU with CUDA events: ``triton.testing.do_bench`` medians (warm-up first, L2 flushed before
  every call) for forward and forward + backward; backward alone as the median over passes whose
  graph is built outside the events; then the peak memory of one forward + backward above what the
  inputs already hold (``torch.cuda.max_memory_allocated`` after a reset);
* on the CPU with the host clock (the numbers only show that everything runs).

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
from dataclasses import dataclass

import torch

from bench.cases import Case, compile_family, contender, float_inputs, make_inputs, naive_skip_reason
from bench.launches import count_launches
from soda_kernels.reference import TOLERANCE

GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")
MAX_INPUT_SETS = 8
CPU_REPEATS = 1  # without a GPU the times only show that everything runs
WARM_UP_PASSES = 3 if GPU else 1
# First guesses of one contender's seconds by kind, replaced by what the run observes (the slowest
# cold compile so far, the mean of the others). A warm compile is one whose B-sweep compilation this
# process already made.
FIRST_GUESS_S = (
    {"compile-max-autotune": 240.0, "compile": 60.0, "compile-warm": 15.0, "other": 5.0}
    if GPU
    else {"compile-max-autotune": 40.0, "compile": 30.0, "compile-warm": 10.0, "other": 2.0}
)


class Budget:
    """Skips a step that would end past the deadline, estimating its seconds from the steps so far."""

    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds
        self.observed: dict[str, list[float]] = {kind: [] for kind in FIRST_GUESS_S}
        self.compiled_families: set[tuple[str, str]] = set()

    def left_s(self) -> float:
        return self.deadline - time.monotonic()

    def kind(self, case: Case, name: str) -> str:
        """ "other", "compile-warm", or a cold compile: "compile-max-autotune" (the long one) or "compile"."""
        if not name.startswith("compile"):
            return "other"
        if (compile_family(case), name) in self.compiled_families:
            return "compile-warm"
        return "compile-max-autotune" if name == "compile-max-autotune" else "compile"

    def reason_to_skip(self, case: Case, name: str) -> str | None:
        kind = self.kind(case, name)
        seen = self.observed[kind]
        cold = kind.startswith("compile") and kind != "compile-warm"
        need = (max(seen) if cold else sum(seen) / len(seen)) if seen else FIRST_GUESS_S[kind]
        if self.left_s() < need:
            return f"time budget: {self.left_s():.0f} s left, this needs about {need:.0f} s"
        return None

    def observe(self, case: Case, name: str, seconds: float) -> None:
        self.observed[self.kind(case, name)].append(seconds)
        if name.startswith("compile"):
            self.compiled_families.add((compile_family(case), name))


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


@dataclass
class Outcome:
    """One contender of one case: its record (measured), or why not (skipped / failed)."""

    record: dict | None = None
    skipped: str | None = None
    failed: str | None = None
    seconds: float = 0.0


def run_contender(case: Case, name: str, budget: Budget) -> Outcome:
    """Check ``name`` against eager on ``case`` and measure it, unless the budget or the memory says
    no. The caller writes the outcome into its results."""
    reason = budget.reason_to_skip(case, name)
    if not reason and name == "naive":
        reason = naive_skip_reason(case, DEVICE)
    if reason:
        return Outcome(skipped=reason)
    started = time.monotonic()
    try:
        setup = CaseSetup.of(case)
        run = contender(name, case, DEVICE)
        first_call = time.perf_counter()
        got = loss_and_grads(run, setup.inputs[0])  # compiles (Triton JIT, torch.compile) outside the timing
        first_call_s = time.perf_counter() - first_call
        errors = dict(zip(("loss", "user", "items", "codebooks"), map(rel_err, got, setup.reference), strict=True))
        tolerance = TOLERANCE[getattr(torch, case.dtype)]
        if not all(math.isfinite(e) and e <= tolerance for e in errors.values()):
            return Outcome(failed=f"disagrees with eager beyond {tolerance}: {errors}")
        record = dict(errors=errors, first_call_s=first_call_s, **measure(run, setup), launches=launches(run, setup))
    except NotImplementedError as error:
        reason = f"not implemented yet: {error}"
    except torch.OutOfMemoryError:
        reason = "out of device memory"
    if reason:  # returned outside the except block, so that the failed call's tensors are freed
        return Outcome(skipped=reason)
    seconds = time.monotonic() - started
    budget.observe(case, name, seconds)
    return Outcome(record=record, seconds=seconds)
