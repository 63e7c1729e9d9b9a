"""Training and evaluation: one loop for every trained recommender, plus the run recipes.

A recommender here is an ``nn.Module`` with ``loss(histories, targets) -> scalar`` and
``recommend(histories, k) -> (B, k)`` item ids (TIGER, SASRec; MostPop only recommends),
and optionally ``start_epoch(epoch, epochs)``, called before each training epoch (SODA's
alternating schedule).
``fit`` trains it with AdamW (linear warm-up, cosine decay), evaluates on validation,
keeps the best checkpoint by validation Recall@10 (written atomically), can resume a
stopped run from ``last.pt``, and writes ``metrics.json`` and ``curves.png``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from soda.alignment import SODA, SODAConfig
from soda.baselines import MostPop, SASRec, SASRecConfig
from soda.data import Examples, Split, k_core, leave_one_out, load_dataset
from soda.embeddings import item_embeddings
from soda.metrics import KS, ranking_metrics
from soda.recommender import TIGER, RecommenderConfig
from soda.tokenizer import RQVAE, TokenizerConfig, codebook_stats, train_tokenizer

SELECTION_METRIC = "recall@10"


@dataclass
class TrainConfig:
    """Recommender training. TIGER trains with batch 256 (Rajput et al. 2023); the optimiser
    (AdamW with warm-up and cosine decay) and the number of epochs are ours."""

    epochs: int = 200
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 500
    grad_clip: float = 1.0
    eval_every: int = 1
    eval_batch_size: int = 256


@dataclass
class RunConfig:
    """Everything one run needs; ``PRESETS`` holds the published sizes and the CPU demo."""

    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    recommender: RecommenderConfig = field(default_factory=RecommenderConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sasrec: SASRecConfig = field(default_factory=SASRecConfig)
    sasrec_train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=50))
    max_history: int = 20
    min_interactions: int = 0  # k-core filtering when > 0
    soda: SODAConfig | None = None  # the SODA switch (off: the plain backbone)


PRESETS = {
    # TIGER's published sizes (for a GPU).
    "tiger": RunConfig(),
    # Fits ml-100k on a 2-core CPU in about ten minutes, end to end.
    "cpu": RunConfig(
        tokenizer=TokenizerConfig(epochs=300),
        recommender=RecommenderConfig(
            num_encoder_layers=2,
            num_decoder_layers=2,
            d_model=64,
            num_heads=4,
            head_dim=16,
            d_ff=256,
            dropout=0.0,  # a few epochs do not overfit, and dropout's RNG costs a third of a CPU step
        ),
        train=TrainConfig(epochs=4, batch_size=256, lr=3e-3, warmup_steps=200, eval_every=2),
        sasrec_train=TrainConfig(epochs=6, lr=3e-3, warmup_steps=200, eval_every=2),
    ),
}


def fit(
    model: nn.Module,
    split: Split,
    config: TrainConfig,
    out_dir: Path,
    device: torch.device,
    resume: bool = False,
    seed: int = 0,
    extra_curves: dict[str, list[float]] | None = None,
) -> dict:
    """Train on split.train, select by validation Recall@10, return and write the metrics.

    Writes ``out_dir/{best.pt, last.pt, metrics.json, curves.png}``; with ``resume`` it
    continues from ``last.pt`` where one exists.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(split.train) / config.batch_size)
    total_steps = config.epochs * steps_per_epoch
    state = {
        "epoch": 0,
        "train_loss": [],
        "valid": [],
        "best": {"epoch": 0, SELECTION_METRIC: -1.0},
    }
    if resume and (out_dir / "last.pt").exists():
        checkpoint = torch.load(out_dir / "last.pt", map_location=device)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        state = checkpoint["state"]
        print(f"resuming {out_dir} after epoch {state['epoch']}")

    for epoch in range(state["epoch"], config.epochs):
        model.train()
        if hasattr(model, "start_epoch"):
            model.start_epoch(epoch, config.epochs)
        order = torch.randperm(len(split.train), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        bar = tqdm(order.split(config.batch_size), desc=f"epoch {epoch + 1}/{config.epochs}", leave=False)
        epoch_loss = 0.0
        for step, batch in enumerate(bar, start=epoch * steps_per_epoch):
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, total_steps, config)
            loss = model.loss(split.train.histories[batch].to(device), split.train.targets[batch].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            epoch_loss += loss.item() * len(batch)
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        state["train_loss"].append(epoch_loss / len(split.train))
        state["epoch"] = epoch + 1
        message = f"epoch {epoch + 1}: train loss {state['train_loss'][-1]:.4f}"
        if (epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs:
            valid = evaluate(model, split.valid, config.eval_batch_size, device)
            state["valid"].append({"epoch": epoch + 1, **valid})
            message += " | valid " + format_metrics(valid)
            if valid[SELECTION_METRIC] > state["best"][SELECTION_METRIC]:
                state["best"] = {"epoch": epoch + 1, SELECTION_METRIC: valid[SELECTION_METRIC]}
                save_atomic({"model": model.state_dict()}, out_dir / "best.pt")
        save_atomic(
            {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "state": state},
            out_dir / "last.pt",
        )
        print(message, flush=True)

    model.load_state_dict(torch.load(out_dir / "best.pt", map_location=device)["model"])
    result = {
        "valid": evaluate(model, split.valid, config.eval_batch_size, device),
        "test": evaluate(model, split.test, config.eval_batch_size, device),
        "best_epoch": state["best"]["epoch"],
    }
    write_metrics(out_dir, result)
    plot_curves(out_dir / "curves.png", state, extra_curves or {})
    return result


def learning_rate(step: int, total_steps: int, config: TrainConfig) -> float:
    """Linear warm-up to config.lr, then cosine decay to 0 at total_steps."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps)
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def evaluate(model: nn.Module, examples: Examples, batch_size: int, device: torch.device) -> dict[str, float]:
    """Recall@5/10 and NDCG@5/10 of model.recommend on examples (one target each)."""
    model.eval()
    ranked = [
        model.recommend(histories.to(device), max(KS)).cpu()
        for histories in tqdm(examples.histories.split(batch_size), desc="evaluate", leave=False)
    ]
    return ranking_metrics(torch.cat(ranked), examples.targets)


def format_metrics(metrics: dict[str, float]) -> str:
    return " ".join(f"{name} {metrics[name]:.4f}" for name in ("recall@5", "recall@10", "ndcg@5", "ndcg@10"))


def save_atomic(obj: object, path: Path) -> None:
    """torch.save to a temporary file, then rename over ``path``."""
    temporary = path.with_name(path.name + ".tmp")
    torch.save(obj, temporary)
    os.replace(temporary, path)


def write_metrics(out_dir: Path, result: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    temporary = out_dir / "metrics.json.tmp"
    temporary.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(temporary, out_dir / "metrics.json")


def plot_curves(path: Path, state: dict, extra_curves: dict[str, list[float]]) -> None:
    """Training loss per epoch, validation metrics per evaluation, and any extra curves."""
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


def prepare_split(dataset_name: str, data_dir: str | None, config: RunConfig):
    """Load the dataset, k-core filter it if asked, and split it leave-one-out."""
    dataset = load_dataset(dataset_name, data_dir)
    if config.min_interactions > 0:
        dataset = k_core(dataset, config.min_interactions)
    split = leave_one_out(dataset, config.max_history)
    print(
        f"{dataset.name}: {len(dataset.sequences)} users, {dataset.num_items} items, "
        f"{dataset.num_interactions} interactions, {len(split.train)} training examples"
    )
    return dataset, split


def train_tiger(
    dataset_name: str,
    config: RunConfig,
    out_dir: Path,
    device: torch.device,
    seed: int = 0,
    resume: bool = False,
    data_dir: str | None = None,
) -> dict:
    """Item embeddings -> RQ-VAE semantic IDs -> TIGER (+ SODA with ``config.soda``); returns the
    validation/test metrics."""
    torch.manual_seed(seed)
    dataset, split = prepare_split(dataset_name, data_dir, config)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer_path = out_dir / "tokenizer.pt"
    embeddings = item_embeddings(dataset.name, dataset.item_texts)
    tokenizer = RQVAE(embeddings.shape[1], config.tokenizer)
    if resume and tokenizer_path.exists():
        saved = torch.load(tokenizer_path)
        tokenizer.load_state_dict(saved["model"])
    else:
        losses = train_tokenizer(tokenizer, embeddings)
        semantic_ids = tokenizer.semantic_ids(embeddings)
        saved = {
            "model": tokenizer.state_dict(),
            "semantic_ids": semantic_ids,
            "losses": losses,
            "stats": codebook_stats(semantic_ids, config.tokenizer.codebook_size),
        }
        save_atomic(saved, tokenizer_path)
    print("rq-vae: " + ", ".join(f"{name} {value:.3g}" for name, value in saved["stats"].items()))
    # SODA re-derives the codes during training: room for any number of colliding items
    extra_codes = dataset.num_items if config.soda is not None else None
    model = TIGER(saved["semantic_ids"], config.tokenizer.codebook_size, config.recommender, extra_codes)
    if config.soda is not None:
        model = SODA(model, tokenizer, embeddings, config.soda)
    print(f"tiger: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    result = fit(model, split, config.train, out_dir, device, resume, seed, {"rq-vae loss": saved["losses"]})
    result["tokenizer"] = saved["stats"]
    if config.soda is not None:  # the codes SODA's tokenizer ended with
        final_ids = model.tokenizer.semantic_ids(model.item_embeddings)
        result["tokenizer_final"] = codebook_stats(final_ids, config.tokenizer.codebook_size)
    write_metrics(out_dir, result)
    return result


def train_baselines(
    dataset_name: str,
    config: RunConfig,
    out_dir: Path,
    device: torch.device,
    seed: int = 0,
    resume: bool = False,
    data_dir: str | None = None,
) -> dict[str, dict]:
    """MostPop and SASRec on the same split; writes out_dir/{mostpop,sasrec}/metrics.json."""
    torch.manual_seed(seed)
    dataset, split = prepare_split(dataset_name, data_dir, config)
    batch = config.sasrec_train.eval_batch_size
    mostpop = MostPop(split.train, dataset.num_items)
    results = {
        "mostpop": {
            "valid": evaluate(mostpop, split.valid, batch, torch.device("cpu")),
            "test": evaluate(mostpop, split.test, batch, torch.device("cpu")),
        }
    }
    write_metrics(out_dir / "mostpop", results["mostpop"])
    sasrec = SASRec(dataset.num_items, replace(config.sasrec, max_history=config.max_history))
    results["sasrec"] = fit(sasrec, split, config.sasrec_train, out_dir / "sasrec", device, resume, seed)
    return results
