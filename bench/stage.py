"""The GPU work in short stages, each one command that brings back its own results.

    python -m bench.stage 1 OUT            # on a GPU machine (PYTHONPATH=.), a bare one will do
    python -m bench.stage 1 OUT --dry-run  # anywhere: the plan, and the CPU-side parts at tiny sizes
    python -m bench.stage list             # the stage table

A GPU machine may die in the middle of a command and take its output with it, and a command may
bring back at most 8 files; so each stage is one process that finishes inside its budget (it
skips, and says so, what would not fit), writes everything it measured into ``OUT`` after every
step (``<date>-<device>-stage<N>.json`` / ``.md`` / ``.log``, the log a copy of what it prints),
and prints a short table last. Stages run in the order of ``STAGES``, the most important first;
each works as the first command on a fresh machine (it fills its own caches; torch.compile's first
call is reported apart, as ``first_call_s`` / "compile s").

* **1, the verdict** (180 s): every public op and mode against float64 on the device, at a realistic
  and an odd shape for each input dtype (float32 through bf16x3 products, bfloat16, float16: the
  paths the interpreter cannot run); the headline's medians for Triton, eager and naive, and where
  the Triton path's time goes (CUDA time per kernel against its own floor,
  ``bench.roofline.kernel_work``); torch.compile's default mode last, if its compile fits.
* **2, the grid** (300 s): the rest of the default grid with Triton, eager and naive case by case,
  one case past 2^31 elements (int64 offsets), then compile-default case by case while the budget
  lasts.
* **3, the compile modes** (300 s): Triton at the headline and the B sweep for the ratios, then
  reduce-overhead (a compile of about 30 s), then max-autotune-no-cudagraphs (about 210 s at the
  headline on an H100, 2026-11-23); each mode compiles once for the sweep, its batch axis dynamic.
* **tests** (180 s): the CUDA test suite (not the model package's, whose datasets are not there),
  spread over the cores with pytest-xdist where installed.

Without a GPU (``--dry-run``, and ``bench/test_stage.py`` in CI) every case is shrunk
(``Case.shrunk``) and the kernels run under the Triton interpreter: the checks, the measurement, the
writers, the floors and the tables run; torch.compile's contenders are listed, not run (their CPU
compile alone outlasts a CI test; ``pytest bench`` compiles them in its smoke grid); the tests
stage collects the suite instead of running it.
"""

from __future__ import annotations

import os
import sys

import torch

GPU = torch.cuda.is_available()
if not GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before soda_kernels imports triton's kernels

import argparse  # noqa: E402 (after TRITON_INTERPRET)
import importlib.util  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, replace  # noqa: E402
from pathlib import Path  # noqa: E402

import soda_kernels as sk  # noqa: E402
from bench.cases import (  # noqa: E402
    HEADLINE,
    Case,
    contender,
    default_grid,
    float_inputs,
    in_batch_sweep,
    make_inputs,
)
from bench.launches import TRITON_RANGE, is_device_kernel, triton_launch_ranges  # noqa: E402
from bench.measure import DEVICE, Budget, Outcome, median_ms, rel_err, run_contender  # noqa: E402
from bench.report import Results, device_name, launches_shown, records_table, run_stem  # noqa: E402
from bench.roofline import floor_ms, kernel_work, measure_ceilings  # noqa: E402
from soda_kernels import reference  # noqa: E402
from soda_kernels.reference import TOLERANCE  # noqa: E402

