"""Top-k retrieval by the distributional score over a whole catalogue, never a B x N buffer.

Scores. With the catalogue's P_n^l and log P_n^l over the F = L K (layer, code) features,

    -KL(P_n^l || Q_b^l) = P_n^l . log Q_b^l - P_n^l . log P_n^l

so over all layers s(b, n) is one product plus a per-row and a per-item constant:

    s(b, n) = rows[b] . cols[n] + row_bias[b] - item_bias[n]
    rows[b] = [w log Q_b, (w Q_b)]     cols[n] = [P_n, (log P_n)]     (bracketed: symmetric)
    row_bias[b] = (-sum_l w_l Q_b^l . log Q_b^l)     item_bias[n] = sum_l w_l P_n^l . log P_n^l

(w_l repeated over layer l's codes; ``torch_backend.topk_user_operands`` builds the user side,
``ItemDistributions`` holds P, log P and the per-layer P . log P of the catalogue.)

Ranking. Each (score, item) becomes one int64 key (``torch_backend.encode_topk_keys``: the
float32 score's order-preserving bits high, 2^31 - 1 - item low): keys are unique and order by
score, then by the lower index, so a top-k of keys is exact and deterministic. Excluded and
padded slots get TOPK_EMPTY, below every key.

Kernel (one launch, then a torch top-k over the splits). Program (row block, split) streams the
column tiles of its contiguous share of the catalogue: a (BLOCK_M, BLOCK_N) score tile on tensor
cores (F in BLOCK_F chunks), the row's excluded items masked by a merge-join against the row's
sorted exclusion list (each row's cursor only moves forward, as the tiles do), and the tile's
keys merged into a running (BLOCK_M, TOPK) list kept sorted on chip: ``tl.topk`` (a bitonic
top-k) of the tile down to TOPK, joined with the running list and cut to TOPK again. A tile none
of whose rows beats its running k-th key is skipped, which is most tiles once the lists fill.
Each program stores its list to a (B, splits, TOPK) buffer; the splits' lists are merged by one
torch top-k on keys (B x splits x TOPK int64: O(B), not O(B N)).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..torch_backend import TOPK_EMPTY, decode_topk_keys
from .common import SCORE_PRECISION, mma, wide_operands
from .launch import launch_config, plan_grid

# The widest running list a program keeps on chip (k is padded to a power of two up to it).
TOPK_MAX_K = 128
_EMPTY = tl.constexpr(TOPK_EMPTY)


@triton.jit
def _ranking_keys(scores, items):
    """int64 keys of a float32 score tile and its int64 item indices (``encode_topk_keys``)."""
    bits = (scores + 0.0).to(tl.int32, bitcast=True)
    ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return (ordered.to(tl.int64) << 32) | (0x7FFFFFFF - items)


@triton.jit
def _score_tile(
    row_ptrs, row_mask, col_ptrs, col_mask, num_features, acc, BLOCK_F: tl.constexpr, PRECISION: tl.constexpr
):
    """acc + rows . cols^T over F features in BLOCK_F chunks: a (BLOCK_M, BLOCK_N) float32 tile.
    row_ptrs (BLOCK_M, 1) and col_ptrs (BLOCK_N, 1): each row's first feature, F contiguous values
    of one dtype; row_mask (BLOCK_M,), col_mask (BLOCK_N,)."""
    offs_f = tl.arange(0, BLOCK_F)[None, :]
    for f_start in range(0, num_features, BLOCK_F):
        f_mask = f_start + offs_f < num_features
        x = tl.load(row_ptrs + f_start + offs_f, mask=row_mask[:, None] & f_mask, other=0.0)
        y = tl.load(col_ptrs + f_start + offs_f, mask=col_mask[:, None] & f_mask, other=0.0)
        acc = mma(x, tl.trans(y), acc, PRECISION)
    return acc


@triton.jit
def _topk_kernel(
    rows_ptr,
    row_bias_ptr,
    probs_ptr,
    log_probs_ptr,
    item_bias_ptr,
    offsets_ptr,
    excluded_ptr,
    out_ptr,
    batch,
    num_items,
    num_features,
    tiles_per_split,
    SYMMETRIC: tl.constexpr,
    TOPK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_F: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """The running top-TOPK keys of a block of users over a split of the catalogue.

    rows_ptr: (B, F or 2F SYMMETRIC) user operands; row_bias_ptr: (B,) float32;
    probs_ptr, log_probs_ptr: (N, F) the catalogue's P and log P (log P read only when SYMMETRIC),
    rows' dtype; item_bias_ptr: (N,) float32; offsets_ptr (B+1,) int64 and excluded_ptr (E,) int64:
    each row's excluded items, ascending within a row (None: no exclusions); out_ptr: (B, splits,
    TOPK) int64, the program's list, descending. Split s takes the column tiles
    [s tiles_per_split, (s + 1) tiles_per_split).
    """
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    split, splits = tl.program_id(1), tl.num_programs(1)
    row_mask = rows < batch
    row_stride = num_features * (2 if SYMMETRIC else 1)
    row_bias = tl.load(row_bias_ptr + rows, mask=row_mask, other=0.0)
    running = tl.full((BLOCK_M, TOPK), _EMPTY, tl.int64)
    if excluded_ptr is not None:
        cursor = tl.load(offsets_ptr + rows, mask=row_mask, other=0)
        end = tl.load(offsets_ptr + rows + 1, mask=row_mask, other=0)
    first_tile = split * tiles_per_split
    last_tile = tl.minimum(first_tile + tiles_per_split, tl.cdiv(num_items, BLOCK_N))
    for tile in range(first_tile, last_tile):
        tile_start = tile * BLOCK_N  # < 2^31: N is capped (TOPK_MAX_ITEMS)
        items = tile_start + tl.arange(0, BLOCK_N).to(tl.int64)
        item_mask = items < num_items
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for half in tl.static_range(2 if SYMMETRIC else 1):  # [w log Q] . P, then [w Q] . log P
            cols_ptr = probs_ptr if half == 0 else log_probs_ptr
            row_ptrs = rows_ptr + rows[:, None] * row_stride + half * num_features
            col_ptrs = cols_ptr + items[:, None] * num_features
            acc = _score_tile(row_ptrs, row_mask, col_ptrs, item_mask, num_features, acc, BLOCK_F=BLOCK_F,
                              PRECISION=PRECISION)
        item_bias = tl.load(item_bias_ptr + items, mask=item_mask, other=0.0)
        eligible = row_mask[:, None] & item_mask[None, :]
        if excluded_ptr is not None:
            # advance each row's cursor past its excluded items below this tile's end, masking them
            tile_end = tile_start + BLOCK_N
            excluded = tl.load(excluded_ptr + cursor, mask=cursor < end, other=0)
            pending = (cursor < end) & (excluded < tile_end)
            while tl.max(pending.to(tl.int32), axis=0) > 0:
                eligible = eligible & ~(pending[:, None] & (items[None, :] == excluded[:, None]))
                cursor += pending.to(tl.int64)
                excluded = tl.load(excluded_ptr + cursor, mask=cursor < end, other=0)
                pending = (cursor < end) & (excluded < tile_end)
        scores = acc + row_bias[:, None] - item_bias[None, :]
        keys = tl.where(eligible, _ranking_keys(scores, items[None, :]), _EMPTY)
        improves = tl.max(keys, axis=1) > tl.min(running, axis=1)
        if tl.max(improves.to(tl.int32), axis=0) > 0:
            if BLOCK_N > TOPK:  # the tile's best TOPK first (a new name: keys keeps its shape)
                best = tl.topk(keys, TOPK)
            else:
                best = keys
            running = tl.topk(tl.reshape(tl.join(running, best), (BLOCK_M, 2 * TOPK)), TOPK)
    out = out_ptr + (rows[:, None] * splits + split) * TOPK + tl.arange(0, TOPK)[None, :]
    tl.store(out, running, mask=row_mask[:, None])


def topk_list_width(k: int) -> int:
    """The running list's width for k: k padded to a power of two (at least 16)."""
    return max(16, triton.next_power_of_2(k))


