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

``project_logit_grad_into`` takes that pair for a tile of rows and codes, the codeword part into a
per-program partial that ``sum_partials`` adds up in a fixed order, so gradients are
deterministic without atomics; ``log_softmax_backward_tile`` is the two-pass log-softmax
backward that feeds it, the one every op's epilogue runs.

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


def wide_operands(*tensors: torch.Tensor | None) -> bool:
    """Whether an op multiplies float32 operands: any of its floating-point inputs (None skipped) is
    float32, the 16-bit ones then upcast to meet it. The one rule of every op: it picks the launch
    table's operand class ("fp32" or "16bit", ``launch.py``) and the in-batch operands' storage."""
    return any(tensor is not None and tensor.dtype == torch.float32 for tensor in tensors)


def operand_dtype(wide: bool) -> torch.dtype:
    """Storage of the in-batch score operands (log-probabilities, probabilities): float32 for wide
    inputs (multiplied as bf16x3), else bfloat16 (the loss within 6.6e-5 of float64, relative, by
    ``python -m bench.precision --batch 4096``, docs/precision.md; bf16's range so that no extreme
    logit overflows)."""
    return torch.float32 if wide else torch.bfloat16


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
def code_tile(k_start, num_codes, row_mask, BLOCK_K: tl.constexpr):
    """The K tile at k_start: its codes (BLOCK_K,), their mask and the (rows, codes) tile mask."""
    codes = k_start + tl.arange(0, BLOCK_K)
    code_mask = codes < num_codes
    return codes, code_mask, row_mask[:, None] & code_mask[None, :]


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
def store_rows(ptr, row_stride, rows, row_mask, width, values):
    """``load_rows``'s converse: the (rows, BLOCK_W) tile ``values`` into the table at ptr, cast to
    its dtype, nothing stored outside ``row_mask`` and past ``width`` columns."""
    offs = tl.arange(0, values.shape[1])
    tl.store(ptr + rows[:, None] * row_stride + offs[None, :], values.to(ptr.dtype.element_ty),
             mask=row_mask[:, None] & (offs < width)[None, :])


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
    src_ptr, rows, row_mask, codebooks_ptr, codebook_shape, layer, codes, code_mask, inv_temperature,
    FROM_LOGITS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """One K tile of one layer's logits of a side, (BLOCK_R, BLOCK_K) float32, -inf on masked codes.

    src_ptr: the side's logits (R, L, K) when FROM_LOGITS (read as they are), else its residuals
    (R, L, d), whose codebook logits against codebooks_ptr (L, K, d) are taken (codebook_shape:
    the tuple (L, K, d)); read at rows (BLOCK_R,) under row_mask, for layer ``layer`` and codes
    (BLOCK_K,) under code_mask.
    """
    num_layers, num_codes, dim = codebook_shape
    if FROM_LOGITS:
        logits = load_logits(src_ptr + layer * num_codes, num_layers * num_codes, rows, row_mask, codes, code_mask)
    else:
        logits = codebook_logits(
            src_ptr + layer * dim, num_layers * dim, rows, row_mask, codebooks_ptr + layer * num_codes * dim, codes,
            code_mask, dim, inv_temperature, BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K, BLOCK_D=BLOCK_D, PRECISION=PRECISION,
        )
    return logits


