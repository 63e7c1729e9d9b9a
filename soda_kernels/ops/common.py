"""What every Triton op of the package shares: precision, the tile helpers and the finishing
kernels (launch settings: ``launch.py``).

Layouts. The ops make their inputs contiguous first (a copy only where one is not), so the
kernels take bare pointers: residuals (R, L, d), logits (R, L, K) and codebooks (L, K, d),
row-major. A helper that works on one layer takes pointers already moved to that layer
(``x_ptr + layer * dim``, ``c_ptr + layer * num_codes * dim``) and the row stride (L d or L K).

Codebook logits by the expansion (the ||x||^2 term cancels in every softmax over k):

    a_k = -||x - C_k||^2 / tau  ~  (2 x . C_k - ||C_k||^2) / tau

and, for a logit gradient g = dLoss/da (one row of K values summing to 0 over k, as every
log-softmax backward leaves it), the gradients of the residual and the codewords:

    dLoss/dx   = (2/tau) sum_k g_k C_k         (the -||x||^2/tau term adds -(2/tau) x sum_k g_k = 0)
    dLoss/dC_k = (2/tau) g_k (x - C_k)          = (2/tau) (g_k x - g_k C_k)

``project_logit_grad`` is that pair for a tile of rows and codes; the codeword part is a
per-program partial that ``sum_partials`` adds up in a fixed order, so gradients are
deterministic without atomics.

Precision. Products of 16-bit residuals and codebooks enter ``tl.dot`` natively (exact products,
float32 accumulation). Float32 operands use ``LOGIT_PRECISION`` ("tf32x3": three tf32
tensor-core products, about float32's accuracy) where a product feeds a logit or a gradient
projection, since the 2/tau factor and the cancellation in x - C_k amplify its error, and
``SCORE_PRECISION`` ("bf16x3", the bf16 tensor-core rate) for the score-sized products of the
in-batch op (its operands are log-probabilities and probabilities: relative error against
float64 of the scores 2.0e-6, of the loss 2.0e-7, measured by
``python -m bench.precision --batch 4096``, the table in docs/precision.md).
``SODA_FP32_DOT_PRECISION`` = ieee / tf32x3 / bf16x3 / tf32, set before import, forces one
precision for every float32 product. The interpreter computes every float32 dot in float32.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .launch import INTERPRETER, launch_config, plan_grid

_FORCED_PRECISION = os.environ.get("SODA_FP32_DOT_PRECISION")
if _FORCED_PRECISION not in (None, "ieee", "tf32x3", "bf16x3", "tf32"):
    raise ValueError(f"SODA_FP32_DOT_PRECISION must be ieee, tf32x3, bf16x3 or tf32, got {_FORCED_PRECISION!r}")


def _precision(default: str) -> str:
    if INTERPRETER:
        return "ieee"  # the interpreter knows neither bf16x3 nor tensor cores: float32 throughout
    return _FORCED_PRECISION or default


LOGIT_PRECISION = _precision("tf32x3")
SCORE_PRECISION = _precision("bf16x3")

# bfloat16 / float16 tiles go into tl.dot as they are on the GPU; the interpreter mis-computes
# 16-bit dots, so there they are upcast to float32 first.
NATIVE_16BIT_DOT = tl.constexpr(not INTERPRETER)


def operand_dtype(input_dtype: torch.dtype) -> torch.dtype:
    """Storage of the in-batch score operands (log-probabilities, probabilities): bfloat16 for
    16-bit inputs (the loss within 6.6e-5 of float64, relative, by
    ``python -m bench.precision --batch 4096``, docs/precision.md; bf16's range so that no extreme
    logit overflows), float32 for float32 inputs (multiplied as bf16x3)."""
    return torch.float32 if input_dtype == torch.float32 else torch.bfloat16


# ----------------------------------------------------------------------------------------------
# Tile helpers.


@triton.jit
def layer_weight(weights_ptr, layer):
    """w_l, float32: from weights_ptr (L,) float32, or 1 when weights_ptr is None (no layer weights
    given: the default, which then costs no tensor and no load)."""
    if weights_ptr is None:
        weight = 1.0
    else:
        weight = tl.load(weights_ptr + layer)
    return weight


@triton.jit
def feature_weights(weights_ptr, features, num_codes, mask):
    """The weight of each feature f = l K + k of ``features`` (a tensor), w_l, float32; 0 where
    ``mask`` is false. weights_ptr as ``layer_weight``."""
    if weights_ptr is None:
        weights = tl.where(mask, 1.0, 0.0)
    else:
        weights = tl.load(weights_ptr + features // num_codes, mask=mask, other=0.0)
    return weights


@triton.jit
def clamp_rows(index, num_rows):
    """Indices into a table of ``num_rows`` >= 1 rows clamped into [0, num_rows), so that an index
    outside the table is never read: the value checks may have been skipped (validate=False,
    torch.compile), and the caller makes what it computes from a clamped index NaN, so that the
    error shows in the loss. (A clamp, not a select on the range check, which costs registers.)"""
    return tl.minimum(tl.maximum(index, 0), num_rows - 1)


@triton.jit
def softplus(x):
    """log(1 + e^x) = max(x, 0) + log1p(e^-|x|), the log1p by its series where e^-|x| is tiny."""
    e = tl.exp(-tl.abs(x))
    return tl.maximum(x, 0.0) + tl.where(e < 1e-4, e * (1.0 - 0.5 * e), tl.log(1.0 + e))


@triton.jit
def sigmoid(x):
    """1 / (1 + e^-x) from e^-|x|, which never overflows."""
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0, e) / (1.0 + e)


@triton.jit
def mma(x, y, acc, PRECISION: tl.constexpr):
    """acc + x @ y for same-dtype tiles: 16-bit tiles natively on the GPU (upcast in the
    interpreter, which mis-computes 16-bit dots), float32 ones at ``PRECISION``."""
    if NATIVE_16BIT_DOT and x.dtype != tl.float32:
        return tl.dot(x, y, acc)
    return tl.dot(x.to(tl.float32), y.to(tl.float32), acc, input_precision=PRECISION)


@triton.jit
def load_rows(ptr, row_stride, rows, row_mask, width, BLOCK_W: tl.constexpr):
    """A (rows, BLOCK_W) tile of a row-major table, row r at ptr + r * row_stride, 0 outside
    ``row_mask`` and past ``width`` columns; in the table's dtype."""
    offs = tl.arange(0, BLOCK_W)
    return tl.load(ptr + rows[:, None] * row_stride + offs[None, :], mask=row_mask[:, None] & (offs < width)[None, :],
                   other=0.0)