def distributional_topk(rows, row_bias, probs, log_probs, item_bias, excluded_rows, excluded_items, k):
    """The k best items per row on the Triton kernel; arguments as ``torch_backend.distributional_topk``
    (validated by the caller), rows and the catalogue in one dtype, k <= TOPK_MAX_K.
    Returns scores (B, k) float32 descending and indices (B, k) int64, -inf / -1 past the eligible."""
    (batch, width), (num_items, num_features) = rows.shape, probs.shape
    symmetric = width == 2 * num_features
    list_width = topk_list_width(k)
    config = launch_config("topk", width=list_width, wide=wide_operands(rows, probs))
    row_blocks = triton.cdiv(batch, config["BLOCK_M"])
    grid = plan_grid("topk", config, rows.device, batch=batch, items=num_items)
    tiles_per_split, splits = grid["tiles_per_split"], grid["splits"]
    offsets = excluded = None
    if excluded_items.numel() > 0:  # each row's items ascending: sort the (row, item) pairs by row N + item
        excluded = torch.sort(excluded_rows * num_items + excluded_items).values % num_items
        offsets = torch.searchsorted(excluded_rows, torch.arange(batch + 1, device=rows.device))
    out = torch.empty((batch, splits, list_width), dtype=torch.int64, device=rows.device)
    _topk_kernel[(row_blocks, splits)](
        rows_ptr=rows.contiguous(), row_bias_ptr=row_bias.float().contiguous(), probs_ptr=probs,
        log_probs_ptr=log_probs, item_bias_ptr=item_bias.float().contiguous(), offsets_ptr=offsets,
        excluded_ptr=excluded, out_ptr=out, batch=batch, num_items=num_items, num_features=num_features,
        tiles_per_split=tiles_per_split, SYMMETRIC=symmetric, TOPK=list_width, PRECISION=SCORE_PRECISION, **config,
    )
    best = out.view(batch, splits * list_width).topk(min(k, splits * list_width), dim=1).values
    if best.shape[1] < k:
        best = torch.cat([best, best.new_full((batch, k - best.shape[1]), TOPK_EMPTY)], 1)
    return decode_topk_keys(best)
