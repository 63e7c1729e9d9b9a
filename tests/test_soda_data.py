"""The data layer: atomic-file parsing, stable ordering, k-core, leave-one-out without leakage."""

import pytest
import torch

from soda.data import (
    PAD,
    DataFormatError,
    SequentialDataset,
    k_core,
    leave_one_out,
    load_atomic,
    load_dataset,
)


def write_atomic(directory, inter_rows, item_rows):
    (directory / "toy.inter").write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
        + "".join(f"{u}\t{i}\t5\t{t}\n" for u, i, t in inter_rows)
    )
    (directory / "toy.item").write_text(
        "item_id:token\ttitle:token_seq\tyear:token\n"
        + "".join(f"{i}\t{title}\t{year}\n" for i, title, year in item_rows)
    )


def test_atomic_files_order_by_timestamp_then_row(tmp_path):
    # u1's rows are out of time order, and b/c tie on the timestamp: c comes first in the file.
    inter = [("u1", "a", 30), ("u1", "c", 10), ("u1", "b", 10), ("u2", "b", 5), ("u2", "d", 1)]
    write_atomic(tmp_path, inter, [("a", "Alpha", 1999), ("b", "Beta", 2001), ("c", "Gamma", 1980)])
    dataset = load_atomic(tmp_path, "toy")
    assert dataset.item_texts == ["Alpha, 1999", "Gamma, 1980", "Beta, 2001", ""]  # a, c, b, d
    assert dataset.sequences == [[2, 3, 1], [4, 3]]  # u1: c, b, a; u2: d, b


def test_malformed_file_names_file_and_line(tmp_path):
    write_atomic(tmp_path, [("u1", "a", 1), ("u1", "b", 2)], [("a", "Alpha", 1999)])
    path = tmp_path / "toy.inter"
    path.write_text(path.read_text() + "u2\tonly-two-fields\n")
    with pytest.raises(DataFormatError, match=r"toy\.inter:4: expected 4 tab-separated fields"):
        load_atomic(tmp_path, "toy")
    path.write_text("user_id:token\titem_id:token\ttimestamp:float\nu1\ta\tyesterday\n")
    with pytest.raises(DataFormatError, match=r"toy\.inter:2: timestamp 'yesterday'"):
        load_atomic(tmp_path, "toy")


def test_unknown_dataset_lists_known_ones():
    with pytest.raises(ValueError, match="ml-100k, ml-latest-small"):
        load_dataset("ml-1b")


def test_k_core_removes_rare_users_and_items_and_renumbers():
    dataset = SequentialDataset("toy", [[1, 2, 3], [1, 2, 3], [1, 2, 4], [4, 5]], list("abcde"))
    # 2-core: item 5 (once) goes, so the last user keeps [4] and goes, so item 4 is left once
    # and goes; what stays is items a, b, c.
    filtered = k_core(dataset, 2)
    assert filtered.item_texts == ["a", "b", "c"]
    assert filtered.sequences == [[1, 2, 3], [1, 2, 3], [1, 2]]
    # 3-core: item 3 (twice) goes too, then every user has two items: nothing is left.
    assert k_core(dataset, 3).sequences == []


def check_split(dataset: SequentialDataset, max_history: int) -> None:
    split = leave_one_out(dataset, max_history)
    users = [s for s in dataset.sequences if len(s) >= 3]
    assert len(split.valid) == len(split.test) == len(users)
    assert len(split.train) == sum(len(s) - 3 for s in users)
    for row, sequence in enumerate(users):
        assert split.test.targets[row] == sequence[-1]
        assert split.valid.targets[row] == sequence[-2]
        expected = sequence[:-1][-max_history:]
        test_history = split.test.histories[row]
        assert test_history[test_history != PAD].tolist() == expected
    # No leakage: no training example of a user contains (as history or target) that user's
    # validation or test position. Training examples come user by user, in order.
    start = 0
    for sequence in users:
        count = len(sequence) - 3
        histories = split.train.histories[start : start + count]
        targets = split.train.targets[start : start + count]
        for history, target, end in zip(histories, targets, range(1, count + 1), strict=True):
            assert target == sequence[end]
            assert history[history != PAD].tolist() == sequence[:end][-max_history:]
            assert end <= len(sequence) - 3  # targets stop before the validation item
        if sequence[-1] not in sequence[:-1]:
            assert not (histories == sequence[-1]).any() and not (targets == sequence[-1]).any()
        start += count


def test_leave_one_out_on_synthetic_sequences():
    generator = torch.Generator().manual_seed(0)
    sequences = [
        torch.randperm(40, generator=generator)[: int(n)].add(1).tolist()
        for n in torch.randint(1, 30, (25,), generator=generator)
    ]
    check_split(SequentialDataset("toy", sequences, [""] * 40), max_history=5)


def test_ml_100k_loads_offline_and_splits_without_leakage():
    dataset = load_dataset("ml-100k")
    assert (len(dataset.sequences), dataset.num_items, dataset.num_interactions) == (943, 1682, 100_000)
    assert all(text for text in dataset.item_texts)
    check_split(SequentialDataset("head", dataset.sequences[:40], dataset.item_texts), 20)
