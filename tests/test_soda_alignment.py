"""Joint training and the recipe: SODA's user-side quantisation, the schedule, the CLI's backbones
and switch, and tiny runs of every backbone x SODA through the recipe the CLI uses."""

import argparse
import fcntl
import json
import math
from dataclasses import replace

import pytest
import torch

import soda.recipes
from soda.__main__ import build_parser, configure
from soda.alignment import RECOMMENDER, TOKENIZER, Schedule, SODAConfig
from soda.atomic import exclusive
from soda.baselines import SASRecConfig
from soda.data import SequentialDataset
from soda.etegrec import ETEGRecConfig
from soda.letter import LETTERConfig
from soda.recipes import PRESETS, RunConfig, train_baselines, train_generative
from soda.recommender import RecommenderConfig
from soda.tokenizer import RQVAE, TokenizerConfig
from soda.train import TrainConfig, fit
from tests.test_soda_parity import BATCH, JOINT_VARIANTS, tiny_soda, train_tiny_soda
from tests.test_soda_train import NUM_ITEMS, cyclic_split

TINY_SODA = SODAConfig(user_hidden=16, backend="torch")


def test_layer_residuals_subtract_the_codewords_chosen_before():
    torch.manual_seed(0)
    tokenizer = RQVAE(8, TokenizerConfig(num_layers=3, codebook_size=5, latent_dim=4, hidden_dims=(16,)))
    latents = torch.randn(6, 3, 4)
    residuals = tokenizer.layer_residuals(latents)
    chosen = torch.zeros(6, 4)
    for layer, codebook in enumerate(tokenizer.codebooks):
        torch.testing.assert_close(residuals[:, layer], latents[:, layer] - chosen)
        chosen = chosen + codebook[torch.cdist(residuals[:, layer], codebook).argmin(-1)]
    # one shared latent: the tokenizer's own residual quantisation
    shared = latents[:, 0]
    torch.testing.assert_close(
        tokenizer.layer_residuals(shared[:, None].expand(-1, 3, -1)), tokenizer.quantize(shared).residuals
    )


def test_schedule_warms_up_alternates_its_cycles_and_stays_frozen():
    schedule = Schedule(warmup_epochs=1, cycles=2, cycle_length=3)
    phases = [schedule.phase(epoch) for epoch in range(10)]
    assert phases == [
        (RECOMMENDER, False),
        (TOKENIZER, True),
        (RECOMMENDER, True),
        (RECOMMENDER, True),
        (TOKENIZER, True),
        (RECOMMENDER, True),
        (RECOMMENDER, True),
        *[(RECOMMENDER, True)] * 3,  # frozen from alternation_epochs on, however long the run
    ]
    assert schedule.alternation_epochs == 7


@pytest.mark.parametrize("warmup, cycles, cycle", [(1, 2, 2), (1, 2, 3), (2, 1, 4), (0, 3, 2), (3, 0, 2), (1, 9, 2)])
@pytest.mark.parametrize("recommender_epochs", [1, 2, 4, 7, 10])
def test_schedule_gives_the_recommender_its_plain_epochs(warmup, cycles, cycle, recommender_epochs):
    schedule = Schedule(warmup_epochs=warmup, cycles=cycles, cycle_length=cycle)
    epochs = schedule.epochs(recommender_epochs)
    phases = [schedule.phase(epoch)[0] for epoch in range(epochs)]
    assert phases.count(RECOMMENDER) == recommender_epochs
    # a tokenizer epoch only where a recommender epoch follows it, and never more than the cycles
    assert all(phases[i + 1] == RECOMMENDER for i, phase in enumerate(phases) if phase == TOKENIZER)
    assert phases.count(TOKENIZER) <= cycles


def test_schedule_and_switch_reject_what_they_cannot_do():
    with pytest.raises(ValueError, match="cycle_length"):
        Schedule(cycle_length=1)
    with pytest.raises(ValueError, match="side"):
        SODAConfig(side="encoder")


def test_cli_switch_configures_soda():
    def args(**soda_options):
        return argparse.Namespace(preset="cpu", epochs=None, min_interactions=None, **soda_options)

    assert configure(args()).soda is None  # main / baselines: no SODA flags at all
    options = dict(soda_weight=0.5, soda_temperature=2.0, soda_in_batch="both", soda_side="tokenizer")
    options |= dict(soda_backend="torch")
    assert configure(args(soda=False, soda_symmetric=False, **options)).soda is None
    soda_config = configure(args(soda=True, soda_symmetric=True, **options)).soda
    assert (soda_config.weight, soda_config.temperature, soda_config.in_batch) == (0.5, 2.0, "both")
    assert soda_config.symmetric and soda_config.backend == "torch" and soda_config.side == "tokenizer"


