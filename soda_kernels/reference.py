"""The simplest obviously-correct formulation of SODA's maths, for tests only.

Everything is computed in float64 straight from the definitions: distances by
explicit differences, every KL term by its sum, every BPR term one by one. It
is slow and memory-hungry (B x B x L x K) on purpose; users run the ``torch``
or ``triton`` backend instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# The accuracy targets, ||out - ref|| / ||ref|| per input dtype, for the loss and every gradient:
# the tests hold each backend to them against this reference, the benchmark each contender
# against eager PyTorch (float64 runs only on the torch backend).
TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 3e-2}


def log_soft_assignment(x: torch.Tensor, codebooks: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax_k(-||x[n,l] - C[l,k]||^2 / tau): (N, L, d), (L, K, d) -> (N, L, K)."""
    x, codebooks = x.double(), codebooks.double()
    squared_distance = ((x[:, :, None, :] - codebooks[None]) ** 2).sum(-1)
    return torch.log_softmax(-squared_distance / temperature, dim=-1)


def kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) over the last axis, from log-probabilities."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def pairwise_kl(p_logits, q_logits, layer_weights=None) -> torch.Tensor:
    """out[i, j] = sum_l w_l KL(softmax(p[i,l]) || softmax(q[j,l])): (M, L, K), (B, L, K) -> (M, B)."""
    log_p = torch.log_softmax(p_logits.double(), -1)
    log_q = torch.log_softmax(q_logits.double(), -1)
    weights = _weights(layer_weights, log_p.shape[1], log_p.device)
    return (kl(log_p[:, None], log_q[None]) * weights).sum(-1)


def score(log_p_item, log_q_user, weights, symmetric: bool) -> torch.Tensor:
    """s = -sum_l w_l [KL(P || Q) (+ KL(Q || P))], broadcasting over leading axes."""
    divergence = kl(log_p_item, log_q_user)
    if symmetric:
        divergence = divergence + kl(log_q_user, log_p_item)
    return -(divergence * weights).sum(-1)


def distributional_bpr(
    user, items, codebooks, positives, negatives=None, *, user_logits=False, in_batch="items",
    symmetric=False, temperature=1.0, user_temperature=None, layer_weights=None, reduction="mean",
) -> torch.Tensor:
    """docs/maths.md, sections 1-3, term by term, in float64."""
    user_tau = temperature if user_temperature is None else user_temperature
    if user_logits:
        log_q = torch.log_softmax(user.double(), -1)
    else:
        log_q = log_soft_assignment(user, codebooks, user_tau)
    log_p = log_soft_assignment(items, codebooks, temperature)
    weights = _weights(layer_weights, log_q.shape[1], log_q.device)
    pos = positives.tolist()
    batch = len(pos)

    def s(b: int, log_p_item: torch.Tensor, log_q_user=None) -> torch.Tensor:
        return score(log_p_item, log_q[b] if log_q_user is None else log_q_user, weights, symmetric)

    def bpr(s_pos, s_neg):
        return F.softplus(s_neg - s_pos)

    rows: list[list[torch.Tensor]] = [[] for _ in range(batch)]
    if negatives is not None:
        for b in range(batch):
            for n in negatives[b].tolist():
                if n != -1:
                    rows[b].append(bpr(s(b, log_p[pos[b]]), s(b, log_p[n])))
    else:
        valid = [[m for m in range(batch) if m != b and pos[m] != pos[b]] for b in range(batch)]
        for b in range(batch):
            s_bb = s(b, log_p[pos[b]])
            if in_batch in ("items", "both"):
                rows[b] += [bpr(s_bb, s(b, log_p[pos[m]])) for m in valid[b]]
            if in_batch in ("users", "both"):
                rows[b] += [bpr(s_bb, s(m, log_p[pos[b]])) for m in valid[b]]
            if in_batch == "mean" and valid[b]:
                mean_q = torch.stack([log_q[m].exp() for m in valid[b]]).mean(0)
                rows[b].append(bpr(s_bb, s(b, log_p[pos[b]], mean_q.log())))

    zero = log_q.sum() * 0.0  # keeps the graph: no terms means zero gradients
    terms = [t for row in rows for t in row]
    if reduction == "sum":
        return torch.stack(terms).sum() if terms else zero
    if reduction == "mean":
        return torch.stack(terms).mean() if terms else zero
    return torch.stack([torch.stack(row).mean() if row else zero for row in rows])


def _weights(layer_weights, num_layers: int, device) -> torch.Tensor:
    if layer_weights is None:
        return torch.ones(num_layers, dtype=torch.float64, device=device)
    return torch.as_tensor(layer_weights, dtype=torch.float64, device=device)
