"""The experiment driver: one record per finished run, skipped when present, TIGER's rows first,
mean ± std tables, each SODA row against its base with a paired bootstrap over users and a
hierarchical one over seeds and users, the sample sizes from the measured spread, and the tables
rewritten from the records alone."""

import json
import math
import random
import statistics
import sys
from dataclasses import replace

import pytest
import torch

from soda import __main__ as soda_main
from soda import experiment
from soda.experiment import hierarchical_bootstrap, paired_bootstrap, run_all, sample_sizes
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
        result = {**fake_metrics(rng), "tokenizer_final": {"codes_changed": rng.random()}}
        if config.soda is not None:  # SODA runs: retrieval and fusion, laid out as the beam search
            result["retrieval"] = fake_metrics(rng)
            result["fusion"] = {**fake_metrics(rng), "weight": 0.1}
        return result

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
    assert len(record["retrieval"]["ranks"]["test"]) == len(record["fusion"]["ranks"]["test"]) == USERS
    assert record["fusion"]["weight"] == 0.1 and "retrieval" not in json.loads(
        (records / "tiger-seed0.json").read_text()
    )
    assert [c["run"] for c in summary["retrieval_and_fusion"][:2]] == ["tiger+soda retrieval", "tiger+soda fusion"]
    assert (record["best_epoch"], record["epochs"]) == (3, 8)
    rows = summary["rows"]["tiger+soda"]  # each record's minutes are its run's own (from fit), not this process's
    assert rows["minutes"]["mean"] == statistics.fmean(
        json.loads((records / f"tiger+soda-seed{s}.json").read_text())["minutes"] for s in (0, 1)
    )
    assert "tokenizer_final" not in json.loads((records / "sasrec-seed0.json").read_text())
    table = (tmp_path / "results" / "toy.md").read_text()
    assert "| tiger+soda | 2 (0-1) |" in table
    assert json.loads((tmp_path / "results" / "toy.json").read_text()) == summary
    # each SODA row against TIGER, seed by seed, with the bootstraps computed from the records' ranks
    assert [(c["run"], c["base"]) for c in summary["comparisons"]] == [(run.name, "tiger") for run in runs[1:4]]
    comparison = summary["comparisons"][1]
    base, variant = (
        [json.loads((records / f"{n}-seed{s}.json").read_text()) for s in (0, 1)]
        for n in ("tiger", "tiger+soda_side-recommender")
    )
    changes = [v["test"]["recall@10"] / b["test"]["recall@10"] - 1 for b, v in zip(base, variant, strict=True)]
    assert comparison["run"] == "tiger+soda side=recommender"
    assert comparison["seeds"] == [0, 1] and comparison["change_per_seed"] == pytest.approx(changes)
    for key in ("users_bootstrap", "hierarchical_bootstrap"):
        assert comparison[key]["low"] <= comparison[key]["change"] <= comparison[key]["high"]
        assert comparison[key]["change"] == pytest.approx(comparison["change"])
    assert comparison["sample_sizes"]["mean_change"] == pytest.approx(statistics.fmean(changes))
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
    table = (tmp_path / "results" / "toy.md").read_text()  # each row says its own seeds
    assert "| tiger+soda | 3 (0-2) |" in table and "| tiger | 2 (0-1) |" in table
    calls.clear()
    summary = run_all(runs, *arguments[:4], 3, *arguments[5:])
    assert [seed for _, _, seed in calls] == [2, 2, 2, 2] and summary["rows"]["tiger"]["seeds"] == [0, 1, 2]


def test_a_rows_seeds_are_counted_and_listed_in_runs():
    assert experiment.seed_list([5]) == "1 (5)"
    assert experiment.seed_list([4, 0, 2, 1, 5]) == "5 (0-2, 4-5)"
    assert experiment.seed_list([0, 2, 3, 4, 6]) == "5 (0, 2-4, 6)"


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
    assert replace(runs[0], against=()) == experiment.experiment_runs(("tiger",))[1]  # the experiment's records
    assert runs[0].against == tuple(run.name for run in runs[1:])  # the default against each variant
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


