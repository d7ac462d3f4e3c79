"""Warps of the decode routing kernels: top-k selection + counting sort (``moe_ops.route``),
CUDA-graph timed: the launch rules of :func:`moe_ops.kernels.dispatch._topk_warps` and
``_count_sort_warps``, the top-k rule with four-warp sorts, and four warps everywhere (the
rule before session 7).

Usage (GPU): ``python benchmarks/tune_routing.py [--out DIR]``. Prints one line per (E, T,
top_k) and writes ``tune_routing.json``.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import harness  # noqa: E402

import moe_ops  # noqa: E402
from moe_ops.kernels import dispatch  # noqa: E402

CASES = [(E, T, 8) for E in (128, 32) for T in (1, 2, 4, 8, 64)]  # Qwen3-30B-A3B, DeepSeek-V3 E=32
FOUR = lambda *_: 4  # noqa: E731
VARIANTS = {"rule": {}, "sort_four_warps": {"_count_sort_warps": FOUR},
            "topk_four_warps": {"_topk_warps": FOUR}, "four_warps": {"_topk_warps": FOUR, "_count_sort_warps": FOUR}}


def main(args):
    dev = torch.device("cuda")
    rules = {name: getattr(dispatch, name) for name in ("_topk_warps", "_count_sort_warps")}
    out = {}
    for E, T, k in CASES:
        logits = torch.randn(T, E, device=dev)
        res = {}
        for variant, patch in VARIANTS.items():
            for name, fn in patch.items():
                setattr(dispatch, name, fn)
            try:
                res[variant] = harness.bench_graph_ms(lambda: moe_ops.route(logits, k), reps=50) * 1e3
            finally:
                for name, fn in rules.items():
                    setattr(dispatch, name, fn)
        out[f"E{E}/T{T}/k{k}"] = res
        print(f"E={E} T={T} top_k={k}: " + ", ".join(f"{v} {us:.2f} us" for v, us in res.items()), flush=True)
    harness.write_json(os.path.join(args.out, "tune_routing.json"), {"env": harness.environment(dev), "us": out})


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    main(p.parse_args())
