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
                                                      SODA row against its base (``compare``)
    results/<dataset>[-<preset>]-ablation.md, .json   ablation: each variant against TIGER, and the
                                                      default TIGER+SODA against each variant

Each comparison gives the relative change of test Recall@10 per seed and of the means over seeds,
two bootstrap intervals (``paired_bootstrap``: over test users only, the seeds fixed;
``hierarchical_bootstrap``: over seeds and, within each, test users, so the training's randomness
counts too), and how many seeds or test users would tell the measured change from zero
(``sample_sizes``). ``run_all(..., tables_only=True)`` rewrites the tables from the records
present without training (``python -m soda experiment|ablate --tables-only``).
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from soda.alignment import RECOMMENDER, TOKENIZER, SODAConfig
from soda.atomic import write_atomic
from soda.metrics import METRICS
from soda.recipes import BACKBONES, RunConfig, train_baselines, train_generative

BASELINES = ("mostpop", "sasrec")
# A SODA run's two other rankings (soda/retrieval.py), each a record's key laid out as its beam search
ALTERNATIVES = ("retrieval", "fusion")
# The committed records and tables (a clone's results/), and the converged experiment's stem
REPOSITORY_RESULTS = Path(__file__).resolve().parents[1] / "results"
CONVERGED_DATASET, CONVERGED_PRESET = "ml-100k", "cpu-converged"
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_K = 10  # the bootstraps compare Recall@10
Z_95 = 1.96  # the standard normal's 97.5% quantile: a two-sided 95% interval is ±1.96 standard errors


@dataclass(frozen=True)
class Run:
    """One row of a table: a backbone (or "baselines") and its SODA switch, by name. A SODA row is
    compared against its backbone's base row and against each row named in ``against``."""

    name: str
    backbone: str
    soda: SODAConfig | None = None
    against: tuple[str, ...] = ()


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
    is the control: the same alternating schedule with no SODA term. Every row is compared
    against TIGER, and the default against each variant (against the control: does the term
    add anything to the schedule?)."""
    default = SODAConfig()
    variants = [(f"in_batch={mode}", replace(default, in_batch=mode)) for mode in ("users", "both", "mean")]
    variants += [("symmetric", replace(default, symmetric=True))]
    variants += [(f"weight={w:g}", replace(default, weight=w)) for w in (0.0, 0.01, 1.0)]
    variants += [(f"temperature={t:g}", replace(default, temperature=t)) for t in (0.5, 2.0)]
    variant_runs = [Run(f"tiger+soda {name}", "tiger", soda) for name, soda in variants]
    return [Run("tiger+soda", "tiger", default, against=tuple(run.name for run in variant_runs))] + variant_runs


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
    tables_only: bool = False,
) -> dict:
    """Run every (run, seed) without a record in ``run_order``; rewrite the summary after each run;
    return it. With ``only``, train just the runs of those names (the summary keeps every row);
    with ``tables_only``, train nothing: the summary of the records present."""
    records_dir = results_dir / dataset / preset
    records_dir.mkdir(parents=True, exist_ok=True)
    title = f"{dataset}, preset {preset}"
    for run, seed in run_order(runs, seeds):
        if tables_only or (only is not None and run.name not in only):
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
                # the tokenizer's code statistics, before and (joint runs) after training
                **{key: result[key] for key in ("tokenizer", "tokenizer_final") if key in result},
                "config": asdict(run_config),
                # last, the long lists: SODA runs' retrieval and fusion (metrics, weight, ranks) and
                # each user's rank under the beam search
                **{key: result[key] for key in ALTERNATIVES if key in result},
                "ranks": result["ranks"],
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
    Recall@10, epochs and minutes; each SODA row against its backbone's base row, then against
    each row of its ``against`` (``compare``; a list, in that order); and the retrieval and fusion
    of every row whose records hold them against the same row's beam search ("retrieval_and_fusion",
    ``alternatives``)."""
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
    pairs = [(run.name, run.backbone) for run in runs if run.soda is not None]
    pairs += [(run.name, other) for run in runs for other in run.against]
    comparisons = []
    for name, base_name in pairs:
        base = records.get(base_name) or read_records(records_dir, base_name, seeds)  # ablate: TIGER's
        if base and records[name]:
            comparisons.append({"run": name, **compare(base_name, base, records[name])})
    return {"seeds": seeds, "rows": rows, "comparisons": comparisons, "retrieval_and_fusion": alternatives(records)}


