"""GPU stage: the main job's TIGER + SODA trained on CUDA through the fused kernels, against the
torch backend on the same seed.

    python -m bench.train_parity OUT_DIR [--steps 100] [--dry-run]

The main job's joint run at the sizes of its GPU preset ("gpu": TIGER's published recommender and
RQ-VAE, batch 256) on ml-100k, shortened: an RQ-VAE pre-trained for a few epochs on seeded random
unit-norm item embeddings (the kernels' parity, not the recommendations, is the subject), then ``steps``
steps of each phase of one alternation cycle (a tokenizer epoch, a recommender epoch, a
recommender epoch with the tokenizer frozen; SODA's term on throughout) at a constant learning
rate. Two runs from one state on the same batches: SODA's term through ``backend="triton"`` (the
fused kernels; on CUDA what the main job's "auto" picks) and through ``backend="torch"``.

Checks, and why these tolerances:

- shadow: at every step of the fused run, the torch backend's loss and gradient on the same
  weights and batch. Only the loss's arithmetic differs (the kernels' products in bf16x3, their
  own summation order), so the loss agrees to the project's float32 bound, 1e-4 relative, and the
  gradient of all parameters to 1e-3 in norm (the same rounding, carried through the backward of
  the encoder, the user head and the tokenizer); a wrong kernel misses both by orders of
  magnitude.
- curves: the two runs' losses, each phase's mean within 1e-2 relative. The runs start
  identical and drift apart by rounding alone (AdamW's normalised steps amplify differences in
  near-zero gradients), which moves a phase's mean loss by far less than a percent over a few
  hundred steps; SODA's term is ~1% of the recommender's loss and most of the tokenizer's, so a
  term that trained differently would show there first.

OUT_DIR/train_parity.json is rewritten after every phase of every run (each loss so far, the
shadow errors, seconds, the device), and at the end holds the checks; the exit status is 1 when
one fails. Without RecBole's wheel (a bare GPU machine) the split is random walks of ml-100k's
size. ``--dry-run``: tiny sizes and a synthetic split on the CPU, the kernels under the Triton
interpreter (set TRITON_INTERPRET=1 before Python starts), in seconds; tests/test_soda_main.py
runs it.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from soda.alignment import SODA, Schedule, SODAConfig
from soda.atomic import write_atomic
from soda.data import SequentialDataset, Split, leave_one_out, load_dataset
from soda.extras import installed
from soda.recipes import PRESETS, RunConfig
from soda.recommender import TIGER, RecommenderConfig
from soda.tokenizer import RQVAE, TokenizerConfig, train_tokenizer
from soda.train import TrainConfig

FUSED, REFERENCE = "triton", "torch"
LOSS_RTOL, GRAD_RTOL, PHASE_MEAN_RTOL = 1e-4, 1e-3, 1e-2
PHASES = ("tokenizer", "recommender", "recommender, tokenizer frozen")
SCHEDULE = Schedule(warmup_epochs=0, cycles=1)  # epochs 0, 1, 2: the three PHASES, SODA's term on
EMBEDDING_DIM = 384  # the sentence encoder's


def stage_config(dry_run: bool) -> RunConfig:
    """The GPU preset's sizes with a short RQ-VAE pre-training; tiny ones for the dry run."""
    if not dry_run:
        config = PRESETS["gpu"]
        return replace(config, tokenizer=replace(config.tokenizer, epochs=200))
    return RunConfig(
        tokenizer=TokenizerConfig(num_layers=2, codebook_size=8, latent_dim=4, hidden_dims=(16,), epochs=20),
        recommender=RecommenderConfig(
            num_encoder_layers=1, num_decoder_layers=1, d_model=16, num_heads=2, head_dim=8, d_ff=32
        ),
        train=TrainConfig(batch_size=32, lr=1e-2),
        max_history=6,
    )


def stage_split(dry_run: bool, max_history: int) -> tuple[str, int, Split]:
    """The data's name, its item count and its leave-one-out split: ml-100k where RecBole's wheel
    is installed; else (a bare GPU machine has no data packages) random walks of ml-100k's size,
    943 users of 100 items over 1682; for the dry run 40 users walking 24 items in a cycle. The
    item embeddings are random either way: the kernels' parity, not the data, is the subject."""
    generator = torch.Generator().manual_seed(0)
    if dry_run:
        starts = torch.randint(0, 24, (40,), generator=generator).tolist()
        dataset = SequentialDataset("cycle", [[(s + i) % 24 + 1 for i in range(10)] for s in starts], [""] * 24)
    elif installed("recbole"):
        dataset = load_dataset("ml-100k")
    else:
        sequences = torch.randint(1, 1683, (943, 100), generator=generator).tolist()
        dataset = SequentialDataset("random walks of ml-100k's size", sequences, [""] * 1682)
    return dataset.name, dataset.num_items, leave_one_out(dataset, max_history)


def initial_model(config: RunConfig, num_items: int, seed: int) -> SODA:
    """TIGER + SODA (its default options, the weight the main job trains with) from one seed, on
    the CPU: the RQ-VAE pre-trained on seeded random item embeddings, TIGER on its codes."""
    torch.manual_seed(seed)
    embeddings = F.normalize(torch.randn(num_items, EMBEDDING_DIM), dim=1)  # unit norm, as the encoder's
    tokenizer = RQVAE(EMBEDDING_DIM, config.tokenizer)
    train_tokenizer(tokenizer, embeddings, progress=False)
    recommender = TIGER(
        tokenizer.semantic_ids(embeddings), config.tokenizer.codebook_size, config.recommender, extra_codes=num_items
    )
    return SODA(recommender, tokenizer, embeddings, SODAConfig(backend=FUSED), SCHEDULE)