QUICK = ("triton", "eager", "naive")
DTYPES = ("bfloat16", "float32", "float16")
# The correctness checks: every public op, and every mode of distributional_bpr with and without
# the symmetric score (user_logits and the reductions are the test suite's).
BPR_MODES = (
    ("items", False),
    ("users", False),
    ("both", False),
    ("both", True),
    ("mean", False),
    ("mean", True),
    ("sampled", False),
    ("sampled", True),
)
REALISTIC = Case("both", 4096, samples=10)  # the headline's sizes (sampled: S = 10, N = 4 B)
ODD = Case("both", 21, layers=3, codes=67, dim=19, samples=5)  # nothing a multiple of 16
PAIRWISE_MAX_ROWS = 1024  # pairwise_kl: M x (M - 3) pairs, its (M, B) output at most 4 MiB
# Past 2^31 elements: codebook_log_softmax's (N, L, K) output at N L K = 2^31 + 16 L K elements
# (9 GiB in float32); its last rows, whose offsets need int64, are checked against float64.
LARGE = Case("both", 2**31 // (4 * 256) + 16, layers=4, codes=256, dim=32)
LARGE_TAIL_ROWS = 2048
LARGE_SHARE = 30 / 300  # of stage 2's budget: what its quick contenders leave for the large case
CHECKS_SHARE = 75 / 180  # of stage 1's budget: the correctness checks end this far into it
PROFILE_SHARE = 20 / 180  # of stage 1's budget: what its quick contenders leave for the profile
PROFILE_STEPS = 5 if GPU else 1  # the interpreter runs a step in seconds


@dataclass(frozen=True)
class Stage:
    """One device command: ``run`` in this process, or ``command`` (a subprocess, its output into the
    stage's log), within ``budget_s`` seconds."""

    budget_s: float
    what: str
    run: Callable[[Context], None] | None = None
    command: tuple[str, ...] = ()  # "{python}", "{out}", "{stem}" are filled in
    dry_command: tuple[str, ...] = ()  # what the dry run runs of a command stage (else nothing)


@dataclass
class Context:
    name: str
    stage: Stage
    out: Path
    stem: Path
    dry_run: bool
    started: float
    results: Results | None = None
    budget_override_s: float | None = None  # --budget-s

    @property
    def budget_s(self) -> float:
        return self.budget_override_s or self.stage.budget_s

    def elapsed_s(self) -> float:
        return time.monotonic() - self.started

    def budget(self, until_s: float | None = None) -> Budget:
        """A budget ending ``until_s`` seconds after the stage's start (its whole budget if None)."""
        return Budget((self.budget_s if until_s is None else until_s) - self.elapsed_s())


def runnable(case: Case, dry_run: bool) -> Case:
    return case.shrunk() if dry_run else case


# ----------------------------------------------------------------------------------------------
# Correctness against float64


@dataclass(frozen=True)
class Check:
    """One op at one shape and dtype: ``op`` is codebook_log_softmax, pairwise_kl or a Case's mode
    of distributional_bpr."""

    op: str
    shape: str  # "realistic" or "odd"
    case: Case

    @property
    def name(self) -> str:
        label = self.case.name.split(" B=")[0] if self.op == "distributional_bpr" else self.op
        case = self.case
        return f"{label}, {self.shape}: B={case.batch} L={case.layers} K={case.codes} d={case.dim}"


def checks(dry_run: bool) -> list[Check]:
    """Dtype by dtype (the headline's bfloat16 first, then float32's bf16x3 path, then float16), each
    at the realistic shape, then the odd one: a cut budget drops whole dtypes, last first."""
    out = []
    for dtype in DTYPES:
        for shape, base in (("realistic", REALISTIC), ("odd", ODD)):
            sized = replace(runnable(base, dry_run), dtype=dtype)
            out.append(Check("codebook_log_softmax", shape, sized))
            out.append(Check("pairwise_kl", shape, sized))
            out += [
                Check("distributional_bpr", shape, replace(sized, mode=mode, symmetric=symmetric))
                for mode, symmetric in BPR_MODES
            ]
    return out


def _randn(generator, *shape, dtype):
    return torch.randn(*shape, generator=generator, device=DEVICE).to(getattr(torch, dtype)).requires_grad_()


def check_inputs(check: Check, seed: int) -> dict:
    """Fresh random inputs of one check on the device (floats requiring gradients)."""
    case = check.case
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    if check.op == "codebook_log_softmax":
        return dict(
            x=_randn(g, case.batch, case.layers, case.dim, dtype=case.dtype),
            codebooks=_randn(g, case.layers, case.codes, case.dim, dtype=case.dtype),
        )
    if check.op == "pairwise_kl":
        rows = min(case.batch, PAIRWISE_MAX_ROWS)
        return dict(
            p_logits=_randn(g, rows, case.layers, case.codes, dtype=case.dtype),
            q_logits=_randn(g, max(2, rows - 3), case.layers, case.codes, dtype=case.dtype),
        )
    return make_inputs(case, seed, DEVICE)


def _options(check: Check) -> dict:
    if check.op == "codebook_log_softmax":
        return dict(temperature=4.0)
    if check.op == "pairwise_kl":
        return {}
    return check.case.options()


def run_check(check: Check, seed: int) -> dict:
    """Output and every input gradient (random upstream gradient) against float64: at the odd shape
    ``soda_kernels.reference`` on the CPU, at the realistic one the torch backend in float64 on the
    device (the tests hold it to the reference within 1e-6; the reference's term-by-term loops do
    not finish at B = 4096)."""
    inputs = check_inputs(check, seed)
    options = _options(check)
    public = getattr(sk, check.op)
    out = public(**inputs, backend="triton", **options)
    where = torch.device("cpu") if check.shape == "odd" else DEVICE
    ref_inputs = {
        name: (
            value.detach().to(where, torch.float64).requires_grad_() if value.is_floating_point() else value.to(where)
        )
        if isinstance(value, torch.Tensor)
        else value
        for name, value in inputs.items()
    }
    if check.shape == "odd":
        ref_fn = {
            "codebook_log_softmax": lambda x, codebooks, temperature: reference.log_soft_assignment(
                x, codebooks, temperature
            ),
            "pairwise_kl": reference.pairwise_kl,
            "distributional_bpr": reference.distributional_bpr,
        }[check.op]
        ref = ref_fn(**ref_inputs, **options)
    else:
        ref = public(**ref_inputs, backend="torch", **options)
    upstream = torch.rand(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) + 0.5
    floats = [name for name, value in inputs.items() if isinstance(value, torch.Tensor) and value.is_floating_point()]
    grads = torch.autograd.grad((out * upstream.to(out.device, out.dtype)).sum(), [inputs[n] for n in floats])
    ref_grads = torch.autograd.grad((ref * upstream.to(ref.device)).sum(), [ref_inputs[n] for n in floats])
    errors = {"out": rel_err(out, ref.to(out.device))}
    errors |= {
        name: rel_err(grad, ref_grad.to(grad.device))
        for name, grad, ref_grad in zip(floats, grads, ref_grads, strict=True)
    }
    worst = max(errors, key=lambda name: errors[name] if math.isfinite(errors[name]) else math.inf)
    tolerance = TOLERANCE[getattr(torch, check.case.dtype)]
    passed = all(math.isfinite(e) and e <= tolerance for e in errors.values())
    return dict(
        check=check.name,
        dtype=check.case.dtype,
        verdict="pass" if passed else "FAIL",
        worst=f"{worst} {errors[worst]:.1e}",
        tolerance=tolerance,
        seed=seed,
    )


def run_checks(ctx: Context, until_s: float) -> None:
    rows = []
    for index, check in enumerate(checks(ctx.dry_run)):
        if ctx.elapsed_s() > until_s:
            rows.append(
                dict(
                    check=check.name,
                    dtype=check.case.dtype,
                    verdict="skipped",
                    worst=f"time budget: the checks end {until_s:.0f} s into the stage",
                )
            )
        else:
            try:
                rows.append(run_check(check, seed=index))
            except Exception as error:  # a crash is a failed check, recorded, and the stage goes on
                rows.append(
                    dict(
                        check=check.name,
                        dtype=check.case.dtype,
                        verdict="FAIL",
                        worst=f"{type(error).__name__}: {error}"[:200],
                    )
                )
        ctx.results.section("checks", rows)
        print(
            f"stage: check {rows[-1]['check']} {rows[-1]['dtype']}: {rows[-1]['verdict']} {rows[-1]['worst']}",
            flush=True,
        )


# ----------------------------------------------------------------------------------------------
# Contenders and the profile


def run_contenders(ctx: Context, plan: list[tuple[Case, str]], budget: Budget) -> None:
    """Each (case, contender) through ``bench.measure.run_contender``, recorded as it ends."""
    for case, name in plan:
        if ctx.dry_run and name.startswith("compile"):
            outcome = Outcome(skipped="dry run: torch.compile is not run on the CPU (pytest bench compiles it)")
        else:
            try:
                outcome = run_contender(case, name, budget)
            except Exception as error:  # a crash (a compile error, a CUDA fault) is recorded; the stage goes on
                outcome = Outcome(failed=f"{type(error).__name__}: {error}"[:300])
        if outcome.record is not None:
            ctx.results.add(case, name, outcome.record)
            first = outcome.record["first_call_s"]
            print(
                f"stage: {case.name} | {name}: {outcome.record['full_ms']:.3f} ms forward + backward "
                f"(first call {first:.1f} s)",
                flush=True,
            )
        else:
            ctx.results.skip(case, name, outcome.failed or outcome.skipped)
            print(
                f"stage: {case.name} | {name}: {'FAILED' if outcome.failed else 'skipped'}: "
                f"{outcome.failed or outcome.skipped}",
                flush=True,
            )


def kernel_times(step: Callable[[], None]) -> dict[str, list[float]]:
    """Per kernel: [launches, total µs] over ``PROFILE_STEPS`` steps: CUDA time on a GPU; on the
    CPU the host time of each interpreted Triton launch (its ``triton::`` range)."""
    from torch.profiler import ProfilerActivity, profile

    step()  # warm
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if GPU else [])
    with triton_launch_ranges(), profile(activities=activities) as prof:
        for _ in range(PROFILE_STEPS):
            step()
        if GPU:
            torch.cuda.synchronize()
    times: dict[str, list[float]] = {}
    for event in prof.events():
        if GPU and is_device_kernel(event):
            name = event.name
        elif not GPU and event.name.startswith(TRITON_RANGE):
            name = event.name.removeprefix(TRITON_RANGE)
        else:
            continue
        entry = times.setdefault(name, [0, 0.0])
        entry[0] += 1
        entry[1] += event.time_range.elapsed_us()
    return times


