"""The public API: argument checks, the backend choice, and the op of each function.

Distributional BPR ranks a user's target item by negative KL between code distributions:

    P_n^l = softmax_k(-||items[n,l] - C[l,k]||^2 / tau)          item n, layer l
    Q_b^l = softmax_k(-||user[b,l] - C[l,k]||^2 / tau_u)         (or softmax(user[b,l]) for logits)
    s(b, n) = -sum_l w_l [KL(P_n^l || Q_b^l) (+ KL(Q_b^l || P_n^l) when symmetric)]
    term(pos, neg) = softplus(s_neg - s_pos) = -log sigmoid(s_pos - s_neg)

Negatives come from ``negatives`` (B, S) (-1 = padding) or from the batch (``in_batch``):
with S[b, m] = s(b, pos[m]) and m valid for row b when pos[m] != pos[b],

    "items": term(S[b,b], S[b,m])   "users": term(S[b,b], S[m,b])   "both": the union
    "mean":  term(S[b,b], s(mean of Q_m over valid m, pos[b]))      (no term without a valid m)

Reductions: "mean" over all terms (0 without terms), "sum", "none" (B,) per-row mean.
"""

from __future__ import annotations

import torch
from torch import nn

from . import torch_backend
from ._backend import autocast_off, resolve_backend
from ._validation import (
    check_bpr_options,
    check_codebooks,
    check_distributional_bpr,
    check_distributional_topk,
    check_float_tensor,
    check_layer_weights,
    check_residuals,
    check_same_device,
    check_temperature,
    check_values,
)

# The Triton ops (soda_kernels.ops.*) are imported where a call first takes the Triton backend, so
# that ``import soda_kernels`` and backend="torch" work where Triton is not installed.


@autocast_off
def codebook_log_softmax(
    x: torch.Tensor, codebooks: torch.Tensor, temperature: float = 1.0, *, backend: str = "auto"
) -> torch.Tensor:
    """Log soft assignment of per-layer residuals to their layer's codewords.

    Args:
        x: (N, L, d) residuals, float32 / bfloat16 / float16 (float64 on the torch backend).
        codebooks: (L, K, d) codewords.
        temperature: tau > 0.
        backend: "auto" (Triton on CUDA, PyTorch otherwise), "triton" or "torch".

    Returns:
        (N, L, K) float32 (float64 for float64 inputs): log softmax_k(-||x[n,l] - C[l,k]||^2 / tau).
    """
    num_layers, _, dim = check_codebooks(codebooks)
    check_residuals("x", x, num_layers, dim, "N")
    check_same_device(x=x, codebooks=codebooks)
    tau = check_temperature("temperature", temperature)
    if resolve_backend(backend, x=x, codebooks=codebooks) == "torch":
        return torch_backend.codebook_log_softmax(x, codebooks, tau)
    from .ops.soft_assignment import log_soft_assignment

    return log_soft_assignment(x, codebooks, tau)


@autocast_off
def pairwise_kl(
    p_logits: torch.Tensor, q_logits: torch.Tensor, layer_weights=None, *, backend: str = "auto",
    validate: bool = True,
) -> torch.Tensor:
    """Layer-weighted KL(softmax(p_logits[i]) || softmax(q_logits[j])) for every pair (i, j).

    Args:
        p_logits: (M, L, K) unnormalised logits.
        q_logits: (B, L, K) unnormalised logits.
        layer_weights: None (all ones), or L non-negative weights.
        backend: "auto", "triton" or "torch".
        validate: check the layer-weight values (finite, >= 0), a host synchronisation; pass False
            for trusted inputs in a hot loop. Skipped while ``torch.compile`` traces.

    Returns:
        (M, B) float32 (float64 for float64 inputs).
    """
    check_float_tensor("p_logits", p_logits, 3, "M, L, K")
    check_float_tensor("q_logits", q_logits, 3, "B, L, K")
    if p_logits.shape[1:] != q_logits.shape[1:]:
        raise ValueError(
            f"p_logits (M, L, K) and q_logits (B, L, K) must agree on L and K, got "
            f"{tuple(p_logits.shape)} and {tuple(q_logits.shape)}"
        )
    if p_logits.shape[2] < 2:
        raise ValueError(f"p_logits must have K >= 2 codes, got K={p_logits.shape[2]}")
    device = check_same_device(p_logits=p_logits, q_logits=q_logits)
    weights = check_layer_weights(layer_weights, p_logits.shape[1], device, check_values(validate))
    if resolve_backend(backend, p_logits=p_logits, q_logits=q_logits) == "torch":
        return torch_backend.pairwise_kl(p_logits, q_logits, weights)
    from .ops.pairwise_kl import pairwise_kl as pairwise_kl_triton

    return pairwise_kl_triton(p_logits, q_logits, weights)


