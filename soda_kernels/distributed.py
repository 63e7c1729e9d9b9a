"""Gather in-batch negatives across ranks, so data-parallel SODA sees the global batch.

Rank r of W holds B_r user rows, N_r item rows and positives_r (B_r,) into its own items. Every
rank gets back the concatenation in rank order (CLIP-style training does the same):

    users     = [user_0; ...; user_{W-1}]                      (B, L, .),  B = sum_r B_r
    items     = [items_0; ...; items_{W-1}]                    (N, L, d),  N = sum_r N_r
    positives = [positives_r + N_0 + ... + N_{r-1}]_r          (B,)

so ``distributional_bpr`` on the result is the loss of the global batch, the same on every rank.
Ranks may hold different B_r and N_r. With ``item_ids`` (each item row's global id) an item that
several rows hold, on one rank or on several, is one item: every positive is sent to the first
row holding its id, so the in-batch rule "a repeated item is never a negative" sees the repeat,
and the loss is the single-process loss on the concatenated batch de-duplicated by ``unique``.

Gradients. With L_q rank q's loss and G the gathered tensor, the backward sums the incoming
gradients over ranks and keeps the local rows:

    grad(user_r) = sum_q dL_q/dG [rows of rank r]        (one all-reduce of both sides)

so after DDP's average over ranks each parameter receives d/dθ of (1/W) sum_q L_q, which is the
global-batch loss L when every rank computes L (as here): the W ranks' identical gradients sum
to W dL/dG and the average divides the W out. Rows no positive points at (the later copies of a
repeated item) get zero gradient; the copy used carries the item's whole gradient, which the
average brings to the replicated parameters all the same. Every rank must backpropagate (the
backward is a collective), as with DDP.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ._validation import FLOAT_DTYPES, check_gather_in_batch, check_index_ranges

# The per-rank description exchanged before gathering, one int64 each.
_FIELDS = (
    "rows",
    "items",
    "layers",
    "user_dim",
    "item_dim",
    "user_dtype",
    "item_dtype",
    "has_ids",
    "builds_graph",
    "positive_min",
    "positive_max",
)


def gather_in_batch(
    user: torch.Tensor,
    items: torch.Tensor,
    positives: torch.Tensor,
    item_ids: torch.Tensor | None = None,
    group=None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All-gather the in-batch inputs of ``distributional_bpr`` over the ranks of ``group``.

    Args:
        user: (B_r, L, d) user residuals, or (B_r, L, K) user logits.
        items: (N_r, L, d) this rank's item residuals.
        positives: (B_r,) int index into ``items`` of each row's target.
        item_ids: None, or (N_r,) int global ids of the item rows: rows holding one id are one item.
        group: the process group (None: the default group).

    Returns:
        (users (B, L, .), items (N, L, d), positives (B,) int64 into ``items``), in rank order,
        differentiable in ``user`` and ``items`` (see the module docstring for the convention).
        Without an initialised process group, or with one rank, ``user`` and ``items`` come back
        as they are, and ``positives`` too unless ``item_ids`` repeats an id: the answer is the
        same at any world size.

    Shapes, dtypes and devices are checked on every rank; that the ranks agree on L, the last
    dimension and the dtypes, and every rank's positives range, are checked after exchanging
    them, so a bad rank makes every rank raise the same error instead of hanging.
    """
    check_gather_in_batch(user, items, positives, item_ids)
    if group is None and not (dist.is_available() and dist.is_initialized()):
        world = 1
    else:
        world = dist.get_world_size(group)
        if dist.get_rank(group) < 0:
            raise ValueError("group: this process is not a member of the process group")
    if world == 1:
        if item_ids is None:
            return user, items, positives
        check_index_ranges(("positives", positives, 0, len(items)))
        return user, items, _first_occurrence(item_ids)[positives]

    rank = dist.get_rank(group)
    table = _exchange_shapes(user, items, positives, item_ids, group)
    batch_sizes, item_counts = [row["rows"] for row in table], [row["items"] for row in table]
    user, items = _AllGatherRows.apply(group, (batch_sizes, item_counts), user, items)
    offset = sum(item_counts[:rank])
    positives = _all_gather_rows(positives.long() + offset, batch_sizes, group)
    if item_ids is not None:
        positives = _first_occurrence(_all_gather_rows(item_ids.long(), item_counts, group))[positives]
    return user, items, positives


