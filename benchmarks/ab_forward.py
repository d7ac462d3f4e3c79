"""A/B timing of the forward launch across two source trees: the table's tile for each case, timed,
its output saved, or compared bit for bit with a previous run's.

Usage (GPU): ``python benchmarks/ab_forward.py --save A.pt [--cases ...]`` on one tree, then the
same with ``--compare A.pt`` on the other (e.g. the kernel file swapped between the two runs).
A case is ``shape:T:format:granularity[:group_size]`` over :data:`bench_forward.SHAPES`, 16-bit x
(weight-only formats). Decode sizes (at most 16 rows per expert) are CUDA-graph timed, prefill
eager. Same weights, routing and x in both runs (fixed seeds).
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import harness  # noqa: E402
from bench_forward import SHAPES  # noqa: E402

import moe_ops  # noqa: E402

DEFAULT_CASES = [f"{s}:{t}:int8_sym:channel" for s in ("qwen3_gate_up", "qwen3_down") for t in (1, 16, 4096)] + [
    "dsv3_gate_up_e32:1:int8_sym:channel", "dsv3_gate_up_e32:4096:int8_sym:channel",
    "qwen3_gate_up:1:int8_asym:group:128", "qwen3_gate_up:4096:int8_asym:group:128"]


def run_case(case: str):
    """``(ms, (y,), note)`` of one case: the table's launch, timed."""
    dev = torch.device("cuda")
    sname, T, fmt, gran, *gs = case.split(":")
    T, gs = int(T), int(gs[0]) if gs else 0
    E, top_k, K, N = SHAPES[sname]
    g = torch.Generator(device=dev).manual_seed(T)  # on the device: the same data in both runs, fast
    w = (torch.randn(E, N, K, generator=g, device=dev) * 0.02).to(torch.bfloat16)
    qw = moe_ops.quantize_weight(w, fmt, gran, gs)
    x = torch.randn(T * top_k, K, generator=g, device=dev).to(torch.bfloat16)
    offs = harness.skewed_offs(T, E, top_k, dev, seed=T)
    fn = lambda: moe_ops.grouped_mm(x, qw, offs)  # noqa: E731
    y = fn()
    decode = T * top_k <= 16 * E
    ms = harness.bench_graph_ms(fn) if decode else harness.bench_ms(fn)
    return ms, (y,), "graph" if decode else "eager"


if __name__ == "__main__":
    print("env", harness.environment(torch.device("cuda")), flush=True)
    harness.ab_run(harness.ab_arguments(DEFAULT_CASES), run_case)