def run_profile(ctx: Context, case: Case) -> None:
    """The Triton path's forward + backward at ``case``: time per kernel against its own floor."""
    inputs = make_inputs(case, 0, DEVICE)
    run = contender("triton", case, DEVICE)
    times = kernel_times(lambda: torch.autograd.grad(run(inputs), float_inputs(inputs)))
    floors = kernel_work(case)
    ceilings = ctx.results.payload["ceilings"]
    rows = []
    for name, (count, total) in sorted(times.items(), key=lambda item: -item[1][1]):
        per_step = count / PROFILE_STEPS
        work = next((counts for kernel, counts in floors.items() if name.startswith(kernel)), None)
        floor_us = None if work is None else 1e3 * floor_ms(case, ceilings, work)["ms"]
        rows.append(
            dict(
                kernel=name[:60],
                launches_per_step=per_step,
                us_per_step=total / PROFILE_STEPS,
                floor_us_per_step=None if floor_us is None else floor_us * per_step,
                over_floor=None if floor_us is None else total / count / floor_us,
            )
        )
    ctx.results.section("profile", rows)


# ----------------------------------------------------------------------------------------------
# Past 2^31 elements


def run_large(ctx: Context) -> None:
    """codebook_log_softmax with N L K > 2^31 elements: its last rows (and their input gradient)
    against float64, and its medians; in a dry run a tiny N stands in."""
    case = replace(LARGE, batch=40, codes=4, dim=2, layers=2) if ctx.dry_run else LARGE
    elements = case.batch * case.layers * case.codes
    row = dict(
        op="codebook_log_softmax",
        N=case.batch,
        L=case.layers,
        K=case.codes,
        d=case.dim,
        out_elements=elements,
        past_2_31=elements > 2**31,
    )
    try:
        g = torch.Generator(device=DEVICE).manual_seed(0)
        x = _randn(g, case.batch, case.layers, case.dim, dtype=case.dtype)
        codebooks = _randn(g, case.layers, case.codes, case.dim, dtype=case.dtype)
        out = sk.codebook_log_softmax(x, codebooks, 4.0, backend="triton")
        upstream = torch.randn(out.shape, generator=g, device=DEVICE)
        (grad_x,) = torch.autograd.grad(out, [x], upstream)
        tail = slice(case.batch - min(LARGE_TAIL_ROWS, case.batch), case.batch)
        x_tail = x.detach()[tail].double().cpu().requires_grad_()
        ref = reference.log_soft_assignment(x_tail, codebooks.detach().double().cpu(), 4.0)
        (ref_grad,) = torch.autograd.grad(ref, [x_tail], upstream[tail].double().cpu())
        row |= dict(
            tail_rows=tail.stop - tail.start,
            out_err=rel_err(out[tail].cpu(), ref),
            grad_x_err=rel_err(grad_x[tail].cpu(), ref_grad),
        )
        tolerance = TOLERANCE[getattr(torch, case.dtype)]
        row["verdict"] = "pass" if max(row["out_err"], row["grad_x_err"]) <= tolerance else "FAIL"
        del out, grad_x
        row["forward_ms"] = median_ms(lambda: sk.codebook_log_softmax(x, codebooks, 4.0, backend="triton"))
        row["full_ms"] = median_ms(
            lambda: torch.autograd.grad(
                sk.codebook_log_softmax(x, codebooks, 4.0, backend="triton"), [x, codebooks], upstream
            )
        )
    except torch.OutOfMemoryError:
        row["verdict"] = "skipped: out of device memory"
    except Exception as error:  # recorded, and the stage goes on
        row["verdict"] = f"FAIL {type(error).__name__}: {error}"[:200]
    ctx.results.section("large", [row])
    print(f"stage: past 2^31 elements: {row['verdict']}", flush=True)


