"""The training loop: tiny end-to-end runs of the tokenizer, TIGER and SASRec on synthetic sequences,
early stopping, the loss read back every few steps, and progress in a log."""

import json
from dataclasses import replace

import pytest
import torch
import torch.nn as nn

import soda.train
from soda.baselines import MostPop, SASRec, SASRecConfig
from soda.data import SequentialDataset, leave_one_out
from soda.progress import Progress
from soda.recommender import TIGER, RecommenderConfig
from soda.tokenizer import RQVAE, TokenizerConfig, train_tokenizer
from soda.train import TrainConfig, evaluate, fit

NUM_ITEMS = 24


def cyclic_split():
    """Each user walks the items in a cycle (item i is followed by i + 1) from a random start."""
    generator = torch.Generator().manual_seed(0)
    starts = torch.randint(0, NUM_ITEMS, (40,), generator=generator).tolist()
    sequences = [[(start + step) % NUM_ITEMS + 1 for step in range(10)] for start in starts]
    return leave_one_out(SequentialDataset("cycle", sequences, [""] * NUM_ITEMS), max_history=6)


def mean_loss(model, examples) -> float:
    model.eval()
    with torch.no_grad():
        return model.loss(examples.histories, examples.targets).item()


def test_tiger_end_to_end_improves_and_resumes(tmp_path):
    torch.manual_seed(0)
    split = cyclic_split()
    tokenizer = RQVAE(8, TokenizerConfig(codebook_size=4, latent_dim=4, hidden_dims=(16,), epochs=20))
    embeddings = torch.randn(NUM_ITEMS, 8)
    train_tokenizer(tokenizer, embeddings, progress=False)
    config = RecommenderConfig(
        num_encoder_layers=1,
        num_decoder_layers=1,
        d_model=32,
        num_heads=2,
        head_dim=16,
        d_ff=64,
        dropout=0.0,
        beam_size=10,
    )
    model = TIGER(tokenizer.semantic_ids(embeddings), 4, config)
    initial = mean_loss(model, split.train)
    training = TrainConfig(epochs=2, batch_size=32, lr=1e-2, warmup_steps=5, eval_batch_size=16)
    fit(model, split, training, tmp_path, torch.device("cpu"))
    after_two = mean_loss(model, split.train)
    assert after_two < 0.9 * initial

    # --resume picks the run up after epoch 2 and trains the remaining epochs only.
    result = fit(model, split, replace(training, epochs=8), tmp_path, torch.device("cpu"), resume=True)
    state = torch.load(tmp_path / "last.pt")["state"]
    assert state["epoch"] == 8 and len(state["train_loss"]) == 8
    assert mean_loss(model, split.train) < after_two
    written = json.loads((tmp_path / "metrics.json").read_text())
    for part in ("valid", "test"):
        assert set(written[part]) == {"recall@5", "recall@10", "ndcg@5", "ndcg@10"}
        assert written[part] == result[part]
    assert (tmp_path / "best.pt").exists() and (tmp_path / "curves.png").exists()
    # the cycle is learnable: TIGER ranks the next item far above chance (10 / 24)
    assert result["test"]["recall@10"] > 0.6


def test_sasrec_learns_and_mostpop_ranks_by_count(tmp_path):
    torch.manual_seed(0)
    split = cyclic_split()
    sasrec = SASRec(NUM_ITEMS, SASRecConfig(hidden=32, max_history=6, dropout=0.0))
    initial = mean_loss(sasrec, split.train)
    result = fit(
        sasrec, split, TrainConfig(epochs=6, batch_size=32, lr=1e-2, warmup_steps=5), tmp_path, torch.device("cpu")
    )
    assert mean_loss(sasrec, split.train) < 0.5 * initial
    assert result["test"]["recall@10"] > 0.6


def test_mostpop_counts_exactly_the_training_items():
    # training parts (all but the last two items): [1, 2, 2], [3, 2], [1, 3, 2, 2]
    sequences = [[1, 2, 2, 4, 5], [3, 2, 6, 7], [1, 3, 2, 2, 8, 9]]
    split = leave_one_out(SequentialDataset("toy", sequences, [""] * 9))
    mostpop = MostPop(split.train, 9)
    top = mostpop.recommend(split.test.histories, 4)
    assert top.tolist() == [[2, 1, 3, 4]] * 3  # counts 5, 2, 2 (ties by id), then unseen items
    metrics = evaluate(mostpop, split.test, 2, torch.device("cpu"))
    assert metrics["recall@10"] == 1.0  # 10 of 9 items: everything is in the list


class Scripted(nn.Module):
    """A recommender whose validation Recall@10 after epoch e (1-based) is ``quality[e - 1]``: it
    ranks a user's target first for that share of the users. Its one parameter trains; the epoch
    it last trained in is a buffer, so a checkpoint remembers which epoch it holds."""

    def __init__(self, quality: list[float]):
        super().__init__()
        self.quality = quality
        self.weight = nn.Parameter(torch.ones(()))
        self.register_buffer("epoch", torch.zeros((), dtype=torch.long))
        self.started = []

    def param_groups(self) -> list[dict]:
        return [{"params": [self.weight]}]

    def start_epoch(self, epoch: int) -> None:
        self.started.append(epoch)
        self.epoch.fill_(epoch + 1)

    def loss(self, histories, targets):
        return (self.weight - 2.0) ** 2

    def recommend(self, histories, k):
        # the target is the item after the history's last (the cycle); first for the first users
        targets = histories[:, -1] % NUM_ITEMS + 1
        hits = torch.arange(len(histories)) < round(self.quality[int(self.epoch) - 1] * len(histories))
        return torch.where(hits[:, None], targets[:, None], 0).expand(-1, k)


