"""Data parallelism on CPU: two gloo processes (torch.multiprocessing) against one process.

``sk.gather_in_batch``: each rank holds an unequal slice of a random batch, with a target repeated
within a rank and one held by both ranks. For every in-batch mode the gathered loss on each rank
equals the single-process loss on the concatenated batch (de-duplicated by ``unique``), and the
parameter gradients averaged over the ranks, as DDP averages them, equal the single-process ones.
``fit`` on two ranks (soda.distributed, as torchrun starts it) trains TIGER + SODA to the
parameters one process reaches with the same global batches. Last, ``torchrun -m soda train``
itself, on a small dataset of atomic files.

The children save what they computed; the parent compares (an exception in a child fails the
spawn, hence the test).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import soda.distributed
import soda_kernels as sk
from soda.data import load_atomic
from soda.embeddings import embeddings_path
from soda.train import TrainConfig, fit
from tests.test_soda_parity import tiny_soda
from tests.test_soda_train import cyclic_split
from tests.utils import rel_err

WORLD = 2
BATCH = 9
SLICES = (slice(0, 6), slice(6, BATCH))  # unequal shares of the batch
NUM_ITEMS, FEATURES, LAYERS, CODES, DIM = 12, 5, 2, 5, 3
CASES = [
    dict(in_batch="items"),
    dict(in_batch="users", symmetric=True),
    dict(in_batch="both", reduction="sum"),
    dict(in_batch="mean", symmetric=True),
    dict(in_batch="both", user_logits=True),
    dict(in_batch="mean", backend="triton"),  # the fused kernels (the interpreter on CPU), float32
]


class Towers(torch.nn.Module):
    """User and item towers into per-layer residuals (user logits with ``user_logits``), and codebooks."""

    def __init__(self, user_logits: bool, dtype: torch.dtype):
        super().__init__()
        self.user = torch.nn.Linear(FEATURES, LAYERS * (CODES if user_logits else DIM), dtype=dtype)
        self.item = torch.nn.Linear(FEATURES, LAYERS * DIM, dtype=dtype)
        self.codebooks = torch.nn.Parameter(torch.randn(LAYERS, CODES, DIM, dtype=dtype))


def problem(index: int):
    """Case ``index``: its options, towers, user features (B, F), item features and targets (B,)."""
    options = {"backend": "torch", **CASES[index]}
    dtype = torch.float32 if options["backend"] == "triton" else torch.float64
    torch.manual_seed(index)
    towers = Towers(options.get("user_logits", False), dtype)
    users = torch.randn(BATCH, FEATURES, dtype=dtype)
    item_features = torch.randn(NUM_ITEMS, FEATURES, dtype=dtype)
    targets = torch.randperm(NUM_ITEMS)[:BATCH]
    targets[2] = targets[0]  # repeated within rank 0
    targets[7] = targets[1]  # held by both ranks
    return options, towers, users, item_features, targets


def alignment_loss(towers, users, item_features, targets, options, gather=True, item_ids=True):
    """What SODA does: unique targets, tower outputs, (gather), distributional BPR."""
    ids, positives = targets.unique(return_inverse=True)
    user = towers.user(users).unflatten(-1, (LAYERS, -1))
    items = towers.item(item_features[ids]).unflatten(-1, (LAYERS, DIM))
    if gather:
        user, items, positives = sk.gather_in_batch(user, items, positives, item_ids=ids if item_ids else None)
    return sk.distributional_bpr(user, items, towers.codebooks, positives, **options)


def tolerance(options) -> float:
    return 1e-5 if options["backend"] == "triton" else 1e-6


def _gather_worker(rank: int, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{out_dir / 'store'}", rank=rank, world_size=WORLD)
    try:
        results = {"cases": []}
        for index in range(len(CASES)):
            options, towers, users, item_features, targets = problem(index)
            rows = SLICES[rank]
            loss = alignment_loss(towers, users[rows], item_features, targets[rows], options)
            loss.backward()
            gradients = {}
            for name, parameter in towers.named_parameters():
                dist.all_reduce(parameter.grad)
                gradients[name] = parameter.grad / WORLD  # DDP's average
            results["cases"].append((loss.detach(), gradients))
        with torch.no_grad():  # without item_ids the item both ranks hold is two items
            options, towers, users, item_features, targets = problem(0)
            rows = SLICES[rank]
            results["no_item_ids"] = alignment_loss(
                towers, users[rows], item_features, targets[rows], options, item_ids=False
            )
        results["layout"] = _gather_layout(rank)
        results["errors"] = _gather_errors(rank)
        torch.save(results, out_dir / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _gather_layout(rank: int) -> dict:
    """Rank r holds 3 - r user rows of value r + 1 and 2 + r items; the upstream gradient on rank r
    is r + 1 everywhere, so the backward's sum over ranks gives every user row 1 + 2 = 3."""
    user = torch.full((3 - rank, 2, 4), rank + 1.0, requires_grad=True)
    items = (10 * rank + torch.arange(2 + rank, dtype=torch.float32))[:, None, None].expand(-1, 2, 3).clone()
    positives = torch.tensor([1, 0, 1][: 3 - rank])
    item_ids = torch.tensor([[5, 7], [7, 1, 5]][rank])
    users, all_items, all_positives = sk.gather_in_batch(user, items.requires_grad_(), positives, item_ids=item_ids)
    (users * (rank + 1)).sum().backward()
    return dict(
        users=users.detach(),
        items=all_items.detach(),
        positives=all_positives,
        user_grad=user.grad,
        items_grad=items.grad,
    )