# ----------------------------------------------------------------------------------------------
# The stages


def sweep_cases() -> list[Case]:
    return [case for case in default_grid() if in_batch_sweep(case)]


def stage_plan(name: str, dry_run: bool = False) -> list[tuple[Case, str]]:
    """The (case, contender) pairs a benchmark stage measures, in its order."""
    head = runnable(HEADLINE, dry_run)
    if name == "1":
        return [(head, contender) for contender in (*QUICK, "compile-default")]
    if name == "2":
        rest = [runnable(case, dry_run) for case in default_grid() if case != HEADLINE]
        return [(case, contender) for case in rest for contender in QUICK] + [
            (case, "compile-default") for case in rest
        ]
    if name == "3":
        sweep = [runnable(case, dry_run) for case in sweep_cases()]
        return [
            (case, contender)
            for contender in ("triton", "compile-reduce-overhead", "compile-max-autotune")
            for case in sweep
        ]
    return []


def verdict(ctx: Context) -> None:
    run_checks(ctx, CHECKS_SHARE * ctx.budget_s)
    plan = stage_plan("1", ctx.dry_run)
    run_contenders(ctx, plan[:-1], ctx.budget((1 - PROFILE_SHARE) * ctx.budget_s))
    run_profile(ctx, plan[0][0])
    run_contenders(ctx, plan[-1:], ctx.budget())


