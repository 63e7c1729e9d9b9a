"""Speed and peak memory of ``distributional_bpr``: Triton vs eager PyTorch vs torch.compile.

One setup per (case, contender) serves the correctness check, the speed and the memory
measurement. Forward, backward and forward + backward are timed separately with CUDA events
(``triton.testing.do_bench``, median, after warm-up), rotating among three input sets so that
repeated runs do not all hit L2. Before timing, each contender's loss and gradients are checked
against eager PyTorch. pytest-benchmark times forward + backward too (synchronised), so
``pytest bench/`` prints its usual table.
"""

from __future__ import annotations

import itertools
import os
import time

import pytest
import torch

from bench.cases import TINY, contender, make_inputs, roofline, selected_cases

GPU = torch.cuda.is_available()
# The GPU run must fit one device call: past these many seconds, compiling stops and then timing
# stops; the skipped cases say so. SODA_BENCH_BUDGET_S overrides the total.
BUDGET_S = float(os.environ.get("SODA_BENCH_BUDGET_S", "330"))
START = time.monotonic()
DEVICE = torch.device("cuda" if GPU else "cpu")
CONTENDERS = ("triton", "eager", "compile")
TOLERANCE = {"float32": 1e-3, "bfloat16": 3e-2, "float16": 3e-2}  # vs eager, which has its own rounding


def _params():
    for case, name in itertools.product(selected_cases(), CONTENDERS):
        if name == "compile" and not (case.compile or not GPU):
            continue
        if name == "triton" and not GPU and case.batch > TINY:
            continue
        yield pytest.param(case, name, id=f"{case.name} | {name}")


def _loss_and_grads(run, inputs):
    floats = [inputs[k] for k in ("user", "items", "codebooks")]
    loss = run(inputs)
    grads = torch.autograd.grad(loss, floats)
    return [loss.detach()] + [g.float() for g in grads]


def _rel_err(out, ref):
    return float((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))


def _time_ms(fn) -> float:
    if GPU:
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=10, rep=60, return_mode="median"))
    start = time.perf_counter()
    for _ in range(3):
        fn()
    return (time.perf_counter() - start) / 3 * 1e3


def _time_backward_ms(run, rotation, repeats: int = 20) -> float:
    """Median of backward passes alone: each graph is built outside the timed region (compiled
    backward graphs cannot be retained and replayed)."""
    times = []
    for step in range(repeats + 3):
        loss = run(next(rotation))
        if GPU:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            loss.backward()
            end.record()
            torch.cuda.synchronize()
            elapsed = start.elapsed_time(end)
        else:
            begin = time.perf_counter()
            loss.backward()
            elapsed = (time.perf_counter() - begin) * 1e3
        if step >= 3:  # warm-up
            times.append(elapsed)
    return float(torch.tensor(times).median())


@pytest.mark.parametrize("case, name", list(_params()))
def test_distributional_bpr(benchmark, results, ceilings, case, name):
    elapsed = time.monotonic() - START
    if elapsed > BUDGET_S or (name == "compile" and elapsed > 0.6 * BUDGET_S):
        pytest.skip(f"over the benchmark time budget ({elapsed:.0f} s of {BUDGET_S:.0f} s)")
    input_sets = [make_inputs(case, seed, DEVICE) for seed in range(3)]
    run = contender(name, case)
    reference = _loss_and_grads(contender("eager", case), input_sets[0])
    compile_start = time.perf_counter()
    got = _loss_and_grads(run, input_sets[0])  # also compiles the compile contender, outside timing
    compile_s = time.perf_counter() - compile_start
    errors = [_rel_err(g, r) for g, r in zip(got, reference, strict=True)]
    assert all(torch.isfinite(g).all() for g in got), "non-finite loss or gradient"
    assert max(errors) <= TOLERANCE[case.dtype], f"{name} disagrees with eager: {errors}"

    rotation = itertools.cycle(input_sets)
    floats = [t for inputs in input_sets for t in (inputs["user"], inputs["items"], inputs["codebooks"])]

    def forward():
        return run(next(rotation))

    def forward_backward():
        inputs = next(rotation)
        run(inputs).backward()

    record = dict(case.record(), contender=name, errors=errors, compile_s=compile_s if name == "compile" else 0.0)
    record["forward_ms"] = _time_ms(forward)
    record["backward_ms"] = _time_backward_ms(run, rotation)
    record["full_ms"] = _time_ms(forward_backward)
    for tensor in floats:
        tensor.grad = None
    if GPU:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
        forward_backward()
        torch.cuda.synchronize()
        record["peak_mib"] = (torch.cuda.max_memory_allocated() - baseline) / 2**20
        floor = roofline(case)
        record["floor_ms"] = 1e3 * max(
            floor["flops"] / ceilings["matmul_bfloat16_flops_per_s"], floor["bytes"] / ceilings["copy_bytes_per_s"]
        )
        record["over_floor"] = record["full_ms"] / record["floor_ms"]
    results.append(record)

    def synchronised_step():
        forward_backward()
        if GPU:
            torch.cuda.synchronize()

    benchmark.extra_info.update(record)
    benchmark.pedantic(synchronised_step, rounds=3 if GPU else 1, iterations=1, warmup_rounds=1 if GPU else 0)
