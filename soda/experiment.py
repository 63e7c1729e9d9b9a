"""The reproduction experiment and the ablation, resumable across sessions.

``experiment``: {TIGER, LETTER, ETEGRec} x {base, +SODA}, plus MostPop and SASRec, over
several seeds on one dataset. ``ablate``: TIGER+SODA with one of the paper's open choices
(in-batch mode, symmetric KL, λ, temperature) changed at a time.

Every finished run leaves a small record, ``results/<dataset>/<preset>/<run>-seed<s>.json``
(its metrics, its tokenizer's code statistics, configuration and minutes), which is
committed with the repository; a run whose record exists is skipped, and a stopped run
continues from its checkpoint under ``--out``. After each run the summary tables are
rewritten from all records:

    results/<dataset>.md, .json            experiment: mean ± std over seeds of the test metrics
    results/<dataset>-ablation.md, .json   ablation
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from soda.alignment import SODAConfig
from soda.metrics import METRICS
from soda.train import BACKBONES, RunConfig, train_baselines, train_generative, write_text_atomic

BASELINES = ("mostpop", "sasrec")


@dataclass(frozen=True)
class Run:
    """One row of a table: a backbone (or "baselines") and its SODA switch, by name."""

    name: str
    backbone: str
    soda: SODAConfig | None = None


def experiment_runs(backbones: tuple[str, ...] = BACKBONES) -> list[Run]:
    """The baselines, then each backbone without and with SODA (default options)."""
    runs = [Run("baselines", "baselines")]
    for backbone in backbones:
        runs += [Run(backbone, backbone), Run(f"{backbone}+soda", backbone, SODAConfig())]
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
    """Run every (run, seed) without a record, seed-major so that each seed completes in turn;
    rewrite the summary after each run; return it. With ``only``, train just the runs of those
    names (the summary keeps every row)."""
    records_dir = results_dir / dataset / preset
    records_dir.mkdir(parents=True, exist_ok=True)
    for seed in range(seeds):
        for run in runs:
            if only is not None and run.name not in only:
                continue
            if all(record_path(records_dir, name, seed).exists() for name in row_names([run])):
                continue
            print(f"== {run.name}, seed {seed}", flush=True)
            start = time.perf_counter()
            run_config = replace(config, soda=run.soda)
            run_dir = out_dir / dataset / preset / record_path(records_dir, run.name, seed).stem
            common = dict(config=run_config, device=device, seed=seed, resume=True, data_dir=data_dir)
            if run.backbone == "baselines":
                results = train_baselines(dataset, out_dir=run_dir, **common)
            else:
                results = {run.name: train_generative(run.backbone, dataset, out_dir=run_dir, **common)}
            minutes = (time.perf_counter() - start) / 60
            for name, result in results.items():  # baselines: one record per model
                record = {
                    "run": name,
                    "seed": seed,
                    "minutes": minutes / len(results),
                    "valid": result["valid"],
                    "test": result["test"],
                    # the tokenizer's code statistics, before and (joint runs) after training
                    **{key: result[key] for key in ("tokenizer", "tokenizer_final") if key in result},
                    "config": asdict(run_config),
                }
                write_text_atomic(record_path(records_dir, name, seed), json.dumps(record, indent=2))
            write_summary(summarize(runs, records_dir, seeds), results_dir / table, f"{dataset}, preset {preset}")
    summary = summarize(runs, records_dir, seeds)
    write_summary(summary, results_dir / table, f"{dataset}, preset {preset}")
    return summary


def record_path(records_dir: Path, name: str, seed: int) -> Path:
    """Where the record of row ``name`` at ``seed`` lives (file-name-safe)."""
    return records_dir / f"{name.replace(' ', '_').replace('=', '-')}-seed{seed}.json"


def row_names(runs: list[Run]) -> list[str]:
    """The table's rows: the baselines run gives two (MostPop, SASRec), every other run one."""
    return [name for run in runs for name in (BASELINES if run.backbone == "baselines" else (run.name,))]


def summarize(runs: list[Run], records_dir: Path, seeds: int) -> dict:
    """Mean and sample std over the recorded seeds of each row's test metrics and minutes."""
    rows = {}
    for name in row_names(runs):
        paths = [record_path(records_dir, name, seed) for seed in range(seeds)]
        records = [json.loads(path.read_text()) for path in paths if path.exists()]
        if not records:
            continue
        row = {"seeds": [r["seed"] for r in records]}
        for key in (*METRICS, "minutes"):
            values = [r["minutes"] if key == "minutes" else r["test"][key] for r in records]
            row[key] = {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}
        rows[name] = row
    return {"seeds": seeds, "rows": rows}


def write_summary(summary: dict, path: Path, title: str) -> None:
    """``path``.json and ``path``.md: one row per model, mean ± std over seeds."""
    lines = [
        f"# {title}: test metrics, mean ± std over seeds\n",
        "| model | seeds | " + " | ".join(METRICS) + " | minutes |",
        "|---" * (len(METRICS) + 3) + "|",
    ]
    for name, row in summary["rows"].items():
        cells = [f"{row[key]['mean']:.4f} ± {row[key]['std']:.4f}" for key in METRICS]
        cells.append(f"{row['minutes']['mean']:.1f}")
        lines.append(f"| {name} | {len(row['seeds'])}/{summary['seeds']} | " + " | ".join(cells) + " |")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path.with_name(path.name + ".json"), json.dumps(summary, indent=2))
    write_text_atomic(path.with_name(path.name + ".md"), "\n".join(lines))
