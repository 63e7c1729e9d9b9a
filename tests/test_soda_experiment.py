"""The experiment driver: one record per finished run, skipped when present, mean ± std tables."""

import json
import random
import statistics
import sys

import pytest
import torch

from soda import __main__ as soda_main
from soda import experiment
from soda.experiment import run_all
from soda.metrics import METRICS
from soda.train import PRESETS


def fake_metrics(rng: random.Random) -> dict:
    return {split: {name: rng.random() for name in METRICS} for split in ("valid", "test")}


def test_runs_are_recorded_skipped_and_summarized(tmp_path, monkeypatch):
    rng = random.Random(0)
    calls = []

    def train_generative(backbone, dataset, config, out_dir, device, seed, resume, data_dir):
        calls.append((backbone, config.soda is not None, seed))
        assert resume and out_dir.parent == tmp_path / "runs" / "toy" / "cpu"
        return {**fake_metrics(rng), "tokenizer_final": {"codes_changed": rng.random()}}

    def train_baselines(dataset, config, out_dir, device, seed, resume, data_dir):
        calls.append(("baselines", False, seed))
        return {"mostpop": fake_metrics(rng), "sasrec": fake_metrics(rng)}

    monkeypatch.setattr(experiment, "train_generative", train_generative)
    monkeypatch.setattr(experiment, "train_baselines", train_baselines)
    runs = experiment.experiment_runs(("tiger",))
    arguments = ("toy", "toy", "cpu", PRESETS["cpu"], 2, tmp_path / "runs", tmp_path / "results", torch.device("cpu"))

    summary = run_all(runs, *arguments)
    assert calls == [(name, soda, seed) for seed in (0, 1) for name, soda in
                     [("baselines", False), ("tiger", False), ("tiger", True)]]
    records = tmp_path / "results" / "toy" / "cpu"
    assert sorted(p.name for p in records.iterdir()) == sorted(
        f"{name}-seed{seed}.json" for name in ("mostpop", "sasrec", "tiger", "tiger+soda") for seed in (0, 1)
    )
    for name in ("mostpop", "tiger+soda"):
        values = [json.loads((records / f"{name}-seed{s}.json").read_text())["test"]["ndcg@10"] for s in (0, 1)]
        row = summary["rows"][name]
        assert row["seeds"] == [0, 1]
        assert row["ndcg@10"]["mean"] == statistics.fmean(values)
        assert row["ndcg@10"]["std"] == statistics.stdev(values)
    assert "codes_changed" in json.loads((records / "tiger+soda-seed0.json").read_text())["tokenizer_final"]
    assert "tokenizer_final" not in json.loads((records / "sasrec-seed0.json").read_text())
    table = (tmp_path / "results" / "toy.md").read_text()
    assert "| tiger+soda | 2/2 |" in table and json.loads((tmp_path / "results" / "toy.json").read_text()) == summary

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
    assert [seed for _, _, seed in calls] == [2, 2] and summary["rows"]["tiger"]["seeds"] == [0, 1, 2]


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
    assert runs[0] == experiment.experiment_runs(("tiger",))[-1]  # shares the experiment's records
    for run in runs[1:]:
        changed = [k for k, v in vars(run.soda).items() if v != getattr(default, k)]
        assert len(changed) == 1 and run.backbone == "tiger", run
    assert len({run.name for run in runs}) == len(runs)
