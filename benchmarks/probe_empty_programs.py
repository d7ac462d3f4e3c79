"""What the grouped GEMM's programs without work cost at decode sizes.

The launch grid has ``host_math.row_tile_bound(M, BLOCK_M, E)`` row tiles, a static bound: at
Qwen3-30B-A3B T=16 (128 rows over 128 experts) 128 row tiles of 16 rows (137 before session 30)
where the routing uses about 45, so about two thirds of the programs load ``offs``, find no tile
and exit. This probe times each decode
launch (the table's tiles, CUDA-graph timed) with that grid and with a grid cut to the row tiles
this routing uses (counted on the host from ``offs``: a measurement device only, never a launch
rule, since the grid must come from static shapes), alternating A/B three times, outputs checked
bit-equal.

Usage (GPU): ``python benchmarks/probe_empty_programs.py [--out FILE]``.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import harness  # noqa: E402
from bench_forward import OURS, SHAPES  # noqa: E402
from bench_moe_layer import LAYERS, quantized_layer  # noqa: E402

import moe_ops  # noqa: E402
from moe_ops.kernels import dispatch  # noqa: E402

_static_bound = dispatch.row_tile_bound
_counts = {"offs": None}


def _used_row_tiles(M, block_m, E):
    """Row tiles the routing in ``_counts`` uses, plus those of the zero rows past ``offs[-1]``."""
    offs = _counts["offs"]
    sizes = torch.diff(offs, prepend=torch.zeros(1, dtype=offs.dtype))
    used = int(((sizes + block_m - 1) // block_m).sum())
    return max(1, used + -(-(M - int(offs[-1])) // block_m))


def _ab(fn, offs_host, label, rows):
    """Time ``fn`` with the static grid and the used-tile grid, alternating, three times each."""
    static_ms, cut_ms = [], []
    ref = None
    for _ in range(3):
        for cut in (False, True):
            dispatch.row_tile_bound = _used_row_tiles if cut else _static_bound
            _counts["offs"] = offs_host
            out = fn()
            torch.cuda.synchronize()
            if ref is None:
                ref = out.clone()
            elif not torch.equal(out, ref):
                raise AssertionError(f"{label}: output differs with the cut grid")
            (cut_ms if cut else static_ms).append(harness.bench_graph_ms(fn) * 1e3)
    dispatch.row_tile_bound = _static_bound
    s, c = sorted(static_ms)[1], sorted(cut_ms)[1]
    line = (f"{label:44s} static {s:8.1f} us  cut {c:8.1f} us  ({(s - c) / s * 100:+5.1f}%)  "
            f"runs static {['%.1f' % v for v in static_ms]} cut {['%.1f' % v for v in cut_ms]}")
    print(line, flush=True)
    rows.append(line)


def main(args):
    dev = torch.device("cuda")
    rows = []
    for sname, tokens, variants in (("qwen3_gate_up", (1, 16), ("int4_asym_g128", "bf16", "fp8_e4m3_ch")),
                                    ("qwen3_down", (1, 16), ("int4_asym_g128",)),
                                    ("dsv3_gate_up_e32", (1, 16), ("int4_asym_g128",)),
                                    ("mixtral_gate_up", (1, 16), ("int4_asym_g128",))):
        E, top_k, K, N = SHAPES[sname]
        w = (torch.randn(E, N, K, device=dev) * 0.02).to(torch.bfloat16)
        for lab in variants:
            _, f, gr, gs, act = next(o for o in OURS if o[0] == lab)
            wd, ws, wz, fmt, g2, gs2 = moe_ops.quantize_weight(w, f, gr, gs).op_args()
            for T in tokens:
                offs = harness.skewed_offs(T, E, top_k, dev, seed=T)
                x = torch.randn(T * top_k, K, device=dev, dtype=torch.bfloat16)
                _ab(lambda: dispatch.grouped_mm(x, wd, ws, wz, offs, fmt, g2, gs2, act or "none", "none"),
                    offs.cpu(), f"grouped_mm {sname} T={T} {lab}", rows)
        w = None
    for layer, tokens in (("qwen3", (1, 8)), ("dsv3", (1, 8))):
        H, I, E, k = LAYERS[layer]
        for fname in ("int4_g128", "bf16"):
            m, act = quantized_layer(layer, fname, dev)
            a1, a2 = m.gate_up.op_args(), m.down.op_args()
            for T in tokens:
                x = torch.randn(T, H, device=dev, dtype=torch.bfloat16)
                r = m.route(x)
                args_ = (x, r.weights, r.sorted_rows, r.offs, *a1[:3], *a2[:3], a1[3], a1[4], a1[5], a2[5], act,
                         "none")
                _ab(lambda: dispatch.expert_mlp(*args_), r.offs.cpu(), f"expert_mlp {layer} T={T} {fname}", rows)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write("# python benchmarks/probe_empty_programs.py; " + str(harness.environment(dev)) + "\n")
            fh.write("\n".join(rows) + "\n")


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    main(p.parse_args())
