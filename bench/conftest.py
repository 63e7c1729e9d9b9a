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

import json
import os
import time
from pathlib import Path

import pytest
import torch

GPU = torch.cuda.is_available()
if not GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch._inductor.config

    torch._inductor.config.cpp.enable_kernel_profile = True

from bench.cases import (  # noqa: E402 (after TRITON_INTERPRET)
    GRIDS,
    INTERPRETER_MAX_BATCH,
    compile_family,
    contenders_of,
    is_headline,
)
from bench.plot import draw  # noqa: E402
from bench.report import Results  # noqa: E402
from bench.roofline import measure_ceilings  # noqa: E402

DEFAULT_BUDGET_S = {"default": 300.0, "full": 1500.0, "smoke": 60.0}
# First guesses of one test's seconds by kind, replaced by what the run observes (the slowest cold
# compile so far, the mean of the others). A warm compile is one whose caches another process filled
# (bench/precompile.py) or whose B-sweep compilation this process already made.
FIRST_GUESS_S = {"compile-max-autotune": 240.0, "compile": 60.0, "compile-warm": 15.0, "other": 5.0} if GPU else {
    "compile-max-autotune": 40.0, "compile": 30.0, "compile-warm": 10.0, "other": 2.0}


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


def _precompiled(out: str | None) -> list[dict]:
    """The records of ``bench/precompile.py`` runs in the results folder (none without one)."""
    if out is None:
        return []
    return [record for path in sorted(Path(out).glob("*-precompile-*.json"))
            for record in json.loads(path.read_text())["compiled"]]


class Budget:
    """Skips a test that would end past the deadline, estimating its seconds from the tests so far."""

    def __init__(self, seconds: float, precompiled: list[dict]):
        self.deadline = time.monotonic() + seconds
        self.observed: dict[str, list[float]] = {kind: [] for kind in FIRST_GUESS_S}
        self.warm = {(record["case"], record["contender"]) for record in precompiled}
        self.compiled_families: set[tuple[str, str]] = set()

    def kind(self, case, name: str) -> str:
        """"other", "compile-warm", or a cold compile: "compile-max-autotune" (the long one) or "compile"."""
        if not name.startswith("compile"):
            return "other"
        if (case.name, name) in self.warm or (compile_family(case), name) in self.compiled_families:
            return "compile-warm"
        return "compile-max-autotune" if name == "compile-max-autotune" else "compile"

    def reason_to_skip(self, case, name: str) -> str | None:
        kind = self.kind(case, name)
        seen = self.observed[kind]
        cold = kind.startswith("compile") and kind != "compile-warm"
        need = (max(seen) if cold else sum(seen) / len(seen)) if seen else FIRST_GUESS_S[kind]
        left = self.deadline - time.monotonic()
        if left < need:
            return f"time budget: {left:.0f} s left, this test needs about {need:.0f} s (see --bench-budget)"
        return None

    def observe(self, case, name: str, seconds: float) -> None:
        self.observed[self.kind(case, name)].append(seconds)
        if name.startswith("compile"):
            self.compiled_families.add((compile_family(case), name))


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
    precompiled = _precompiled(out)
    budget = Budget(_budget_s(config), precompiled)  # counts from the first benchmark test
    results = Results(Path(out) if out else None, device, _grid(config), _budget_s(config), measure_ceilings(device),
                      precompiled)
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
