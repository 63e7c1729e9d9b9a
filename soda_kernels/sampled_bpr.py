"""Fused distributional BPR with explicit (sampled) negatives: Triton kernels (issue 3)."""


def sampled_bpr(user, items, codebooks, positives, negatives, *, user_logits, symmetric, temperature,
                user_temperature, layer_weights, reduction):
    raise NotImplementedError("backend='triton' with explicit negatives lands with issue 3")