def test_cli_parses_every_backbone_with_and_without_soda():
    parser = build_parser()
    for backbone in ("tiger", "letter", "etegrec"):
        args = parser.parse_args(["train", "--backbone", backbone, "--preset", "cpu"])
        assert args.backbone == backbone and configure(args) == PRESETS["cpu"]
        args = parser.parse_args(["train", "--backbone", backbone, "--soda", "--soda-weight", "0.3"])
        config = configure(args)
        assert args.backbone == backbone and config.soda == SODAConfig(weight=0.3)
        assert (config.letter, config.etegrec) == (PRESETS["tiger"].letter, PRESETS["tiger"].etegrec)
    assert PRESETS["tiger"].etegrec == ETEGRecConfig() and PRESETS["tiger"].letter == LETTERConfig()
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--backbone", "sasrec"])


@pytest.fixture
def tiny_recipe(monkeypatch):
    """The recipe on the cyclic split with random 8-d item embeddings, and a tiny RunConfig."""
    split = cyclic_split()
    dataset = SequentialDataset("cycle", [], [""] * NUM_ITEMS)
    monkeypatch.setattr(soda.recipes, "prepare_split", lambda *args: (dataset, split))
    monkeypatch.setattr(soda.recipes, "item_embeddings", lambda *args: torch.randn(NUM_ITEMS, 8))
    return RunConfig(
        tokenizer=TokenizerConfig(num_layers=2, codebook_size=8, latent_dim=4, hidden_dims=(16,), epochs=20),
        recommender=RecommenderConfig(
            num_encoder_layers=1, num_decoder_layers=1, d_model=32, num_heads=2, head_dim=16, d_ff=64, dropout=0.0
        ),
        train=TrainConfig(epochs=4, batch_size=32, lr=1e-2, warmup_steps=5, eval_every=3, eval_batch_size=64),
        sasrec=SASRecConfig(hidden=16, dropout=0.0),
        sasrec_train=TrainConfig(epochs=2, batch_size=32, lr=1e-2, warmup_steps=5, eval_every=2),
        letter=LETTERConfig(clusters=3, recluster_every=5),
        etegrec=ETEGRecConfig(schedule=Schedule(warmup_epochs=1, cycles=1), user_hidden=16, backend="torch"),
        schedule=Schedule(warmup_epochs=0, cycles=2),
    )


# The recommender epochs of each run, four in all: SODA's schedule is T R T R R R (two cycles, then
# frozen), ETEGRec's R T R R R (a warm-up epoch without alignment first, one cycle), the plain
# run's R R R R, and SODA on the recommender's side alone never trains the tokenizer.
RECOMMENDER_EPOCHS = {"soda": [1, 3, 4, 5], "etegrec": [0, 2, 3, 4], "plain": [0, 1, 2, 3], "frozen": [0, 1, 2, 3]}


@pytest.mark.parametrize(
    "backbone, soda_config, schedule",
    [
        ("tiger", TINY_SODA, "soda"),
        ("tiger", replace(TINY_SODA, side="recommender"), "frozen"),
        ("tiger", replace(TINY_SODA, side="tokenizer"), "soda"),
        ("letter", None, "plain"),
        ("letter", TINY_SODA, "soda"),
        ("etegrec", None, "etegrec"),
        ("etegrec", TINY_SODA, "etegrec"),
    ],
)
def test_tiny_runs_train_through_the_recipe(tiny_recipe, tmp_path, backbone, soda_config, schedule):
    config = replace(tiny_recipe, soda=soda_config)
    result = train_generative(backbone, "cycle", config, tmp_path, torch.device("cpu"))
    train_loss = torch.load(tmp_path / "last.pt")["state"]["train_loss"]
    assert len(train_loss) == max(RECOMMENDER_EPOCHS[schedule]) + 1
    recommender_losses = [train_loss[epoch] for epoch in RECOMMENDER_EPOCHS[schedule]]
    assert recommender_losses[-1] < 0.8 * recommender_losses[0], train_loss
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["test"] == result["test"] and len(written["ranks"]["test"]) == len(cyclic_split().test)
    assert ("tokenizer_final" in written) == (schedule != "plain")
    assert ("retrieval" in written and "fusion" in written) == (soda_config is not None)  # soda/retrieval.py
    assert ("codes_changed" in written.get("tokenizer_final", {})) == (schedule != "plain")
    if schedule == "frozen":  # the tokenizer never trained: the codes did not move
        assert written["tokenizer_final"]["codes_changed"] == 0.0


