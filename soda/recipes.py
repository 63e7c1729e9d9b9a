"""Run recipes: every model the command line trains, from the dataset to its metrics.

``RunConfig`` holds one run's configuration (a dataclass per component, with its published
defaults); ``PRESETS`` the published sizes ("tiger", for a GPU), the CPU demo ("cpu", a fixed
four-epoch budget) and the CPU reproduction at convergence ("cpu-converged", early stopping).
``train_generative`` trains TIGER, LETTER or ETEGRec, each with or without SODA, and
``train_baselines`` MostPop and SASRec, all through ``soda.train.fit``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from soda.alignment import RECOMMENDER, SODA, Schedule, SODAConfig
from soda.atomic import exclusive, save_atomic
from soda.baselines import MostPop, SASRec, SASRecConfig
from soda.data import SequentialDataset, Split, k_core, leave_one_out, load_dataset
from soda.embeddings import item_embeddings
from soda.etegrec import ETEGRec, ETEGRecConfig
from soda.letter import LETTERConfig, LETTERLosses
from soda.recommender import TIGER, RecommenderConfig
from soda.retrieval import evaluate_retrieval_and_fusion
from soda.tokenizer import RQVAE, TokenizerConfig, codebook_stats, train_tokenizer
from soda.train import TrainConfig, evaluate_split, fit, write_metrics

BACKBONES = ("tiger", "letter", "etegrec")


@dataclass
class RunConfig:
    """Everything one run needs; ``PRESETS`` holds the published sizes and the CPU ones."""

    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    recommender: RecommenderConfig = field(default_factory=RecommenderConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sasrec: SASRecConfig = field(default_factory=SASRecConfig)
    sasrec_train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=50))
    letter: LETTERConfig = field(default_factory=LETTERConfig)  # used by --backbone letter
    etegrec: ETEGRecConfig = field(default_factory=ETEGRecConfig)  # used by --backbone etegrec
    schedule: Schedule = field(default_factory=Schedule)  # the joint runs of TIGER and LETTER + SODA
    max_history: int = 20
    min_interactions: int = 0  # k-core filtering when > 0
    soda: SODAConfig | None = None  # the SODA switch (off: the plain backbone)


CPU_RECOMMENDER = RecommenderConfig(
    num_encoder_layers=2,
    num_decoder_layers=2,
    d_model=64,
    num_heads=4,
    head_dim=16,
    d_ff=256,
    dropout=0.0,  # dropout's RNG costs a third of a CPU step; the converged preset stops early instead
)
PRESETS = {
    # TIGER's published sizes (for a GPU).
    "tiger": RunConfig(),
    # Fits ml-100k on a 2-core CPU in about ten minutes, end to end: four recommender epochs.
    "cpu": RunConfig(
        tokenizer=TokenizerConfig(epochs=300),
        recommender=CPU_RECOMMENDER,
        train=TrainConfig(epochs=4, batch_size=256, lr=3e-3, warmup_steps=200, eval_every=2),
        sasrec_train=TrainConfig(epochs=6, lr=3e-3, warmup_steps=200, eval_every=2),
        etegrec=ETEGRecConfig(schedule=Schedule(warmup_epochs=1, cycles=2), item_embeddings="text"),
        schedule=Schedule(warmup_epochs=1, cycles=2),  # R T R T R R
    ),
    # The CPU sizes trained to convergence: every model until validation Recall@10 has not improved
    # in 5 epochs after epoch 10 (at most 50 recommender epochs); the joint runs alternate 4 cycles
    # after 2 warm-up epochs (epochs 1-10), then train the recommender with the tokenizer frozen
    # until they stop. The floor of 10 is the alternation's length, so that no run of the table can
    # stop sooner than another: with 943 validation users one evaluation's Recall@10 varies by about
    # 0.01, and TIGER without the floor stopped at epoch 10 on such a dip, its learning rate still
    # at 91% of the peak.
    "cpu-converged": RunConfig(
        tokenizer=TokenizerConfig(epochs=300),
        recommender=CPU_RECOMMENDER,
        train=TrainConfig(epochs=50, batch_size=256, lr=3e-3, warmup_steps=200, patience=5, min_epochs=10),
        sasrec_train=TrainConfig(epochs=100, lr=3e-3, warmup_steps=200, patience=5, min_epochs=10),
        etegrec=ETEGRecConfig(schedule=Schedule(warmup_epochs=2, cycles=4)),
        schedule=Schedule(warmup_epochs=2, cycles=4),  # R R T R T R T R T R, then R until stopped
    ),
}


def prepare_split(dataset_name: str, data_dir: str | None, config: RunConfig) -> tuple[SequentialDataset, Split]:
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


def joint_schedule(backbone: str, config: RunConfig) -> Schedule | None:
    """The alternation a run trains on, or None for a plain backbone: ETEGRec's own; with SODA on
    TIGER and LETTER, ``config.schedule`` (without its cycles when SODA trains the recommender
    only: the tokenizer then stays frozen throughout)."""
    if backbone == "etegrec":
        return config.etegrec.schedule
    if config.soda is None:
        return None
    return replace(config.schedule, cycles=0) if config.soda.side == RECOMMENDER else config.schedule


def train_generative(
    backbone: str,
    dataset_name: str,
    config: RunConfig,
    out_dir: Path,
    device: torch.device,
    seed: int = 0,
    resume: bool = False,
    data_dir: str | None = None,
    sasrec_dir: Path | None = None,
) -> dict:
    """One generative recommender end to end; returns (and writes to out_dir/metrics.json) what
    ``fit`` returns, with its tokenizer's code statistics.

        tiger     item embeddings -> RQ-VAE semantic IDs -> TIGER
        letter    a SASRec first (its item embeddings are the CF embeddings), then the RQ-VAE
                  with LETTER's losses (config.letter) -> TIGER
        etegrec   a SASRec first (its item embeddings are the tokenizer's input, or the text
                  embeddings: config.etegrec.item_embeddings), the RQ-VAE -> ETEGRec: tokenizer and
                  TIGER alternating with SIA and PSA (config.etegrec)

    With ``config.soda`` SODA's term joins: on TIGER and LETTER as joint training on
    ``joint_schedule`` (LETTER's tokenizer epochs keep its losses), on ETEGRec next to SIA and PSA.
    With ``resume`` the tokenizer, the SASRec embeddings and the recommender continue from out_dir.
    ``sasrec_dir`` is where the SASRec of LETTER and ETEGRec trains (default out_dir/sasrec), or with
    ``resume`` is found: runs that name the same one share it, trained once (``train_sasrec``).
    """
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; known: {', '.join(BACKBONES)}")
    torch.manual_seed(seed)
    dataset, split = prepare_split(dataset_name, data_dir, config)
    out_dir.mkdir(parents=True, exist_ok=True)
    embeddings = item_embeddings(dataset.name, dataset.item_texts)
    regularizer = None
    if backbone == "letter" or (backbone == "etegrec" and config.etegrec.item_embeddings == "sasrec"):
        sasrec_dir = out_dir / "sasrec" if sasrec_dir is None else sasrec_dir
        cf_embeddings = collaborative_embeddings(
            dataset.num_items, split, config, out_dir, sasrec_dir, device, seed, resume
        )
        if backbone == "letter":
            regularizer = LETTERLosses(cf_embeddings, config.tokenizer.latent_dim, config.letter)
        else:
            embeddings = cf_embeddings
    tokenizer = RQVAE(embeddings.shape[1], config.tokenizer, regularizer)
    saved = pretrain_tokenizer(tokenizer, embeddings, out_dir / "tokenizer.pt", resume)
    print("rq-vae: " + ", ".join(f"{name} {value:.3g}" for name, value in saved["stats"].items()))
    schedule = joint_schedule(backbone, config)
    # when the tokenizer trains, the codes are re-derived: room for any number of colliding items
    extra_codes = dataset.num_items if schedule is not None and schedule.cycles > 0 else None
    model = TIGER(saved["semantic_ids"], config.tokenizer.codebook_size, config.recommender, extra_codes)
    if backbone == "etegrec":
        model = ETEGRec(model, tokenizer, embeddings, config.etegrec, config.soda)
    elif schedule is not None:
        model = SODA(model, tokenizer, embeddings, config.soda, schedule)
    print(f"{backbone}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    train = config.train
    if schedule is not None:  # the recommender's epochs as on its own, the tokenizer's on top; no stop mid-alternation
        epochs, min_epochs = schedule.epochs(train.epochs), max(train.min_epochs, schedule.alternation_epochs)
        train = replace(train, epochs=epochs, min_epochs=min_epochs)
    extra_curves = {"rq-vae loss": saved["losses"]}
    result = fit(model, split, train, out_dir, device, resume, seed, extra_curves)
    if config.soda is not None:  # SODA's user head: retrieval over the catalogue, and fusion with the beam
        result.update(evaluate_retrieval_and_fusion(model, split, train.eval_batch_size, device))
    result["tokenizer"] = saved["stats"]
    if schedule is not None:  # the codes the tokenizer ended with, and the share of items whose codes it moved
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
    num_items: int,
    split: Split,
    config: RunConfig,
    out_dir: Path,
    sasrec_dir: Path,
    device: torch.device,
    seed: int,
    resume: bool,
) -> torch.Tensor:
    """The item embeddings (N, hidden) of a SASRec trained on the split (in sasrec_dir): LETTER's
    CF embeddings, ETEGRec's tokenizer input. Kept in out_dir/collaborative.pt for ``resume``."""
    path = out_dir / "collaborative.pt"
    if resume and path.exists():
        return torch.load(path)
    sasrec, _ = train_sasrec(num_items, split, config, sasrec_dir, device, resume, seed)
    cf_embeddings = sasrec.item_embedding.weight[1:].detach().cpu()
    save_atomic(cf_embeddings, path)
    return cf_embeddings


def train_sasrec(
    num_items: int, split: Split, config: RunConfig, out_dir: Path, device: torch.device, resume: bool, seed: int
) -> tuple[SASRec, dict]:
    """SASRec (config.sasrec, config.sasrec_train) fitted on the split: the model at its best epoch, its
    metrics. One process at a time trains in out_dir; with ``resume`` the next finds the run finished."""
    sasrec = SASRec(num_items, replace(config.sasrec, max_history=config.max_history))
    with exclusive(out_dir):
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
    started = time.perf_counter()
    mostpop = MostPop(split.train, dataset.num_items)
    results = {"mostpop": evaluate_split(mostpop, split, config.sasrec_train.eval_batch_size, torch.device("cpu"))}
    results["mostpop"]["minutes"] = (time.perf_counter() - started) / 60  # counting and ranking
    write_metrics(out_dir / "mostpop", results["mostpop"])
    _, results["sasrec"] = train_sasrec(dataset.num_items, split, config, out_dir / "sasrec", device, resume, seed)
    return results
