"""Retrieval benchmark: ``sk.distributional_topk`` (the fused Triton kernel) against ``torch.topk``
over the full B x N score matrix (where it fits) and the chunked PyTorch path, time and peak memory.

    python -m bench.bench_topk OUT_DIR            # GPU: B=1024, k=100, N = 1e4 .. 1e7, at most ~2 minutes
    python -m bench.bench_topk OUT_DIR --smoke    # CPU: tiny shapes through the interpreter (bench/test_topk_bench.py)

One catalogue (``sk.ItemDistributions``, bfloat16 on the GPU) per N serves all three contenders;
its build time is reported apart. Each contender runs once (compiling it) and is checked first:
every row's k indices against the full matrix's torch.topk (the exact top-k up to ties and the
bfloat16 rounding of the fused path's user operands), as the fraction of indices in common.
Then its time (GPU: CUDA-synchronised host clock, the median of up to 5 calls; CPU: one call) and
its peak memory above what the inputs hold (``torch.cuda.max_memory_allocated``; the CPU records
none). Each result is appended to OUT_DIR/bench_topk.jsonl as soon as it is measured, so a stage
cut short keeps what it finished; OUT_DIR/bench_topk.md is the table at the end. A contender is
skipped where its memory would not fit (the full matrix) or its time, extrapolated linearly in N
from the previous N, would overrun the budget.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

if __name__ == "__main__" and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the CPU smoke runs the kernel in the interpreter

import soda_kernels as sk  # noqa: E402 (after TRITON_INTERPRET)
from soda_kernels import torch_backend  # noqa: E402

GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")
# TIGER's tokenizer: 3 layers x 256 codes, 32-d latent (SPEC section 4); the B and k.
GPU_SETTINGS = dict(
    batch=1024,
    k=100,
    items=(10**4, 10**5, 10**6, 10**7),
    layers=3,
    codes=256,
    dim=32,
    dtype=torch.bfloat16,
    history=20,
    budget_s=110.0,
)
SMOKE_SETTINGS = dict(
    batch=4, k=10, items=(60, 150), layers=2, codes=16, dim=8, dtype=torch.float32, history=3, budget_s=600.0
)
CONTENDERS = ("fused", "chunked", "full")
MAX_REPEATS = 5


def make_problem(settings: dict, num_items: int, seed: int = 0):
    """Users (B, L, d), a catalogue of N random items, codebooks and a CSR history of ``history``
    items a user (excluded from the results, as in evaluation)."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    layers, codes, dim, dtype = settings["layers"], settings["codes"], settings["dim"], settings["dtype"]

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=DEVICE).to(dtype)

    user, codebooks = randn(settings["batch"], layers, dim), randn(layers, codes, dim)
    started = time.perf_counter()
    catalogue = sk.ItemDistributions.from_items(randn(num_items, layers, dim), codebooks)
    _synchronize()
    build_s = time.perf_counter() - started
    history = min(settings["history"], num_items)
    offsets = torch.arange(0, settings["batch"] + 1, device=DEVICE) * history
    excluded = torch.randint(0, num_items, (settings["batch"] * history,), generator=g, device=DEVICE)
    return user, catalogue, codebooks, (offsets, excluded), build_s


def full_topk(user, catalogue, codebooks, k, exclude):
    """The direct way: the whole (B, N) score matrix, the history masked to -inf, torch.topk."""
    log_q = sk.codebook_log_softmax(user, codebooks, backend="torch")
    rows, row_bias = torch_backend.topk_user_operands(log_q, None, False)
    item_bias = torch_backend.topk_item_bias(catalogue.negative_entropy, None, torch.float32)
    scores = (rows.to(catalogue.probs.dtype) @ catalogue.probs.T).float() + row_bias[:, None] - item_bias
    offsets, excluded = exclude
    rows_of = torch.repeat_interleave(torch.arange(len(offsets) - 1, device=DEVICE), offsets.diff())
    scores[rows_of, excluded] = float("-inf")
    return scores.topk(k, dim=1)


def run_contender(name: str, problem, k: int):
    user, catalogue, codebooks, exclude, _ = problem
    if name == "full":
        return full_topk(user, catalogue, codebooks, k, exclude)
    backend = "triton" if name == "fused" else "torch"
    return sk.distributional_topk(user, catalogue, codebooks, k, exclude=exclude, backend=backend)


def full_fits(settings: dict, num_items: int) -> bool:
    """Whether the (B, N) scores (bfloat16 product, float32 scores, torch.topk's copy) fit in 80% of
    the free device memory; on the CPU, whether they stay under 1 GB."""
    need = settings["batch"] * num_items * (2 + 4 + 4)
    free = torch.cuda.mem_get_info()[0] if GPU else 2**30
    return need < 0.8 * free


def _synchronize() -> None:
    if GPU:
        torch.cuda.synchronize()


def measure(name: str, problem, k: int) -> tuple[dict, tuple]:
    """Time (median of up to MAX_REPEATS calls after the first) and peak memory of one contender."""
    _synchronize()
    started = time.perf_counter()
    out = run_contender(name, problem, k)
    _synchronize()
    first_s = time.perf_counter() - started
    times = []
    repeats = max(1, min(MAX_REPEATS, int(2.0 / max(first_s, 1e-3)))) if GPU else 0
    for _ in range(repeats):
        started = time.perf_counter()
        run_contender(name, problem, k)
        _synchronize()
        times.append(time.perf_counter() - started)
    peak = None
    if GPU:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        run_contender(name, problem, k)
        _synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    record = dict(
        first_call_s=first_s,
        time_ms=1e3 * statistics.median(times or [first_s]),
        calls=len(times) or 1,
        peak_bytes=peak,
    )
    return record, out