def alternatives(records: dict[str, dict[int, dict]]) -> list[dict]:
    """For each row (its records by seed) and each of ``ALTERNATIVES`` that some of its records
    hold: that ranking against the row's beam search over the seeds that have it (``compare``; run
    "<row> retrieval" or "<row> fusion", base "<row> beam search"), fusion with the weight that
    validation chose in each of those seeds ("weight_per_seed")."""
    found = []
    for name, by_seed in records.items():
        for method in ALTERNATIVES:
            variant = {seed: record[method] for seed, record in by_seed.items() if method in record}
            if not variant:
                continue
            comparison = {"run": f"{name} {method}", **compare(f"{name} beam search", by_seed, variant)}
            if method == "fusion":
                comparison["weight_per_seed"] = [variant[seed]["weight"] for seed in comparison["seeds"]]
            found.append(comparison)
    return found


def hits(record: dict, k: int = BOOTSTRAP_K) -> torch.Tensor:
    """Each test user's hit at k (1.0 / 0.0) from a record's ranks: (U,) float64."""
    ranks = torch.tensor(record["ranks"]["test"])
    return ((ranks >= 0) & (ranks < k)).double()


def compare(base_name: str, base: dict[int, dict], variant: dict[int, dict]) -> dict:
    """A row against a base row over the seeds both have: the test Recall@10 means, the relative
    change of the means and per seed; where the records hold each user's rank, two bootstraps of the
    change of the means, over test users ("users_bootstrap", ``paired_bootstrap``) and over seeds and
    test users ("hierarchical_bootstrap", ``hierarchical_bootstrap``), and from two seeds on, the
    seeds or test users that would tell the change from zero ("sample_sizes", ``sample_sizes``)."""
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
        base_hits = torch.stack([hits(base[s]) for s in seeds])
        variant_hits = torch.stack([hits(variant[s]) for s in seeds])
        result["users_bootstrap"] = paired_bootstrap(base_hits, variant_hits)
        result["hierarchical_bootstrap"] = hierarchical_bootstrap(base_hits, variant_hits)
        if len(seeds) > 1:
            result["sample_sizes"] = sample_sizes(base_hits, variant_hits)
    return result


def resampled_users(users: int, resamples: int, generator: torch.Generator) -> torch.Tensor:
    """How often each of ``users`` users is drawn when each resample draws ``users`` of them with
    replacement: (resamples, users) float64."""
    draws = torch.randint(users, (resamples, users), generator=generator)
    ones = torch.ones(resamples, users, dtype=torch.float64)
    return torch.zeros(resamples, users, dtype=torch.float64).scatter_add_(1, draws, ones)


