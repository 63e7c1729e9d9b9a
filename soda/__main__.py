"""Command line: ``python -m soda {train,baselines,main,experiment,ablate}``.

python -m soda train --dataset ml-100k --backbone tiger|letter|etegrec [--preset tiger|gpu|cpu|cpu-converged]
                     [--epochs N] [--rqvae-epochs N] [--seed S] [--device cpu|cuda] [--out DIR] [--resume]
                     [--soda [--soda-weight W] [--soda-temperature T] [--soda-in-batch MODE]
                      [--soda-symmetric] [--soda-side both|recommender|tokenizer]
                      [--soda-backend auto|triton|torch]]
python -m soda baselines --dataset ml-100k [--out DIR]
python -m soda main        # the README's main job: TIGER, TIGER+SODA, MostPop, SASRec on ml-100k, one table
python -m soda experiment --dataset ml-100k --seeds 3 [--preset cpu-converged] [--backbones ...] [--results results]
python -m soda ablate --dataset ml-100k --seeds 1 [--only RUN ...]
torchrun --nproc_per_node N -m soda train ...   # data-parallel on N GPUs (soda/distributed.py)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from typing import TextIO

import torch

from soda import distributed
from soda.alignment import SIDES, SODAConfig
from soda.atomic import write_atomic
from soda.data import KNOWN_DATASETS, require_dataset
from soda.embeddings import require_encoder
from soda.experiment import ablation_runs, converged_verdict, experiment_runs, run_all, table_stem
from soda.extras import MissingPackage
from soda.metrics import METRICS
from soda.recipes import BACKBONES, PRESETS, RunConfig, train_baselines, train_generative
from soda.train import require_plotting


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Help that shows each option's default, where it has one (not None, not a flag's False)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The command line's parser: commands train, baselines, main, experiment and ablate."""
    parser = argparse.ArgumentParser(
        prog="python -m soda", description=__doc__.split("\n")[0], formatter_class=HelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)

    def add_command(name: str, help: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=help, description=help, formatter_class=HelpFormatter)

    train = add_command("train", "train a generative recommender")
    train.add_argument("--backbone", default="tiger", choices=BACKBONES, help="the generative recommender")
    soda_defaults = SODAConfig()
    train.add_argument("--soda", action="store_true", help="add SODA's alignment loss, alternating updates")
    train.add_argument("--soda-weight", type=float, default=soda_defaults.weight, help="λ")
    train.add_argument("--soda-temperature", type=float, default=soda_defaults.temperature, help="τ")
    train.add_argument(
        "--soda-in-batch", default=soda_defaults.in_batch, choices=("items", "users", "both", "mean"), help="negatives"
    )
    train.add_argument("--soda-symmetric", action="store_true", help="score with KL(P||Q) + KL(Q||P)")
    train.add_argument("--soda-side", default=soda_defaults.side, choices=SIDES, help="whose objective the term joins")
    train.add_argument(
        "--soda-backend", default=soda_defaults.backend, choices=("auto", "triton", "torch"), help="soda_kernels'"
    )
    baselines = add_command("baselines", "MostPop and SASRec")
    main_job = add_command(
        "main", "the main job: TIGER, TIGER+SODA, MostPop and SASRec on one split, one table, the converged verdict"
    )
    experiment = add_command("experiment", "{TIGER, LETTER, ETEGRec} x {base, +SODA} and baselines")
    experiment.add_argument("--backbones", nargs="+", default=list(BACKBONES), choices=BACKBONES, help="whose rows")
    ablate = add_command("ablate", "TIGER+SODA, one open choice changed at a time")
    for command in (experiment, ablate):
        command.add_argument("--seeds", type=int, default=3, help="seeds 0..SEEDS-1")
        command.add_argument("--results", type=Path, default=Path("results"), help="records and tables")
        command.add_argument("--only", nargs="+", metavar="RUN", help="train only these runs (the table keeps all)")
        command.add_argument("--tables-only", action="store_true", help="train nothing: the tables from the records")
    rqvae_epochs = ", ".join(f"{name} {preset.tokenizer.epochs}" for name, preset in sorted(PRESETS.items()))
    for command, preset, out in (
        (train, "tiger", "runs/tiger"),
        (baselines, "tiger", "runs/baselines"),
        (main_job, None, "runs/main"),
        (experiment, "cpu", "runs/experiment"),
        (ablate, "cpu", "runs/ablate"),
    ):
        command.add_argument(
            "--dataset",
            default="ml-100k",
            help=f"{' | '.join(KNOWN_DATASETS)} | NAME with --data-dir",
        )
        command.add_argument("--data-dir", default=None, help="directory of RecBole atomic files NAME.inter/.item")
        command.add_argument(
            "--preset",
            default=preset,
            choices=sorted(PRESETS),
            help="sizes and budgets (soda/recipes.py)" + ("" if preset else "; default: gpu on CUDA, cpu otherwise"),
        )
        command.add_argument(
            "--epochs",
            type=int,
            default=None,
            help="recommender epochs (default: the preset's); the RQ-VAE pre-training keeps its own: --rqvae-epochs",
        )
        command.add_argument(
            "--rqvae-epochs",
            type=int,
            default=None,
            help=f"RQ-VAE pre-training epochs, before the recommender (default: the preset's: {rqvae_epochs})",
        )
        command.add_argument("--min-interactions", type=int, default=None, help="k-core filter (default: none)")
        command.add_argument("--seed", type=int, default=0, help="seed of the initialisation and the batch order")
        command.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
        command.add_argument("--out", type=Path, default=Path(out), help="where the runs write")
        command.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    return parser


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    if args.preset is None:  # the main job: the GPU sizes on CUDA
        args.preset = "gpu" if args.device.startswith("cuda") else "cpu"
    try:
        run(parser, args)
    except MissingPackage as error:  # one line, no traceback
        sys.exit(f"python -m soda {args.command}: {error}")


