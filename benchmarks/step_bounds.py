"""Least time of a training step's kernels at the ceilings measured in a run (a roofline bound),
and the largest ratio to the bf16 ``torch._grouped_mm`` peer that this bound allows.

A kernel's least time is ``max(flops / matmul ceiling, bytes / copy ceiling)``: its FLOPs at the
dense matmul ceiling of its operands' dtype (bf16 or fp8) and the bytes it must read and write
at the copy ceiling (bytes read + written per second), both measured in the same run
(:func:`harness.ceilings`). A step's bound is the sum over the kernels it launches, as
``moe_ops.grouped_mm`` launches them for the recipe (each cast its own kernel, run before the
GEMM that reads it). Scales (4 bytes per 128 or more elements) and the token-block layout's zero
padding are left out. The copy ceiling is the measured rate of one large device copy (as many
bytes read as written); a kernel that reads twice what it writes can pass it by a few percent
(the weight casts measured up to 1.02 of it on an H100), so a bound holds to within that.
Shapes: ``x [M, K]``, ``W [E, N, K]``, ``dy [M, N]``; 16-bit inputs and outputs (y, dx, dW),
1-byte fp8 codes.

``fused_casts``: the same step with x's and dy's two fp8 layouts (the forward/dgrad one and the
wgrad's token blocks) written from one read of each (4 bytes an element instead of 6): what a
fused activation cast could reach. The weight casts cannot drop a read that way for
``fp8_rowwise`` (W's scales run along K, W^T's along N: both need the whole slice before the
first code), and ``fp8_blockwise`` already writes W and W^T from one read.

Usage: ``python benchmarks/step_bounds.py results/training_<device>.json [--out DIR]``: the
bounds of a ``bench_training.py`` run, from its ceilings and its peer rows, written beside it as
``step_bounds_<device>.md``; ``bench_training.py`` adds the same rows to its own table.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import harness  # noqa: E402

RECIPES = ("bf16", "fp8_rowwise", "fp8_blockwise")


def step_kernels(E: int, M: int, K: int, N: int, recipe: str, fused_casts: bool = False) -> dict:
    """``{kernel: (flops, bytes, matmul dtype or None)}`` of one forward+dgrad+wgrad step.
    ``recipe``: ``"bf16"``, ``"fp8_rowwise"`` or ``"fp8_blockwise"``; names as
    ``bench_training.py``'s rows (``cast_*``: casts, dtype None)."""
    if recipe not in RECIPES:
        raise ValueError(f"step_kernels: recipe must be one of {RECIPES}, got {recipe!r}")
    flops = 2.0 * M * N * K
    code = 2 if recipe == "bf16" else 1  # bytes an operand element as the GEMMs read it
    dtype = "bf16" if recipe == "bf16" else "fp8"
    kernels = {
        "fwd": (flops, (M * K + E * N * K) * code + M * N * 2, dtype),
        "dgrad": (flops, (M * N + E * N * K) * code + M * K * 2, dtype),
        "wgrad": (flops, (M * N + M * K) * code + E * N * K * 2, dtype),
    }
    if recipe == "bf16":
        return kernels
    row_cast, unit = ("fp8_token", "expert") if recipe == "fp8_rowwise" else ("fp8_1x128", "128")
    if fused_casts:  # one read of x (dy), both layouts' codes written
        kernels[f"cast_x_{row_cast}_and_token_blocks_{unit}"] = (0.0, M * K * 4, None)
        kernels[f"cast_dy_{row_cast}_and_token_blocks_{unit}"] = (0.0, M * N * 4, None)
    else:
        kernels.update({f"cast_x_{row_cast}": (0.0, M * K * 3, None), f"cast_dy_{row_cast}": (0.0, M * N * 3, None),
                        f"cast_x_token_blocks_{unit}": (0.0, M * K * 3, None),
                        f"cast_dy_token_blocks_{unit}": (0.0, M * N * 3, None)})
    if recipe == "fp8_rowwise":
        kernels["cast_w_fp8_channel"] = (0.0, E * N * K * 3, None)
        kernels["cast_wT_fp8_channel"] = (0.0, E * N * K * 3, None)
    else:
        kernels["cast_w_fp8_block_pair"] = (0.0, E * N * K * 4, None)
    return kernels


def kernel_bound_ms(flops: float, nbytes: float, dtype, ceil: dict) -> float:
    """``max(flops / matmul ceiling of dtype, bytes / copy ceiling)`` in ms; ``ceil`` as
    :func:`harness.ceilings` returns it (``copy_GBps``, ``bf16_TFLOPs``, ``fp8_TFLOPs``)."""
    t = nbytes / (ceil["copy_GBps"] * 1e6)
    if dtype is not None:
        t = max(t, flops / (ceil[f"{dtype}_TFLOPs"] * 1e9))
    return t


def step_bound_ms(E: int, M: int, K: int, N: int, recipe: str, ceil: dict, fused_casts: bool = False) -> float:
    """Sum of :func:`kernel_bound_ms` over :func:`step_kernels`."""
    return sum(kernel_bound_ms(f, b, d, ceil) for f, b, d in step_kernels(E, M, K, N, recipe, fused_casts).values())


def bound_rows(sname: str, T: int, E: int, top_k: int, K: int, N: int, ceil: dict, peer_graph_ms: float) -> list:
    """``bench_training.py`` rows ``bound_<recipe>[_fused_casts]``: the bound in ``ms_graph`` and
    ``graph_x_vs_grouped_mm_bf16`` = the peer's CUDA-graph time over it (the largest ratio a step
    of that recipe can reach at this run's ceilings)."""
    M = T * top_k
    rows = []
    for recipe in RECIPES:
        for fused in ((False,) if recipe == "bf16" else (False, True)):
            ms = step_bound_ms(E, M, K, N, recipe, ceil, fused)
            rows.append({"shape": sname, "T": T, "variant": f"bound_{recipe}" + ("_fused_casts" if fused else ""),
                         "ms_graph": ms, "graph_x_vs_grouped_mm_bf16": peer_graph_ms / ms})
    return rows


def main(argv=None) -> str:
    p = argparse.ArgumentParser()
    p.add_argument("results", help="a bench_training.py JSON (its env, ceilings and peer rows)")
    p.add_argument("--out", help="directory of the markdown (default: beside the JSON)")
    args = p.parse_args(argv)
    from bench_training import SHAPES
    with open(args.results) as fh:
        run = json.load(fh)
    peers = {(r["shape"], r["T"]): r["ms_graph"] for r in run["rows"] if r["variant"] == "grouped_mm_bf16_fwd_bwd"}
    rows = []
    for (sname, T), peer_ms in peers.items():
        E, top_k, K, N = SHAPES[sname]
        rows.append({"shape": sname, "T": T, "variant": "grouped_mm_bf16_fwd_bwd (measured)", "ms_graph": peer_ms})
        rows.extend(bound_rows(sname, T, E, top_k, K, N, run["ceilings"], peer_ms))
        rows.extend({**r, "variant": r["variant"] + " (measured)"} for r in run["rows"]
                    if r["shape"] == sname and r["T"] == T and r["variant"].startswith("ours_"))
    name = "step_bounds_" + os.path.splitext(os.path.basename(args.results))[0].removeprefix("training_")
    env = {**run["env"], "source": os.path.basename(args.results)}
    return harness.write_results(name, env, run["ceilings"], rows,
                                 ["shape", "T", "variant", "ms_graph", "graph_x_vs_grouped_mm_bf16"],
                                 args.out or os.path.dirname(os.path.abspath(args.results)))


if __name__ == "__main__":
    print(main())