@triton.jit
def codebook_logits(
    x_ptr, row_stride, rows, row_mask, c_ptr, codes, code_mask, dim, inv_temperature,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """(2 x[rows] . C[codes] - ||C[codes]||^2) / tau, a (BLOCK_R, BLOCK_K) float32 tile, -inf on
    masked codes (so that they vanish from every softmax), accumulated over d in BLOCK_D chunks.

    x_ptr: the residuals of one layer, row r at x_ptr + r * row_stride (d contiguous values);
    c_ptr: that layer's codebook (K, d); rows (BLOCK_R,), codes (BLOCK_K,) with their masks.
    """
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    squared_norm = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for d_start in range(0, dim, BLOCK_D):
        x = load_rows(x_ptr + d_start, row_stride, rows, row_mask, dim - d_start, BLOCK_D)
        c = load_rows(c_ptr + d_start, dim, codes, code_mask, dim - d_start, BLOCK_D)
        if x.dtype == c.dtype:
            acc = mma(x, tl.trans(c), acc, PRECISION)
        else:
            acc = tl.dot(x.to(tl.float32), tl.trans(c.to(tl.float32)), acc, input_precision=PRECISION)
        c = c.to(tl.float32)
        squared_norm += tl.sum(c * c, axis=1)
    logits = (2.0 * acc - squared_norm[None, :]) * inv_temperature
    return tl.where(code_mask[None, :], logits, float("-inf"))


@triton.jit
def load_logits(logits_ptr, row_stride, rows, row_mask, codes, code_mask):
    """A (rows, codes) tile of one layer's logits (K contiguous values a row at logits_ptr +
    r * row_stride) as float32, -inf on masked codes (so that they vanish from every softmax)."""
    logits = tl.load(logits_ptr + rows[:, None] * row_stride + codes[None, :],
                     mask=row_mask[:, None] & code_mask[None, :], other=0.0).to(tl.float32)
    return tl.where(code_mask[None, :], logits, float("-inf"))


@triton.jit
def log_sum_exp_update(running_max, running_sum, logits):
    """One K tile of an online log-sum-exp: (max, sum of exp(logit - max)) per row, (BLOCK_R,)
    each, after the (BLOCK_R, BLOCK_K) tile ``logits``; start from (-inf, 0), end with max + log sum."""
    new_max = tl.maximum(running_max, tl.max(logits, axis=1))
    running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(logits - new_max[:, None]), axis=1)
    return new_max, running_sum