def bootstrap_result(change: float, base_sums: torch.Tensor, variant_sums: torch.Tensor) -> dict:
    """The change on all data and, from the resamples' sums of the metric (R,) for the base and the
    variant, the 2.5% and 97.5% quantiles of the resampled relative change ("low", "high") and the
    share of resamples in which the variant is not better ("p_not_better", a one-sided p-value)."""
    changes = variant_sums / base_sums - 1
    low, high = torch.quantile(changes, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return {
        "change": change,
        "low": low,
        "high": high,
        "p_not_better": (variant_sums <= base_sums).double().mean().item(),
        "resamples": len(changes),
    }


def paired_bootstrap(base: torch.Tensor, variant: torch.Tensor, resamples: int = BOOTSTRAP_RESAMPLES) -> dict:
    """Paired bootstrap over users of the relative change of a mean metric, the seeds fixed.

    base, variant (S, U): a per-user metric (e.g. hit@10) of S seeds' runs on the same U test users.
    Each resample draws U users with replacement, the same users for both models and every seed,
    and computes mean(variant) / mean(base) − 1 over the seeds and the drawn users. Returns the
    change on all users, the 2.5% and 97.5% quantiles of the resampled changes ("low", "high") and
    the share of resamples in which the variant is not better ("p_not_better", a one-sided p-value).
    The resampling is seeded: the same records give the same interval. It counts the test users'
    randomness only: the seeds' runs are taken as they are.
    """
    base, variant = base.double(), variant.double()
    counts = resampled_users(base.shape[1], resamples, torch.Generator().manual_seed(0))  # (R, U)
    change = (variant.mean() / base.mean() - 1).item()
    return bootstrap_result(change, base_sums=counts @ base.mean(0), variant_sums=counts @ variant.mean(0))


def hierarchical_bootstrap(base: torch.Tensor, variant: torch.Tensor, resamples: int = BOOTSTRAP_RESAMPLES) -> dict:
    """Hierarchical paired bootstrap over seeds, then test users, of the relative change of a mean
    metric: an interval that counts both the training's randomness and the test users'.

    base, variant (S, U): a per-user metric (e.g. hit@10) of S seeds' runs on the same U test users;
    base[s] and variant[s] were trained with seed s (paired by seed). Each resample draws S seeds
    with replacement, a seed drawn twice counting twice; then, for each drawn seed afresh, U users
    with replacement, the same users for that seed's base and variant; and computes
    mean(variant) / mean(base) − 1 over every drawn seed's drawn users. Returns what
    ``paired_bootstrap`` returns (the change on all data, "low", "high", "p_not_better"); seeded.

    With one seed it is a users-only bootstrap. Here every seed is tested on the same users; drawing
    them afresh per seed counts a user's seed-to-seed noise twice (in the seeds' spread and in the
    users' draw, so the interval errs wide) and the part of a user's effect common to every seed
    only once per seed (so it errs narrow where the variant wins the same users in every seed; on
    ml-100k that part is small, 2-5% of the per-user variance of the paired difference). With few
    seeds it errs narrow too: it draws from the S seeds seen (10 distinct draws of 3 seeds; the
    drawn means' variance (S − 1)/S of the seeds' own, with normal rather than t quantiles).
    """
    base, variant = base.double(), variant.double()
    seeds, users = base.shape
    generator = torch.Generator().manual_seed(0)
    seed_draws = torch.randint(seeds, (resamples, seeds), generator=generator)
    base_sums = torch.zeros(resamples, dtype=torch.float64)
    variant_sums = torch.zeros(resamples, dtype=torch.float64)
    for slot in range(seeds):  # one drawn seed of every resample at a time: (R, U) at most
        counts = resampled_users(users, resamples, generator)
        sums = counts @ torch.cat([base, variant]).T  # (R, 2S): the drawn users' sums in every run
        drawn = seed_draws[:, slot : slot + 1]
        base_sums += sums[:, :seeds].gather(1, drawn).squeeze(1)
        variant_sums += sums[:, seeds:].gather(1, drawn).squeeze(1)
    change = (variant.mean() / base.mean() - 1).item()
    return bootstrap_result(change, base_sums=base_sums, variant_sums=variant_sums)


def sample_sizes(base: torch.Tensor, variant: torch.Tensor) -> dict:
    """How many seeds, or test users per seed, would make the 95% interval of the mean change
    exclude zero if the true change were the measured one: a rough normal approximation.

    base, variant (S, U): a per-user metric (e.g. hit@10) of S ≥ 2 seeds' runs on U test users.
    Seed s changes the mean by c_s = mean(variant[s]) / mean(base[s]) − 1; m and sd are the mean and
    the sample standard deviation of c over the seeds. Over n seeds the mean change's interval is
    m ± 1.96·sd/√n, which excludes zero from n = (1.96·sd/m)² seeds ("seeds_needed").

    sd² splits into what the users' noise explains and a seed-level rest: within seed s, drawing U
    users gives c_s the variance var_u(variant[s, u] − (1 + c_s)·base[s, u]) / (U·mean(base[s])²)
    (delta method), σ²_users / U with σ²_users averaged over the seeds; σ²_training =
    max(sd² − σ²_users / U, 0) is the rest, a seed's change common to all its users, which more
    users do not average out. With n seeds of U' users each the mean change has the variance
    (σ²_training + σ²_users / U') / n, so at the S seeds measured the interval excludes zero from
    U' = σ²_users / (S·(m / 1.96)² − σ²_training) users per seed ("users_needed"); None where no
    number of users suffices (the seed-level spread alone is too wide at S seeds).

    At these sizes the interval excludes zero about half the time (the estimate falls on either
    side of the true change); 80% power takes about twice as many ((1.96 + 0.84)² / 1.96² ≈ 2.0).
    From a few seeds sd is itself rough. Returns the sizes, m ("mean_change"), sd ("sd_change") and
    its two parts as standard deviations of one seed's change ("sd_users", "sd_training").
    """
    seeds, users = base.shape
    if seeds < 2:
        raise ValueError(f"sample_sizes: base has {seeds} seed(s); the spread over seeds needs at least 2")
    base, variant = base.double(), variant.double()
    base_means = base.mean(1)
    changes = variant.mean(1) / base_means - 1  # (S,)
    mean, variance = changes.mean().item(), changes.var().item()
    users_variance = ((variant - (1 + changes[:, None]) * base).var(1) / base_means**2).mean().item()
    training_variance = max(variance - users_variance / users, 0.0)
    margin = seeds * (mean / Z_95) ** 2 - training_variance
    return {
        "mean_change": mean,
        "sd_change": math.sqrt(variance),
        "sd_users": math.sqrt(users_variance / users),
        "sd_training": math.sqrt(training_variance),
        "seeds_needed": max(1, math.ceil((Z_95 * math.sqrt(variance) / mean) ** 2)) if mean != 0 else None,
        "test_users": users,
        "users_needed": math.ceil(users_variance / margin) if margin > 0 else None,
    }


def percent(value: float) -> str:
    return f"{100 * value:+.0f}%"


def interval(bootstrap: dict) -> list[str]:
    """A bootstrap's table cells: its 95% interval and its p."""
    return [f"{percent(bootstrap['low'])} to {percent(bootstrap['high'])}", f"{bootstrap['p_not_better']:.3f}"]


COMPARISON_HEADER = (
    "| run | base | seeds | base R@10 | run R@10 | change of the means | change per seed "
    "| 95% interval, users | p, users | 95% interval, seeds and users | p, seeds and users"
)


def comparison_cells(comparison: dict) -> list[str]:
    """A comparison's (``compare``) table cells under ``COMPARISON_HEADER``."""
    cells = [comparison["run"], comparison["base"], str(len(comparison["seeds"]))]
    cells += [f"{comparison['base_recall@10']:.4f}", f"{comparison['variant_recall@10']:.4f}"]
    cells += [percent(comparison["change"]), ", ".join(map(percent, comparison["change_per_seed"]))]
    for key in ("users_bootstrap", "hierarchical_bootstrap"):
        cells += interval(comparison[key]) if key in comparison else ["–", "–"]
    return cells


def seed_list(seeds: list[int]) -> str:
    """How many seeds and which, runs of consecutive seeds joined: [0, 1, 2, 4] -> "4 (0-2, 4)"."""
    spans, ordered = [], sorted(seeds)
    for seed in ordered:
        if spans and seed == spans[-1][1] + 1:
            spans[-1][1] = seed
        else:
            spans.append([seed, seed])
    return f"{len(ordered)} (" + ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans) + ")"


