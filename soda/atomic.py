"""Atomic file writes, the one way every file of a run is written (checkpoints, metrics, records,
caches): a reader sees the old file or the new one, never part of one, even if the writer is
killed halfway. Data-parallel (soda/distributed.py), rank 0 alone writes. And ``exclusive``, for a
run directory that two processes may both want to train (a SASRec the experiment's runs share)."""

from __future__ import annotations

import fcntl
import io
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from soda import distributed


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write ``data`` to a temporary file beside ``path`` (its name carries the process id), then
    rename it over ``path``."""
    if not distributed.is_main():
        return
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    if isinstance(data, str):
        temporary.write_text(data)
    else:
        temporary.write_bytes(data)
    os.replace(temporary, path)


def save_atomic(obj: object, path: Path) -> None:
    """``torch.save(obj, path)``, atomically."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_atomic(path, buffer.getvalue())


@contextmanager
def exclusive(directory: Path) -> Iterator[None]:
    """Hold the lock of ``directory`` (its file ``.lock``, created with it) for the block: a second
    process asking for it waits until the first is done, then finds the first's work (a run it
    resumes). Data-parallel, rank 0 alone locks; the other ranks wait for it inside the run."""
    if not distributed.is_main():
        yield
        return
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as lock:  # closing the file releases the lock
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
