"""The reproduction experiment and the ablation, resumable across sessions.

``experiment``: TIGER without and with SODA (SODA on both sides, on the recommender's side only,
on the tokenizer's side only), MostPop and SASRec, then LETTER and ETEGRec without and with SODA,
over several seeds on one dataset. ``ablate``: TIGER+SODA with one of the paper's open choices
(in-batch mode, symmetric KL, λ, temperature) changed at a time.

Runs go group by group (a backbone's rows, or the baselines), each group seed by seed, so that
the rows that answer the main question, TIGER's, complete first and every base-vs-SODA pair of a
seed lands together. Every finished run leaves a small record,
``results/<dataset>/<preset>/<run>-seed<s>.json`` (its metrics, each test and validation user's
rank of its target, its tokenizer's code statistics, configuration, epochs and minutes), which is
committed with the repository; a run whose record exists is skipped, and a stopped run continues
from its checkpoint under ``--out``. The runs of a seed that need a SASRec (LETTER's CF embeddings,
ETEGRec's tokenizer input) take the baselines' SASRec of that seed, trained once by whichever run
comes first, so a base run and its +SODA run start from the same item embeddings. After each run
the summary tables are rewritten from all records (``table_stem``):

    results/<dataset>[-<preset>].md, .json            experiment: mean ± std over seeds, and each
                                                      SODA row against its base: the change per
                                                      seed and a paired bootstrap over test users
    results/<dataset>[-<preset>]-ablation.md, .json   ablation
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from soda.alignment import RECOMMENDER, TOKENIZER, SODAConfig
from soda.atomic import write_atomic
from soda.metrics import METRICS
from soda.recipes import BACKBONES, RunConfig, train_baselines, train_generative

BASELINES = ("mostpop", "sasrec")
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_K = 10  # the paired bootstrap compares Recall@10


@dataclass(frozen=True)
class Run:
    """One row of a table: a backbone (or "baselines") and its SODA switch, by name."""

    name: str
    backbone: str
    soda: SODAConfig | None = None


def experiment_runs(backbones: tuple[str, ...] = BACKBONES) -> list[Run]:
    """Each backbone without and with SODA (default options; on TIGER also each side alone), the
    baselines after TIGER's rows."""
    runs = []
    for backbone in backbones:
        runs += [Run(backbone, backbone), Run(f"{backbone}+soda", backbone, SODAConfig())]
        if backbone == "tiger":
            sides = (RECOMMENDER, TOKENIZER)
            runs += [Run(f"tiger+soda side={side}", "tiger", SODAConfig(side=side)) for side in sides]
            runs.append(Run("baselines", "baselines"))
    if "tiger" not in backbones:
        runs.insert(0, Run("baselines", "baselines"))
    return runs


def ablation_runs() -> list[Run]:
    """TIGER+SODA at the defaults, then one open choice changed at a time. The default row
    is the experiment's "tiger+soda" run, so the two commands share its records; weight=0
    is the control: the same alternating schedule with no SODA term."""
    default = SODAConfig()
    variants = [(f"in_batch={mode}", replace(default, in_batch=mode)) for mode in ("users", "both", "mean")]
    variants += [("symmetric", replace(default, symmetric=True))]
    variants += [(f"weight={w:g}", replace(default, weight=w)) for w in (0.0, 0.01, 1.0)]
    variants += [(f"temperature={t:g}", replace(default, temperature=t)) for t in (0.5, 2.0)]
    return [Run("tiger+soda", "tiger", default)] + [Run(f"tiger+soda {name}", "tiger", soda) for name, soda in variants]


def table_stem(dataset: str, label: str, ablation: bool = False) -> str:
    """The summary table's file name without suffix: the CPU preset's is the dataset's name."""
    return dataset + ("" if label == "cpu" else f"-{label}") + ("-ablation" if ablation else "")


def run_order(runs: list[Run], seeds: int) -> list[tuple[Run, int]]:
    """Group by group in the order the groups first appear (a group: one backbone's runs, or the
    baselines), each group seed by seed."""
    groups = list(dict.fromkeys(run.backbone for run in runs))
    return [(run, seed) for group in groups for seed in range(seeds) for run in runs if run.backbone == group]