def hits_at(rates: list[float], users: int, seed: int) -> torch.Tensor:
    """Seeded random hits of each seed's run: (S, U) float64, seed s's users hit with rates[s]."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(len(rates), users, generator=generator) < torch.tensor(rates)[:, None]).double()


def test_hierarchical_bootstrap_counts_the_seeds_spread():
    base = hits_at([0.15] * 4, users=600, seed=1)
    big = hits_at([0.3] * 4, users=600, seed=2)  # twice the hits in every seed
    result = hierarchical_bootstrap(base, big, resamples=2000)
    assert result["change"] == pytest.approx(big.mean().item() / base.mean().item() - 1)
    assert 0 < result["low"] < result["change"] < result["high"] and result["p_not_better"] == 0.0
    same = hierarchical_bootstrap(base, base, resamples=2000)
    assert same["low"] == same["high"] == same["change"] == 0.0 and same["p_not_better"] == 1.0
    null = hierarchical_bootstrap(base, hits_at([0.15] * 4, users=600, seed=3), resamples=2000)
    assert null["low"] < 0 < null["high"] and 0.05 < null["p_not_better"] < 0.95
    # the variant's effect swings from seed to seed: the users-only interval misses it, this one not
    swinging = hits_at([0.15 * (1 + effect) for effect in (0.9, -0.2, 0.8, -0.1)], users=600, seed=4)
    users_only, both = paired_bootstrap(base, swinging, resamples=2000), hierarchical_bootstrap(base, swinging, 2000)
    assert both["high"] - both["low"] > 2 * (users_only["high"] - users_only["low"])
    assert users_only["low"] > 0 > both["low"]


def test_hierarchical_bootstrap_draws_seeds_then_users_per_drawn_seed():
    base, variant = hits_at([0.2, 0.1, 0.3], users=40, seed=5), hits_at([0.3, 0.2, 0.1], users=40, seed=6)
    result = hierarchical_bootstrap(base, variant, resamples=300)
    # the same resamples one by one, from the function's seeded draws: seeds first, then users per slot
    generator = torch.Generator().manual_seed(0)
    seed_draws = torch.randint(3, (300, 3), generator=generator)
    user_draws = [torch.randint(40, (300, 40), generator=generator) for _ in range(3)]
    changes = []
    for r in range(300):
        drawn = [(seed_draws[r, slot], user_draws[slot][r]) for slot in range(3)]
        base_sum = sum(base[seed, users].sum() for seed, users in drawn)
        changes.append(sum(variant[seed, users].sum() for seed, users in drawn) / base_sum - 1)
    low, high = torch.quantile(torch.stack(changes), torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    assert (result["low"], result["high"]) == (pytest.approx(low), pytest.approx(high))
    assert result["p_not_better"] == pytest.approx(sum(change <= 0 for change in changes).item() / 300)


def test_sample_sizes_on_a_hand_computed_case():
    base = torch.zeros(2, 100, dtype=torch.float64)
    base[:, :10] = 1  # 10 hits of 100 users in both seeds
    variant = torch.zeros(2, 100, dtype=torch.float64)
    variant[0, :9] = 1  # seed 0: one hit lost, -10%
    variant[1, :13] = 1  # seed 1: three hits won, +30%
    sizes = sample_sizes(base, variant)
    assert sizes["mean_change"] == pytest.approx(0.1) and sizes["sd_change"] == pytest.approx(0.2 * math.sqrt(2))
    assert sizes["seeds_needed"] == 31  # (1.96 · 0.2√2 / 0.1)² = 1.96² · 8 = 30.7
    # within seed 0 the users' differences v − 0.9·b are 0.1 (9 users), −0.9 (1), 0: variance 0.9/99,
    # within seed 1 v − 1.3·b are −0.3 (10 users), 1 (3), 0: variance 3.9/99; over mean(base)² = 0.01
    users_variance = (90 / 99 + 390 / 99) / 2
    assert sizes["sd_users"] == pytest.approx(math.sqrt(users_variance / 100))
    assert sizes["sd_training"] == pytest.approx(math.sqrt(0.08 - users_variance / 100))
    assert sizes["users_needed"] is None  # 2 · (0.1 / 1.96)² < the seed-level variance: no users suffice
    steady = sample_sizes(base, variant[[1, 1]])  # +30% in both seeds: all of the spread is the users'
    assert steady["sd_change"] == 0 and steady["sd_training"] == 0 and steady["seeds_needed"] == 1
    assert steady["users_needed"] == 85  # (390 / 99) / (2 · (0.3 / 1.96)²) = 84.1
    with pytest.raises(ValueError, match="sample_sizes: base has 1 seed"):
        sample_sizes(base[:1], variant[:1])


def ranking(rng: random.Random, hit_rate: float) -> dict:
    """A record's ranking (the beam search's, or a retrieval's or fusion's): seeded hits of 300 test
    users at ``hit_rate``, their ranks, and metrics with Recall@10 agreeing with the ranks."""
    ranks = [rng.randrange(10) if rng.random() < hit_rate else -1 for _ in range(300)]
    test = {metric: rng.random() for metric in METRICS} | {"recall@10": sum(rank >= 0 for rank in ranks) / 300}
    return {"valid": test, "test": test, "ranks": {"test": ranks}}


def write_record(records_dir, name: str, seed: int, hit_rate: float, **extra) -> None:
    """A finished run's record with seeded hits of 300 test users at ``hit_rate``, and ``extra`` keys."""
    record = {"run": name, "seed": seed, "minutes": 1.0, **ranking(random.Random(f"{name}-{seed}"), hit_rate), **extra}
    experiment.write_atomic(experiment.record_path(records_dir, name, seed), json.dumps(record))


