"""Pairwise layer-weighted KL between two sets of per-layer code distributions.

    out[i, j] = sum_l w_l KL(P_i^l || Q_j^l),  P = softmax(p_logits), Q = softmax(q_logits)
              = sum_l w_l sum_k P_i,k log P_i,k  -  sum_(l,k) w_l P_i,k log Q_j,k

The second term is one matrix product over the concatenated (layer, code) axis.
"""

from __future__ import annotations

import torch

from . import torch_backend
from ._backend import resolve_backend
from ._validation import check_float_tensor, check_layer_weights, check_same_device


def pairwise_kl(
    p_logits: torch.Tensor, q_logits: torch.Tensor, layer_weights=None, *, backend: str = "auto"
) -> torch.Tensor:
    """Layer-weighted KL(softmax(p_logits[i]) || softmax(q_logits[j])) for every pair (i, j).

    Args:
        p_logits: (M, L, K) unnormalised logits.
        q_logits: (B, L, K) unnormalised logits.
        layer_weights: None (all ones), or L non-negative weights.
        backend: "auto", "triton" or "torch".

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
    weights = check_layer_weights(layer_weights, p_logits.shape[1], device)
    if resolve_backend(backend, p_logits=p_logits, q_logits=q_logits) == "torch":
        return torch_backend.pairwise_kl(p_logits, q_logits, weights)
    raise NotImplementedError("backend='triton' for pairwise_kl lands with the fused kernels (issue 3)")