def grid(ctx: Context) -> None:
    plan = stage_plan("2", ctx.dry_run)
    quick = [(case, name) for case, name in plan if not name.startswith("compile")]
    run_contenders(ctx, quick, ctx.budget((1 - LARGE_SHARE) * ctx.budget_s))
    run_large(ctx)
    run_contenders(ctx, [pair for pair in plan if pair not in quick], ctx.budget())


def compile_modes(ctx: Context) -> None:
    run_contenders(ctx, stage_plan("3", ctx.dry_run), ctx.budget())


PYTEST = ("{python}", "-m", "pytest", "tests", "-q", "-p", "no:cacheprovider", "--ignore-glob=tests/test_soda_*")
STAGES = {
    "1": Stage(180, "the verdict: correctness on the device, the headline, the kernel profile", run=verdict),
    "2": Stage(300, "the grid: the rest of the default grid, one case past 2^31 elements", run=grid),
    "3": Stage(
        300, "the compile modes: reduce-overhead and max-autotune at the headline and the B sweep", run=compile_modes
    ),
    "tests": Stage(
        180,
        "the CUDA test suite (tests/test_soda_* need the datasets: not run)",
        command=(*PYTEST, "--junitxml={stem}.xml", "{workers}"),
        dry_command=(*PYTEST, "--collect-only"),
    ),
    # Stages of other work, one line each (their CPU smoke runs are in their own bench tests).
    "topk": Stage(
        150,
        "retrieval: distributional_topk against torch.topk over B x N and the chunked torch path",
        command=("{python}", "-m", "bench.bench_topk", "{out}"),
    ),
}


def _fill(command: tuple[str, ...], ctx: Context) -> list[str]:
    workers = os.cpu_count() or 1
    xdist = importlib.util.find_spec("xdist") is not None and workers > 1
    values = dict(python=sys.executable, out=str(ctx.out), stem=str(ctx.stem), workers=f"-n{workers}" if xdist else "")
    return [part for part in (piece.format(**values) for piece in command) if part]