def _gather_errors(rank: int) -> list[tuple[str, str]]:
    """Rank 1 alone is wrong; both ranks raise the same error (and stay in step)."""
    errors = []
    for wrong in ("item_dim", "positive_range", "item_ids"):
        items = torch.zeros(3, 2, 4 if wrong == "item_dim" and rank == 1 else 3)
        positives = torch.tensor([0, 3 if wrong == "positive_range" and rank == 1 else 2])
        item_ids = None if wrong == "item_ids" and rank == 1 else torch.arange(3)
        try:
            sk.gather_in_batch(torch.zeros(2, 2, 3), items, positives, item_ids=item_ids)
        except (ValueError, IndexError) as error:
            errors.append((type(error).__name__, str(error)))
    return errors


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """What each of the two ranks of ``_gather_worker`` computed."""
    out_dir = tmp_path_factory.mktemp("gather")
    mp.spawn(_gather_worker, args=(out_dir,), nprocs=WORLD, join=True)
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(WORLD)]


@pytest.mark.parametrize("index", range(len(CASES)), ids=lambda index: "-".join(map(str, CASES[index].values())))
def test_gathered_loss_and_gradients_equal_one_process_on_the_whole_batch(ranks, index):
    options, towers, users, item_features, targets = problem(index)
    loss = alignment_loss(towers, users, item_features, targets, options, gather=False)
    loss.backward()
    for rank, result in enumerate(ranks):
        gathered_loss, gradients = result["cases"][index]
        assert rel_err(gathered_loss, loss) < tolerance(options), rank
        for name, parameter in towers.named_parameters():
            assert parameter.grad.norm() > 0
            assert rel_err(gradients[name], parameter.grad) < tolerance(options), (rank, name)
    if index == 0:  # the item both ranks hold matters: without item_ids the loss is another
        assert all(rel_err(result["no_item_ids"], loss) > 1e-3 for result in ranks)


def test_gather_concatenates_in_rank_order_and_sums_gradients_over_ranks(ranks):
    for result in ranks:
        layout = result["layout"]
        assert layout["users"][:, 0, 0].tolist() == [1, 1, 1, 2, 2]
        assert layout["items"][:, 0, 0].tolist() == [0, 1, 10, 11, 12]
        # rank 1's positives [1, 0] point at its items 11 (id 1) and 10 (id 7); id 7 first sits at row 1
        assert layout["positives"].tolist() == [1, 0, 1, 3, 1]
        assert (layout["user_grad"] == 3).all()
        # the items' upstream gradient is zero: only the users entered the sum above
        assert layout["items_grad"].abs().sum() == 0


def test_gather_errors_on_one_rank_raise_on_every_rank(ranks):
    for result in ranks:
        errors = result["errors"]
        assert [kind for kind, _ in errors] == ["ValueError", "IndexError", "ValueError"]
        assert "items must have the same shape" in errors[0][1] and "rank 1 has (., 2, 4)" in errors[0][1]
        assert "positives on rank 1 holds 3" in errors[1][1]
        assert "item_ids must be given on every rank or on none" in errors[2][1]


def test_one_process_passes_through_and_validates():
    assert not dist.is_initialized()
    user, items, positives = torch.randn(3, 2, 4), torch.randn(4, 2, 3), torch.tensor([2, 0, 2])
    assert all(
        a is b for a, b in zip(sk.gather_in_batch(user, items, positives), (user, items, positives), strict=True)
    )
    # with item_ids the answer is the one any world size gives: positives at an id's first row
    same = sk.gather_in_batch(user, items, positives, item_ids=torch.tensor([9, 4, 4, 9]))
    assert same[0] is user and same[1] is items and same[2].tolist() == [1, 0, 1]
    wrong = [
        (dict(user=torch.randn(3, 4)), ValueError, "user must have shape"),
        (dict(items=torch.randn(4, 3, 3)), ValueError, "items has L=3"),
        (dict(positives=torch.tensor([0, 1])), ValueError, "positives must have B=3"),
        (dict(positives=torch.tensor([0.0, 1.0, 2.0])), TypeError, "positives must be an integer tensor"),
        (dict(item_ids=torch.arange(3)), ValueError, "item_ids must have N=4"),
        (dict(item_ids=torch.arange(4), positives=torch.tensor([0, 4, 1])), IndexError, "positives holds 4"),
        (dict(item_ids=torch.arange(4, device="meta")), ValueError, "one device"),
    ]
    for change, error, message in wrong:
        arguments = dict(user=user, items=items, positives=positives) | change
        with pytest.raises(error, match=message):
            sk.gather_in_batch(**arguments)