def set_backend(model: SODA, backend: str) -> None:
    """Route SODA's term through ``backend``."""
    alignment = model.alignments[0]
    alignment.config = replace(alignment.config, backend=backend)


def loss_and_gradient(
    model: SODA, histories: torch.Tensor, targets: torch.Tensor, seed: int
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The training loss on one batch, its dropout drawn from ``seed``, and the gradient of each
    trainable parameter (zeros where the loss does not reach it)."""
    torch.manual_seed(seed)
    loss = model.loss(histories, targets)
    parameters = [p for p in model.parameters() if p.requires_grad]
    gradients = torch.autograd.grad(loss, parameters, allow_unused=True)
    return loss.detach(), [torch.zeros_like(p) if g is None else g for p, g in zip(parameters, gradients, strict=True)]


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def train(
    model: SODA,
    backend: str,
    split: Split,
    config: RunConfig,
    steps: int,
    device: torch.device,
    seed: int,
    record: dict,
    out_dir: Path,
) -> None:
    """``steps`` steps of each phase with SODA's term through ``backend``; the fused run also
    checks every step against the torch backend's loss and gradient on its weights. Fills
    record["runs"][backend] as it goes and writes the record after each phase."""
    set_backend(model, backend)
    model.to(device)
    optimizer = torch.optim.AdamW(model.param_groups(), lr=config.train.lr, weight_decay=config.train.weight_decay)
    for group in optimizer.param_groups:
        group["lr"] = group.get("peak_lr", config.train.lr)
    generator = torch.Generator().manual_seed(seed)  # the same batches for both runs
    run = record["runs"][backend] = {"losses": [], "seconds": 0.0}
    if backend == FUSED:
        run["shadow"] = {"loss": [], "gradient": []}
    for epoch, phase in enumerate(PHASES):
        started = time.perf_counter()
        model.train()
        model.start_epoch(epoch)
        for step in range(epoch * steps, (epoch + 1) * steps):
            batch = torch.randint(len(split.train), (config.train.batch_size,), generator=generator)
            histories, targets = split.train.histories[batch].to(device), split.train.targets[batch].to(device)
            step_seed = seed * 100_003 + step  # the same dropout for the shadow, the fused step and the other run
            if backend == FUSED:
                set_backend(model, REFERENCE)
                reference_loss, reference_gradient = loss_and_gradient(model, histories, targets, step_seed)
                set_backend(model, FUSED)
            loss, gradient = loss_and_gradient(model, histories, targets, step_seed)
            if backend == FUSED:
                run["shadow"]["loss"].append(relative(loss, reference_loss))
                run["shadow"]["gradient"].append(
                    relative(
                        torch.cat([g.flatten() for g in gradient]), torch.cat([g.flatten() for g in reference_gradient])
                    )
                )
            parameters = [p for p in model.parameters() if p.requires_grad]
            for parameter, grad in zip(parameters, gradient, strict=True):
                parameter.grad = grad
            torch.nn.utils.clip_grad_norm_(parameters, config.train.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            run["losses"].append(loss.item())
        run["seconds"] += time.perf_counter() - started
        print(f"{backend}: {phase}: mean loss {sum(run['losses'][-steps:]) / steps:.4f}", flush=True)
        write_atomic(out_dir / "train_parity.json", json.dumps(record, indent=2) + "\n")


def checks(record: dict, steps: int) -> dict[str, dict]:
    """Each check's worst value, its tolerance and whether it passed."""
    fused, reference = record["runs"][FUSED], record["runs"][REFERENCE]
    phase_means = [
        abs(sum(fused["losses"][i : i + steps]) / sum(reference["losses"][i : i + steps]) - 1)
        for i in range(0, len(reference["losses"]), steps)
    ]
    worst = {
        "shadow loss": (max(fused["shadow"]["loss"]), LOSS_RTOL),
        "shadow gradient": (max(fused["shadow"]["gradient"]), GRAD_RTOL),
        "phase mean loss": (max(phase_means), PHASE_MEAN_RTOL),
    }
    return {name: {"worst": value, "tolerance": tol, "passed": value <= tol} for name, (value, tol) in worst.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.train_parity",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawTextHelpFormatter,
    )
    parser.add_argument("out_dir", type=Path, help="where train_parity.json is written as the stage goes")
    parser.add_argument("--steps", type=int, default=None, help="steps per phase (default: 100; dry run 4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dry-run", action="store_true", help="tiny, on the CPU, the kernels interpreted")
    args = parser.parse_args(argv)
    steps = args.steps or (4 if args.dry_run else 100)
    device = torch.device("cpu" if args.dry_run else "cuda")
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device: this is the GPU stage (--dry-run runs it tiny on the CPU)")
    config = stage_config(args.dry_run)
    data, num_items, split = stage_split(args.dry_run, config.max_history)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)",
        "torch": torch.__version__,
        "data": data,
        "steps_per_phase": steps,
        "phases": PHASES,
        "config": asdict(config),
        "runs": {},
    }
    initial = initial_model(config, num_items, args.seed)
    for backend in (FUSED, REFERENCE):
        train(copy.deepcopy(initial), backend, split, config, steps, device, args.seed, record, args.out_dir)
    record["checks"] = checks(record, steps)
    write_atomic(args.out_dir / "train_parity.json", json.dumps(record, indent=2) + "\n")
    for name, check in record["checks"].items():
        verdict = "ok" if check["passed"] else "FAILED"
        print(f"{name}: worst relative difference {check['worst']:.2e} (tolerance {check['tolerance']:g}) {verdict}")
    return 0 if all(check["passed"] for check in record["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
