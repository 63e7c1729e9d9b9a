"""Where the headline case's time goes: torch.profiler over the Triton path's forward + backward.

    PYTHONPATH=. python3 bench/profile_headline.py [in_batch mode]
"""

import sys

import torch
from torch.profiler import ProfilerActivity, profile

import soda_kernels as sk

mode = sys.argv[1] if len(sys.argv) > 1 else "both"
g = torch.Generator().manual_seed(0)
B, L, K, d = 4096, 3, 256, 128


def randn(*shape):
    return torch.randn(*shape, generator=g).to("cuda", torch.bfloat16).requires_grad_()


user, items, codebooks = randn(B, L, d), randn(B, L, d), randn(L, K, d)
positives = torch.randint(0, B, (B,), generator=g).cuda()


def step():
    sk.distributional_bpr(user, items, codebooks, positives, in_batch=mode, temperature=4.0).backward()


for _ in range(3):
    step()
torch.cuda.synchronize()
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    for _ in range(5):
        step()
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))
print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12, max_name_column_width=60))
