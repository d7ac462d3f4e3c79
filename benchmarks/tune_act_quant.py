"""Sweep the per-row activation cast (``fp8_token`` / ``int8_token``) over row counts: at 32768
rows bandwidth decides, at decode sizes a few programs' latency does; the rule
(``dispatch._per_row_tiles``) has to serve both, from K alone.

Usage (GPU): ``python benchmarks/tune_act_quant.py [--out DIR]``; CUDA-graph timed, prints the
ranking per (K, M) and writes ``tune_act_quant.json``.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import harness  # noqa: E402

from moe_ops.kernels import dispatch  # noqa: E402

# (BLOCK_R, BLOCK_C, num_warps): one pass when BLOCK_C >= K, else two
CONFIGS = {768: [(16, 256, 4), (8, 1024, 8), (1, 1024, 4), (4, 1024, 4), (1, 256, 4)],
           2048: [(1, 2048, 4), (4, 2048, 8), (1, 2048, 8)],
           7168: [(1, 2048, 4), (1, 8192, 8), (1, 8192, 16), (1, 4096, 8), (2, 2048, 8)]}
ROWS = [1, 8, 64, 512, 2048, 8192, 32768]


def main(out_dir):
    dev = torch.device("cuda")
    env, ceil = harness.environment(dev), harness.ceilings(dev)
    res = []
    for K, space in CONFIGS.items():
        for M in ROWS:
            x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
            rk = harness.sweep(lambda c: (lambda: dispatch.quantize_act(x, "fp8_token", c)), space,
                               f"K={K} M={M}", graph=True)
            default = dispatch._per_row_tiles(K)
            res.append({"K": K, "M": M, "default": str(default), "ranking": [(ms, str(c)) for ms, c in rk]})
    harness.write_json(os.path.join(out_dir, "tune_act_quant.json"), {"env": env, "ceilings": ceil, "results": res})


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    main(p.parse_args().out)
