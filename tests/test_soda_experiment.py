"""The experiment driver: one record per finished run, skipped when present, TIGER's rows first,
mean ± std tables, and each SODA row against its base with a paired bootstrap over users."""

import json
import random
import statistics
import sys

import pytest
import torch

from soda import __main__ as soda_main
from soda import experiment
from soda.experiment import paired_bootstrap, run_all
from soda.metrics import METRICS
from soda.recipes import PRESETS

USERS = 50


def fake_metrics(rng: random.Random) -> dict:
    """What a run returns: metrics, each user's rank (recall@10 agreeing with the ranks), epochs, minutes."""
    ranks = [rng.choice([-1, -1, 0, 3, 7, 12]) if rng.random() < 0.9 else 2 for _ in range(USERS)]
    ranks = [rank if rank < 10 else -1 for rank in ranks]
    metrics = {split: {name: rng.random() for name in METRICS} for split in ("valid", "test")}
    metrics["test"]["recall@10"] = sum(0 <= rank < 10 for rank in ranks) / USERS
    return {**metrics, "ranks": {"valid": ranks, "test": ranks}, "best_epoch": 3, "epochs": 8, "minutes": rng.random()}


def test_runs_are_recorded_skipped_and_summarized(tmp_path, monkeypatch):
    rng = random.Random(0)
    calls = []

    def train_generative(backbone, dataset, config, out_dir, device, seed, resume, data_dir, sasrec_dir):
        calls.append((backbone, config.soda is not None, seed))
        assert resume and out_dir.parent == tmp_path / "runs" / "toy" / "cpu"
        assert sasrec_dir == out_dir.parent / f"baselines-seed{seed}" / "sasrec"  # the baselines' SASRec
        return {**fake_metrics(rng), "tokenizer_final": {"codes_changed": rng.random()}}

    def train_baselines(dataset, config, out_dir, device, seed, resume, data_dir):
        calls.append(("baselines", False, seed))
        return {"mostpop": fake_metrics(rng), "sasrec": fake_metrics(rng)}

    monkeypatch.setattr(experiment, "train_generative", train_generative)
    monkeypatch.setattr(experiment, "train_baselines", train_baselines)
    runs = experiment.experiment_runs(("tiger",))
    arguments = ("toy", "toy", "cpu", PRESETS["cpu"], 2, tmp_path / "runs", tmp_path / "results", torch.device("cpu"))

    summary = run_all(runs, *arguments)
    # TIGER's rows first (base, +SODA, each side alone), seed by seed, then the baselines
    tiger_rows = [("tiger", False), ("tiger", True), ("tiger", True), ("tiger", True)]
    assert calls == [(name, soda, seed) for seed in (0, 1) for name, soda in tiger_rows] + [
        ("baselines", False, seed) for seed in (0, 1)
    ]
    records = tmp_path / "results" / "toy" / "cpu"
    names = ("mostpop", "sasrec", "tiger", "tiger+soda", "tiger+soda_side-recommender", "tiger+soda_side-tokenizer")
    assert sorted(p.name for p in records.iterdir()) == sorted(f"{n}-seed{s}.json" for n in names for s in (0, 1))
    for name in ("mostpop", "tiger+soda"):
        values = [json.loads((records / f"{name}-seed{s}.json").read_text())["test"]["ndcg@10"] for s in (0, 1)]
        row = summary["rows"][name]
        assert row["seeds"] == [0, 1]
        assert row["ndcg@10"]["mean"] == statistics.fmean(values)
        assert row["ndcg@10"]["std"] == statistics.stdev(values)
    record = json.loads((records / "tiger+soda-seed0.json").read_text())
    assert "codes_changed" in record["tokenizer_final"] and len(record["ranks"]["test"]) == USERS
    assert (record["best_epoch"], record["epochs"]) == (3, 8)
    rows = summary["rows"]["tiger+soda"]  # each record's minutes are its run's own (from fit), not this process's
    assert rows["minutes"]["mean"] == statistics.fmean(
        json.loads((records / f"tiger+soda-seed{s}.json").read_text())["minutes"] for s in (0, 1)
    )
    assert "tokenizer_final" not in json.loads((records / "sasrec-seed0.json").read_text())
    table = (tmp_path / "results" / "toy.md").read_text()
    assert "| tiger+soda | 2/2 |" in table and json.loads((tmp_path / "results" / "toy.json").read_text()) == summary
    # each SODA row against TIGER, seed by seed, with the bootstrap computed from the records' ranks
    comparison = summary["comparisons"]["tiger+soda side=recommender"]
    base, variant = (
        [json.loads((records / f"{n}-seed{s}.json").read_text()) for s in (0, 1)]
        for n in ("tiger", "tiger+soda_side-recommender")
    )
    changes = [v["test"]["recall@10"] / b["test"]["recall@10"] - 1 for b, v in zip(base, variant, strict=True)]
    assert comparison["seeds"] == [0, 1] and comparison["change_per_seed"] == pytest.approx(changes)
    assert comparison["bootstrap"]["low"] <= comparison["bootstrap"]["change"] <= comparison["bootstrap"]["high"]
    assert comparison["bootstrap"]["change"] == pytest.approx(comparison["change"])
    assert "| tiger+soda side=tokenizer | tiger | 2 |" in table

    # A rerun with one record removed trains only that run, and one more seed adds one seed's runs.
    (records / "tiger-seed1.json").unlink()
    calls.clear()
    run_all(runs, *arguments)
    assert calls == [("tiger", False, 1)]
    calls.clear()
    summary = run_all(runs, *arguments[:4], 3, *arguments[5:], only={"tiger+soda"})
    assert calls == [("tiger", True, 2)]  # the other runs of seed 2 wait; the table keeps their rows
    assert summary["rows"]["tiger+soda"]["seeds"] == [0, 1, 2] and summary["rows"]["tiger"]["seeds"] == [0, 1]
    calls.clear()
    summary = run_all(runs, *arguments[:4], 3, *arguments[5:])
    assert [seed for _, _, seed in calls] == [2, 2, 2, 2] and summary["rows"]["tiger"]["seeds"] == [0, 1, 2]