def run_command(ctx: Context) -> None:
    """The stage's command as a subprocess, its output into ``<stem>-output.log`` as it comes, ended
    (SIGINT, then SIGKILL) at the stage's budget; a JSON record of how it ended."""
    command = _fill(ctx.stage.dry_command if ctx.dry_run else ctx.stage.command, ctx)
    record = dict(stage=ctx.name, command=" ".join(command), dry_run=ctx.dry_run)
    if not command:
        record["outcome"] = "dry run: nothing to run on the CPU"
    else:
        log = ctx.stem.with_name(f"{ctx.stem.name}-output.log")
        timeout = ctx.budget_s - ctx.elapsed_s()
        with log.open("w") as sink:
            process = subprocess.Popen(
                command, stdout=sink, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1")
            )
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                process.send_signal(signal.SIGINT)
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
                record["timed_out_after_s"] = round(timeout)
        lines = log.read_text().splitlines()
        summary = [line for line in lines if re.search(r"\d+ (passed|failed|error|tests? collected)", line)]
        record |= dict(
            returncode=process.returncode,
            seconds=round(ctx.elapsed_s(), 1),
            summary=summary[-1] if summary else (lines[-1] if lines else ""),
            failed=[line for line in lines if line.startswith(("FAILED", "ERROR"))][:20],
        )
    ctx.stem.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    shown = {key: value for key, value in record.items() if key not in ("command", "failed")}
    print(
        "\n".join(
            [f"# stage {ctx.name}: {record['command']}", *records_table("", "", [shown])[4:], *record.get("failed", [])]
        ),
        flush=True,
    )


# ----------------------------------------------------------------------------------------------
# The table printed last


def cases_table(payload: dict) -> list[dict]:
    """One row per case: forward + backward ms per contender, compile seconds, Triton's ratios."""
    rows = []
    for entry in payload["cases"]:
        row = dict(case=entry["name"])
        for name, record in entry["contenders"].items():
            row[name] = (
                f"{record['full_ms']:.3f}"
                if "full_ms" in record
                else ("FAIL" if record.get("skipped", "").startswith("disagrees") else "skip")
            )
        compiled = [
            r["first_call_s"] for n, r in entry["contenders"].items() if n.startswith("compile") and "first_call_s" in r
        ]
        row["compile s"] = f"{max(compiled):.0f}" if compiled else None
        for other in ("eager", "naive", "best-compile"):
            value = entry["ratios"].get(f"full_speedup_vs_{other}")
            row[f"vs {other}"] = None if value is None else f"{value:.2f}x"
        if "floor" in entry and "over_floor" in entry["contenders"].get("triton", {}):
            row["/ floor"] = f"{entry['contenders']['triton']['over_floor']:.1f}x"
        rows.append(row)
    shown = [key for key in dict.fromkeys(key for row in rows for key in row) if any(row.get(key) for row in rows)]
    return [{key: row.get(key) for key in shown} for row in rows]


def headline_rows(entry: dict) -> list[dict]:
    """Per contender of the headline: the three medians, peak memory, kernels per step, first call."""
    rows = []
    for name, record in entry["contenders"].items():
        if "full_ms" not in record:
            continue
        rows.append(
            dict(
                contender=name,
                forward_ms=record["forward_ms"],
                backward_ms=record["backward_ms"],
                full_ms=record["full_ms"],
                peak_mib=record["peak_mib"],
                kernels=launches_shown(record),
                first_call_s=record["first_call_s"],
            )
        )
    return rows


def summary(ctx: Context) -> list[str]:
    payload = ctx.results.payload
    lines = [
        f"# stage {ctx.name} on {payload['device']}: {ctx.elapsed_s():.0f} s of {ctx.budget_s:.0f} s"
        + (" (dry run: shrunk cases, the Triton interpreter)" if ctx.dry_run else "")
    ]
    if payload.get("checks"):
        verdicts = [row["verdict"] for row in payload["checks"]]
        lines.append(
            f"checks: {verdicts.count('pass')} pass, {verdicts.count('FAIL')} FAIL, "
            f"{verdicts.count('skipped')} skipped of {len(verdicts)}"
        )
        lines += [
            f"  FAIL {row['check']} {row['dtype']}: {row['worst']}"
            for row in payload["checks"]
            if row["verdict"] == "FAIL"
        ]
    if payload["cases"]:
        lines += records_table("forward + backward ms", "", cases_table(payload))[4:]
    head = next((entry for entry in payload["cases"] if entry["name"] == runnable(HEADLINE, ctx.dry_run).name), None)
    if head is not None:
        lines += records_table("headline", "", headline_rows(head))[4:]
    for name in ("profile", "large"):
        if payload.get(name):
            lines += records_table(name, "", payload[name])[4:]
    lines.append(f"files: {', '.join(sorted(path.name for path in ctx.out.glob(ctx.stem.name + '*')))}")
    return lines


