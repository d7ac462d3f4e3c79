"""Kernel-time breakdown (torch.profiler) of one fwd+bwd grouped GEMM under an FP8 recipe.

Usage (GPU): ``python benchmarks/profile_recipe.py [--recipe fp8_blockwise]``; prints the top
kernels by CUDA time for the Qwen3-30B-A3B gate_up shape at T=4096.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import harness  # noqa: E402

import moe_ops  # noqa: E402


def main(recipe: str, out: str):
    dev = torch.device("cuda")
    E, top_k, K, N, T = 128, 8, 2048, 1536, 4096
    offs, x, w, dy = harness.training_operands(E, top_k, K, N, T, dev, requires_grad=True)

    def step():
        y = moe_ops.grouped_mm(x, w, offs, recipe=recipe)
        return torch.autograd.grad(y, (x, w), dy)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70)
    print(table)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"profile_{recipe}.txt"), "w") as fh:
        fh.write(table)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--recipe", default="fp8_blockwise")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    a = p.parse_args()
    main(a.recipe, a.out)
