"""SODA on TIGER: the user-side quantisation, the schedule, the CLI switch, and a tiny run that trains."""

import argparse
import json

import torch

import soda.train
from soda.__main__ import configure
from soda.alignment import RECOMMENDER, TOKENIZER, SODAConfig
from soda.data import SequentialDataset
from soda.recommender import RecommenderConfig
from soda.tokenizer import RQVAE, TokenizerConfig
from soda.train import RunConfig, TrainConfig, train_tiger
from tests.test_soda_train import NUM_ITEMS, cyclic_split


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


def test_schedule_warms_up_alternates_and_ends_frozen():
    config = SODAConfig(warmup_epochs=1, cycle_length=3, final_frozen_epochs=2)
    phases = [config.phase(epoch, 9) for epoch in range(9)]
    assert phases == [
        (RECOMMENDER, False),
        (TOKENIZER, True),
        (RECOMMENDER, True),
        (RECOMMENDER, True),
        (TOKENIZER, True),
        (RECOMMENDER, True),
        (RECOMMENDER, True),
        (RECOMMENDER, True),
        (RECOMMENDER, True),
    ]


def test_cli_switch_configures_soda():
    def args(**soda_options):
        return argparse.Namespace(preset="cpu", epochs=None, min_interactions=None, **soda_options)

    assert configure(args()).soda is None  # main / baselines: no SODA flags at all
    options = dict(soda_weight=0.5, soda_temperature=2.0, soda_in_batch="both", soda_backend="torch")
    assert configure(args(soda=False, soda_symmetric=False, **options)).soda is None
    soda_config = configure(args(soda=True, soda_symmetric=True, **options)).soda
    assert (soda_config.weight, soda_config.temperature, soda_config.in_batch) == (0.5, 2.0, "both")
    assert soda_config.symmetric and soda_config.backend == "torch"


def test_tiny_soda_run_trains_through_train_tiger(tmp_path, monkeypatch):
    split = cyclic_split()
    dataset = SequentialDataset("cycle", [], [""] * NUM_ITEMS)
    monkeypatch.setattr(soda.train, "prepare_split", lambda *args: (dataset, split))
    monkeypatch.setattr(soda.train, "item_embeddings", lambda *args: torch.randn(NUM_ITEMS, 8))
    config = RunConfig(
        tokenizer=TokenizerConfig(num_layers=2, codebook_size=8, latent_dim=4, hidden_dims=(16,), epochs=20),
        recommender=RecommenderConfig(
            num_encoder_layers=1, num_decoder_layers=1, d_model=32, num_heads=2, head_dim=16, d_ff=64, dropout=0.0
        ),
        train=TrainConfig(epochs=6, batch_size=32, lr=1e-2, warmup_steps=5, eval_every=3, eval_batch_size=64),
        soda=SODAConfig(user_hidden=16, warmup_epochs=0, cycle_length=2, final_frozen_epochs=2, backend="torch"),
    )
    result = train_tiger("cycle", config, tmp_path, torch.device("cpu"))
    # epochs: tokenizer, recommender, tokenizer, recommender, then two with the tokenizer frozen
    train_loss = torch.load(tmp_path / "last.pt")["state"]["train_loss"]
    assert train_loss[5] < train_loss[3] < train_loss[1]
    assert json.loads((tmp_path / "metrics.json").read_text())["tokenizer_final"] == result["tokenizer_final"]


def test_codes_are_rederived_after_a_tokenizer_epoch():
    from tests.test_soda_parity import train_tiny_soda

    model = train_tiny_soda("torch", epochs=2)  # a tokenizer epoch, then a recommender epoch
    codes = model.tokenizer.semantic_ids(model.item_embeddings)
    expected = codes + torch.tensor(model.recommender.level_starts)
    assert torch.equal(model.recommender.item_tokens[1:], expected)
    assert (model.recommend(cyclic_split().test.histories, 5) > 0).all()