# ----------------------------------------------------------------------------------------------
# The command line


class Tee:
    """stdout also into the stage's log, line by line (a killed command keeps what it printed)."""

    def __init__(self, path: Path):
        self.stream, self.file = sys.stdout, path.open("a", buffering=1)

    def write(self, text: str) -> int:
        self.stream.write(text)
        self.file.write(text)
        return len(text)

    def flush(self) -> None:
        self.stream.flush()
        self.file.flush()


def plan_lines(name: str, dry_run: bool) -> list[str]:
    """What a stage would do: its contenders per case, its checks, its command."""
    stage = STAGES[name]
    lines = [f"stage {name} ({stage.budget_s:.0f} s): {stage.what}"]
    if stage.run is verdict:
        lines.append(f"  checks: {len(checks(dry_run))} (every op and mode x {', '.join(DTYPES)} x realistic, odd)")
    pairs = stage_plan(name, dry_run)
    for case in dict.fromkeys(case for case, _ in pairs):
        lines.append(f"  {case.name}: {', '.join(n for c, n in pairs if c == case)}")
    if stage.run is grid:
        lines.append(
            f"  past 2^31: codebook_log_softmax N={LARGE.batch} L={LARGE.layers} K={LARGE.codes} "
            f"d={LARGE.dim} ({LARGE.batch * LARGE.layers * LARGE.codes} output elements)"
        )
    if stage.command:
        lines.append("  command: " + " ".join(stage.command))
    lines.append(f"  files: {', '.join(f'<date>-<device>-stage-{name}{suffix}' for suffix in files(name))}")
    return lines


def files(name: str) -> tuple[str, ...]:
    """What a stage writes into OUT, after ``<date>-<device>-stage<name>`` (at most 8 files come back)."""
    return (
        (".log", ".json", *((".xml",) if name == "tests" else ()), "-output.log")
        if STAGES[name].command
        else (".log", ".json", ".md")
    )


def main(argv: list[str] | None = None) -> Context | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=[*STAGES, "list"])
    parser.add_argument("out", type=Path, nargs="?")
    parser.add_argument("--dry-run", action="store_true", help="shrunk cases on the CPU (the interpreter)")
    parser.add_argument("--budget-s", type=float, help="another budget than the stage's (its parts scale with it)")
    args = parser.parse_args(argv)
    if args.stage == "list":
        for name in STAGES:
            print("\n".join(plan_lines(name, args.dry_run)))
        return None
    if args.out is None:
        parser.error("OUT is needed to run a stage")
    if GPU == args.dry_run:
        parser.error("--dry-run is for machines without a GPU, and they can run nothing else")
    stage = STAGES[args.stage]
    args.out.mkdir(parents=True, exist_ok=True)
    stem = run_stem(args.out, DEVICE).with_name(f"{run_stem(args.out, DEVICE).name}-stage-{args.stage}")
    ctx = Context(args.stage, stage, args.out, stem, args.dry_run, time.monotonic(), budget_override_s=args.budget_s)
    stdout, sys.stdout = sys.stdout, (tee := Tee(stem.with_suffix(".log")))
    try:
        print("\n".join(plan_lines(args.stage, args.dry_run)), flush=True)
        print(f"stage: {device_name(DEVICE)}, torch {torch.__version__}", flush=True)
        if stage.command:
            run_command(ctx)
        else:
            ctx.results = Results(stem, DEVICE, f"stage {args.stage}", ctx.budget_s, measure_ceilings(DEVICE))
            stage.run(ctx)
            print("\n".join(summary(ctx)), flush=True)
    except BaseException:
        traceback.print_exc(file=tee.file)  # into the log too (the terminal gets it from Python)
        raise
    finally:
        sys.stdout = stdout
        tee.file.close()
    return ctx


if __name__ == "__main__":
    main()
