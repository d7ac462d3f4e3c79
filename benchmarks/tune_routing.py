"""Decode routing, CUDA-graph timed: ``moe_ops.route`` in one launch (``topk_sort_kernel``,
within ``dispatch.topk_sort_fits``) with the warps rule of
:func:`moe_ops.kernels.dispatch._topk_warps` and with four warps, against the two launches it
replaces (``topk_route`` then ``sort_rows``: top-k kernel + counting sort).

With ``--router``: the router GEMM and the routing, ``moe_ops::router_route`` in one launch
(:func:`moe_ops.kernels.dispatch.router_topk_sort`, with :data:`dispatch.ROUTER_PROGRAMS` at
its value and at half and twice it) against ``F.linear`` (cuBLAS) then ``moe_ops.route``, bf16,
at Qwen3-30B-A3B's router (128 experts, H 2048) and DeepSeek-V3's hidden size over 32 experts.

Usage (GPU): ``python benchmarks/tune_routing.py [--router] [--out DIR]``. Prints one line per
case and writes ``tune_routing.json`` (``tune_router.json``).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import harness  # noqa: E402

import moe_ops  # noqa: E402,F401  (registers the operators)
from moe_ops.kernels import dispatch  # noqa: E402

CASES = [(E, T, 8) for E in (128, 32) for T in (1, 2, 4, 8, 16, 64)]  # Qwen3-30B-A3B, DeepSeek-V3 E=32
FOUR = lambda *_: 4  # noqa: E731
OPS = torch.ops.moe_ops


def _two_launches(logits, k):
    w, ids = OPS.topk_route(logits, k)
    return [w, ids] + OPS.sort_rows(ids, logits.shape[1])


VARIANTS = {"one_launch": (OPS.route, {}), "one_launch_four_warps": (OPS.route, {"_topk_warps": FOUR}),
            "two_launches": (_two_launches, {})}


def main(args):
    dev = torch.device("cuda")
    rules = {name: getattr(dispatch, name) for name in ("_topk_warps",)}
    out = {}
    for E, T, k in CASES:
        logits = torch.randn(T, E, device=dev)
        res = {}
        for variant, (op, patch) in VARIANTS.items():
            for name, fn in patch.items():
                setattr(dispatch, name, fn)
            try:
                res[variant] = harness.bench_graph_ms(lambda: op(logits, k), reps=50) * 1e3
            finally:
                for name, fn in rules.items():
                    setattr(dispatch, name, fn)
        out[f"E{E}/T{T}/k{k}"] = res
        print(f"E={E} T={T} top_k={k}: " + ", ".join(f"{v} {us:.2f} us" for v, us in res.items()), flush=True)
    harness.write_json(os.path.join(args.out, "tune_routing.json"), {"env": harness.environment(dev), "us": out})


ROUTER_CASES = [(E, H, T, 8) for E, H in ((128, 2048), (32, 7168)) for T in (1, 2, 4, 8, 16)]


def main_router(args):
    dev = torch.device("cuda")
    programs = dispatch.ROUTER_PROGRAMS
    sem = torch.zeros(1, dtype=torch.int32, device=dev)
    out = {}
    for E, H, T, k in ROUTER_CASES:
        x = torch.randn(T, H, device=dev, dtype=torch.bfloat16)
        wr = torch.randn(E, H, device=dev, dtype=torch.bfloat16) * H ** -0.5
        res = {"linear_then_route": harness.bench_graph_ms(
            lambda: OPS.route(torch.nn.functional.linear(x, wr), k), reps=50) * 1e3}
        for p in (programs, programs // 2, programs * 2):
            dispatch.ROUTER_PROGRAMS = p
            try:
                res[f"router_route_{p}_programs"] = harness.bench_graph_ms(
                    lambda: OPS.router_route(x, wr, k, "softmax", True, None, sem), reps=50) * 1e3
            finally:
                dispatch.ROUTER_PROGRAMS = programs
        out[f"E{E}/H{H}/T{T}/k{k}"] = res
        print(f"E={E} H={H} T={T} top_k={k}: " + ", ".join(f"{v} {us:.2f} us" for v, us in res.items()), flush=True)
    harness.write_json(os.path.join(args.out, "tune_router.json"), {"env": harness.environment(dev), "us": out})


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    p.add_argument("--router", action="store_true")
    a = p.parse_args()
    main_router(a) if a.router else main(a)
