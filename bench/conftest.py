"""Benchmark session: device ceilings, collected results, and the JSON / Markdown / plots at the end.

On a GPU, ``pytest bench/ --bench-out DIR`` writes DIR/<date>-<device>.json, a Markdown table and
PNG plots. Without a GPU it is a smoke run: the PyTorch contenders at small sizes and the Triton
kernels through the interpreter at a tiny size, for correctness only.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

RESULTS: list[dict] = []
CEILINGS: dict = {}


def pytest_addoption(parser):
    parser.addoption("--bench-out", default=None, help="folder for the GPU run's JSON, table and plots")


def measure_ceilings() -> dict:
    """Measured device ceilings: copy bandwidth (bytes read + written) and dense matmul rates."""
    from triton.testing import do_bench

    source = torch.empty(2**28, dtype=torch.float32, device="cuda").normal_()
    target = torch.empty_like(source)
    copy_ms = do_bench(lambda: target.copy_(source), return_mode="median")
    ceilings = {"copy_bytes_per_s": 2 * source.numel() * 4 / (copy_ms * 1e-3)}
    for dtype in (torch.bfloat16, torch.float32):
        a = torch.randn(8192, 8192, device="cuda", dtype=dtype)
        b = torch.randn(8192, 8192, device="cuda", dtype=dtype)
        ms = do_bench(lambda a=a, b=b: a @ b, return_mode="median")
        ceilings[f"matmul_{str(dtype).split('.')[1]}_flops_per_s"] = 2 * 8192**3 / (ms * 1e-3)
    return ceilings


@pytest.fixture(scope="session")
def ceilings():
    if torch.cuda.is_available():
        CEILINGS.update(measure_ceilings())
    return CEILINGS


@pytest.fixture(scope="session")
def results():
    return RESULTS


def pytest_sessionfinish(session, exitstatus):
    if not torch.cuda.is_available():
        print("\nbench: smoke mode (no GPU): correctness and CPU timings only; speed ratios need a GPU.")
        return
    out = session.config.getoption("--bench-out")
    if not out or not RESULTS:
        return
    import triton

    from bench.report import write_markdown, write_plots

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name().replace(" ", "-")
    stem = f"{datetime.date.today().isoformat()}-{device}"
    payload = dict(
        device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
        python=platform.python_version(), ceilings=CEILINGS, cases=RESULTS,
    )
    (out / f"{stem}.json").write_text(json.dumps(payload, indent=1) + "\n")
    write_markdown(payload, out / f"{stem}.md")
    write_plots(payload, out)

