"""The benchmark session: the case grid, the time budget, the measured ceilings and the results file.

    pytest bench/                                  # CPU: smoke mode; GPU: the default grid
    pytest bench/ --bench-out DIR                  # also DIR/<date>-<device>.json, .md and .png
    pytest bench/ --bench-grid full --bench-budget 1500
    pytest bench/ --bench-grid default --bench-dry-run --bench-out /tmp/x   # the GPU grid shrunk, on CPU

Without a GPU the Triton kernels run through the interpreter, which must be chosen before triton
is imported, hence here.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

GPU = torch.cuda.is_available()
if not GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from bench.cases import CONTENDERS, GRIDS, INTERPRETER_MAX_BATCH  # noqa: E402 (after TRITON_INTERPRET)
from bench.plot import draw  # noqa: E402
from bench.report import Results  # noqa: E402
from bench.roofline import measure_ceilings  # noqa: E402

DEFAULT_BUDGET_S = {"default": 300.0, "full": 1500.0, "smoke": 100.0}
# First guesses of one test's seconds, replaced by what the run observes (the slowest compile so far,
# the mean of the others).
FIRST_GUESS_S = {"compile": 90.0 if GPU else 20.0, "other": 5.0 if GPU else 2.0}


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
    cases = GRIDS[_grid(metafunc.config)]()
    if metafunc.config.getoption("--bench-dry-run"):
        cases = list(dict.fromkeys(case.shrunk() for case in cases))
    params = [
        pytest.param(case, name, id=f"{case.name} | {name}")
        for case in cases
        for name in CONTENDERS
        if GPU or name != "triton" or case.batch <= INTERPRETER_MAX_BATCH
    ]
    metafunc.parametrize("case, contender_name", params)


class Budget:
    """Skips a test that would end past the deadline, estimating its seconds from the tests so far."""

    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds
        self.observed: dict[str, list[float]] = {"compile": [], "other": []}

    def reason_to_skip(self, name: str) -> str | None:
        kind = "compile" if name == "compile" else "other"
        seen = self.observed[kind]
        need = (max(seen) if kind == "compile" else sum(seen) / len(seen)) if seen else FIRST_GUESS_S[kind]
        left = self.deadline - time.monotonic()
        if left < need:
            return f"time budget: {left:.0f} s left, this test needs about {need:.0f} s (see --bench-budget)"
        return None

    def observe(self, name: str, seconds: float) -> None:
        self.observed["compile" if name == "compile" else "other"].append(seconds)


SESSION: dict = {}  # "results": the run's Results once the first benchmark test asked for them


def pytest_collection_modifyitems(session, config, items):
    """Every eager and Triton test first, case by case; then the torch.compile tests (whose
    compilation runs long) in the same order, in whatever time the budget has left."""

    def contender_of(item):
        return item.callspec.params.get("contender_name") if hasattr(item, "callspec") else None

    others = [item for item in items if contender_of(item) is None]
    quick = [item for item in items if contender_of(item) in ("triton", "eager")]
    items[:] = others + quick + [item for item in items if contender_of(item) == "compile"]


@pytest.fixture(scope="session")
def bench(request) -> tuple[Results, Budget]:
    config = request.config
    out = config.getoption("--bench-out")
    device = torch.device("cuda" if GPU else "cpu")
    budget = Budget(_budget_s(config))  # counts from the first benchmark test (after tests/ in `pytest tests bench`)
    results = Results(Path(out) if out else None, device, _grid(config), _budget_s(config), measure_ceilings(device))
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
            "the interpreter at a tiny size only; speed ratios, peak memory and the roofline need a GPU."
        )
    if results.stem is not None:
        terminalreporter.write_line(f"bench: results in {results.stem}.json / .md / .png")