@autocast_off
def distributional_bpr(
    user: torch.Tensor,
    items: torch.Tensor,
    codebooks: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor | None = None,
    *,
    user_logits: bool = False,
    in_batch: str = "items",
    symmetric: bool = False,
    temperature: float = 1.0,
    user_temperature: float | None = None,
    layer_weights=None,
    reduction: str = "mean",
    backend: str = "auto",
    validate: bool = True,
) -> torch.Tensor:
    """BPR loss with negative (layer-weighted, optionally symmetric) KL as the score.

    Args:
        user: (B, L, d) user residuals, or (B, L, K) logits with ``user_logits=True``.
        items: (N, L, d) item residuals.
        codebooks: (L, K, d) codewords shared by both sides.
        positives: (B,) int64 index into ``items`` of each row's target item.
        negatives: (B, S) int64 item indices (-1 = padding), or None for in-batch negatives.
        user_logits: read ``user`` as per-layer logits instead of residuals.
        in_batch: "items", "users", "both" or "mean" (used when ``negatives`` is None).
        symmetric: score with KL(P||Q) + KL(Q||P).
        temperature: tau of the item soft assignment.
        user_temperature: tau of the user soft assignment (default: ``temperature``).
        layer_weights: None (all ones) or L non-negative weights.
        reduction: "mean", "sum" or "none".
        backend: "auto" (Triton on CUDA, PyTorch otherwise), "triton" or "torch".
        validate: check the values of ``positives``, ``negatives`` (index ranges) and
            ``layer_weights``, a host synchronisation; pass False for trusted inputs in a hot
            loop. Shapes, dtypes, devices and options are always checked. The value checks are
            skipped while ``torch.compile`` traces, so a compiled call never syncs.

    Options take Python, numpy or 0-d tensor (not requiring grad) numbers and bools.

    Returns:
        A float32 scalar, or (B,) with ``reduction="none"``. Inputs may mix dtypes: the arithmetic
        and the loss are float32, float64 where any input is float64 (the torch backend only; the
        Triton backend refuses float64); each gradient comes in its input's dtype. B = 0 gives 0.0
        (an empty (0,) tensor for "none") with zero gradients.

    Unchecked indices (``validate=False``, ``torch.compile``): an index outside [0, N) (or a -1 in
    ``positives``, or below -1 in ``negatives``) is never read; it makes the item's distribution
    NaN, so the loss is NaN: for "none", the row holding it and, in-batch "items" / "both", every
    row that has it as a negative; the gradients are NaN (the codebooks' throughout).

    Non-finite inputs are not checked (a host synchronisation): a NaN or +-inf in ``user``,
    ``items`` or ``codebooks``, or a ``user_logits`` row with -inf entries (codes of probability
    0), gives a NaN or +inf loss (its rows for "none", those whose terms use it) and non-finite
    gradients, the same on both backends.
    """
    checked, weights = check_distributional_bpr(
        user, items, codebooks, positives, negatives, user_logits=user_logits, in_batch=in_batch,
        symmetric=symmetric, temperature=temperature, user_temperature=user_temperature,
        layer_weights=layer_weights, reduction=reduction, backend=backend, validate=validate,
    )
    if user.shape[0] == 0:
        return _no_terms(user, items, codebooks, checked.reduction)
    options = dict(
        user_logits=checked.user_logits, symmetric=checked.symmetric, temperature=checked.temperature,
        user_temperature=checked.user_temperature, layer_weights=weights, reduction=checked.reduction,
    )
    if resolve_backend(checked.backend, user=user, items=items, codebooks=codebooks) == "torch":
        return torch_backend.distributional_bpr(
            user, items, codebooks, positives, negatives, in_batch=checked.in_batch, **options
        )
    if negatives is not None:
        from .ops.sampled_negatives import sampled_bpr

        return sampled_bpr(user, items, codebooks, positives, negatives, **options)
    if checked.in_batch == "mean":
        from .ops.in_batch_mean import in_batch_mean

        return in_batch_mean(user, items, codebooks, positives, **options)
    from .ops.in_batch_pairs import in_batch_pairs

    return in_batch_pairs(user, items, codebooks, positives, in_batch=checked.in_batch, **options)


def _no_terms(user, items, codebooks, reduction: str) -> torch.Tensor:
    """The loss of an empty batch: 0.0 (an empty (0,) tensor for "none") in the compute dtype, with
    zero gradients for every input (sums over empty slices, which no NaN in the inputs reaches)."""
    dtype = torch_backend.compute_dtype(user, items, codebooks)
    zero = sum(t.flatten()[:0].sum().to(dtype) for t in (user, items, codebooks))
    return zero.expand(0) if reduction == "none" else zero