EPOCHS = 2
# 280 training examples: 10 global batches of 27 (shares 14 + 13) and one of 10
TRAINING = TrainConfig(epochs=EPOCHS, batch_size=27, lr=1e-2, warmup_steps=3, eval_batch_size=64)
# recommender epochs with the alignment on (a tokenizer epoch's RQ-VAE loss is a per-rank mean)
SCHEDULE = dict(warmup_epochs=0, cycles=0, backend="torch")


def _fit_worker(rank: int, port: int, out_dir):
    """One rank as torchrun starts it: its variables in the environment, then setup and fit."""
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    device = soda.distributed.setup("cpu")
    try:
        assert soda.distributed.world_size() == WORLD and soda.distributed.rank() == rank
        model = tiny_soda(rank, **SCHEDULE)  # another model on rank 1: fit must start every rank from rank 0's
        result = fit(model, cyclic_split(), TRAINING, out_dir / "run", device)
        torch.save({"result": result, "parameters": dict(model.named_parameters())}, out_dir / f"fit{rank}.pt")
    finally:
        soda.distributed.teardown()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_fit_on_two_ranks_trains_like_one_process(tmp_path):
    assert soda.distributed.setup("cpu") == torch.device("cpu") and not dist.is_initialized()  # no torchrun
    mp.spawn(_fit_worker, args=(_free_port(), tmp_path), nprocs=WORLD, join=True)
    single = tiny_soda(0, **SCHEDULE)
    single_result = fit(single, cyclic_split(), TRAINING, tmp_path / "single", torch.device("cpu"))
    ranks = [torch.load(tmp_path / f"fit{rank}.pt") for rank in range(WORLD)]
    initial = dict(tiny_soda(0, **SCHEDULE).named_parameters())
    for name, value in single.named_parameters():
        assert not torch.equal(value, initial[name]) or not value.requires_grad, name  # it trained
        for rank in range(WORLD):
            torch.testing.assert_close(ranks[rank]["parameters"][name], value, rtol=1e-4, atol=1e-5, msg=name)
    assert ranks[1]["result"] == ranks[0]["result"]  # rank 0's evaluation, handed to every rank
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert written["test"] == ranks[0]["result"]["test"]
    assert set(single_result["test"]) == set(written["test"])
    assert (tmp_path / "run" / "best.pt").exists() and (tmp_path / "run" / "curves.png").exists()


# gloo on two CPU processes; NCCL on every GPU there is (one on the lent GPU machines), Triton kernels
LAUNCHES = [
    ("cpu", WORLD, "torch"),
    pytest.param(
        "cuda",
        max(torch.cuda.device_count(), 1),
        "triton",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    ),
]


@pytest.mark.parametrize("device, ranks, backend", LAUNCHES)
def test_torchrun_trains_tiger_with_soda_from_the_command_line(tmp_path, monkeypatch, device, ranks, backend):
    """torchrun through the CLI, as the README runs it: rank 0 alone writes and prints."""
    data = tmp_path / "data"
    data.mkdir()
    generator = torch.Generator().manual_seed(0)
    items = torch.randint(1, 61, (48, 9), generator=generator)
    (data / "toy.inter").write_text(
        "user_id:token\titem_id:token\ttimestamp:float\n"
        + "".join(
            f"u{user}\ti{item}\t{step}\n" for user, row in enumerate(items.tolist()) for step, item in enumerate(row)
        )
    )
    (data / "toy.item").write_text(
        "item_id:token\ttitle:token_seq\n" + "".join(f"i{i}\tItem {i}\n" for i in range(1, 61))
    )
    monkeypatch.setenv("SODA_CACHE", str(tmp_path / "cache"))  # the children inherit it
    # the item embeddings from the cache (random, 32-d), so that no sentence encoder runs
    texts = load_atomic(data, "toy").item_texts
    path = embeddings_path("toy", texts)
    path.parent.mkdir(parents=True)
    torch.save(torch.randn(len(texts), 32, generator=generator), path)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks)]
    command += ["--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    command += ["-m", "soda", "train", "--backbone", "tiger", "--soda", "--soda-backend", backend]
    command += ["--dataset", "toy", "--data-dir", str(data), "--preset", "cpu", "--epochs", "3", "--device", device]
    command += ["--out", str(tmp_path / "run")]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-4000:]
    assert finished.stdout.count("toy, test split, seed 0") == 1, finished.stdout  # printed by rank 0 only
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(written["test"]) == {"recall@5", "recall@10", "ndcg@5", "ndcg@10"}
    epochs = torch.load(tmp_path / "run" / "last.pt")["state"]["train_loss"]
    assert len(epochs) == 5  # R T R T R: three recommender epochs, the two cycles' tokenizer epochs on top