def run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Run the parsed command; a missing package is found before anything is written."""
    runs = None
    if args.command == "experiment":
        runs = experiment_runs(tuple(args.backbones))
    elif args.command == "ablate":
        runs = ablation_runs()
    if runs is not None and (unknown := set(args.only or ()) - {run.name for run in runs}):
        parser.error(f"--only: unknown runs {sorted(unknown)}; runs: {', '.join(run.name for run in runs)}")
    config = configure(args)
    require_packages(args)
    args.out.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out / "config.json", json.dumps(asdict(config), indent=2) + "\n")
    device = distributed.setup(args.device)  # under torchrun: join the group, cuda -> cuda:LOCAL_RANK
    common = dict(config=config, device=device, seed=args.seed, resume=args.resume, data_dir=args.data_dir)
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
            device,
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
        with logged_to(args.out / "log.txt" if distributed.is_main() else None):
            main_job(args, common, start)
        return
    if distributed.is_main():
        minutes = (time.perf_counter() - start) / 60
        print(table(results, f"{args.dataset}, test split, seed {args.seed}, {minutes:.1f} min"))
        print(where(run_dirs))


def main_job(args: argparse.Namespace, common: dict, start: float) -> None:
    """TIGER, TIGER + SODA (the joint run: alternating updates, SODA's default options), MostPop and
    SASRec on one split, each in args.out/<name>; one table, on ml-100k the converged verdict
    beside it, and where each model's files are."""
    config = common.pop("config")
    results = {}
    for name, soda in (("tiger", None), ("tiger+soda", SODAConfig())):
        run_config = replace(config, soda=soda)
        results[name] = train_generative("tiger", args.dataset, config=run_config, out_dir=args.out / name, **common)
    results.update(train_baselines(args.dataset, config=config, out_dir=args.out, **common))
    if distributed.is_main():
        minutes = (time.perf_counter() - start) / 60
        title = f"{args.dataset}, test split, seed {args.seed}, preset {args.preset}, {minutes:.1f} min"
        print(table(results, title))
        if args.dataset == "ml-100k" and args.data_dir is None:
            print("\n" + "\n".join(converged_verdict()))
        print(where({name: args.out / name for name in results}))


def require_packages(args: argparse.Namespace) -> None:
    """Raise ``MissingPackage`` for the first optional package the command needs that is missing
    (none for --tables-only, which trains nothing)."""
    if getattr(args, "tables_only", False):
        return
    require_dataset(args.dataset, args.data_dir)
    require_plotting()
    if args.command != "baselines":
        require_encoder()


class Tee:
    """A text stream that writes to ``stream`` and to ``log``; not a terminal, so that progress
    comes as plain lines (soda.progress) in both."""

    def __init__(self, stream: TextIO, log: TextIO):
        self.stream, self.log = stream, log

    def write(self, text: str) -> int:
        self.log.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.log.flush()
        self.stream.flush()

    def isatty(self) -> bool:
        return False

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


@contextmanager
def logged_to(path: Path | None) -> Iterator[None]:
    """Within the block, what this process prints on stdout and stderr goes to ``path`` too
    (appended; a resumed run continues the log); nothing changes when ``path`` is None."""
    if path is None:
        yield
        return
    streams = sys.stdout, sys.stderr
    with path.open("a", buffering=1) as log:
        sys.stdout, sys.stderr = Tee(streams[0], log), Tee(streams[1], log)
        try:
            yield
        finally:
            sys.stdout, sys.stderr = streams


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
    if args.rqvae_epochs is not None:
        config = replace(config, tokenizer=replace(config.tokenizer, epochs=args.rqvae_epochs))
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
    """A Markdown table of each model's test metrics; a SODA run's retrieval by its score and fusion
    with the beam (result["retrieval"], result["fusion"], where present) as rows of their own."""
    lines = [
        f"\n{title}\n",
        "| model | " + " | ".join(METRICS) + " |",
        "|---" * (len(METRICS) + 1) + "|",
    ]
    for name, result in results.items():
        rows = [(name, result["test"])]
        rows += [(f"{name} {kind}", result[kind]["test"]) for kind in ("retrieval", "fusion") if kind in result]
        lines += [f"| {row} | " + " | ".join(f"{metrics[c]:.4f}" for c in METRICS) + " |" for row, metrics in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