class DistributionalBPRLoss(nn.Module):
    """``nn.Module`` around :func:`distributional_bpr`; the keyword options are fixed at construction.

    Example::

        loss_fn = DistributionalBPRLoss(in_batch="both", symmetric=True, temperature=0.5)
        loss = loss_fn(user_residuals, item_residuals, codebooks, positives)
    """

    def __init__(self, **options):
        super().__init__()
        allowed = {
            "user_logits", "in_batch", "symmetric", "temperature", "user_temperature",
            "layer_weights", "reduction", "backend", "validate",
        }
        unknown = sorted(set(options) - allowed)
        if unknown:
            raise TypeError(f"DistributionalBPRLoss got unknown option(s) {unknown}; allowed: {sorted(allowed)}")
        # Checked now, so that a bad option fails here and not at the first call (the number of
        # layer weights waits for the codebooks).
        check_bpr_options(**{k: v for k, v in options.items() if k != "layer_weights"})
        check_layer_weights(options.get("layer_weights"), None, torch.device("cpu"), options.get("validate", True))
        self.options = options

    def forward(self, user, items, codebooks, positives, negatives=None) -> torch.Tensor:
        return distributional_bpr(user, items, codebooks, positives, negatives, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class ItemDistributions:
    """A catalogue's side of the score, computed once for every query batch of
    :func:`distributional_topk` (pass it in place of ``items``).

    Attributes:
        probs: (N, L K) P_n^l over the (layer, code) features; bfloat16 for 16-bit items, else
            the items' dtype (float32, float64).
        log_probs: (N, L K) log P_n^l, same dtype (the symmetric score's second product).
        negative_entropy: (N, L) float32 (float64 for float64 items) P_n^l . log P_n^l.
        temperature: the tau the soft assignments were taken at.
        num_layers, num_codes: L and K.

    Memory: N L K (2 bytes for 16-bit items, else 4 or 8) twice, plus N L floats.
    """

    BUILD_ROWS = 65536  # items soft-assigned at a time while building (bounds the float32 temporaries)

    def __init__(self, probs: torch.Tensor, log_probs: torch.Tensor, negative_entropy: torch.Tensor,
                 temperature: float):
        self.probs, self.log_probs, self.negative_entropy = probs, log_probs, negative_entropy
        self.temperature = temperature
        self.num_layers = negative_entropy.shape[1]
        self.num_codes = probs.shape[1] // self.num_layers

    @classmethod
    def from_items(cls, items: torch.Tensor, codebooks: torch.Tensor, temperature: float = 1.0, *,
                   backend: str = "auto") -> ItemDistributions:
        """The catalogue of item residuals ``items`` (N, L, d) under ``codebooks`` (L, K, d) at
        ``temperature``; the soft assignments run on ``backend``, BUILD_ROWS items at a time."""
        num_layers, _, dim = check_codebooks(codebooks)
        check_residuals("items", items, num_layers, dim, "N")
        check_same_device(items=items, codebooks=codebooks)
        tau = check_temperature("temperature", temperature)
        if items.shape[0] == 0:
            raise ValueError("items must hold at least one row (N >= 1)")
        storage = items.dtype if items.dtype in (torch.float32, torch.float64) else torch.bfloat16
        num_items, num_codes = items.shape[0], codebooks.shape[1]
        probs = items.new_empty((num_items, num_layers * num_codes), dtype=storage)
        log_probs = torch.empty_like(probs)
        negative_entropy = items.new_empty((num_items, num_layers), dtype=torch_backend.compute_dtype(items))
        for start in range(0, num_items, cls.BUILD_ROWS):  # filled in place: no second copy of the catalogue
            stop = min(start + cls.BUILD_ROWS, num_items)
            log_p = codebook_log_softmax(items[start:stop].detach(), codebooks.detach(), tau, backend=backend)
            p = log_p.exp()
            probs[start:stop] = p.flatten(1)
            log_probs[start:stop] = log_p.flatten(1)
            negative_entropy[start:stop] = (p * log_p).sum(-1)
        return cls(probs, log_probs, negative_entropy, tau)

    def __len__(self) -> int:
        return self.probs.shape[0]

    def __repr__(self) -> str:
        return (f"ItemDistributions(N={len(self)}, L={self.num_layers}, K={self.num_codes}, "
                f"dtype={self.probs.dtype}, temperature={self.temperature})")


@autocast_off
@torch.no_grad()
def distributional_topk(
    user: torch.Tensor,
    items: torch.Tensor | ItemDistributions,
    codebooks: torch.Tensor,
    k: int,
    *,
    exclude: tuple[torch.Tensor, torch.Tensor] | None = None,
    user_logits: bool = False,
    symmetric: bool = False,
    temperature: float = 1.0,
    user_temperature: float | None = None,
    layer_weights=None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k items of highest s(b, n) = -sum_l w_l KL(P_n^l || Q_b^l) (+ KL(Q_b^l || P_n^l) when
    symmetric) for each user over the whole catalogue, without a B x N buffer. Not differentiable
    (the indices are discrete; the scores are returned without a graph).

    Args:
        user: (B, L, d) user residuals, or (B, L, K) logits with ``user_logits=True``.
        items: (N, L, d) item residuals, or an :class:`ItemDistributions` built from them once
            (its temperature is then the items'; ``temperature`` must be left at 1.0 or agree).
        codebooks: (L, K, d) codewords.
        k: items per user, >= 1; past the eligible items a row is padded with -inf / -1.
        exclude: (offsets (B+1,), items (E,)) int64 CSR: row b never returns
            ``items[offsets[b]:offsets[b+1]]`` (a history); offsets start at 0 and end at E.
        user_logits, symmetric, temperature, user_temperature, layer_weights: as in
            :func:`distributional_bpr`.
        backend: "auto" (Triton on CUDA, PyTorch otherwise), "triton" or "torch". The Triton
            kernel keeps k <= 128 on chip; "auto" runs larger k on the PyTorch path (chunked, on
            the same device), "triton" refuses it.

    Returns:
        scores (B, k) float32, descending; indices (B, k) int64. Equal scores (as float32) go to
        the lower index; the order is deterministic. The PyTorch path streams the catalogue in
        chunks of ``torch_backend.TOPK_MEMORY_BYTES`` (256 MiB) of temporaries.
    """
    if isinstance(items, ItemDistributions):
        catalogue = items
        num_layers, num_codes, _ = check_codebooks(codebooks)
        if (catalogue.num_layers, catalogue.num_codes) != (num_layers, num_codes):
            raise ValueError(
                f"items (ItemDistributions) has L={catalogue.num_layers}, K={catalogue.num_codes} but codebooks "
                f"has L={num_layers}, K={num_codes}"
            )
        if temperature != 1.0 and check_temperature("temperature", temperature) != catalogue.temperature:
            raise ValueError(
                f"temperature={temperature} disagrees with the ItemDistributions' temperature={catalogue.temperature}"
            )
        check_same_device(user=user, codebooks=codebooks, items=catalogue.probs)
        item_temperature = catalogue.temperature
    else:
        catalogue = None
        item_temperature = check_temperature("temperature", temperature)
    args = check_distributional_topk(
        user, codebooks, len(catalogue) if catalogue is not None else _rows(items), k, exclude,
        user_logits=user_logits, symmetric=symmetric, temperature=item_temperature,
        user_temperature=user_temperature, layer_weights=layer_weights, backend=backend,
    )
    if catalogue is None:
        catalogue = ItemDistributions.from_items(items, codebooks, item_temperature, backend=backend)
    chosen = resolve_backend(backend, user=user, codebooks=codebooks, items=catalogue.probs)
    if chosen == "triton":
        from .ops.topk import TOPK_MAX_K

        if k > TOPK_MAX_K:
            if backend == "triton":
                raise ValueError(f"backend='triton' keeps k <= {TOPK_MAX_K} on chip, got k={k} (use backend='auto')")
            chosen = "torch"
    if user_logits:
        log_q = user.detach().to(torch_backend.compute_dtype(user)).log_softmax(-1)
    else:
        log_q = codebook_log_softmax(user.detach(), codebooks.detach(), args.user_temperature, backend=chosen)
    rows, row_bias = torch_backend.topk_user_operands(log_q, args.layer_weights, symmetric)
    item_bias = torch_backend.topk_item_bias(catalogue.negative_entropy, args.layer_weights, row_bias.dtype)
    if chosen == "torch":
        run = torch_backend.distributional_topk
    else:
        from .ops.topk import distributional_topk as run
    return run(rows.to(catalogue.probs.dtype) if chosen == "triton" else rows, row_bias, catalogue.probs,
               catalogue.log_probs, item_bias, args.excluded_rows, args.excluded_items, k)


def _rows(items) -> int:
    """N of a residual tensor (N, L, d), its shape checked."""
    check_float_tensor("items", items, 3, "N, L, d")
    return items.shape[0]
