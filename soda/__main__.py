"""Command line: ``python -m soda {train,baselines,main,experiment,ablate}``.

python -m soda train --dataset ml-100k --backbone tiger|letter|etegrec [--preset tiger|cpu|cpu-converged]
                     [--epochs N] [--seed S] [--device cpu|cuda] [--out DIR] [--resume]
                     [--soda [--soda-weight W] [--soda-temperature T] [--soda-in-batch MODE]
                      [--soda-symmetric] [--soda-side both|recommender|tokenizer]
                      [--soda-backend auto|triton|torch]]
python -m soda baselines --dataset ml-100k [--out DIR]
python -m soda main        # the README's main job: TIGER, MostPop, SASRec on ml-100k, one table
python -m soda experiment --dataset ml-100k --seeds 3 [--preset cpu-converged] [--backbones ...] [--results results]
python -m soda ablate --dataset ml-100k --seeds 1 [--only RUN ...]
torchrun --nproc_per_node N -m soda train ...   # data-parallel on N GPUs (soda/distributed.py)
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from soda import distributed
from soda.alignment import SIDES, SODAConfig
from soda.atomic import write_atomic
from soda.data import KNOWN_DATASETS
from soda.experiment import ablation_runs, experiment_runs, run_all, table_stem
from soda.metrics import METRICS
from soda.recipes import BACKBONES, PRESETS, RunConfig, train_baselines, train_generative


def build_parser() -> argparse.ArgumentParser:
    """The command line's parser: commands train, baselines and main."""
    parser = argparse.ArgumentParser(prog="python -m soda", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a generative recommender")
    train.add_argument("--backbone", default="tiger", choices=BACKBONES)
    soda_defaults = SODAConfig()
    train.add_argument("--soda", action="store_true", help="add SODA's alignment loss, alternating updates")
    train.add_argument("--soda-weight", type=float, default=soda_defaults.weight, help="λ")
    train.add_argument("--soda-temperature", type=float, default=soda_defaults.temperature)
    train.add_argument("--soda-in-batch", default=soda_defaults.in_batch, choices=("items", "users", "both", "mean"))
    train.add_argument("--soda-symmetric", action="store_true", help="score with KL(P||Q) + KL(Q||P)")
    train.add_argument("--soda-side", default=soda_defaults.side, choices=SIDES, help="whose objective the term joins")
    train.add_argument("--soda-backend", default=soda_defaults.backend, choices=("auto", "triton", "torch"))
    baselines = commands.add_parser("baselines", help="MostPop and SASRec")
    main_job = commands.add_parser("main", help="TIGER vs MostPop vs SASRec on ml-100k, on CPU")
    experiment = commands.add_parser("experiment", help="{TIGER, LETTER, ETEGRec} x {base, +SODA} and baselines")
    experiment.add_argument("--backbones", nargs="+", default=list(BACKBONES), choices=BACKBONES)
    ablate = commands.add_parser("ablate", help="TIGER+SODA, one open choice changed at a time")
    for command in (experiment, ablate):
        command.add_argument("--seeds", type=int, default=3, help="seeds 0..SEEDS-1")
        command.add_argument("--results", type=Path, default=Path("results"), help="records and tables")
        command.add_argument("--only", nargs="+", metavar="RUN", help="train only these runs (the table keeps all)")
        command.add_argument("--tables-only", action="store_true", help="train nothing: the tables from the records")
    for command, preset, out in (
        (train, "tiger", "runs/tiger"),
        (baselines, "tiger", "runs/baselines"),
        (main_job, "cpu", "runs/main"),
        (experiment, "cpu", "runs/experiment"),
        (ablate, "cpu", "runs/ablate"),
    ):
        command.add_argument(
            "--dataset",
            default="ml-100k",
            help=f"{' | '.join(KNOWN_DATASETS)} | NAME with --data-dir",
        )
        command.add_argument("--data-dir", default=None, help="directory of RecBole atomic files NAME.inter/.item")
        command.add_argument("--preset", default=preset, choices=sorted(PRESETS))
        command.add_argument("--epochs", type=int, default=None, help="recommender epochs (preset's by default)")
        command.add_argument("--min-interactions", type=int, default=None, help="k-core filter")
        command.add_argument("--seed", type=int, default=0)
        command.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        command.add_argument("--out", type=Path, default=Path(out))
        command.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    return parser


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    runs = None
    if args.command == "experiment":
        runs = experiment_runs(tuple(args.backbones))
    elif args.command == "ablate":
        runs = ablation_runs()
    if runs is not None and (unknown := set(args.only or ()) - {run.name for run in runs}):
        parser.error(f"--only: unknown runs {sorted(unknown)}; runs: {', '.join(run.name for run in runs)}")
    config = configure(args)
    args.out.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out / "config.json", json.dumps(asdict(config), indent=2) + "\n")
    common = dict(
        config=config,
        device=distributed.setup(args.device),  # under torchrun: join the group, cuda -> cuda:LOCAL_RANK
        seed=args.seed,
        resume=args.resume,
        data_dir=args.data_dir,
    )
    start = time.perf_counter()
    if runs is not None:  # experiment or ablate
        label = args.preset + ("" if args.epochs is None else f"-epochs{args.epochs}")  # records of one config
        table_name = table_stem(args.dataset, label, ablation=args.command == "ablate")
        run_all(
            runs,
            table_name,
            args.dataset,
            label,
            config,
            args.seeds,
            args.out,
            args.results,
            common["device"],
            args.data_dir,
            set(args.only) if args.only else None,
            tables_only=args.tables_only,
        )  # every run resumes; --seed and --resume do not apply
        if distributed.is_main():
            print((args.results / f"{table_name}.md").read_text())
        return
    if args.command == "train":
        results = {args.backbone: train_generative(args.backbone, args.dataset, out_dir=args.out, **common)}
        run_dirs = {args.backbone: args.out}
    elif args.command == "baselines":
        results = train_baselines(args.dataset, out_dir=args.out, **common)
        run_dirs = {name: args.out / name for name in results}
    else:
        results = {"tiger": train_generative("tiger", args.dataset, out_dir=args.out / "tiger", **common)}
        results.update(train_baselines(args.dataset, out_dir=args.out, **common))
        run_dirs = {name: args.out / name for name in results}
    minutes = (time.perf_counter() - start) / 60
    if distributed.is_main():
        print(table(results, f"{args.dataset}, test split, seed {args.seed}, {minutes:.1f} min"))
        print(where(run_dirs))