def test_tables_only_rewrites_the_ablation_tables_from_the_records(tmp_path, monkeypatch, capsys):
    records_dir = tmp_path / "ml-100k" / "cpu-converged"
    records_dir.mkdir(parents=True)
    for seed in range(2):
        for name, hit_rate in (("tiger", 0.1), ("tiger+soda", 0.2), ("tiger+soda weight=0", 0.15)):
            write_record(records_dir, name, seed, hit_rate)
    monkeypatch.setattr(experiment, "train_generative", None)  # calling either would fail the test
    monkeypatch.setattr(experiment, "train_baselines", None)
    arguments = ["ablate", "--preset", "cpu-converged", "--seeds", "3", "--tables-only"]
    monkeypatch.setattr(sys, "argv", ["soda", *arguments, "--results", str(tmp_path), "--out", str(tmp_path / "o")])
    soda_main.main()
    summary = json.loads((tmp_path / "ml-100k-cpu-converged-ablation.json").read_text())
    pairs = [(c["run"], c["base"]) for c in summary["comparisons"]]
    joint, control = "tiger+soda", "tiger+soda weight=0"
    assert pairs == [(joint, "tiger"), (control, "tiger"), (joint, control)]  # joint, control, joint vs control
    assert sorted(summary["rows"]) == [joint, control] and summary["rows"][joint]["seeds"] == [0, 1]
    table = (tmp_path / "ml-100k-cpu-converged-ablation.md").read_text()
    assert capsys.readouterr().out.strip() == table.strip()
    joint_vs_control = summary["comparisons"][2]
    users, both = joint_vs_control["users_bootstrap"], joint_vs_control["hierarchical_bootstrap"]
    cells = f"{experiment.percent(users['low'])} to {experiment.percent(users['high'])} | {users['p_not_better']:.3f}"
    cells += f" | {experiment.percent(both['low'])} to {experiment.percent(both['high'])}"
    assert f"| {joint} | {control} | 2 |" in table and cells in table
    sizes = joint_vs_control["sample_sizes"]
    assert f"| {joint} | {control} | 2 | {experiment.percent(sizes['mean_change'])} |" in table
    assert sorted(path.name for path in records_dir.iterdir()) == sorted(  # no record added or changed
        experiment.record_path(records_dir, name, seed).name for name in ("tiger", joint, control) for seed in (0, 1)
    )


