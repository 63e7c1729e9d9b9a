"""The benchmark session: the case grid, the time budget, the measured ceilings and the results file.

    pytest bench/                                  # CPU: smoke mode; GPU: the default grid
    pytest bench/ --bench-out DIR                  # also DIR/<date>-<device>.json, .md and .png
    pytest bench/ --bench-grid full --bench-budget 1500
    pytest bench/ --bench-grid default --bench-dry-run --bench-out /tmp/x   # the GPU grid shrunk, on CPU

Without a GPU the Triton kernels run through the interpreter, which must be chosen before triton
is imported, hence here; and torch.compile's C++ kernels get profiler ranges, so that the launch
counter sees them (``bench.launches``).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

GPU = torch.cuda.is_available()
if not GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch._inductor.config

    torch._inductor.config.cpp.enable_kernel_profile = True

from bench.cases import GRIDS, INTERPRETER_MAX_BATCH, contenders_of, is_headline  # noqa: E402 (after TRITON_INTERPRET)
from bench.measure import Budget  # noqa: E402
from bench.plot import draw  # noqa: E402
from bench.report import Results, run_stem  # noqa: E402
from bench.roofline import measure_ceilings  # noqa: E402

DEFAULT_BUDGET_S = {"default": 300.0, "full": 1500.0, "smoke": 60.0}


def pytest_addoption(parser):
    group = parser.getgroup("bench", "soda_kernels benchmarks")
    group.addoption("--bench-out", default=None, help="folder for the JSON results, Markdown table and plot")
    group.addoption("--bench-grid", choices=sorted(GRIDS), default=os.environ.get("SODA_BENCH_GRID"),
                    help="case grid: default (GPU), full, smoke (CPU); env SODA_BENCH_GRID")
    group.addoption("--bench-budget", type=float, default=os.environ.get("SODA_BENCH_BUDGET_S"),
                    help="seconds from the first benchmark test after which tests are skipped; env SODA_BENCH_BUDGET_S")
    group.addoption("--bench-dry-run", action="store_true", help="every case of the grid shrunk to CPU size")


def _grid(config) -> str:
    return config.getoption("--bench-grid") or ("default" if GPU else "smoke")


def _budget_s(config) -> float:
    return float(config.getoption("--bench-budget") or DEFAULT_BUDGET_S[_grid(config)])


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    dry_run = metafunc.config.getoption("--bench-dry-run")
    params = []
    for case in GRIDS[_grid(metafunc.config)]():
        run_case = case.shrunk() if dry_run else case
        params += [
            pytest.param(run_case, name, id=f"{run_case.name} | {name}")
            for name in contenders_of(case)
            if GPU or name != "triton" or run_case.batch <= INTERPRETER_MAX_BATCH
        ]
    metafunc.parametrize("case, contender_name", list(dict.fromkeys(params)))


SESSION: dict = {}  # "results": the run's Results once the first benchmark test asked for them


def pytest_collection_modifyitems(session, config, items):
    """The order of the benchmark tests: every contender of the headline; then the quick contenders
    (Triton, eager, naive) case by case; then the torch.compile contenders (whose compilation runs
    long) in the same order, in whatever time the budget has left. Other tests come first."""

    def params(item):
        return item.callspec.params if hasattr(item, "callspec") and "contender_name" in item.callspec.params else None

    def rank(item):
        p = params(item)
        if p is None:
            return 0
        if is_headline(p["case"]):
            return 1
        return 3 if p["contender_name"].startswith("compile") else 2

    items.sort(key=rank)  # stable: each group keeps the grid's order


@pytest.fixture(scope="session")
def bench(request) -> tuple[Results, Budget]:
    config = request.config
    out = config.getoption("--bench-out")
    device = torch.device("cuda" if GPU else "cpu")
    budget = Budget(_budget_s(config))  # counts from the first benchmark test
    stem = run_stem(Path(out), device) if out else None
    results = Results(stem, device, _grid(config), _budget_s(config), measure_ceilings(device))
    SESSION["results"] = results
    return results, budget


def pytest_sessionfinish(session, exitstatus):
    results = SESSION.get("results")
    if results is not None and results.stem is not None and results.stem.with_suffix(".json").exists():
        draw(results.stem.with_suffix(".json"))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    results = SESSION.get("results")
    if results is None:
        return
    if not GPU:
        terminalreporter.write_line(
            "bench: no GPU, so a smoke run: contenders checked against eager and timed on the CPU, Triton through "
            "the interpreter at a tiny size only, launches counted on the host; speed ratios, peak memory and the "
            "roofline need a GPU."
        )
    if results.stem is not None:
        terminalreporter.write_line(f"bench: results in {results.stem}.json / .md / .png")