def write_summary(summary: dict, path: Path, title: str) -> None:
    """``path``.json and ``path``.md: one row per model (mean ± std over seeds), then each comparison
    (a row against a base row) with both bootstrap intervals, then each SODA row's retrieval and
    fusion against its beam search, then the sample sizes that would tell each change from zero."""
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
        lines.append(f"| {name} | {seed_list(row['seeds'])} | " + " | ".join(cells) + " |")
    comparisons = [comparison for comparison in summary["comparisons"] if comparison["seeds"]]
    if comparisons:
        lines += [
            "\n## Each run against its base: test Recall@10 over the seeds both have\n",
            "The change is relative (the run's mean over the base's mean). Two paired bootstraps"
            f" ({BOOTSTRAP_RESAMPLES} resamples each) give a 95% interval of it and p, the share of"
            " resamples in which the run is not better than its base: over the test users only (the"
            " same users for both runs of every seed; the seeds as they are), and hierarchical (the"
            " seeds drawn with replacement, then within each drawn seed the test users, the same for"
            " both runs of that seed), which counts the training's randomness too. With few seeds the"
            " latter errs narrow (it draws only from the seeds seen, with normal quantiles).\n",
            COMPARISON_HEADER + " |",
            "|---" * 11 + "|",
        ]
        for comparison in comparisons:
            lines.append("| " + " | ".join(comparison_cells(comparison)) + " |")
    if summary["retrieval_and_fusion"]:
        lines += [
            "\n## Retrieval and fusion against the beam search: test Recall@10 over the seeds that have them\n",
            "A SODA run ranks the test users' targets twice more (soda/retrieval.py): retrieval, the"
            " top 10 of the whole catalogue by SODA's score from the run's user head; fusion, the beam"
            " search's candidates re-ranked by log p + w·score, w chosen per seed on validation"
            " Recall@10. Each against the same run's beam search, same seeds and users, with the same"
            " two paired bootstraps (over the test users only; over seeds, then test users). A run whose"
            " term has weight 0 (the control) never trains its user head: its retrieval is that of an"
            " untrained head, a floor.\n",
            COMPARISON_HEADER + " | fusion weight per seed |",
            "|---" * 12 + "|",
        ]
        for comparison in summary["retrieval_and_fusion"]:
            weights = ", ".join(f"{weight:g}" for weight in comparison.get("weight_per_seed", ())) or "–"
            lines.append("| " + " | ".join([*comparison_cells(comparison), weights]) + " |")
    sized = [comparison for comparison in comparisons if "sample_sizes" in comparison]
    if sized:
        lines += [
            "\n## How many seeds or test users would tell each change from zero\n",
            "A rough normal approximation, if the true change were the mean of the per-seed changes:"
            " the 95% interval of the mean over n seeds excludes zero from n ≈ (1.96·sd/mean)² seeds,"
            " sd the per-seed changes' standard deviation. sd² splits into what the test users' noise"
            " explains (a seed's change drawn over its users, delta method; more users shrink it) and a"
            " seed-level rest (more users do not); at the seeds measured, the interval excludes zero"
            " from the users per seed shown (–: no number suffices, the seed-level spread alone is too"
            " wide). At these sizes the interval"
            " excludes zero about half the time; 80% power takes about twice as many. From few seeds"
            " the sd is itself rough.\n",
            "| run | base | seeds | mean change per seed | sd over seeds | sd, users' noise "
            "| sd, seed-level | seeds needed | test users per seed needed (now) |",
            "|---" * 9 + "|",
        ]
        for comparison in sized:
            sizes = comparison["sample_sizes"]
            cells = [comparison["run"], comparison["base"], str(len(comparison["seeds"]))]
            cells += [percent(sizes["mean_change"])]
            cells += [f"{100 * sizes[key]:.1f}%" for key in ("sd_change", "sd_users", "sd_training")]
            cells += ["–" if sizes["seeds_needed"] is None else str(sizes["seeds_needed"])]
            users_needed = "–" if sizes["users_needed"] is None else str(sizes["users_needed"])
            cells += [f"{users_needed} ({sizes['test_users']})"]
            lines.append("| " + " | ".join(cells) + " |")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path.with_name(path.name + ".json"), json.dumps(summary, indent=2) + "\n")
    write_atomic(path.with_name(path.name + ".md"), "\n".join(lines) + "\n")


