"""The GPU stages' dry runs on the CPU: each stage lists its plan, runs its CPU-side parts (checks
against float64, the measurement, the int64-offset case, the profile and the floors, the writers,
the table) on shrunk cases under the Triton interpreter, and writes only the files it declares.
A short ``--budget-s`` keeps each run to seconds, so the budget's skips are exercised too.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from bench import stage
from bench.cases import HEADLINE, default_grid, in_batch_sweep
from bench.roofline import kernel_work, work

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="a dry run is the CPU's stand-in for a GPU stage")
DRY_BUDGET_S = {"1": 25.0, "2": 15.0, "3": 5.0, "tests": 120.0}


def dry_run(name: str, tmp_path, capsys) -> tuple[stage.Context, str]:
    ctx = stage.main([name, str(tmp_path), "--dry-run", "--budget-s", str(DRY_BUDGET_S[name])])
    produced = sorted(path.name for path in tmp_path.iterdir())
    declared = sorted(ctx.stem.name + suffix for suffix in stage.files(name))
    assert set(produced) <= set(declared) and len(declared) <= 8, (produced, declared)
    assert ctx.stem.with_suffix(".json").exists() and ctx.stem.with_suffix(".log").exists()
    return ctx, capsys.readouterr().out


def test_every_stage_has_a_plan_and_at_most_8_files():
    for name in stage.STAGES:
        lines = stage.plan_lines(name, dry_run=False)
        assert lines[0].startswith(f"stage {name} ") and any("files:" in line for line in lines)
        assert len(stage.files(name)) <= 8


def test_the_stages_cover_the_default_grid():
    grid = default_grid()
    one = stage.stage_plan("1")
    two = stage.stage_plan("2")
    three = stage.stage_plan("3")
    assert {case for case, _ in one} == {HEADLINE}
    assert {case for case, _ in two} == set(grid) - {HEADLINE}
    for contenders in ({name for _, name in one}, {name for case, name in two if case == grid[-1]}):
        assert contenders == {"triton", "eager", "naive", "compile-default"}
    sweep = {case for case in grid if in_batch_sweep(case)}
    assert HEADLINE in sweep and len(sweep) == 4
    assert set(three) == {
        (case, name) for case in sweep for name in ("triton", "compile-reduce-overhead", "compile-max-autotune")
    }
    assert stage.LARGE.batch * stage.LARGE.layers * stage.LARGE.codes > 2**31


def test_checks_cover_every_op_mode_dtype_and_shape():
    checks = stage.checks(dry_run=False)
    assert {(c.op, c.shape, c.case.dtype) for c in checks} == {
        (op, shape, dtype)
        for op in ("codebook_log_softmax", "pairwise_kl", "distributional_bpr")
        for shape in ("realistic", "odd")
        for dtype in stage.DTYPES
    }
    modes = {(c.case.mode, c.case.symmetric) for c in checks if c.op == "distributional_bpr"}
    assert modes == set(stage.BPR_MODES)
    odd = stage.ODD
    assert all(size % 16 for size in (odd.batch, odd.codes, odd.dim))


def test_kernel_floors_add_up_to_the_design():
    """The prologue runs twice and the epilogue recomputes the logits and projects them (5 passes of
    the logits' products against the 3 of ``work``); the score products are recomputed in backward
    (5 against 3)."""
    kernels = kernel_work(HEADLINE)
    whole = work(HEADLINE)
    assignment = 2 * kernels["_prologue_kernel"]["assignment_flops"] + kernels["_epilogue_kernel"]["assignment_flops"]
    assert assignment * 3 == whole["assignment_flops"] * 5
    scores = kernels["_forward_kernel"]["score_flops"] + kernels["_backward_kernel"]["score_flops"]
    assert scores * 3 == whole["score_flops"] * 5
    assert kernel_work(replace(HEADLINE, mode="mean")) == {}


def test_stage_1_dry_run(tmp_path, capsys):
    ctx, printed = dry_run("1", tmp_path, capsys)
    payload = json.loads(ctx.stem.with_suffix(".json").read_text())
    verdicts = [row["verdict"] for row in payload["checks"]]
    assert "FAIL" not in verdicts and "pass" in verdicts and len(verdicts) == len(stage.checks(dry_run=True))
    head = payload["cases"][0]
    assert "full_ms" in head["contenders"]["triton"]  # the others too, where the budget let them
    assert all(
        "full_ms" in head["contenders"][n] or "budget" in head["contenders"][n]["skipped"] for n in ("eager", "naive")
    )
    assert head["contenders"]["compile-default"]["skipped"].startswith("dry run")
    kernels = {row["kernel"] for row in payload["profile"]}
    assert {"_prologue_kernel", "_forward_kernel", "_backward_kernel", "_epilogue_kernel"} <= kernels
    assert all(row["floor_us_per_step"] > 0 for row in payload["profile"] if row["kernel"] in kernel_work(HEADLINE))
    assert printed.rstrip().splitlines()[-1].startswith("files:") and "checks:" in printed


def test_stage_2_dry_run(tmp_path, capsys):
    ctx, printed = dry_run("2", tmp_path, capsys)
    payload = json.loads(ctx.stem.with_suffix(".json").read_text())
    (large,) = payload["large"]
    assert large["verdict"] == "pass" and large["tail_rows"] > 0
    records = [record for entry in payload["cases"] for record in entry["contenders"].values()]
    assert any("full_ms" in record for record in records)
    assert all(
        "full_ms" in record or "budget" in record.get("skipped", "") or "dry run" in record.get("skipped", "")
        for record in records
    )
    assert "| case |" in printed


def test_stage_3_dry_run(tmp_path, capsys):
    ctx, printed = dry_run("3", tmp_path, capsys)
    payload = json.loads(ctx.stem.with_suffix(".json").read_text())
    compiled = [
        record
        for entry in payload["cases"]
        for name, record in entry["contenders"].items()
        if name.startswith("compile")
    ]
    assert len(compiled) == 8 and all(record["skipped"].startswith("dry run") for record in compiled)
    assert "compile-max-autotune" in printed


def test_tests_stage_dry_run_collects_the_cuda_suite(tmp_path, capsys):
    ctx, printed = dry_run("tests", tmp_path, capsys)
    record = json.loads(ctx.stem.with_suffix(".json").read_text())
    assert record["returncode"] == 0 and "collected" in record["summary"], record
    assert "test_soda_" not in ctx.stem.with_name(ctx.stem.name + "-output.log").read_text()
    assert "--collect-only" in printed