def test_etegrec_tokenizer_reads_sasrec_item_embeddings(tiny_recipe, tmp_path):
    config = replace(tiny_recipe, train=replace(tiny_recipe.train, epochs=1))
    train_generative("etegrec", "cycle", config, tmp_path, torch.device("cpu"))
    cf_embeddings = torch.load(tmp_path / "collaborative.pt")  # SASRec's 16-d item embeddings
    tokenizer = torch.load(tmp_path / "tokenizer.pt")["model"]
    assert tokenizer["encoder.0.weight"].shape[1] == cf_embeddings.shape[1] == 16  # not the 8-d text ones
    text = replace(config, etegrec=replace(config.etegrec, item_embeddings="text"))
    train_generative("etegrec", "cycle", text, tmp_path / "text", torch.device("cpu"))
    assert torch.load(tmp_path / "text" / "tokenizer.pt")["model"]["encoder.0.weight"].shape[1] == 8


def test_letter_trains_sasrec_once_and_resumes_from_its_embeddings(tiny_recipe, tmp_path, monkeypatch):
    config = replace(tiny_recipe, train=replace(tiny_recipe.train, epochs=1))
    train_generative("letter", "cycle", config, tmp_path, torch.device("cpu"))
    cf_embeddings = torch.load(tmp_path / "collaborative.pt")
    assert cf_embeddings.shape == (NUM_ITEMS, 16) and (tmp_path / "sasrec" / "best.pt").exists()
    tokenizer = torch.load(tmp_path / "tokenizer.pt")["model"]
    assert tokenizer["regularizer.projection.weight"].shape == (4, 16)  # SASRec's 16-d -> the 4-d latent

    def no_sasrec(*args):
        raise AssertionError("--resume retrained SASRec")

    monkeypatch.setattr(soda.recipes, "train_sasrec", no_sasrec)
    config = replace(config, train=replace(config.train, epochs=2))
    train_generative("letter", "cycle", config, tmp_path, torch.device("cpu"), resume=True)
    assert len(torch.load(tmp_path / "last.pt")["state"]["train_loss"]) == 2


def test_runs_that_name_one_sasrec_train_it_once_and_share_its_embeddings(tiny_recipe, tmp_path):
    # the experiment's way: LETTER and ETEGRec of a seed take the baselines' SASRec of that seed
    config = replace(tiny_recipe, train=replace(tiny_recipe.train, epochs=1))
    shared = tmp_path / "baselines" / "sasrec"
    train_generative(
        "letter", "cycle", config, tmp_path / "letter", torch.device("cpu"), resume=True, sasrec_dir=shared
    )
    trained = (shared / "last.pt").stat().st_mtime_ns
    assert len(torch.load(shared / "last.pt")["state"]["train_loss"]) == tiny_recipe.sasrec_train.epochs
    assert not (tmp_path / "letter" / "sasrec").exists()
    train_generative(
        "etegrec", "cycle", config, tmp_path / "etegrec", torch.device("cpu"), resume=True, sasrec_dir=shared
    )
    results = train_baselines("cycle", config, tmp_path / "baselines", torch.device("cpu"), resume=True)
    assert (shared / "last.pt").stat().st_mtime_ns == trained  # found finished: no epoch trained again
    assert results["sasrec"]["epochs"] == tiny_recipe.sasrec_train.epochs
    letter, etegrec = (torch.load(tmp_path / run / "collaborative.pt") for run in ("letter", "etegrec"))
    assert torch.equal(letter, etegrec)


def test_exclusive_holds_a_directory_for_one_holder_at_a_time(tmp_path):
    with exclusive(tmp_path / "run"):
        with open(tmp_path / "run" / ".lock") as other:  # another open file: another process's view
            with pytest.raises(BlockingIOError):
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with open(tmp_path / "run" / ".lock") as other:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released at the end of the block


def test_baselines_train_through_the_recipe_and_report_their_minutes(tiny_recipe, tmp_path):
    results = train_baselines("cycle", tiny_recipe, tmp_path, torch.device("cpu"))
    assert set(results) == {"mostpop", "sasrec"}
    for name, result in results.items():
        assert 0 < result["minutes"] < 5 and len(result["ranks"]["test"]) == len(cyclic_split().test)
        assert json.loads((tmp_path / name / "metrics.json").read_text())["test"] == result["test"]
    assert results["sasrec"]["epochs"] == tiny_recipe.sasrec_train.epochs


class Captured(Exception):
    """Raised by a stand-in for ``fit`` once it has seen the TrainConfig the recipe chose."""


