"""Data-parallel training under torchrun: one process per GPU (or per CPU process), one global batch.

    torchrun --nproc_per_node N -m soda train ...        (or python -m torch.distributed.run ...)

``setup`` (called by the command line) sees torchrun's RANK, WORLD_SIZE and LOCAL_RANK, joins the
process group (NCCL on CUDA, gloo on CPU), gives each process its GPU (cuda:LOCAL_RANK) and
leaves the group at exit. Without those variables every function here is a no-op, and training
is single-process exactly as before. ``fit`` (soda/train.py) then:

- starts every rank from rank 0's parameters and buffers (``broadcast_module``);
- draws the same permutation on every rank and splits each global batch of ``batch_size``
  examples across the ranks (``shard``: rank r takes B_r ~ batch_size / W rows);
- backpropagates each rank's loss weighted by its share B_r / B of the global batch and sums the
  gradients across ranks (``sum_gradients``). For a loss that is a mean over examples this is the
  gradient of the global batch: sum_r (B_r / B) mean_r = mean. SODA's alignment is computed on
  the global batch on every rank (``sk.gather_in_batch``, whose backward sums over ranks); the
  shares sum to 1, so it too gets exactly its global-batch gradient;
- evaluates and writes checkpoints, metrics and curves on rank 0 while the others wait
  (``barrier``), and hands rank 0's results to every rank (``from_main``).

Why not DistributedDataParallel: SODA's alternating schedule switches ``requires_grad`` per epoch,
and a DDP wrapper built once reduces only the parameters that required gradients when it was
built, and expects every one of them to get a gradient each step. An explicit all-reduce after
backward (one flat buffer per dtype, the parameters that have a gradient on some rank) is right
whatever trains in an epoch, and with unequal shards. Its price, no overlap of communication
with backward, is small for models of this size.

A SODA tokenizer epoch is the one place where the data-parallel gradient is close but not
exact: the RQ-VAE loss is a mean over each rank's distinct target items.
"""

from __future__ import annotations

import atexit
import os
from datetime import timedelta
from itertools import chain

import torch
import torch.distributed as dist
import torch.nn as nn

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
# Rank 0 evaluates while the others wait at a barrier: longer than NCCL's default 10 minutes.
TIMEOUT = timedelta(hours=2)


def setup(device: str | torch.device) -> torch.device:
    """Join torchrun's process group if torchrun started this process; the device to train on
    (``cuda`` becomes ``cuda:LOCAL_RANK``)."""
    device = torch.device(device)
    if not all(name in os.environ for name in TORCHRUN_VARIABLES) or dist.is_initialized():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
    atexit.register(teardown)
    return device


def teardown() -> None:
    """Leave the process group, if in one."""
    if dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """Rank 0, the one that evaluates and writes files (the only process when not distributed)."""
    return rank() == 0


def shard(batch: torch.Tensor) -> torch.Tensor:
    """This rank's part of a global batch of example indices (sizes differ by at most one)."""
    return batch.tensor_split(world_size())[rank()]


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def from_main(value):
    """Rank 0's ``value`` (any picklable object) on every rank."""
    if world_size() == 1:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def _device() -> torch.device:
    """Where collectives' own tensors live: the current GPU under NCCL, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def sum_over_ranks(value: float) -> float:
    if world_size() == 1:
        return value
    total = torch.tensor(value, dtype=torch.float64, device=_device())
    dist.all_reduce(total)
    return total.item()


@torch.no_grad()
def broadcast_module(model: nn.Module) -> None:
    """Copy rank 0's parameters and buffers (persistent or not) to every rank, after checking
    that every rank built the same model."""
    if world_size() == 1:
        return
    named = list(chain(model.named_parameters(), model.named_buffers()))
    layout = [(name, tuple(tensor.shape), str(tensor.dtype)) for name, tensor in named]
    layouts = [None] * world_size()
    dist.all_gather_object(layouts, layout)
    for other_rank, other in enumerate(layouts):
        if other != layout:
            differences = [(mine, theirs) for mine, theirs in zip(layout, other, strict=False) if mine != theirs]
            first = differences[0] if differences else f"{len(layout)} tensors against {len(other)}"
            raise RuntimeError(
                f"rank {rank()} and rank {other_rank} built different models (first difference: {first}); "
                "data-parallel training needs the same model on every rank"
            )
    for _, tensor in named:
        dist.broadcast(tensor, src=0)


@torch.no_grad()
def sum_gradients(parameters) -> None:
    """Sum the gradients of ``parameters`` over the ranks, in place. A parameter that has a
    gradient on some rank gets the sum on every rank (zeros standing in where it has none); one
    that has none anywhere keeps none, so the optimiser skips it as it would on one process."""
    if world_size() == 1:
        return
    parameters = [p for p in parameters if p.requires_grad]
    if not parameters:
        return
    has_grad = torch.tensor([p.grad is not None for p in parameters], dtype=torch.float32, device=_device())
    dist.all_reduce(has_grad)
    buckets: dict[tuple, list[nn.Parameter]] = {}
    for parameter, present in zip(parameters, has_grad.tolist(), strict=True):
        if present:
            buckets.setdefault((parameter.device, parameter.dtype), []).append(parameter)
    for bucket in buckets.values():
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in bucket])
        dist.all_reduce(flat)
        for parameter, part in zip(bucket, flat.split([p.numel() for p in bucket]), strict=True):
            parameter.grad = part.view_as(parameter)
