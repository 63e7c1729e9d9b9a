"""The training loop: one for every trained recommender (TIGER, SASRec, the joint models).

``fit`` trains a ``Trainable`` with AdamW (linear warm-up, cosine decay), evaluates on validation
every ``eval_every`` epochs, keeps the best checkpoint by validation Recall@10 (written
atomically), stops early after ``patience`` evaluations without a better one, can resume a
stopped run from ``last.pt``, tests the best checkpoint, and writes ``metrics.json`` (with each
user's rank of its target, for paired comparisons) and ``curves.png``. The run recipes that build
the models and call it are in ``soda.recipes``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from time import perf_counter
from typing import Protocol

import torch
import torch.nn as nn

from soda import distributed
from soda.atomic import save_atomic, write_atomic
from soda.data import Examples, Split
from soda.extras import require
from soda.metrics import KS, METRICS, ranking_metrics, target_ranks
from soda.progress import Progress

SELECTION_METRIC = "recall@10"


class Recommender(Protocol):
    """What ``evaluate`` ranks with (MostPop, and every ``Trainable``); an ``nn.Module``."""

    def recommend(self, histories: torch.Tensor, k: int) -> torch.Tensor:
        """Histories (B, T) of item ids, 0 = padding -> the top k items (B, k), best first."""
        ...


class Trainable(Recommender, Protocol):
    """What ``fit`` trains (TIGER, SASRec, ``soda.alignment.JointModel``); an ``nn.Module``."""

    def loss(self, histories: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Histories (B, T), each row's next item (B,) -> the scalar training loss."""
        ...

    def param_groups(self) -> list[dict]:
        """AdamW's parameter groups; a group's "peak_lr" replaces ``TrainConfig.lr`` for it."""
        ...

    def start_epoch(self, epoch: int) -> None:
        """Called before training epoch ``epoch`` (0-based): a joint model's alternation."""
        ...


@dataclass
class TrainConfig:
    """Recommender training. TIGER trains with batch 256 (Rajput et al. 2023); the optimiser
    (AdamW with warm-up and cosine decay to 0 at ``epochs``), the number of epochs and the
    early stopping are ours."""

    epochs: int = 200  # the most; early stopping may end the run sooner
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 500
    grad_clip: float = 1.0
    eval_every: int = 1
    eval_batch_size: int = 256
    # Stop after this many evaluations without a better validation Recall@10 (None: never), counting
    # only those after epoch ``min_epochs``: the runs one table compares get the same floor, and a
    # joint model's alternation (which may lower validation for a while) never ends a run.
    patience: int | None = None
    min_epochs: int = 0
    log_every: int = 50  # steps between reading the loss back to the host for the progress display


