"""Driver for Nsight Compute: one forward grouped GEMM of a benchmark shape, a few calls.

Usage (GPU): ``ncu --section WarpStateStats ... -k regex:grouped_gemm -s 2 -c 1 python
benchmarks/ncu_decode.py --shape qwen3_gate_up --tokens 1 --variant int4_asym_g128`` (the first
calls compile and warm up; ``-s`` skips them).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import harness  # noqa: E402
from bench_forward import OURS, SHAPES  # noqa: E402

import moe_ops  # noqa: E402


def main(a):
    dev = torch.device("cuda")
    E, top_k, K, N = SHAPES[a.shape]
    _, f, gr, gs, act = next(o for o in OURS if o[0] == a.variant)
    w = (torch.randn(E, N, K, device=dev) * 0.02).to(torch.bfloat16)
    wq = w if f == "bf16" else moe_ops.quantize_weight(w, f, gr, gs)
    offs = harness.skewed_offs(a.tokens, E, top_k, dev, seed=a.tokens)
    x = torch.randn(a.tokens * top_k, K, device=dev, dtype=torch.bfloat16)
    for _ in range(a.calls):
        moe_ops.grouped_mm(x, wq, offs, act_quant=act)
    torch.cuda.synchronize()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="qwen3_gate_up", choices=sorted(SHAPES))
    p.add_argument("--tokens", type=int, default=1)
    p.add_argument("--variant", default="int4_asym_g128", choices=[o[0] for o in OURS])
    p.add_argument("--calls", type=int, default=4)
    main(p.parse_args())