def where(run_dirs: dict[str, Path]) -> str:
    """Where each model's files are: metrics, checkpoints and the plot of its training curves."""
    lines = ["\nfiles (metrics.json: validation and test metrics; best.pt: the checkpoint tested; curves.png):"]
    for name, run_dir in run_dirs.items():
        files = [f.name for f in sorted(run_dir.iterdir()) if f.is_file() and f.suffix in (".json", ".pt", ".png")]
        lines.append(f"  {name}: {run_dir}/  {' '.join(files)}")
    return "\n".join(lines)


def configure(args: argparse.Namespace) -> RunConfig:
    """The preset with the command line's overrides."""
    config = PRESETS[args.preset]
    if args.epochs is not None:
        config = replace(config, train=replace(config.train, epochs=args.epochs))
    if args.min_interactions is not None:
        config = replace(config, min_interactions=args.min_interactions)
    if getattr(args, "soda", False):
        soda = SODAConfig(
            weight=args.soda_weight,
            temperature=args.soda_temperature,
            in_batch=args.soda_in_batch,
            symmetric=args.soda_symmetric,
            side=args.soda_side,
            backend=args.soda_backend,
        )
        config = replace(config, soda=soda)
    return config


def table(results: dict[str, dict], title: str) -> str:
    """A Markdown table of each model's test metrics."""
    lines = [
        f"\n{title}\n",
        "| model | " + " | ".join(METRICS) + " |",
        "|---" * (len(METRICS) + 1) + "|",
    ]
    for name, result in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{result['test'][c]:.4f}" for c in METRICS) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