@triton.jit
def layer_log_probs(
    src_ptr, rows, row_mask, codebooks_ptr, codebook_shape, layer, codes, code_mask, inv_temperature, lse,
    FROM_LOGITS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """(log r, r) of a (rows, codes) tile of one layer: the log-probabilities ``layer_logits`` - lse
    (lse: the rows' log-sum-exps, (BLOCK_R,)) and the probabilities, both 0 on masked rows and
    codes; arguments as ``layer_logits``."""
    tile_mask = row_mask[:, None] & code_mask[None, :]
    logits = layer_logits(
        src_ptr, rows, row_mask, codebooks_ptr, codebook_shape, layer, codes, code_mask, inv_temperature,
        FROM_LOGITS=FROM_LOGITS, BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K, BLOCK_D=BLOCK_D, PRECISION=PRECISION,
    )
    log_r = tl.where(tile_mask, logits - lse[:, None], 0.0)
    return log_r, tl.where(tile_mask, tl.exp(log_r), 0.0)


@triton.jit
def log_sum_exp(
    src_ptr, rows, row_mask, codebooks_ptr, codebook_shape, layer, inv_temperature,
    FROM_LOGITS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """log sum_k exp(logit_k) of one layer of a side, (BLOCK_R,) float32: an online log-sum-exp over
    the K tiles (arguments as ``layer_logits``)."""
    running_max = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    running_sum = tl.zeros((BLOCK_R,), tl.float32)
    for k_start in range(0, codebook_shape[1], BLOCK_K):
        codes, code_mask, _ = code_tile(k_start, codebook_shape[1], row_mask, BLOCK_K)
        logits = layer_logits(
            src_ptr, rows, row_mask, codebooks_ptr, codebook_shape, layer, codes, code_mask, inv_temperature,
            FROM_LOGITS=FROM_LOGITS, BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K, BLOCK_D=BLOCK_D, PRECISION=PRECISION,
        )
        running_max, running_sum = log_sum_exp_update(running_max, running_sum, logits)
    return running_max + tl.log(running_sum)


@triton.jit
def user_item_log_sum_exps(
    sides, rows, item_rows, row_mask, codebooks_ptr, codebook_shape, layer, inv_temperatures,
    USER_LOGITS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """(lse_q, lse_p) of one layer, (BLOCK_R,) each: the log-sum-exps (``log_sum_exp``) of the users
    at rows and of their items at item_rows. sides: the tuple (user_ptr, items_ptr), the users'
    residuals (B, L, d) or logits (USER_LOGITS) and the items' residuals (N, L, d);
    inv_temperatures: the tuple (1 / the users' temperature, 1 / the items')."""
    lse_q = log_sum_exp(
        sides[0], rows, row_mask, codebooks_ptr, codebook_shape, layer, inv_temperatures[0],
        FROM_LOGITS=USER_LOGITS, BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K, BLOCK_D=BLOCK_D, PRECISION=PRECISION,
    )
    lse_p = log_sum_exp(
        sides[1], item_rows, row_mask, codebooks_ptr, codebook_shape, layer, inv_temperatures[1],
        FROM_LOGITS=False, BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K, BLOCK_D=BLOCK_D, PRECISION=PRECISION,
    )
    return lse_q, lse_p


@triton.jit
def user_item_log_probs(
    sides, rows, item_rows, row_mask, codebooks_ptr, codebook_shape, layer, codes, code_mask, inv_temperatures, lse_q,
    lse_p,
    USER_LOGITS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """(log Q, Q, log P, P) of one K tile of one layer, (BLOCK_R, BLOCK_K) each, 0 on masked rows
    and codes: ``layer_log_probs`` of the users and of their items, arguments as
    ``user_item_log_sum_exps`` with its results."""
    log_q, q = layer_log_probs(
        sides[0], rows, row_mask, codebooks_ptr, codebook_shape, layer, codes, code_mask, inv_temperatures[0], lse_q,
        FROM_LOGITS=USER_LOGITS, BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K, BLOCK_D=BLOCK_D, PRECISION=PRECISION,
    )
    log_p, p = layer_log_probs(
        sides[1], item_rows, row_mask, codebooks_ptr, codebook_shape, layer, codes, code_mask, inv_temperatures[1],
        lse_p, FROM_LOGITS=False, BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K, BLOCK_D=BLOCK_D, PRECISION=PRECISION,
    )
    return log_q, q, log_p, p


@triton.jit
def project_logit_grad_into(grad_logits, x, c, grad_x, grad_c, PRECISION: tl.constexpr):
    """The residual and codeword gradients of one (rows, codes) tile of a layer's logit gradient g,
    added to a caller's running sums: (grad_x + g c, grad_c + g^T x, sum_r g), (BLOCK_R, BLOCK_G),
    (BLOCK_K, BLOCK_G) and (BLOCK_K,) float32, up to the factor 2 / tau, which the caller folds
    into g. The caller subtracts (sum of the sum_r g) c from its codebook partial once, after its
    last tile of rows.

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
def project_into_partial(
    grad_logits, x, c, grad_x, partial_ptr, codes, code_mask, dim, first_block, PRECISION: tl.constexpr,
):
    """``project_logit_grad_into`` for one tile of a program whose codebook partial lives in global
    memory: returns grad_x + g c and sets (the program's ``first_block``) or adds to rows ``codes``
    of its partial partial_ptr (K, d) float32 g^T x - (sum_r g) c, the partial read back by the
    program that owns it. Arguments as ``project_logit_grad_into``; c (BLOCK_K, BLOCK_DIM), d whole."""
    offs_d = tl.arange(0, c.shape[1])
    tile = partial_ptr + codes[:, None] * dim + offs_d[None, :]
    tile_mask = code_mask[:, None] & (offs_d < dim)[None, :]
    grad_x, grad_c, column_sum = project_logit_grad_into(grad_logits, x, c, grad_x, tl.zeros(c.shape, tl.float32),
                                                         PRECISION)
    grad_c -= column_sum[:, None] * c.to(tl.float32)
    # the partial read after the products, so that it is not live across them (registers)
    grad_c += tl.load(tile, mask=tile_mask & ~first_block, other=0.0)
    tl.store(tile, grad_c, mask=tile_mask)
    return grad_x


@triton.jit
def log_softmax_backward_tile(
    step, grad_log, r, tile_mask, grad_log_sum, grad_x, x, codebooks_ptr, codebook_shape, layer, codes, code_mask,
    partial_ptr, first_block, scale, out_ptr, out_rows,
    FROM_LOGITS: tl.constexpr, BLOCK_DIM: tl.constexpr, PRECISION: tl.constexpr,
):
    """One K tile of a layer's two-pass log-softmax backward, dz = dlog r - r sum_k dlog r_k, for a
    block of rows; returns (grad_log_sum, grad_x).

    Pass ``step`` 0 adds the tile's row sums of grad_log (dlog r, (BLOCK_R, BLOCK_K)) to
    grad_log_sum (BLOCK_R,). Pass 1 forms the tile of dz (r: the probabilities, 0 where masked)
    and, with FROM_LOGITS, stores it as it is into rows out_rows of the logit gradient out_ptr
    (R, L, K); else projects scale dz (scale = 2 / tau) onto the rows' residuals x (BLOCK_R,
    BLOCK_DIM), added to grad_x, and onto the codewords of codebooks_ptr (codebook_shape (L, K, d)),
    set (``first_block``) or added into the program's partial partial_ptr (K, d) of the layer
    (``project_into_partial``).
    """
    num_layers, num_codes, dim = codebook_shape
    grad_log = tl.where(tile_mask, grad_log, 0.0)
    if step == 0:
        grad_log_sum += tl.sum(grad_log, axis=1)
    else:
        grad_logits = tl.where(tile_mask, grad_log - r * grad_log_sum[:, None], 0.0)
        if FROM_LOGITS:
            out = out_ptr + out_rows[:, None] * num_layers * num_codes + layer * num_codes + codes[None, :]
            tl.store(out, grad_logits.to(out_ptr.dtype.element_ty), mask=tile_mask)
        else:
            c = load_rows(codebooks_ptr + layer * num_codes * dim, dim, codes, code_mask, dim, BLOCK_DIM)
            grad_x = project_into_partial(scale * grad_logits, x, c, grad_x, partial_ptr, codes, code_mask, dim,
                                          first_block=first_block, PRECISION=PRECISION)
    return grad_log_sum, grad_x


# ----------------------------------------------------------------------------------------------
# Finishing kernels shared by the ops, and the index checks' reduction.


@triton.jit
def row_scale(grad_ptr, counts_ptr, total_ptr, rows, row_mask, REDUCTION: tl.constexpr):
    """g_b = dLoss/dt_b for rows (BLOCK,): dLoss/dloss scaled by the reduction; 0 on masked rows.

    grad_ptr: () or, for "none", (B,) float32; counts_ptr: (B,) T_b; total_ptr: () sum_b T_b.
    """
    if REDUCTION == "none":
        grad = tl.load(grad_ptr + rows, mask=row_mask, other=0.0)
        scale = grad / tl.maximum(tl.load(counts_ptr + rows, mask=row_mask, other=1.0), 1.0)
    elif REDUCTION == "mean":
        scale = tl.load(grad_ptr) / tl.maximum(tl.load(total_ptr), 1.0) + tl.zeros(rows.shape, tl.float32)
    else:
        scale = tl.load(grad_ptr) + tl.zeros(rows.shape, tl.float32)
    return tl.where(row_mask, scale, 0.0)


@triton.jit
def finish_rows(loss_ptr, counts_ptr, rows, row_mask, terms, count, term_sum, count_sum, REDUCTION: tl.constexpr):
    """A finishing kernel's block of rows (BLOCK,): counts_ptr[rows] <- T_b = count and, for "none",
    loss_ptr[rows] <- t_b / max(T_b, 1), t_b = terms; returns the running sums (term_sum + terms,
    count_sum + count) for ``store_reduction``."""
    tl.store(counts_ptr + rows, count, mask=row_mask)
    if REDUCTION == "none":
        tl.store(loss_ptr + rows, terms / tl.maximum(count, 1.0), mask=row_mask)
    return term_sum + terms, count_sum + count


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
def _sum_parts(parts_ptr, num_parts, batch, rows, row_mask):
    """sum_p parts[p, rows] of a (num_parts, B) float32 buffer, added in the order p = 0, 1, ..."""
    total = tl.zeros(rows.shape, tl.float32)
    for part in range(0, num_parts):
        total += tl.load(parts_ptr + part * batch + rows, mask=row_mask, other=0.0)
    return total


@triton.jit
def _finish_kernel(
    term_parts_ptr, count_parts_ptr, extra_parts_ptr, loss_ptr, counts_ptr, total_ptr, extra_ptr,
    batch, num_term_parts, num_count_parts, count_scale,
    REDUCTION: tl.constexpr, BLOCK: tl.constexpr,
):
    """One program, the loss from per-program partials: per row b, t_b = sum_p term_parts[p, b] and
    T_b = count_scale sum_p count_parts[p, b], each added in the order p = 0, 1, ...

    term_parts_ptr (num_term_parts, B), count_parts_ptr (num_count_parts, B) float32;
    extra_parts_ptr: None, or (num_count_parts, B) float32 more sums, extra_ptr (B,) <- them.
    Writes counts_ptr (B,) <- T_b, total_ptr () <- sum_b T_b, loss_ptr () <- the mean over all
    terms or their sum, or (B,) <- t_b / max(T_b, 1) for "none" (``finish_rows``).
    """
    term_sum = tl.zeros((BLOCK,), tl.float32)
    count_sum = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, batch, BLOCK):
        rows = start + tl.arange(0, BLOCK)
        row_mask = rows < batch
        terms = _sum_parts(term_parts_ptr, num_term_parts, batch, rows, row_mask)
        count = count_scale * _sum_parts(count_parts_ptr, num_count_parts, batch, rows, row_mask)
        if extra_parts_ptr is not None:
            tl.store(extra_ptr + rows, _sum_parts(extra_parts_ptr, num_count_parts, batch, rows, row_mask),
                     mask=row_mask)
        term_sum, count_sum = finish_rows(loss_ptr, counts_ptr, rows, row_mask, terms, count, term_sum, count_sum,
                                          REDUCTION=REDUCTION)
    store_reduction(loss_ptr, total_ptr, term_sum, count_sum, REDUCTION)


def finish(term_parts: torch.Tensor, count_parts: torch.Tensor, reduction: str, *, count_scale: float = 1.0,
           extra_parts: torch.Tensor | None = None):
    """The loss of an op from its partial sums, one launch (``_finish_kernel``): term_parts (P, B)
    and count_parts (P', B) float32, the rows' terms and term counts (times ``count_scale``), and
    optionally extra_parts (P', B), more sums the backward needs. Returns (loss: () or (B,) for
    "none", counts T_b (B,), total (), the extra sums (B,) or None), all float32."""
    batch = count_parts.shape[1]
    loss = count_parts.new_empty((batch,) if reduction == "none" else ())
    counts, total = count_parts.new_empty((batch,)), count_parts.new_empty(())
    extra = None if extra_parts is None else count_parts.new_empty((batch,))
    _finish_kernel[(1,)](
        term_parts_ptr=term_parts, count_parts_ptr=count_parts, extra_parts_ptr=extra_parts, loss_ptr=loss,
        counts_ptr=counts, total_ptr=total, extra_ptr=extra, batch=batch, num_term_parts=term_parts.shape[0],
        num_count_parts=count_parts.shape[0], count_scale=float(count_scale), REDUCTION=reduction,
        **launch_config("reduce"),
    )
    return loss, counts, total, extra


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
    _index_bounds_kernel[(programs,)](
        first_ptr=flat_first, first_size=flat_first.numel(), second_ptr=flat_second,
        second_size=0 if flat_second is None else flat_second.numel(), out_ptr=out, **config,
    )
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
    _sum_partials_kernel[(triton.cdiv(size, config["BLOCK"]),)](
        partial_ptr=partials, out_ptr=out, num_partials=partials.shape[0], size=size, **config,
    )
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
    _sum_rows_by_index_kernel[grid](
        rows_ptr=rows, index_ptr=index, out_ptr=out, num_rows=rows.shape[0], num_targets=num_targets, width=width,
        **config,
    )
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
        rows_ptr=rows, order_ptr=sorted_index if order is None else order, sorted_index_ptr=sorted_index, out_ptr=out,
        num_rows=rows.shape[0], num_targets=num_targets, width=width, search_steps=max(1, rows.shape[0].bit_length()),
        GATHER=order is not None, **config,
    )
    return out
