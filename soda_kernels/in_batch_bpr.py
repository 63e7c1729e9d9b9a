"""Fused in-batch distributional BPR: Triton kernels (issue 4)."""


def in_batch_bpr(user, items, codebooks, positives, *, in_batch, user_logits, symmetric, temperature,
                 user_temperature, layer_weights, reduction):
    raise NotImplementedError("backend='triton' with in-batch negatives lands with issue 4")
