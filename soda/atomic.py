"""Atomic file writes, the one way every file of a run is written (checkpoints, metrics, records,
caches): a reader sees the old file or the new one, never part of one, even if the writer is
killed halfway. Data-parallel (soda/distributed.py), rank 0 alone writes."""

from __future__ import annotations

import io
import os
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
