"""Training and evaluation: one loop for every trained recommender, plus the run recipes.

A recommender here is an ``nn.Module`` with ``loss(histories, targets) -> scalar`` and
``recommend(histories, k) -> (B, k)`` item ids (TIGER, SASRec; MostPop only recommends),
and optionally ``start_epoch(epoch, epochs)``, called before each training epoch (the
alternating schedule of the joint models, ``soda.alignment.JointModel``).
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

from soda import distributed
from soda.alignment import SODA, SODAConfig
from soda.baselines import MostPop, SASRec, SASRecConfig
from soda.data import Examples, Split, k_core, leave_one_out, load_dataset
from soda.embeddings import item_embeddings
from soda.etegrec import ETEGRec, ETEGRecConfig
from soda.letter import LETTERConfig, LETTERLosses
from soda.metrics import KS, METRICS, ranking_metrics
from soda.recommender import TIGER, RecommenderConfig
from soda.tokenizer import RQVAE, TokenizerConfig, codebook_stats, train_tokenizer

SELECTION_METRIC = "recall@10"
BACKBONES = ("tiger", "letter", "etegrec")


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
    letter: LETTERConfig = field(default_factory=LETTERConfig)  # used by --backbone letter
    etegrec: ETEGRecConfig = field(default_factory=ETEGRecConfig)  # used by --backbone etegrec
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
        etegrec=ETEGRecConfig(warmup_epochs=1, final_frozen_epochs=1),
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
    continues from ``last.pt`` where one exists. Under torchrun it trains data-parallel, each
    global batch split across the ranks, rank 0 evaluating and writing (soda/distributed.py).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    model.to(device)
    distributed.broadcast_module(model)  # every rank starts from rank 0's model
    # a model may give parameter groups their own peak rate ("peak_lr"; a joint model's tokenizer)
    groups = model.param_groups() if hasattr(model, "param_groups") else model.parameters()
    optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
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
        # global batches; data-parallel, each is split across the ranks (so it needs a row per rank)
        batches = [batch for batch in order.split(config.batch_size) if len(batch) >= distributed.world_size()]
        bar = tqdm(batches, desc=f"epoch {epoch + 1}/{config.epochs}", leave=False, disable=not distributed.is_main())
        epoch_loss = 0.0
        for step, batch in enumerate(bar, start=epoch * steps_per_epoch):
            for group in optimizer.param_groups:
                group["lr"] = group.get("peak_lr", config.lr) * lr_factor(step, total_steps, config)
            local = distributed.shard(batch)  # the whole batch on one process
            loss = model.loss(split.train.histories[local].to(device), split.train.targets[local].to(device))
            optimizer.zero_grad(set_to_none=True)
            (loss * (len(local) / len(batch))).backward()  # this rank's share of the batch's mean
            distributed.sum_gradients(model.parameters())
            nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            epoch_loss += loss.item() * len(local)
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        state["train_loss"].append(distributed.sum_over_ranks(epoch_loss) / len(split.train))
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
        result = {
            "valid": evaluate(model, split.valid, config.eval_batch_size, device),
            "test": evaluate(model, split.test, config.eval_batch_size, device),
            "best_epoch": state["best"]["epoch"],
        }
        write_metrics(out_dir, result)
        plot_curves(out_dir / "curves.png", state, extra_curves or {})
    return distributed.from_main(result)


def lr_factor(step: int, total_steps: int, config: TrainConfig) -> float:
    """The learning rate over its peak: linear warm-up to 1, then cosine decay to 0 at total_steps."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


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
    return " ".join(f"{name} {metrics[name]:.4f}" for name in METRICS)


def save_atomic(obj: object, path: Path) -> None:
    """torch.save to a temporary file, then rename over ``path``. Data-parallel, rank 0 alone writes."""
    if not distributed.is_main():
        return
    temporary = path.with_name(path.name + ".tmp")
    torch.save(obj, temporary)
    os.replace(temporary, path)


def write_metrics(out_dir: Path, result: dict) -> None:
    """``result`` as out_dir/metrics.json (atomically). Data-parallel, rank 0 alone writes."""
    if not distributed.is_main():
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "metrics.json", json.dumps(result, indent=2))