def test_early_stopping_stops_after_patience_evaluations_and_tests_the_best_epoch(tmp_path):
    split = cyclic_split()
    quality = [0.2, 0.5, 0.4, 0.5, 0.45, 0.9, 0.1, 0.1]  # best at epoch 2; 3, 4, 5 do not beat it
    model = Scripted(quality)
    config = TrainConfig(epochs=8, batch_size=64, warmup_steps=1, patience=3)
    result = fit(model, split, config, tmp_path, torch.device("cpu"))
    assert model.started == [0, 1, 2, 3, 4]  # epoch 6 (0.9) never trains
    assert result["best_epoch"] == 2 and result["epochs"] == 5
    assert result["valid"]["recall@10"] == pytest.approx(0.5, abs=1 / len(split.valid))  # the best checkpoint's
    assert sum(0 <= rank < 10 for rank in result["ranks"]["valid"]) == round(0.5 * len(split.valid))
    # a resumed run that already stopped trains nothing more
    resumed = Scripted(quality)
    fit(resumed, split, replace(config, epochs=20), tmp_path, torch.device("cpu"), resume=True)
    assert resumed.started == []
    # without patience every epoch trains and the best is epoch 6
    assert (
        fit(Scripted(quality), split, replace(config, patience=None), tmp_path / "all", torch.device("cpu"))[
            "best_epoch"
        ]
        == 6
    )


def test_patience_counts_only_the_evaluations_after_min_epochs(tmp_path):
    quality = [0.5, 0.2, 0.2, 0.2, 0.3, 0.4, 0.3, 0.3, 0.3]  # the alternation (epochs 1-4) falls, then recovers
    model = Scripted(quality)
    config = TrainConfig(epochs=9, batch_size=64, warmup_steps=1, patience=2, min_epochs=4)
    result = fit(model, cyclic_split(), config, tmp_path, torch.device("cpu"))
    # epochs 5 and 6 are the first two evaluations that count; neither beats epoch 1, so it stops
    assert model.started == [0, 1, 2, 3, 4, 5] and result["best_epoch"] == 1


def test_minutes_sum_every_process_that_trained_the_run(tmp_path, monkeypatch):
    clock = iter(range(0, 10_000, 30))  # every reading 30 s after the last: 30 s an epoch
    monkeypatch.setattr(soda.train, "perf_counter", lambda: next(clock))
    config = TrainConfig(epochs=2, batch_size=64, warmup_steps=1)
    assert fit(Scripted([0.5] * 4), cyclic_split(), config, tmp_path, torch.device("cpu"))["minutes"] == 1.0
    resumed = fit(Scripted([0.5] * 4), cyclic_split(), replace(config, epochs=4), tmp_path, torch.device("cpu"), True)
    assert resumed["minutes"] == 2.0  # two epochs before the resume, two after
    checkpoint = torch.load(tmp_path / "last.pt")
    del checkpoint["state"]["seconds"]  # a checkpoint from before the timing counts from its resume
    torch.save(checkpoint, tmp_path / "last.pt")
    resumed = fit(Scripted([0.5] * 5), cyclic_split(), replace(config, epochs=5), tmp_path, torch.device("cpu"), True)
    assert resumed["minutes"] == 0.5


def test_fit_reads_the_loss_back_every_log_every_steps_not_every_step(tmp_path, monkeypatch):
    split = cyclic_split()  # 280 training examples: 35 steps of 8 per epoch
    loss_reads, item = [], torch.Tensor.item

    def counted_item(tensor):
        loss_reads.append(tensor.grad_fn is not None)  # a tensor in the graph: the loss
        return item(tensor)

    monkeypatch.setattr(torch.Tensor, "item", counted_item)
    for log_every, reads in ((1000, 0), (10, 7)):  # 70 steps: none, or the 10th, 20th, ... 70th
        loss_reads.clear()
        config = TrainConfig(epochs=2, batch_size=8, warmup_steps=1, eval_every=2, log_every=log_every)
        fit(Scripted([0.5, 0.5]), split, config, tmp_path / str(log_every), torch.device("cpu"))
        assert sum(loss_reads) == reads


def test_progress_in_a_log_is_lines_not_carriage_returns(capsys):
    items = list(Progress(range(3), "work", interval=0.0))
    assert items == [0, 1, 2]
    err = capsys.readouterr().err  # pytest's stderr is no terminal
    assert "\r" not in err and err.splitlines()[-1].startswith("work: 3/3 (")
    list(Progress(range(3), "quiet", enabled=False))
    assert capsys.readouterr().err == ""