@triton.jit
def layer_logits(
    src_ptr, row_stride, rows, row_mask, c_ptr, codes, code_mask, dim, inv_temperature,
    FROM_LOGITS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """One K tile of a layer's logits, (BLOCK_R, BLOCK_K) float32, -inf on masked codes: read
    from src_ptr (the layer's logits, K contiguous values a row) when FROM_LOGITS, else the
    codebook logits of the residuals at src_ptr (c_ptr: the layer's codebook (K, d))."""
    if FROM_LOGITS:
        logits = load_logits(src_ptr, row_stride, rows, row_mask, codes, code_mask)
    else:
        logits = codebook_logits(src_ptr, row_stride, rows, row_mask, c_ptr, codes, code_mask, dim,
                                 inv_temperature, BLOCK_R, BLOCK_K, BLOCK_D, PRECISION)
    return logits


@triton.jit
def layer_log_probs(
    src_ptr, row_stride, rows, row_mask, c_ptr, codes, code_mask, dim, inv_temperature, lse,
    FROM_LOGITS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """A (rows, codes) tile of one layer's log-probabilities, ``layer_logits`` - lse (lse: the
    rows' log-sum-exps, (BLOCK_R,)), 0 on masked rows and codes; arguments as ``layer_logits``."""
    logits = layer_logits(src_ptr, row_stride, rows, row_mask, c_ptr, codes, code_mask, dim, inv_temperature,
                          FROM_LOGITS, BLOCK_R, BLOCK_K, BLOCK_D, PRECISION)
    return tl.where(row_mask[:, None] & code_mask[None, :], logits - lse[:, None], 0.0)


@triton.jit
def log_sum_exp(
    src_ptr, row_stride, rows, row_mask, c_ptr, num_codes, dim, inv_temperature,
    FROM_LOGITS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """log sum_k exp(logit_k) of one layer, (BLOCK_R,) float32: an online log-sum-exp over K tiles
    (arguments as ``layer_logits``)."""
    running_max = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    running_sum = tl.zeros((BLOCK_R,), tl.float32)
    for k_start in range(0, num_codes, BLOCK_K):
        codes = k_start + tl.arange(0, BLOCK_K)
        logits = layer_logits(src_ptr, row_stride, rows, row_mask, c_ptr, codes, codes < num_codes, dim,
                              inv_temperature, FROM_LOGITS, BLOCK_R, BLOCK_K, BLOCK_D, PRECISION)
        running_max, running_sum = log_sum_exp_update(running_max, running_sum, logits)
    return running_max + tl.log(running_sum)


@triton.jit
def project_logit_grad(grad_logits, x, c, PRECISION: tl.constexpr):
    """The residual and codeword gradients of one (rows, codes) tile of a layer's logit gradient,
    up to the factor 2 / tau: (g c, g^T x - (sum_r g) c), (BLOCK_R, BLOCK_DIM) and (BLOCK_K,
    BLOCK_DIM) float32. The caller sums the first over its K tiles into the residual gradient and
    stores the second as its partial of the codebook gradient.

    grad_logits (BLOCK_R, BLOCK_K) float32, 0 on masked rows and codes; x (BLOCK_R, BLOCK_DIM)
    and c (BLOCK_K, BLOCK_DIM) the rows' residuals and the codewords, d whole (zero-padded).
    Float32 products at ``PRECISION`` whatever the input dtype: x - c may cancel, and these
    products are small.
    """
    x = x.to(tl.float32)
    c = c.to(tl.float32)
    grad_x = tl.dot(grad_logits, c, input_precision=PRECISION)
    grad_c = tl.dot(tl.trans(grad_logits), x, input_precision=PRECISION) - tl.sum(grad_logits, axis=0)[:, None] * c
    return grad_x, grad_c


@triton.jit
def project_logit_grad_into(grad_logits, x, c, grad_x, grad_c, PRECISION: tl.constexpr):
    """``project_logit_grad`` for a caller that sums many tiles of rows into one codebook partial:
    (grad_x + g c, grad_c + g^T x, sum_r g), (BLOCK_R, BLOCK_G), (BLOCK_K, BLOCK_G) and (BLOCK_K,)
    float32, up to the factor 2 / tau, which the caller folds into g. The caller subtracts
    (sum of the sum_r g) c from its partial once, after its last tile.

    grad_logits (BLOCK_R, BLOCK_K) float32, 0 on masked rows and codes; x (BLOCK_R, BLOCK_G) and
    c (BLOCK_K, BLOCK_G) a chunk of the residuals' and the codewords' features. bfloat16 x and c
    multiply natively with g rounded to bfloat16 (relative 4e-3, inside the 16-bit inputs'
    tolerance), the column sums taken of the rounded g, so that g^T x - (sum g) c is still
    sum g (x - c) and nothing cancels; float16 (whose range would flush small g to 0) and float32
    operands multiply in float32 at ``PRECISION``.
    """
    if NATIVE_16BIT_DOT and x.dtype == tl.bfloat16 and c.dtype == tl.bfloat16:
        g = grad_logits.to(tl.bfloat16)
    else:
        g = grad_logits
        x = x.to(tl.float32)
        c = c.to(tl.float32)
    grad_x = mma(g, c, grad_x, PRECISION)
    grad_c = mma(tl.trans(g), x, grad_c, PRECISION)
    return grad_x, grad_c, tl.sum(g.to(tl.float32), axis=0)


@triton.jit
def project_into_partial(grad_logits, x, c, grad_x, part_ptr, codes, code_mask, dim, first, PRECISION: tl.constexpr):
    """``project_logit_grad_into`` for one tile of a program whose codebook partial lives in global
    memory: returns grad_x + g c and sets (``first``) or adds to rows ``codes`` of the partial
    part_ptr (K, d) float32 g^T x - (sum_r g) c, the partial read back by the program that owns
    it. Arguments as ``project_logit_grad_into``; c (BLOCK_K, BLOCK_DIM) with d whole."""
    offs_d = tl.arange(0, c.shape[1])
    tile = part_ptr + codes[:, None] * dim + offs_d[None, :]
    tile_mask = code_mask[:, None] & (offs_d < dim)[None, :]
    grad_c = tl.load(tile, mask=tile_mask & ~first, other=0.0)
    grad_x, grad_c, column_sum = project_logit_grad_into(grad_logits, x, c, grad_x, grad_c, PRECISION)
    tl.store(tile, grad_c - column_sum[:, None] * c.to(tl.float32), mask=tile_mask)
    return grad_x


# ----------------------------------------------------------------------------------------------
# Finishing kernels shared by the ops, and the index checks' reduction.


@triton.jit
def store_reduction(loss_ptr, total_ptr, term_sum, count_sum, REDUCTION: tl.constexpr):
    """A finishing kernel's last step, from its (BLOCK,) running sums of the rows' terms and term
    counts: total_ptr () <- T, the number of terms; loss_ptr () <- the terms' sum over max(T, 1)
    ("mean") or their sum ("sum"); "none" has stored its rows already."""
    total = tl.sum(count_sum, axis=0)
    tl.store(total_ptr, total)
    if REDUCTION == "mean":
        tl.store(loss_ptr, tl.sum(term_sum, axis=0) / tl.maximum(total, 1.0))
    if REDUCTION == "sum":
        tl.store(loss_ptr, tl.sum(term_sum, axis=0))


@triton.jit
def _index_bounds_kernel(first_ptr, first_size, second_ptr, second_size, out_ptr, BLOCK: tl.constexpr):
    """Program p's min and max of each index tensor over the blocks p, p + P, ... (P programs).

    first_ptr: (first_size,) int32 or int64; second_ptr: the same, or None for one tensor;
    out_ptr: (P, 2, 2) int64, [p, t] = (min, max) of tensor t's blocks, (int64 max, int64 min)
    where the program saw none of it.
    """
    program, programs = tl.program_id(0), tl.num_programs(0)
    out = out_ptr + program * 4
    for t in tl.static_range(2):
        ptr = first_ptr if t == 0 else second_ptr
        size = first_size if t == 0 else second_size
        if ptr is not None:
            low = tl.full((BLOCK,), 9223372036854775807, tl.int64)
            high = tl.full((BLOCK,), -9223372036854775808, tl.int64)
            for start in range(program * BLOCK, size, programs * BLOCK):
                offs = start + tl.arange(0, BLOCK).to(tl.int64)
                mask = offs < size
                value = tl.load(ptr + offs, mask=mask).to(tl.int64)
                low = tl.where(mask, tl.minimum(low, value), low)
                high = tl.where(mask, tl.maximum(high, value), high)
            tl.store(out + 2 * t, tl.min(low, axis=0))
            tl.store(out + 2 * t + 1, tl.max(high, axis=0))


def index_bounds(first: torch.Tensor, second: torch.Tensor | None = None) -> list[tuple[int, int]]:
    """[(min, max)] of each (non-empty) integer tensor given, in one launch and one host read.
    Where a GPU would spend a reduction kernel and two synchronisations per tensor on
    ``torch.aminmax``, the checks of positives and negatives together cost one of each."""
    config = launch_config("bounds")
    programs = plan_grid("bounds", config, first.device)["programs"]
    out = torch.empty((programs, 2, 2), dtype=torch.int64, device=first.device)
    flat_first = first.reshape(-1)
    flat_second = None if second is None else second.reshape(-1)
    _index_bounds_kernel[(programs,)](flat_first, flat_first.numel(),
                                      flat_second, 0 if flat_second is None else flat_second.numel(), out, **config)
    per_program = out.tolist()
    given = 1 if second is None else 2
    return [(min(p[t][0] for p in per_program), max(p[t][1] for p in per_program)) for t in range(given)]


@triton.jit
def _sum_partials_kernel(partial_ptr, out_ptr, num_partials, size, BLOCK: tl.constexpr):
    """out[e] = sum_p partial[p, e] in the order p = 0, 1, ..., cast to out's dtype.

    partial_ptr: (num_partials, size) float32; out_ptr: (size,) in the gradient's dtype.
    """
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < size
    total = tl.zeros((BLOCK,), tl.float32)
    for p in range(0, num_partials):
        total += tl.load(partial_ptr + p * size + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, total.to(out_ptr.dtype.element_ty), mask=mask)


def sum_partials(partials: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(P, *shape) float32 per-program partials -> their sum (*shape) in ``dtype``, deterministic."""
    out = torch.empty(partials.shape[1:], dtype=dtype, device=partials.device)
    size = out.numel()
    config = launch_config("partials")
    _sum_partials_kernel[(triton.cdiv(size, config["BLOCK"]),)](partials, out, partials.shape[0], size, **config)
    return out


@triton.jit
def _sum_rows_by_index_kernel(
    rows_ptr, index_ptr, out_ptr, num_rows, num_targets, width,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """out[index[r]] = sum of rows[r'] over every r' with index[r'] == index[r], written once, by
    the first such r, for the columns of this program's width block.

    rows_ptr: (num_rows, width) float32; index_ptr: (num_rows,) int64; out_ptr: (num_targets,
    width) in the gradient's dtype, rows no index names left as they are (an index outside
    [0, num_targets) writes nothing). The sum over a block of
    candidate rows is a product with the 0/1 match matrix in float32 FMAs ("ieee": exact products),
    taken only for the blocks that hold a match, so the order of the additions is fixed.
    """
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    columns = tl.program_id(1).to(tl.int64) * BLOCK_W + tl.arange(0, BLOCK_W)
    row_mask, column_mask = rows < num_rows, columns < width
    index = tl.load(index_ptr + rows, mask=row_mask, other=-1)
    first = row_mask
    total = tl.zeros((BLOCK_R, BLOCK_W), tl.float32)
    for start in range(0, num_rows, BLOCK_C):
        others = start + tl.arange(0, BLOCK_C)
        other_mask = others < num_rows
        other_index = tl.load(index_ptr + others, mask=other_mask, other=-2)
        match = (index[:, None] == other_index[None, :]) & row_mask[:, None] & other_mask[None, :]
        first = first & (tl.max((match & (others[None, :] < rows[:, None])).to(tl.int32), axis=1) == 0)
        if tl.max(match.to(tl.int32)) > 0:
            values = tl.load(rows_ptr + others[:, None] * width + columns[None, :],
                             mask=other_mask[:, None] & column_mask[None, :], other=0.0)
            total = tl.dot(match.to(tl.float32), values, total, input_precision="ieee")
    inside = first & (index >= 0) & (index < num_targets)
    out = out_ptr + tl.where(inside, index, 0)[:, None] * width + columns[None, :]
    tl.store(out, total.to(out_ptr.dtype.element_ty), mask=inside[:, None] & column_mask[None, :])


def sum_rows_by_index(rows: torch.Tensor, index: torch.Tensor, num_targets: int, dtype: torch.dtype) -> torch.Tensor:
    """out (num_targets, *row_shape) in ``dtype``: out[n] = sum of rows[r] over index[r] == n, zero
    where no index is n; deterministic. rows (R, *row_shape) float32 contiguous, index (R,) int64."""
    width = rows[0].numel()
    out = torch.zeros((num_targets, *rows.shape[1:]), dtype=dtype, device=rows.device)
    config = launch_config("match", width=width)
    grid = (triton.cdiv(rows.shape[0], config["BLOCK_R"]), triton.cdiv(width, config["BLOCK_W"]))
    _sum_rows_by_index_kernel[grid](rows, index, out, rows.shape[0], num_targets, width, **config)
    return out


@triton.jit
def lower_bound(sorted_ptr, length, values, steps):
    """For each of ``values`` (an int64 tensor), the first position t in [0, length) of the ascending
    integer table at sorted_ptr with sorted[t] >= value, or length: a binary search of ``steps`` >=
    log2(length + 1) halvings."""
    low = tl.zeros(values.shape, tl.int64)
    high = low + length
    for _ in range(0, steps):
        active = low < high
        middle = (low + high) // 2
        below = active & (tl.load(sorted_ptr + middle, mask=active, other=0) < values)
        low = tl.where(below, middle + 1, low)
        high = tl.where(active & ~below, middle, high)
    return low


@triton.jit
def _sum_rows_by_sorted_index_kernel(
    rows_ptr, order_ptr, sorted_index_ptr, out_ptr, num_rows, num_targets, width, search_steps,
    GATHER: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """out[n] = sum over the positions t with sorted_index[t] == n of rows[order[t]] (rows[t]
    without GATHER), added in the order of t, for this program's targets n and width block.

    rows_ptr: (num_rows, width) float32; order_ptr: (num_rows,) int64, a permutation;
    sorted_index_ptr: (num_rows,) int32 or int64 ascending (values outside [0, num_targets) are never
    read); out_ptr: (num_targets, width) in the gradient's dtype, 0 for a target no index names.
    """
    targets = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    columns = tl.program_id(1).to(tl.int64) * BLOCK_W + tl.arange(0, BLOCK_W)
    target_mask, column_mask = targets < num_targets, columns < width
    start = lower_bound(sorted_index_ptr, num_rows, targets, search_steps)
    end = tl.where(target_mask, lower_bound(sorted_index_ptr, num_rows, targets + 1, search_steps), start)
    total = tl.zeros((BLOCK_T, BLOCK_W), tl.float32)
    for step in range(0, tl.max(end - start, axis=0)):
        position = start + step
        present = position < end
        source = position
        if GATHER:
            source = tl.load(order_ptr + position, mask=present, other=0)
        total += tl.load(rows_ptr + source[:, None] * width + columns[None, :],
                         mask=present[:, None] & column_mask[None, :], other=0.0)
    tl.store(out_ptr + targets[:, None] * width + columns[None, :], total.to(out_ptr.dtype.element_ty),
             mask=target_mask[:, None] & column_mask[None, :])


def sum_rows_by_sorted_index(rows: torch.Tensor, sorted_index: torch.Tensor, order: torch.Tensor | None,
                             num_targets: int, dtype: torch.dtype) -> torch.Tensor:
    """out (num_targets, *row_shape) in ``dtype``: out[n] = sum of rows[order[t]] over the t with
    sorted_index[t] == n, in the order of t (deterministic), 0 where no index is n; ``order=None``
    when the rows are already in sorted order. rows (R, *row_shape) float32 contiguous,
    sorted_index (R,) int32 or int64 ascending (``torch.sort(index, stable=True)``), order (R,) int64.
    One launch; each target binary-searches its run of positions, so R may be large (sampled
    occurrences) where ``sum_rows_by_index`` would compare every pair."""
    width = rows[0].numel()
    out = torch.empty((num_targets, *rows.shape[1:]), dtype=dtype, device=rows.device)
    config = launch_config("segments", width=width)
    grid = (triton.cdiv(num_targets, config["BLOCK_T"]), triton.cdiv(width, config["BLOCK_W"]))
    _sum_rows_by_sorted_index_kernel[grid](
        rows, sorted_index if order is None else order, sorted_index, out, rows.shape[0], num_targets, width,
        max(1, rows.shape[0].bit_length()), GATHER=order is not None, **config,
    )
    return out