def test_retrieval_and_fusion_are_compared_with_the_beam_search_over_the_seeds_that_have_them(tmp_path):
    runs = experiment.experiment_runs(("tiger",))
    for seed in range(3):
        write_record(tmp_path, "tiger", seed, 0.1)
        # seed 2's record is from before retrieval: the comparison takes seeds 0 and 1
        extra = (
            {}
            if seed == 2
            else {
                "retrieval": ranking(random.Random(f"retrieval-{seed}"), 0.05),
                "fusion": {**ranking(random.Random(f"fusion-{seed}"), 0.3), "weight": (0.03, 1.0)[seed]},
            }
        )
        write_record(tmp_path, "tiger+soda", seed, 0.2, **extra)
    summary = experiment.summarize(runs, tmp_path, 3)
    found = summary["retrieval_and_fusion"]
    assert [(c["run"], c["base"]) for c in found] == [
        ("tiger+soda retrieval", "tiger+soda beam search"),
        ("tiger+soda fusion", "tiger+soda beam search"),
    ]
    beam = experiment.read_records(tmp_path, "tiger+soda", 3)
    beam_hits = torch.stack([experiment.hits(beam[seed]) for seed in (0, 1)])
    for comparison, method in zip(found, ("retrieval", "fusion"), strict=True):
        assert comparison["seeds"] == [0, 1]
        base = [beam[seed]["test"]["recall@10"] for seed in (0, 1)]
        variant = [beam[seed][method]["test"]["recall@10"] for seed in (0, 1)]
        assert comparison["base_recall@10"] == pytest.approx(statistics.fmean(base))
        assert comparison["variant_recall@10"] == pytest.approx(statistics.fmean(variant))
        assert comparison["change_per_seed"] == pytest.approx([v / b - 1 for b, v in zip(base, variant, strict=True)])
        method_hits = torch.stack([experiment.hits(beam[seed][method]) for seed in (0, 1)])
        assert method_hits.mean(1).tolist() == pytest.approx(variant)  # the ranks agree with the metrics
        assert comparison["users_bootstrap"] == paired_bootstrap(beam_hits, method_hits)
        assert comparison["hierarchical_bootstrap"] == hierarchical_bootstrap(beam_hits, method_hits)
    assert found[0]["change"] < 0 < found[1]["change"]  # retrieval hits 5% of users, fusion 30%, the beam 20%
    assert "weight_per_seed" not in found[0] and found[1]["weight_per_seed"] == [0.03, 1.0]
    experiment.write_summary(summary, tmp_path / "table", "toy")
    table = (tmp_path / "table.md").read_text()
    assert "## Retrieval and fusion against the beam search" in table
    fusion_row = "| " + " | ".join(experiment.comparison_cells(found[1])) + " | 0.03, 1 |"
    assert fusion_row in table and "| tiger+soda retrieval | tiger+soda beam search | 2 |" in table
    assert json.loads((tmp_path / "table.json").read_text()) == summary


def test_records_without_retrieval_give_no_retrieval_and_fusion_rows(tmp_path):
    for seed in range(2):
        write_record(tmp_path, "tiger", seed, 0.1)
        write_record(tmp_path, "tiger+soda", seed, 0.2)
    summary = experiment.summarize(experiment.experiment_runs(("tiger",)), tmp_path, 2)
    assert summary["retrieval_and_fusion"] == [] and len(summary["comparisons"]) == 1
    experiment.write_summary(summary, tmp_path / "table", "toy")
    assert "Retrieval and fusion" not in (tmp_path / "table.md").read_text()