def write_text_atomic(path: Path, text: str) -> None:
    """``text`` and a newline to a temporary file, then renamed over ``path``."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text + "\n")
    os.replace(temporary, path)


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


def train_generative(
    backbone: str,
    dataset_name: str,
    config: RunConfig,
    out_dir: Path,
    device: torch.device,
    seed: int = 0,
    resume: bool = False,
    data_dir: str | None = None,
) -> dict:
    """One generative recommender end to end; returns (and writes to out_dir/metrics.json) its
    validation/test metrics and its tokenizer's code statistics.

        tiger     item embeddings -> RQ-VAE semantic IDs -> TIGER
        letter    a SASRec first (its item embeddings are the CF embeddings), then the RQ-VAE
                  with LETTER's losses (config.letter) -> TIGER
        etegrec   RQ-VAE -> ETEGRec: tokenizer and TIGER alternating with SIA and PSA (config.etegrec)

    With ``config.soda`` SODA's term joins: on TIGER and LETTER as joint training on SODAConfig's
    schedule (LETTER's tokenizer epochs keep its losses), on ETEGRec next to SIA and PSA. With
    ``resume`` the tokenizer, the CF embeddings and the recommender continue from out_dir.
    """
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; known: {', '.join(BACKBONES)}")
    torch.manual_seed(seed)
    dataset, split = prepare_split(dataset_name, data_dir, config)
    out_dir.mkdir(parents=True, exist_ok=True)
    embeddings = item_embeddings(dataset.name, dataset.item_texts)
    regularizer = None
    if backbone == "letter":
        cf_embeddings = collaborative_embeddings(dataset.num_items, split, config, out_dir, device, seed, resume)
        regularizer = LETTERLosses(cf_embeddings, config.tokenizer.latent_dim, config.letter)
    tokenizer = RQVAE(embeddings.shape[1], config.tokenizer, regularizer)
    saved = pretrain_tokenizer(tokenizer, embeddings, out_dir / "tokenizer.pt", resume)
    print("rq-vae: " + ", ".join(f"{name} {value:.3g}" for name, value in saved["stats"].items()))
    joint = backbone == "etegrec" or config.soda is not None
    # joint training re-derives the codes: room for any number of colliding items
    extra_codes = dataset.num_items if joint else None
    model = TIGER(saved["semantic_ids"], config.tokenizer.codebook_size, config.recommender, extra_codes)
    if backbone == "etegrec":
        model = ETEGRec(model, tokenizer, embeddings, config.etegrec, config.soda)
    elif config.soda is not None:
        model = SODA(model, tokenizer, embeddings, config.soda)
    print(f"{backbone}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    train = config.train
    if joint:  # the recommender's epochs as on its own, the tokenizer's on top
        train = replace(train, epochs=model.schedule.epochs(train.epochs))
    result = fit(model, split, train, out_dir, device, resume, seed, {"rq-vae loss": saved["losses"]})
    result["tokenizer"] = saved["stats"]
    if joint:  # the codes the tokenizer ended with, and the share of items whose codes it moved
        final_ids = model.tokenizer.semantic_ids(model.item_embeddings)
        result["tokenizer_final"] = codebook_stats(final_ids, config.tokenizer.codebook_size)
        moved = (final_ids[:, :-1] != saved["semantic_ids"][:, :-1]).any(dim=1)
        result["tokenizer_final"]["codes_changed"] = moved.float().mean().item()
    write_metrics(out_dir, result)
    return result


def pretrain_tokenizer(tokenizer: RQVAE, embeddings: torch.Tensor, path: Path, resume: bool) -> dict:
    """Train the RQ-VAE on the item embeddings (N, D) and save it to ``path``, or with ``resume``
    load it from there: {"model": state, "semantic_ids": (N, L + 1), "losses", "stats"}."""
    if resume and path.exists():
        saved = torch.load(path)
        tokenizer.load_state_dict(saved["model"])
        return saved
    losses = train_tokenizer(tokenizer, embeddings)
    semantic_ids = tokenizer.semantic_ids(embeddings)
    saved = {
        "model": tokenizer.state_dict(),
        "semantic_ids": semantic_ids,
        "losses": losses,
        "stats": codebook_stats(semantic_ids, tokenizer.config.codebook_size),
    }
    save_atomic(saved, path)
    return saved


def collaborative_embeddings(
    num_items: int, split: Split, config: RunConfig, out_dir: Path, device: torch.device, seed: int, resume: bool
) -> torch.Tensor:
    """LETTER's CF embeddings: the item embeddings (N, hidden) of a SASRec trained on the split
    (in out_dir/sasrec), kept in out_dir/collaborative.pt for ``resume``."""
    path = out_dir / "collaborative.pt"
    if resume and path.exists():
        return torch.load(path)
    sasrec, _ = train_sasrec(num_items, split, config, out_dir / "sasrec", device, resume, seed)
    cf_embeddings = sasrec.item_embedding.weight[1:].detach().cpu()
    save_atomic(cf_embeddings, path)
    return cf_embeddings


def train_sasrec(
    num_items: int, split: Split, config: RunConfig, out_dir: Path, device: torch.device, resume: bool, seed: int
) -> tuple[SASRec, dict]:
    """SASRec (config.sasrec, config.sasrec_train) fitted on the split: the model at its best epoch, its metrics."""
    sasrec = SASRec(num_items, replace(config.sasrec, max_history=config.max_history))
    return sasrec, fit(sasrec, split, config.sasrec_train, out_dir, device, resume, seed)


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
    _, results["sasrec"] = train_sasrec(dataset.num_items, split, config, out_dir / "sasrec", device, resume, seed)
    return results