def run_all(
    runs: list[Run],
    table: str,
    dataset: str,
    preset: str,
    config: RunConfig,
    seeds: int,
    out_dir: Path,
    results_dir: Path,
    device: torch.device,
    data_dir: str | None = None,
    only: set[str] | None = None,
) -> dict:
    """Run every (run, seed) without a record in ``run_order``; rewrite the summary after each run;
    return it. With ``only``, train just the runs of those names (the summary keeps every row)."""
    records_dir = results_dir / dataset / preset
    records_dir.mkdir(parents=True, exist_ok=True)
    title = f"{dataset}, preset {preset}"
    for run, seed in run_order(runs, seeds):
        if only is not None and run.name not in only:
            continue
        if all(record_path(records_dir, name, seed).exists() for name in row_names([run])):
            continue
        print(f"== {run.name}, seed {seed}", flush=True)
        run_config = replace(config, soda=run.soda)
        preset_dir = out_dir / dataset / preset
        run_dir = preset_dir / record_path(records_dir, run.name, seed).stem
        common = dict(config=run_config, device=device, seed=seed, resume=True, data_dir=data_dir)
        if run.backbone == "baselines":
            results = train_baselines(dataset, out_dir=run_dir, **common)
        else:  # LETTER's and ETEGRec's SASRec: the baselines' of this seed, one SASRec for them all
            sasrec_dir = preset_dir / record_path(records_dir, "baselines", seed).stem / "sasrec"
            results = {
                run.name: train_generative(run.backbone, dataset, out_dir=run_dir, sasrec_dir=sasrec_dir, **common)
            }
        for name, result in results.items():  # baselines: one record per model
            record = {
                "run": name,
                "seed": seed,
                **{key: result[key] for key in ("minutes", "valid", "test", "best_epoch", "epochs") if key in result},
                **{key: result[key] for key in ("retrieval", "fusion") if key in result},  # SODA runs
                # the tokenizer's code statistics, before and (joint runs) after training
                **{key: result[key] for key in ("tokenizer", "tokenizer_final") if key in result},
                "config": asdict(run_config),
                "ranks": result["ranks"],  # last: the long lists
            }
            write_atomic(record_path(records_dir, name, seed), json.dumps(record, indent=2) + "\n")
        write_summary(summarize(runs, records_dir, seeds), results_dir / table, title)
    summary = summarize(runs, records_dir, seeds)
    write_summary(summary, results_dir / table, title)
    return summary


def record_path(records_dir: Path, name: str, seed: int) -> Path:
    """Where the record of row ``name`` at ``seed`` lives (file-name-safe)."""
    return records_dir / f"{name.replace(' ', '_').replace('=', '-')}-seed{seed}.json"


def row_names(runs: list[Run]) -> list[str]:
    """The table's rows: the baselines run gives two (MostPop, SASRec), every other run one."""
    return [name for run in runs for name in (BASELINES if run.backbone == "baselines" else (run.name,))]


def read_records(records_dir: Path, name: str, seeds: int) -> dict[int, dict]:
    """The records of row ``name`` by seed, for the seeds 0..seeds-1 that have one."""
    paths = {seed: record_path(records_dir, name, seed) for seed in range(seeds)}
    return {seed: json.loads(path.read_text()) for seed, path in paths.items() if path.exists()}


def mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def summarize(runs: list[Run], records_dir: Path, seeds: int) -> dict:
    """Mean and sample std over the recorded seeds of each row's test metrics, validation
    Recall@10, epochs and minutes; and each SODA row against its backbone's base row."""
    rows, records = {}, {}
    for name in row_names(runs):
        records[name] = read_records(records_dir, name, seeds)
        if not records[name]:
            continue
        found = list(records[name].values())
        row = {"seeds": [r["seed"] for r in found]}
        for key in METRICS:
            row[key] = mean_std([r["test"][key] for r in found])
        row["valid recall@10"] = mean_std([r["valid"]["recall@10"] for r in found])
        for key in ("epochs", "best_epoch", "minutes"):
            if all(key in r for r in found):
                row[key] = mean_std([r[key] for r in found])
        rows[name] = row
    comparisons = {}
    for run in runs:
        if run.soda is not None and records[run.name]:
            base = records.get(run.backbone) or read_records(records_dir, run.backbone, seeds)  # ablate: TIGER's
            if base:
                comparisons[run.name] = compare(run.backbone, base, records[run.name])
    return {"seeds": seeds, "rows": rows, "comparisons": comparisons}


def hits(record: dict, k: int = BOOTSTRAP_K) -> torch.Tensor:
    """Each test user's hit at k (1.0 / 0.0) from a record's ranks: (U,) float64."""
    ranks = torch.tensor(record["ranks"]["test"])
    return ((ranks >= 0) & (ranks < k)).double()


