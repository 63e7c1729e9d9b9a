"""GPU stage: time the launch candidates per size bucket and write the launch table for this device.

    python -m bench.tune OUT_DIR                  # on a GPU: at most --budget-s seconds (default 170)
    python -m bench.tune OUT_DIR --dry-run        # any machine: the jobs, their candidates, a table of defaults

A job is one op (in-batch "both", sampled S = 10, "mean") at one operand class (bf16 inputs:
"16bit", float32: "fp32") and one bucket of ``soda_kernels.ops.launch.BUCKETS``, at the headline
shape (L = 3, K = 256, d = 128) and the bucket's representative batch (``BUCKET_BATCH``: 1024,
4096, 16384). ``launch.tune`` times the op's forward + backward through the public API (median of
``triton.testing.do_bench``, the first call compiling) with each candidate of each of the op's
families, one family after another, the others at their best so far. Jobs run most important
first (bf16 in-batch at B = 4096 first); none starts after the budget, and one that would run past
it stops and is not written.

Written as it goes, after every job: ``OUT_DIR/launch_table.json``, the committed table
(``soda_kernels/launch_table.json``) with this device's entries (``torch.cuda.get_device_name``)
set to each family's fastest candidate, ready to copy over the committed one; and
``OUT_DIR/tune-<device>.jsonl``, one line a job with every timing. A short table is printed last.
``--dry-run`` runs nothing: it lists the jobs and candidates, and writes both files for the device
"dry-run" with the defaults and no timings, through the same writer, then reads the table back.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from bench.cases import HEADLINE, Case, contender, float_inputs, make_inputs
from soda_kernels.ops import in_batch_mean, in_batch_pairs, launch, sampled_negatives

BUCKET_BATCH = {"B<=1024": 1024, "B<=4096": 4096, "B>4096": 16384}  # the batch each bucket is timed at
OP_FAMILIES = {"both": in_batch_pairs.FAMILIES, "sampled": sampled_negatives.FAMILIES, "mean": in_batch_mean.FAMILIES}
DEFAULT_BUDGET_S = 170.0


@dataclass(frozen=True)
class Job:
    case: Case
    bucket: str

    @property
    def families(self) -> tuple[str, ...]:
        return OP_FAMILIES[self.case.mode]

    @property
    def wide(self) -> bool:
        return self.case.dtype == "float32"

    @property
    def name(self) -> str:
        return f"{self.case.name} ({self.bucket})"


def jobs() -> list[Job]:
    """Every (op, operand class, bucket), most important first: bf16 before float32, the in-batch
    op first, the headline's bucket first within each op."""
    order = ("B<=4096", "B>4096", "B<=1024")
    ops = [HEADLINE, Case("sampled", 4096, samples=10), replace(HEADLINE, mode="mean")]
    return [
        Job(replace(op, batch=BUCKET_BATCH[bucket], dtype=dtype), bucket)
        for dtype in ("bfloat16", "float32")
        for op in ops
        for bucket in order
    ]


class OverBudget(Exception):
    """A job reached the stage's deadline; it is dropped."""


def time_job(job: Job, deadline: float, device: torch.device) -> dict[str, dict[str, float]]:
    """{family: {candidate: median ms}} of one job on the GPU."""
    inputs = make_inputs(job.case, 0, device)
    loss_of = contender("triton", job.case, device)

    def run():
        return torch.autograd.grad(loss_of(inputs), float_inputs(inputs))

    def measure(step):
        if time.perf_counter() > deadline:
            raise OverBudget
        return launch.median_cuda_ms(step)

    return launch.tune(job.families, wide=job.wide, run=run, measure=measure)


def _device_file_name(device_name: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", device_name).strip("-")


def _write_atomically(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


class TableWriter:
    """Keeps OUT_DIR/launch_table.json (the committed table with this device's entries) and the
    jsonl log up to date after every job."""

    def __init__(self, out_dir: Path, device_name: str):
        self.table = launch.load_table(launch.TABLE_PATH)
        self.device_name = device_name
        self.table_path = out_dir / "launch_table.json"
        self.log_path = out_dir / f"tune-{_device_file_name(device_name)}.jsonl"
        self.rows: list[tuple] = []

    def record(self, job: Job, timings: dict[str, dict[str, float]] | None) -> None:
        """Set the job's entries (each family's fastest; the defaults where ``timings`` is None),
        rewrite the table and append the job's line to the log."""
        entries = self.table["devices"].setdefault(self.device_name, {})
        for family in job.families:
            default = launch.candidates(family, job.wide)[0]
            times = (timings or {}).get(family)
            best = min(times, key=times.get) if times else default
            entries[launch.table_key(family, job.wide, job.case.batch)] = best
            self.rows.append((job.name, family, default, times and times[default], best, times and times[best]))
        launch.check_table(self.table, str(self.table_path))
        _write_atomically(self.table_path, json.dumps(self.table, indent=1, sort_keys=True) + "\n")
        line = dict(
            job=job.name, case=job.case.record(), bucket=job.bucket, device=self.device_name, timings_ms=timings
        )
        with self.log_path.open("a") as log:
            log.write(json.dumps(line) + "\n")

    def summary(self) -> str:
        lines = ["| job | family | default | ms | best | ms |", "|---|---|---|---|---|---|"]
        for job, family, default, default_ms, best, best_ms in self.rows:
            ms = ["–" if value is None else f"{value:.3f}" for value in (default_ms, best_ms)]
            lines.append(f"| {job} | {family} | `{default}` | {ms[0]} | `{best}` | {ms[1]} |")
        return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--dry-run", action="store_true", help="list the jobs, write a table of defaults; no GPU")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help="no job runs past this")
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if args.dry_run:
        device, device_name = None, "dry-run"
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA device: run with --dry-run")
        device = torch.device("cuda")
        device_name = launch.device_name(device)
    writer = TableWriter(args.out_dir, device_name)
    for job in jobs():
        candidates = {family: launch.candidates(family, job.wide) for family in job.families}
        print(
            f"bench.tune: {job.name}: " + "; ".join(f"{f}: {', '.join(c)}" for f, c in candidates.items()), flush=True
        )
        if args.dry_run:
            writer.record(job, None)
            continue
        if time.perf_counter() - started > args.budget_s:
            print(f"bench.tune: budget of {args.budget_s:.0f} s spent; {job.name} and the rest not timed", flush=True)
            break
        try:
            timings = time_job(job, started + args.budget_s, device)
        except OverBudget:
            print(f"bench.tune: budget spent during {job.name}; not written", flush=True)
            break
        writer.record(job, timings)
        torch.cuda.empty_cache()
    launch.load_table(writer.table_path)  # what was written reads back as a launch table
    print(writer.summary())
    print(f"bench.tune: wrote {writer.table_path} and {writer.log_path} in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
