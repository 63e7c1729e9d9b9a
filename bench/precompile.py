"""Compile the benchmark's torch.compile contenders ahead, in a process of their own.

    python -m bench.precompile OUT compile-max-autotune                # the cases that contender runs
    python -m bench.precompile OUT compile-default compile-reduce-overhead --stop-after-s 200
    python -m bench.precompile OUT compile-default --grid default --dry-run   # on a CPU, shrunk cases

bench/run_gpu.sh runs it beside the CUDA kernel tests, which leave the CPU cores idle: one forward +
backward per (case, contender) of the grid, in the grid's order, compiles the contender, and the
caches torch.compile keeps on disk (FX graphs, AOTAutograd, autotuning results, Triton kernels) make
the benchmark's own compilation of the same graph warm. Autotuning here shares the GPU with the
kernel tests, which may make a choice less than the best; the timings of the benchmark run alone.
The B sweep compiles once (its batch axis is dynamic), so only its first case is compiled here.

After each compile ``OUT/<date>-<device>-precompile-<contenders>.json`` lists what is compiled with its cold
seconds; the benchmark reads it for its time budget and its report. No compile starts after
``--stop-after-s`` (the caller's timeout ends one under way; what it compiled stays in the caches).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bench.cases import (
    COMPILE_MODES,
    GRIDS,
    compile_family,
    contender,
    contenders_of,
    float_inputs,
    make_inputs,
)
from bench.report import run_stem


def plan(grid: str, names: list[str], dry_run: bool) -> list[tuple]:
    """(case as the benchmark runs it, contender) to compile, one per compile family, in grid order."""
    seen, order = set(), []
    for case in GRIDS[grid]():
        run_case = case.shrunk() if dry_run else case
        for name in contenders_of(case):
            if name in names and (compile_family(run_case), name) not in seen:
                seen.add((compile_family(run_case), name))
                order.append((run_case, name))
    return order


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("contenders", nargs="+", choices=sorted(COMPILE_MODES))
    parser.add_argument("--grid", choices=sorted(GRIDS), default="default")
    parser.add_argument("--dry-run", action="store_true", help="the grid's cases shrunk, as bench --bench-dry-run")
    parser.add_argument("--stop-after-s", type=float, default=float("inf"), help="start no compile after this")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    started = time.monotonic()
    stem = run_stem(args.out, device)
    target = stem.with_name(f"{stem.name}-precompile-{'+'.join(args.contenders)}.json")
    args.out.mkdir(parents=True, exist_ok=True)
    compiled = []
    for case, name in plan(args.grid, args.contenders, args.dry_run):
        if time.monotonic() - started > args.stop_after_s:
            break
        inputs = make_inputs(case, 0, device)
        begin = time.perf_counter()
        torch.autograd.grad(contender(name, case, device)(inputs), float_inputs(inputs))
        if device.type == "cuda":
            torch.cuda.synchronize()
        compiled.append(dict(case=case.name, contender=name, seconds=time.perf_counter() - begin))
        target.write_text(json.dumps(dict(device=str(device), compiled=compiled), indent=1) + "\n")
        print(f"bench.precompile: {case.name} | {name}: {compiled[-1]['seconds']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