def compare(base_name: str, base: dict[int, dict], variant: dict[int, dict]) -> dict:
    """A SODA row against its base over the seeds both have: the test Recall@10 means, the
    relative change of the means and per seed, and (where the records hold each user's rank) a
    paired bootstrap over test users of the relative change of the means."""
    seeds = sorted(set(base) & set(variant))
    if not seeds:
        return {"base": base_name, "seeds": []}
    base_recall = [base[s]["test"]["recall@10"] for s in seeds]
    variant_recall = [variant[s]["test"]["recall@10"] for s in seeds]
    result = {
        "base": base_name,
        "seeds": seeds,
        "base_recall@10": statistics.fmean(base_recall),
        "variant_recall@10": statistics.fmean(variant_recall),
        "change": statistics.fmean(variant_recall) / statistics.fmean(base_recall) - 1,
        "change_per_seed": [v / b - 1 for b, v in zip(base_recall, variant_recall, strict=True)],
    }
    if all("ranks" in records[s] for records in (base, variant) for s in seeds):
        result["bootstrap"] = paired_bootstrap(
            torch.stack([hits(base[s]) for s in seeds]), torch.stack([hits(variant[s]) for s in seeds])
        )
    return result


def paired_bootstrap(base: torch.Tensor, variant: torch.Tensor, resamples: int = BOOTSTRAP_RESAMPLES) -> dict:
    """Paired bootstrap over users of the relative change of a mean metric.

    base, variant (S, U): a per-user metric (e.g. hit@10) of S seeds' runs on the same U test users.
    Each resample draws U users with replacement, the same users for both models and every seed,
    and computes mean(variant) / mean(base) − 1 over the seeds and the drawn users. Returns the
    change on all users, the 2.5% and 97.5% quantiles of the resampled changes ("low", "high") and
    the share of resamples in which the variant is not better ("p_not_better", a one-sided p-value).
    The resampling is seeded: the same records give the same interval.
    """
    users = base.shape[1]
    generator = torch.Generator().manual_seed(0)
    draws = torch.randint(users, (resamples, users), generator=generator)
    counts = torch.zeros(resamples, users, dtype=torch.float64).scatter_add_(
        1, draws, torch.ones(resamples, users, dtype=torch.float64)
    )  # how often each user is drawn, per resample
    base_means, variant_means = counts @ base.double().mean(0), counts @ variant.double().mean(0)
    changes = variant_means / base_means - 1
    low, high = torch.quantile(changes, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return {
        "change": (variant.double().mean() / base.double().mean() - 1).item(),
        "low": low,
        "high": high,
        "p_not_better": (variant_means <= base_means).double().mean().item(),
        "resamples": resamples,
    }


def percent(value: float) -> str:
    return f"{100 * value:+.0f}%"


def write_summary(summary: dict, path: Path, title: str) -> None:
    """``path``.json and ``path``.md: one row per model (mean ± std over seeds), then each SODA row
    against its base."""
    lines = [
        f"# {title}: test metrics, mean ± std over seeds\n",
        "| model | seeds | " + " | ".join(METRICS) + " | valid recall@10 | epochs (best) | minutes |",
        "|---" * (len(METRICS) + 5) + "|",
    ]
    for name, row in summary["rows"].items():
        cells = [f"{row[key]['mean']:.4f} ± {row[key]['std']:.4f}" for key in (*METRICS, "valid recall@10")]
        trained = "epochs" in row and "best_epoch" in row  # records before early stopping have neither
        epochs = f"{row['epochs']['mean']:.1f} ({row['best_epoch']['mean']:.1f})" if trained else "–"
        cells += [epochs, f"{row['minutes']['mean']:.1f}"]
        lines.append(f"| {name} | {len(row['seeds'])}/{summary['seeds']} | " + " | ".join(cells) + " |")
    if summary["comparisons"]:
        lines += [
            "\n## SODA against its base: test Recall@10 over the seeds both have\n",
            "The change is relative (+SODA's mean over the base's mean). The interval and the p-value"
            f" come from a paired bootstrap over the test users ({BOOTSTRAP_RESAMPLES} resamples, the"
            " same users for both runs of every seed); p: the share of resamples in which +SODA is not"
            " better.\n",
            "| run | base | seeds | base R@10 | run R@10 | change of the means | change per seed | 95% interval | p |",
            "|---" * 9 + "|",
        ]
        for name, comparison in summary["comparisons"].items():
            if not comparison["seeds"]:
                continue
            interval, p = "–", "–"
            if "bootstrap" in comparison:
                bootstrap = comparison["bootstrap"]
                interval = f"{percent(bootstrap['low'])} to {percent(bootstrap['high'])}"
                p = f"{bootstrap['p_not_better']:.3f}"
            per_seed = ", ".join(percent(change) for change in comparison["change_per_seed"])
            lines.append(
                f"| {name} | {comparison['base']} | {len(comparison['seeds'])} "
                f"| {comparison['base_recall@10']:.4f} | {comparison['variant_recall@10']:.4f} "
                f"| {percent(comparison['change'])} | {per_seed} | {interval} | {p} |"
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path.with_name(path.name + ".json"), json.dumps(summary, indent=2) + "\n")
    write_atomic(path.with_name(path.name + ".md"), "\n".join(lines) + "\n")