def agreement(indices: torch.Tensor, exact: torch.Tensor) -> float:
    """The fraction of the exact top-k's indices a contender returned (rows averaged)."""
    same = (indices[:, :, None] == exact[:, None, :]).any(1).float()
    return float(same.mean())


def run(out_dir: Path, settings: dict) -> list[dict]:
    out_dir.mkdir(parents=True, exist_ok=True)
    results_file = out_dir / "bench_topk.jsonl"
    device_name = torch.cuda.get_device_name() if GPU else "cpu"
    deadline = time.perf_counter() + settings["budget_s"]
    records, previous = [], {}
    for num_items in settings["items"]:
        if time.perf_counter() > deadline:
            break
        try:
            problem = make_problem(settings, num_items)
        except torch.OutOfMemoryError:
            break
        k = settings["k"]
        exact = None
        if full_fits(settings, num_items):
            exact = full_topk(*problem[:3], k, problem[3]).indices
        for name in CONTENDERS:
            base = dict(
                device=device_name,
                contender=name,
                batch=settings["batch"],
                items=num_items,
                k=k,
                features=settings["layers"] * settings["codes"],
                dtype=str(settings["dtype"]),
                catalogue_build_s=problem[4],
            )
            estimate = previous.get(name, 0.0) * num_items / previous.get(f"{name}_items", num_items)
            skip = None
            if name == "full" and exact is None:
                skip = "the B x N scores do not fit"
            elif time.perf_counter() + 3 * estimate > deadline:
                skip = f"over the time budget (about {estimate:.1f} s a call)"
            if skip:
                record = dict(base, skipped=skip)
            else:
                try:
                    timing, (_, indices) = measure(name, problem, k)
                except torch.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    record = dict(base, skipped="out of memory")
                else:
                    previous[name], previous[f"{name}_items"] = timing["time_ms"] / 1e3, num_items
                    record = dict(base, **timing, agreement=None if exact is None else agreement(indices, exact))
            records.append(record)
            with results_file.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
            print(_row(record), flush=True)
        del problem
        if GPU:
            torch.cuda.empty_cache()
    (out_dir / "bench_topk.md").write_text(markdown(records))
    return records


def _row(record: dict) -> str:
    head = f"| {record['items']:,} | {record['contender']} "
    if "skipped" in record:
        return head + f"| – | – | – | skipped: {record['skipped']} |"
    peak = "–" if record["peak_bytes"] is None else f"{record['peak_bytes'] / 2**20:.0f}"
    agree = "–" if record["agreement"] is None else f"{record['agreement']:.4f}"
    return head + f"| {record['time_ms']:.2f} | {peak} | {agree} | build {record['catalogue_build_s']:.1f} s |"


def markdown(records: list[dict]) -> str:
    if not records:
        return "no results\n"
    first = records[0]
    lines = [
        f"# distributional_topk on {first['device']}: B={first['batch']}, k={first['k']}, F={first['features']}, "
        f"{first['dtype']}, history excluded",
        "",
        "| N | contender | ms | peak MiB | agreement with full top-k | note |",
        "|---|---|---|---|---|---|",
    ]
    return "\n".join(lines + [_row(record) for record in records]) + "\n"


def static_launches() -> list[tuple[str, list]]:
    """The fused kernel's launches at the GPU benchmark's shapes, captured for ``bench.static``
    (needs a process without TRITON_INTERPRET): bfloat16 and float32, with a history excluded, and
    bfloat16 symmetric; k = 100 (a 128-wide list) and k = 10 (16 wide)."""
    from bench.launches import capture_launches
    from soda_kernels.ops.topk import distributional_topk

    batch, num_items, features = GPU_SETTINGS["batch"], 10**5, GPU_SETTINGS["layers"] * GPU_SETTINGS["codes"]
    history = GPU_SETTINGS["history"]
    excluded_rows = torch.arange(batch).repeat_interleave(history)
    excluded_items = torch.randint(0, num_items, (batch * history,))
    none = torch.zeros(0, dtype=torch.int64)
    variants = [
        ("topk-bf16", torch.bfloat16, False, True, 100),
        ("topk-fp32", torch.float32, False, True, 100),
        ("topk-bf16-symmetric", torch.bfloat16, True, False, 100),
        ("topk-bf16-k10", torch.bfloat16, False, True, 10),
    ]
    captured = []
    for name, dtype, symmetric, exclude, k in variants:
        rows = torch.empty(batch, features * (2 if symmetric else 1), dtype=dtype)
        probs = torch.empty(num_items, features, dtype=dtype)
        with capture_launches() as launches:
            distributional_topk(
                rows,
                torch.zeros(batch),
                probs,
                probs,
                torch.zeros(num_items),
                excluded_rows if exclude else none,
                excluded_items if exclude else none,
                k,
            )
        captured.append((name, launches))
    return captured


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--smoke", action="store_true", help="tiny CPU shapes (the default without a GPU)")
    args = parser.parse_args(argv)
    settings = SMOKE_SETTINGS if args.smoke or not GPU else GPU_SETTINGS
    print("| N | contender | ms | peak MiB | agreement | note |", flush=True)
    run(args.out_dir, settings)


if __name__ == "__main__":
    main()