def fit(
    model: Trainable,
    split: Split,
    config: TrainConfig,
    out_dir: Path,
    device: torch.device,
    resume: bool = False,
    seed: int = 0,
    extra_curves: dict[str, list[float]] | None = None,
) -> dict:
    """Train on split.train, select by validation Recall@10, return and write the metrics:
    {"valid", "test": metrics of the best checkpoint, "ranks": {"valid", "test": each user's rank
    of its target, −1 outside the top 10}, "best_epoch", "epochs": the epochs trained, "minutes":
    their training and validation, summed over every process that trained them (resumes)}.

    Early stopping counts only the evaluations after epoch ``config.min_epochs``.
    Writes ``out_dir/{best.pt, last.pt, metrics.json, curves.png}``; with ``resume`` it
    continues from ``last.pt`` where one exists. Under torchrun it trains data-parallel, each
    global batch split across the ranks, rank 0 evaluating and writing (soda/distributed.py).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    model.to(device)
    distributed.broadcast_module(model)  # every rank starts from rank 0's model
    optimizer = torch.optim.AdamW(model.param_groups(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(split.train) / config.batch_size)
    total_steps = config.epochs * steps_per_epoch
    state = {
        "epoch": 0,
        "train_loss": [],
        "valid": [],
        "best": {"epoch": 0, SELECTION_METRIC: -1.0},
        "seconds": 0.0,
    }
    if resume and (out_dir / "last.pt").exists():
        checkpoint = torch.load(out_dir / "last.pt", map_location=device)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        state = {"seconds": 0.0, **checkpoint["state"]}  # checkpoints from before timing: from here on
        print(f"resuming {out_dir} after epoch {state['epoch']}")

    for epoch in range(state["epoch"], config.epochs):
        if patience_exhausted(state, config.patience, config.min_epochs):
            if distributed.is_main():
                print(
                    f"early stop after epoch {epoch}: best validation {SELECTION_METRIC} at epoch "
                    f"{state['best']['epoch']}, none better in the {config.patience} evaluations since",
                    flush=True,
                )
            break
        started = perf_counter()
        model.train()
        model.start_epoch(epoch)
        order = torch.randperm(len(split.train), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        # global batches; data-parallel, each is split across the ranks (so it needs a row per rank)
        batches = [batch for batch in order.split(config.batch_size) if len(batch) >= distributed.world_size()]
        steps = Progress(batches, f"epoch {epoch + 1}/{config.epochs}", enabled=distributed.is_main())
        epoch_loss = torch.zeros((), dtype=torch.float64, device=device)
        for step, batch in enumerate(steps, start=epoch * steps_per_epoch):
            for group in optimizer.param_groups:
                group["lr"] = group.get("peak_lr", config.lr) * lr_factor(step, total_steps, config)
            local = distributed.shard(batch)  # the whole batch on one process
            loss = model.loss(split.train.histories[local].to(device), split.train.targets[local].to(device))
            optimizer.zero_grad(set_to_none=True)
            (loss * (len(local) / len(batch))).backward()  # this rank's share of the batch's mean
            distributed.sum_gradients(model.parameters())
            nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            epoch_loss += loss.detach() * len(local)  # stays on the device: no host sync per step
            if (step + 1) % config.log_every == 0:
                steps.set_postfix(f"loss {loss.item():.4f}")
        state["train_loss"].append(distributed.sum_over_ranks(epoch_loss.item()) / len(split.train))
        state["epoch"] = epoch + 1
        message = f"epoch {epoch + 1}: train loss {state['train_loss'][-1]:.4f}"
        evaluating = (epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs
        if evaluating and distributed.is_main():
            valid = evaluate(model, split.valid, config.eval_batch_size, device)
            state["valid"].append({"epoch": epoch + 1, **valid})
            message += " | valid " + format_metrics(valid)
            if valid[SELECTION_METRIC] > state["best"][SELECTION_METRIC]:
                state["best"] = {"epoch": epoch + 1, SELECTION_METRIC: valid[SELECTION_METRIC]}
                save_atomic({"model": model.state_dict()}, out_dir / "best.pt")
        state["seconds"] += perf_counter() - started
        state = distributed.from_main(state)  # rank 0's evaluations, for every rank's early stopping
        save_atomic(
            {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "state": state},
            out_dir / "last.pt",
        )
        if distributed.is_main():
            print(message, flush=True)
        distributed.barrier()  # the others wait for rank 0's evaluation and checkpoints

    model.load_state_dict(torch.load(out_dir / "best.pt", map_location=device)["model"])
    result = None
    if distributed.is_main():
        result = evaluate_split(model, split, config.eval_batch_size, device)
        result.update(best_epoch=state["best"]["epoch"], epochs=state["epoch"], minutes=state["seconds"] / 60)
        write_metrics(out_dir, result)
        plot_curves(out_dir / "curves.png", state, extra_curves or {})
    return distributed.from_main(result)


def patience_exhausted(state: dict, patience: int | None, min_epochs: int = 0) -> bool:
    """Whether ``patience`` evaluations after epoch max(best epoch, ``min_epochs``) have passed
    without a better validation Recall@10 (never, with ``patience`` None)."""
    if patience is None:
        return False
    since = max(state["best"]["epoch"], min_epochs)
    return sum(row["epoch"] > since for row in state["valid"]) >= patience


def lr_factor(step: int, total_steps: int, config: TrainConfig) -> float:
    """The learning rate over its peak: linear warm-up to 1, then cosine decay to 0 at total_steps."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def rank_targets(model: Recommender, examples: Examples, batch_size: int, device: torch.device) -> torch.Tensor:
    """Each example's rank (0-based) of its target in model.recommend's top max(KS), −1 when it is
    not there: (E,) int64."""
    model.eval()
    batches = Progress(examples.histories.split(batch_size), "evaluate", enabled=distributed.is_main())
    ranked = [model.recommend(histories.to(device), max(KS)).cpu() for histories in batches]
    return target_ranks(torch.cat(ranked), examples.targets)


def evaluate(model: Recommender, examples: Examples, batch_size: int, device: torch.device) -> dict[str, float]:
    """Recall@5/10 and NDCG@5/10 of model.recommend on examples (one target each)."""
    return ranking_metrics(rank_targets(model, examples, batch_size, device))


def evaluate_split(model: Recommender, split: Split, batch_size: int, device: torch.device) -> dict:
    """Validation and test metrics and each user's rank of its target (−1: not in the top 10):
    {"valid": metrics, "test": metrics, "ranks": {"valid": [...], "test": [...]}}."""
    ranks = {part: rank_targets(model, getattr(split, part), batch_size, device) for part in ("valid", "test")}
    return {
        **{part: ranking_metrics(part_ranks) for part, part_ranks in ranks.items()},
        "ranks": {part: part_ranks.tolist() for part, part_ranks in ranks.items()},
    }


def format_metrics(metrics: dict[str, float]) -> str:
    return " ".join(f"{name} {metrics[name]:.4f}" for name in METRICS)


def write_metrics(out_dir: Path, result: dict) -> None:
    """``result`` as out_dir/metrics.json (atomically; data-parallel, rank 0 alone writes)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / "metrics.json", json.dumps(result, indent=2) + "\n")


def require_plotting() -> None:
    """Raise ``soda.extras.MissingPackage`` if matplotlib, which draws curves.png, is missing."""
    require("training-curve plots (curves.png)", "matplotlib")


def plot_curves(path: Path, state: dict, extra_curves: dict[str, list[float]]) -> None:
    """Training loss per epoch, validation metrics per evaluation, and any extra curves."""
    require_plotting()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 + len(extra_curves)
    figure, axes = plt.subplots(1, panels, figsize=(4.5 * panels, 3.5))
    axes[0].plot(range(1, len(state["train_loss"]) + 1), state["train_loss"])
    axes[0].set(title="train loss", xlabel="epoch")
    epochs = [row["epoch"] for row in state["valid"]]
    for name in ("recall@10", "ndcg@10", "recall@5", "ndcg@5"):
        axes[1].plot(epochs, [row[name] for row in state["valid"]], marker="o", label=name)
    axes[1].set(title="validation", xlabel="epoch")
    axes[1].legend()
    for axis, (name, values) in zip(axes[2:], extra_curves.items(), strict=True):
        axis.plot(range(1, len(values) + 1), values)
        axis.set(title=name, xlabel="epoch", yscale="log")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
