"""The naive contender: distributional BPR the way a researcher writes it first.

Squared distances as VQ code computes them (||x||^2 + ||c||^2 - 2 x.c), a log-softmax per layer,
and every KL divergence by broadcasting the two sides against each other, as public ETEGRec-style
code computes its alignment: in-batch, KL(P_m || Q_b) for all pairs is a B x B x L x K tensor
(two when symmetric), sampled a B x S x L x K one. Autograd differentiates it. It computes the
same loss as ``soda_kernels`` (reduction "mean", residual inputs), so the benchmark checks it
against eager like every contender, and it runs only where its memory fits
(``peak_bytes_estimate``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Float32 tensors of the broadcast size alive at once at the peak, per KL direction (measured with
# the CPU profiler at B = 256: 4.05; the backward of the broadcast KL holds its saved difference and
# the incoming gradient's products).
BROADCAST_TENSORS_AT_PEAK = 4


def log_soft_assignment(x: torch.Tensor, codebooks: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax_k(-||x[n,l] - C[l,k]||^2 / tau): (N, L, d), (L, K, d) -> (N, L, K) float32."""
    x, codebooks = x.float(), codebooks.float()
    distances = (x.square().sum(-1, keepdim=True) + codebooks.square().sum(-1)
                 - 2 * torch.einsum("nld,lkd->nlk", x, codebooks))
    return torch.log_softmax(-distances / temperature, dim=-1)


def kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) per layer over the last axis, broadcasting the leading axes: (..., L, K) -> (..., L)."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def distributional_bpr(user, items, codebooks, positives, negatives, *, in_batch, symmetric, temperature,
                       user_temperature, layer_weights) -> torch.Tensor:
    """The mean BPR term; the shapes and options of ``sk.distributional_bpr`` (user residuals,
    reduction "mean")."""
    log_q = log_soft_assignment(user, codebooks, user_temperature)  # (B, L, K)
    log_p = log_soft_assignment(items, codebooks, temperature)  # (N, L, K)
    weights = layer_weights.float()

    def score(item_log_p, user_log_q):  # -sum_l w_l [KL(P || Q) (+ KL(Q || P))], broadcast
        divergence = kl(item_log_p, user_log_q)
        if symmetric:
            divergence = divergence + kl(user_log_q, item_log_p)
        return -(divergence * weights).sum(-1)

    positive_log_p = log_p[positives]
    if negatives is not None:
        positive = score(positive_log_p, log_q)  # (B,)
        negative = score(log_p[negatives.clamp_min(0)], log_q[:, None])  # (B, S): B x S x L x K
        mask = negatives >= 0
        return (F.softplus(negative - positive[:, None]) * mask).sum() / mask.sum().clamp_min(1)

    valid = positives[None, :] != positives[:, None]  # (B, B): m is a negative of row b
    if in_batch == "mean":
        count = valid.sum(1)
        mean_q = (valid.float() @ log_q.exp().flatten(1)).view(log_q.shape) / count.clamp_min(1)[:, None, None]
        terms = F.softplus(score(positive_log_p, mean_q.clamp_min(1e-30).log()) - score(positive_log_p, log_q))
        has_term = count > 0
        return (terms * has_term).sum() / has_term.sum().clamp_min(1)

    scores = score(positive_log_p[None, :], log_q[:, None])  # S[b, m] = s(b, pos[m]): B x B x L x K
    diagonal = scores.diagonal()
    terms = []
    if in_batch in ("items", "both"):
        terms.append(F.softplus(scores - diagonal[:, None])[valid])
    if in_batch in ("users", "both"):
        terms.append(F.softplus(scores.T - diagonal[:, None])[valid])
    terms = torch.cat(terms)
    return terms.sum() / max(terms.numel(), 1)


def peak_bytes_estimate(batch: int, layers: int, codes: int, samples: int, mode: str, symmetric: bool) -> int:
    """Bytes of the broadcast tensors at the peak of forward + backward (the rest is far smaller)."""
    rows = batch * (1 + samples) if mode == "sampled" else batch * (1 if mode == "mean" else batch)
    return BROADCAST_TENSORS_AT_PEAK * (2 if symmetric else 1) * rows * layers * codes * 4
