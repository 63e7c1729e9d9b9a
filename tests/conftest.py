"""Without a GPU every Triton kernel runs on CPU tensors under the Triton interpreter.

TRITON_INTERPRET must be set before any kernel module is imported, hence here. Under pytest-xdist
(``make test`` runs tests/ with ``-n auto``) each worker takes its share of the CPU's threads, so
that the workers' PyTorch thread pools do not oversubscribe the machine.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
