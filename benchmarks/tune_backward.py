"""Sweep tile configs of the dgrad (forward kernel over transposed weights) and wgrad kernels.

Usage (GPU): ``python benchmarks/tune_backward.py [--out DIR] [--kinds dgrad,wgrad,wgrad_tma,wgrad_groups]``;
prints each ranking. ``wgrad_tma``: whole row chunks by TMA descriptors against pointer loads.
``wgrad_groups``: the table's wgrad tile in the expert-by-expert grid against the 1-D grid taken
:data:`WGRAD_GROUPS` experts at a time (``grouped_wgrad_kernel`` ``EXPERT_GROUP``), two rounds
alternated, each timing printed, outputs compared bit for bit with the table's.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import harness  # noqa: E402
from bench_training import SHAPES  # noqa: E402

from moe_ops.kernels import dispatch  # noqa: E402
from moe_ops.kernels.grouped_wgrad import launch_wgrad  # noqa: E402
from moe_ops.lowering.kernel_choice import KernelConfig as C, choose_wgrad_config  # noqa: E402

DGRAD = [C(128, 256, 64, 8, 3), C(128, 128, 64, 8, 3), C(128, 128, 64, 4, 4), C(64, 256, 64, 8, 3),
         C(128, 128, 32, 4, 4), C(128, 256, 32, 8, 4), C(256, 128, 64, 8, 3), C(128, 128, 64, 8, 4, group_m=1)]
WGRAD = [(64, 128, 128, 8, 3), (32, 128, 128, 4, 3), (64, 128, 64, 4, 4), (64, 256, 128, 8, 3),
         (128, 128, 64, 8, 3), (64, 128, 128, 4, 4), (32, 256, 128, 8, 3), (128, 128, 128, 8, 3),
         # more CTAs an SM (smaller stages), narrower output tiles, deeper K-tile pipelines
         (32, 128, 128, 4, 2), (32, 128, 64, 4, 3), (64, 128, 64, 4, 3), (32, 64, 128, 4, 3),
         (64, 64, 128, 4, 3), (32, 128, 256, 8, 2), (64, 256, 64, 8, 3), (16, 128, 128, 4, 4),
         (32, 128, 128, 4, 4), (64, 128, 128, 4, 3)]

# --kinds wgrad_tma: the default wgrad tile with pointer loads against TMA chunks, and TMA tiles
WGRAD_TMA = [((64, 128, 128, 8, 3), False), ((64, 128, 128, 8, 3), True), ((64, 128, 128, 8, 4), True),
             ((128, 128, 64, 8, 3), True), ((64, 256, 64, 8, 3), True), ((128, 128, 128, 8, 3), True),
             ((128, 256, 64, 8, 3), True),
             # wider output tiles (DeepSeek-V3's 1024 rows per expert: more MMA per loaded chunk)
             ((64, 256, 128, 8, 3), True), ((64, 128, 256, 8, 3), True), ((64, 256, 128, 8, 2), True),
             ((32, 256, 128, 8, 3), True)]


# --kinds wgrad_groups: experts a group of the 1-D wgrad grid (0: the table's expert-by-expert grid)
WGRAD_GROUPS = [0, 4, 8, 16, 32]


def wgrad_groups(sname, dy, x, offs, rounds: int = 2) -> list:
    """``[(round, group, ms, equal to the table's output)]`` of the table's wgrad tile at each of
    :data:`WGRAD_GROUPS`, CUDA-graph timed, the groups alternated ``rounds`` times."""
    tile = choose_wgrad_config(x.shape[0], offs.shape[0])
    base = launch_wgrad(dy, x, offs, dy.dtype, tile)
    out = []
    for rnd in range(rounds):
        for g in WGRAD_GROUPS:
            if g > offs.shape[0]:
                continue
            fn = (lambda g=g: launch_wgrad(dy, x, offs, dy.dtype, tuple(tile) + ((g,) if g else ())))
            same = bool(torch.equal(fn(), base))
            ms = harness.bench_graph_ms(fn, reps=5)  # 5 outputs of [E, N, K] live in the graph's pool
            out.append((rnd, g, ms, same))
            print(f"{sname:18s} wgrad {tile} expert_group {g:2d} round {rnd}: {ms:.4f} ms, "
                  f"equal to the table's: {same}", flush=True)
    return out


def main(out_dir, kinds):
    dev = torch.device("cuda")
    T, res = 4096, []
    for sname, (E, top_k, K, N) in SHAPES.items():
        offs, x, w, dy = harness.training_operands(E, top_k, K, N, T, dev)
        makers = {"dgrad": lambda cfg: (lambda: dispatch.grouped_mm_dgrad(dy, w, None, None, offs, "none", "none", 0,
                                                                          "none", config=cfg)),
                  "wgrad": lambda cfg: (lambda: dispatch.grouped_mm_wgrad(dy, x, offs, "none", config=cfg)),
                  "wgrad_tma": lambda c: (lambda: launch_wgrad(dy, x, offs, dy.dtype, c[0], tma=c[1]))}
        if "wgrad_tma" in kinds:
            print(sname, "wgrad TMA chunks equal pointer loads bit for bit:",
                  torch.equal(launch_wgrad(dy, x, offs, dy.dtype, tma=True), launch_wgrad(dy, x, offs, dy.dtype,
                                                                                          tma=False)), flush=True)
        if "wgrad_groups" in kinds:
            res.append({"shape": sname, "kind": "wgrad_groups", "timings": wgrad_groups(sname, dy, x, offs)})
        for kind, space in (("dgrad", DGRAD), ("wgrad", WGRAD), ("wgrad_tma", WGRAD_TMA)):
            if kind not in kinds:
                continue
            ranking = harness.sweep(makers[kind], space, f"{sname:18s} {kind}")
            res.append({"shape": sname, "kind": kind, "ranking": [(ms, str(c)) for ms, c in ranking]})
        x = w = dy = None
    harness.write_json(os.path.join(out_dir, "tune_backward.json"), {"env": harness.environment(dev), "results": res})


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    p.add_argument("--kinds", default="dgrad,wgrad", help="comma-separated: dgrad, wgrad, wgrad_tma, wgrad_groups")
    a = p.parse_args()
    main(a.out, a.kinds.split(","))