def converged_verdict(results_dir: Path = REPOSITORY_RESULTS) -> list[str]:
    """Two lines on what the converged experiment on ml-100k found, from the committed records under
    ``results_dir`` (those of results/<stem>.md and <stem>-ablation.md): TIGER+SODA against TIGER,
    and against its control (the same alternation without SODA's term, ``tiger+soda weight=0``),
    each change with both paired bootstraps' 95% intervals (``compare``: over the test users; over
    seeds, then test users) and whether the term's share is told from zero (``told_from_zero``); the
    main job prints them beside its short run's table."""
    stem = table_stem(CONVERGED_DATASET, CONVERGED_PRESET)
    records_dir = results_dir / CONVERGED_DATASET / CONVERGED_PRESET
    seeds = sorted(int(path.stem.rpartition("seed")[2]) for path in records_dir.glob("tiger-seed*.json"))
    records = {
        name: read_records(records_dir, name, max(seeds, default=-1) + 1)
        for name in ("tiger", "tiger+soda", "tiger+soda weight=0")
    }
    if not all(records.values()):
        return [f"(the converged experiment, results/{stem}.md and {stem}-ablation.md, is in a clone's results/)"]
    soda = compare("tiger", records["tiger"], records["tiger+soda"])
    control = compare("tiger", records["tiger"], records["tiger+soda weight=0"])
    over_control = compare("tiger+soda weight=0", records["tiger+soda weight=0"], records["tiger+soda"])

    def change(comparison: dict) -> str:
        users, both = (interval(comparison[key])[0] for key in ("users_bootstrap", "hierarchical_bootstrap"))
        return f"{percent(comparison['change'])} (95% {users} over the test users, {both} over seeds and users)"

    told = told_from_zero(over_control["users_bootstrap"], over_control["hierarchical_bootstrap"])
    return [
        f"The verdict is not this short run's but the converged experiment's ({len(soda['seeds'])} seeds, "
        f"results/{stem}.md): tiger+soda Recall@10 {soda['variant_recall@10']:.4f} against tiger "
        f"{soda['base_recall@10']:.4f}, {change(soda)}.",
        f"Its control, the same alternation without SODA's term (tiger+soda weight=0, results/{stem}-ablation.md,"
        f" {len(control['seeds'])} seeds): {control['variant_recall@10']:.4f}, {change(control)} on tiger; "
        f"tiger+soda on it {change(over_control)}: the term's own share {told}.",
    ]


def told_from_zero(users: dict, both: dict) -> str:
    """Whether a change is told from zero by its two 95% intervals (``low``, ``high``): over the
    test users only, and over seeds and users (which counts the training's randomness too)."""
    for side, outside in (("above", lambda b: b["low"] > 0), ("below", lambda b: b["high"] < 0)):
        if outside(both):
            return f"{side} zero, the training's randomness counted"
        if outside(users):
            return f"{side} zero over the test users, not told from zero once the seeds' spread is counted"
    return "not told from zero"