def _exchange_shapes(user, items, positives, item_ids, group) -> list[dict[str, int]]:
    """Every rank's sizes and layout; raises (on every rank alike) where the ranks disagree."""
    builds_graph = torch.is_grad_enabled() and (user.requires_grad or items.requires_grad)
    layout = [
        len(user),
        len(items),
        user.shape[1],
        user.shape[2],
        items.shape[2],
        FLOAT_DTYPES.index(user.dtype),
        FLOAT_DTYPES.index(items.dtype),
        item_ids is not None,
        builds_graph,
    ]
    local = torch.tensor(layout, dtype=torch.int64, device=user.device)
    extremes = torch.stack([positives.min(), positives.max()]).long() if len(positives) else local.new_tensor([0, -1])
    local = torch.cat([local, extremes])
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, local, group=group)
    table = [dict(zip(_FIELDS, row, strict=True)) for row in torch.stack(gathered).tolist()]

    def describe(row, side):
        dtype = str(FLOAT_DTYPES[row[f"{side}_dtype"]]).removeprefix("torch.")
        return f"(., {row['layers']}, {row[f'{side}_dim']}) {dtype}"

    first = table[0]
    for rank, row in enumerate(table):
        for name, side in (("user", "user"), ("items", "item")):
            if describe(row, side) != describe(first, side):
                raise ValueError(
                    f"{name} must have the same shape past the first axis and the same dtype on every rank: "
                    f"rank 0 has {describe(first, side)}, rank {rank} has {describe(row, side)}"
                )
        if row["has_ids"] != first["has_ids"]:
            raise ValueError(
                f"item_ids must be given on every rank or on none (rank 0: {bool(first['has_ids'])}, "
                f"rank {rank}: {bool(row['has_ids'])})"
            )
        if row["builds_graph"] != first["builds_graph"]:
            raise RuntimeError(
                "every rank must differentiate the gather or none (its backward is a collective): "
                f"rank 0 {'does' if first['builds_graph'] else 'does not'}, "
                f"rank {rank} {'does' if row['builds_graph'] else 'does not'}"
            )
        for bound in ("positive_min", "positive_max"):
            if row["rows"] and not 0 <= row[bound] < row["items"]:
                raise IndexError(
                    f"positives on rank {rank} holds {row[bound]}, outside the valid range "
                    f"[0, {row['items']}) of that rank's items"
                )
    return table


def _all_gather_rows(tensor: torch.Tensor, counts: list[int], group) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` along dim 0 (rank r holds counts[r] rows): pad to the
    largest count, all-gather, strip the padding."""
    padded = tensor.new_zeros((max(counts), *tensor.shape[1:]))
    padded[: len(tensor)] = tensor
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([part[:count] for part, count in zip(parts, counts, strict=True)])


class _AllGatherRows(torch.autograd.Function):
    """``_all_gather_rows`` of several tensors; backward: one all-reduce (sum over ranks) of all
    their gradients, then each tensor's local rows."""

    @staticmethod
    def forward(ctx, group, counts, *tensors):
        ctx.group, ctx.counts, ctx.rank = group, counts, dist.get_rank(group)
        ctx.dtypes = [t.dtype for t in tensors]
        gathered = tuple(_all_gather_rows(t, c, group) for t, c in zip(tensors, counts, strict=True))
        ctx.shapes = [g.shape for g in gathered]
        return gathered

    @staticmethod
    def backward(ctx, *grads):
        dtype = torch.float64 if torch.float64 in ctx.dtypes else torch.float32
        flat = torch.cat([grad.to(dtype).reshape(-1) for grad in grads])  # unused outputs: zeros
        dist.all_reduce(flat, group=ctx.group)
        local_grads = []
        parts = flat.split([shape.numel() for shape in ctx.shapes])
        for index, (part, shape, counts) in enumerate(zip(parts, ctx.shapes, ctx.counts, strict=True)):
            start = sum(counts[: ctx.rank])
            local = part.view(shape)[start : start + counts[ctx.rank]].to(ctx.dtypes[index])
            local_grads.append(local if ctx.needs_input_grad[2 + index] else None)
        return None, None, *local_grads


def _first_occurrence(ids: torch.Tensor) -> torch.Tensor:
    """For every row, the index of the first row holding the same id: (N,) -> (N,) int64.
    Static shapes (a stable sort and a running maximum), so no host synchronisation."""
    ordered, order = torch.sort(ids, stable=True)
    starts = torch.ones_like(ordered, dtype=torch.bool)
    starts[1:] = ordered[1:] != ordered[:-1]
    position = torch.arange(len(ids), device=ids.device)
    group_start = torch.cummax(torch.where(starts, position, 0), 0).values
    return torch.empty_like(order).scatter_(0, order, order[group_start])