@pytest.mark.parametrize("floor", [1, 6])
def test_no_run_stops_before_the_floor_and_no_joint_run_mid_alternation(tiny_recipe, tmp_path, monkeypatch, floor):
    def capture(model, split, config, *args):
        raise Captured(config)

    monkeypatch.setattr(soda.recipes, "fit", capture)
    base = replace(tiny_recipe, train=replace(tiny_recipe.train, patience=2, min_epochs=floor))
    chosen, recommender_side = {}, replace(TINY_SODA, side="recommender")
    for name, soda_config in (("plain", None), ("joint", TINY_SODA), ("recommender", recommender_side)):
        with pytest.raises(Captured) as captured:
            train_generative("tiger", "cycle", replace(base, soda=soda_config), tmp_path / name, torch.device("cpu"))
        chosen[name] = captured.value.args[0].min_epochs
    # the tiny schedule alternates epochs 1-4; on the recommender's side alone the tokenizer never trains
    assert chosen == {"plain": floor, "joint": max(floor, 4), "recommender": floor}


@pytest.mark.parametrize("variant", JOINT_VARIANTS)
def test_codes_are_rederived_after_a_tokenizer_epoch(variant):
    initial = train_tiny_soda("torch", epochs=0, variant=variant).recommender.item_tokens.clone()
    model = train_tiny_soda("torch", epochs=2, variant=variant)  # a tokenizer epoch, then a recommender epoch
    codes = model.tokenizer.semantic_ids(model.item_embeddings)
    expected = codes + torch.tensor(model.recommender.level_starts)
    assert torch.equal(model.recommender.item_tokens[1:], expected)
    assert not torch.equal(model.recommender.item_tokens, initial)  # the tokenizer epoch moved some codes
    assert (model.recommend(cyclic_split().test.histories, 5) > 0).all()


def test_joint_training_gives_the_tokenizer_its_own_learning_rate(tmp_path):
    model = tiny_soda(tokenizer_lr=3e-4, backend="torch")  # a tokenizer epoch first
    recommender_group, tokenizer_group = model.param_groups()
    assert [id(p) for p in tokenizer_group["params"]] == [id(p) for p in model.tokenizer.parameters()]
    assert len(recommender_group["params"]) + len(tokenizer_group["params"]) == len(list(model.parameters()))
    split = cyclic_split()
    config = TrainConfig(epochs=1, batch_size=32, lr=1e-2, warmup_steps=1000, eval_batch_size=64)
    before = model.tokenizer.codebooks.detach().clone()
    fit(model, split, config, tmp_path, torch.device("cpu"))
    warmup = math.ceil(len(split.train) / 32) / 1000  # the rate's factor at the last step
    saved = torch.load(tmp_path / "last.pt")["optimizer"]["param_groups"]
    assert saved[0]["lr"] == pytest.approx(1e-2 * warmup) and saved[1]["lr"] == pytest.approx(3e-4 * warmup)
    assert not torch.equal(model.tokenizer.codebooks, before)


@pytest.mark.parametrize("side", ["both", "tokenizer"])
def test_soda_on_the_tokenizer_side_sends_no_gradient_into_the_encoder(side):
    split = cyclic_split()
    histories, targets = split.train.histories[:BATCH], split.train.targets[:BATCH]
    model = tiny_soda(side=side, backend="torch", cycles=0)  # recommender epochs with the term
    model.start_epoch(0)
    model.loss(histories, targets).backward()
    with_term = [p.grad.clone() for p in model.recommender.encoder.parameters()]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.alignments.parameters())  # the head
    model.zero_grad(set_to_none=True)
    model.recommender.loss(histories, targets).backward()
    code_loss_only = [p.grad for p in model.recommender.encoder.parameters()]
    same = all(torch.allclose(a, b) for a, b in zip(with_term, code_loss_only, strict=True))
    assert same == (side == "tokenizer")


@pytest.mark.parametrize("side", ["both", "recommender"])
def test_soda_on_the_recommender_side_leaves_the_tokenizer_epochs_alone(side):
    split = cyclic_split()
    histories, targets = split.train.histories[:BATCH], split.train.targets[:BATCH]
    model = tiny_soda(side=side, backend="torch")  # no warm-up: a tokenizer epoch first
    model.start_epoch(0)
    assert model.phase == TOKENIZER
    rows = targets.unique() - 1
    rqvae_loss, _ = model.tokenizer(model.item_embeddings[rows], rows)
    assert torch.isclose(model.loss(histories, targets), rqvae_loss).item() == (side == "recommender")