def test_the_converged_preset_keeps_its_own_records_and_table(tmp_path, monkeypatch):
    presets = []

    def train_generative(backbone, dataset, config, out_dir, device, seed, resume, data_dir, sasrec_dir):
        presets.append((config.train.patience, config.train.min_epochs, config.sasrec_train.min_epochs))
        return fake_metrics(random.Random(seed))

    monkeypatch.setattr(experiment, "train_generative", train_generative)
    arguments = ["experiment", "--preset", "cpu-converged", "--backbones", "letter", "--seeds", "1"]
    arguments += ["--only", "letter", "letter+soda", "--out", str(tmp_path / "o"), "--results", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", ["soda", *arguments])
    soda_main.main()
    assert presets == [(5, 10, 10)] * 2  # early stopping on, after the same floor for every model
    records = sorted(path.name for path in (tmp_path / "ml-100k" / "cpu-converged").iterdir())
    assert records == ["letter+soda-seed0.json", "letter-seed0.json"]
    assert "preset cpu-converged" in (tmp_path / "ml-100k-cpu-converged.md").read_text()
    assert not (tmp_path / "ml-100k.md").exists()  # the CPU preset's table is another file


def test_paired_bootstrap_resamples_the_same_users_for_both_runs():
    generator = torch.Generator().manual_seed(0)
    base = (torch.rand(2, 400, generator=generator) < 0.1).double()  # two seeds' hits of 400 users
    better = torch.maximum(base, (torch.rand(2, 400, generator=generator) < 0.05).double())  # never a lost hit
    result = paired_bootstrap(base, better, resamples=2000)
    assert result["change"] == pytest.approx(better.mean().item() / base.mean().item() - 1)
    assert 0 < result["low"] < result["change"] < result["high"] and result["p_not_better"] == 0.0
    same = paired_bootstrap(base, base, resamples=2000)
    assert same["low"] == same["high"] == same["change"] == 0.0 and same["p_not_better"] == 1.0
    # the quantiles of the change over resamples drawn one by one (the function's seeded draws)
    draws = torch.randint(400, (2000, 400), generator=torch.Generator().manual_seed(0))
    changes = torch.stack([better[:, users].mean() / base[:, users].mean() - 1 for users in draws])
    low, high = torch.quantile(changes, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    assert (result["low"], result["high"]) == (pytest.approx(low), pytest.approx(high))


def test_cli_rejects_an_unknown_run_before_training(tmp_path, monkeypatch, capsys):
    arguments = ["ablate", "--only", "tiger+soda weight=7", "--out", str(tmp_path / "o"), "--results", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", ["soda", *arguments])
    with pytest.raises(SystemExit):
        soda_main.main()
    assert "--only: unknown runs ['tiger+soda weight=7']" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_ablation_changes_one_choice_at_a_time():
    runs = experiment.ablation_runs()
    default = runs[0].soda
    assert runs[0] == experiment.experiment_runs(("tiger",))[1]  # shares the experiment's records
    for run in runs[1:]:
        changed = [k for k, v in vars(run.soda).items() if v != getattr(default, k)]
        assert len(changed) == 1 and run.backbone == "tiger", run
    assert len({run.name for run in runs}) == len(runs)


def test_the_demo_ends_by_saying_where_its_files_are(tmp_path):
    for name, files in (("tiger", ("metrics.json", "best.pt", "last.pt", "curves.png", "notes.txt")), ("sasrec", ())):
        (tmp_path / name).mkdir()
        for file in files:
            (tmp_path / name / file).write_text("")
    lines = soda_main.where({"tiger": tmp_path / "tiger", "sasrec": tmp_path / "sasrec"}).splitlines()
    assert "metrics.json" in lines[1] and "curves.png" in lines[1]
    assert lines[2:] == [
        f"  tiger: {tmp_path / 'tiger'}/  best.pt curves.png last.pt metrics.json",
        f"  sasrec: {tmp_path / 'sasrec'}/  ",
    ]
