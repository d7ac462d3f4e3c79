"""Forward grouped GEMM: ours per format against PyTorch's grouped GEMMs, in one run.

Usage (GPU machine): ``python benchmarks/bench_forward.py [--out DIR] [--quick]``.
Prints one markdown table and writes ``forward_<device>.md/.json`` under ``--out``
(default ``benchmarks/results``). Ratios are peer_ms / our_ms (>1: we are faster). W8A8 rows
time the whole call (dynamic activation cast included) and, as ``gemm_ms``, the GEMM alone on x
cast beforehand (``act_cast_ms`` the cast alone, CUDA-graph timed): ``torch._scaled_grouped_mm`` is timed on
inputs cast beforehand, so ``gemm_x_vs_scaled_grouped_mm_fp8`` is the like-for-like ratio.
``ms`` is eager (``triton.testing.do_bench``); ``graph_ms`` the whole call replayed in a CUDA
graph, for every row at decode sizes (T <= 128) and for the bf16 and W8A8 rows at prefill, where
``graph_x_vs_ours_bf16`` compares W8A8 with our bf16 path free of host time.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
import harness  # noqa: E402

import moe_ops  # noqa: E402
from moe_ops.kernels import dispatch  # noqa: E402

SHAPES = {
    "qwen3_gate_up": (128, 8, 2048, 1536),
    "qwen3_down": (128, 8, 768, 2048),
    "dsv3_gate_up_e32": (32, 8, 7168, 4096),
    "mixtral_gate_up": (8, 2, 4096, 28672),
}
OURS = [  # (label, format, granularity, group_size, act_quant)
    ("bf16", "bf16", "none", 0, None),
    ("int4_asym_g128", "int4_asym", "group", 128, None),
    ("int8_sym_ch", "int8_sym", "channel", 0, None),
    ("fp8_e4m3_ch", "fp8_e4m3", "channel", 0, None),
    ("w8a8_int8", "int8_sym", "channel", 0, "int8_token"),
    ("w8a8_fp8", "fp8_e4m3", "channel", 0, "fp8_token"),
]


def _scaled_grouped_peer(x, w, offs):
    xs = x.float().abs().amax(1).clamp_min(1e-12) / 448.0
    xq = (x.float() / xs[:, None]).to(torch.float8_e4m3fn)
    ws = w.float().abs().amax(2).clamp_min(1e-12) / 448.0
    wq = (w.float() / ws[:, :, None]).to(torch.float8_e4m3fn)
    return lambda: torch._scaled_grouped_mm(xq, wq.transpose(-2, -1), xs, ws, offs=offs, out_dtype=torch.bfloat16)


def run(args):
    dev = torch.device("cuda")
    env = harness.environment(dev)
    ceil = harness.ceilings(dev)
    print("env", env, "\nceilings", ceil, flush=True)
    rows = []
    Ts = [16, 4096] if args.quick else (args.tokens or [1, 16, 128, 1024, 4096])
    for sname, (E, top_k, K, N) in SHAPES.items():
        g = torch.Generator().manual_seed(0)
        w = (torch.randn(E, N, K, generator=g) * 0.02).to(torch.bfloat16).to(dev)
        qws = {lab: moe_ops.quantize_weight(w, f, gr, gs) for lab, f, gr, gs, _ in OURS}
        qw_int4 = qws["int4_asym_g128"]
        for T in Ts:
            offs = harness.skewed_offs(T, E, top_k, dev, seed=T)
            M = T * top_k
            x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
            counts = torch.diff(offs, prepend=offs.new_zeros(1)).cpu()
            active = int((counts > 0).sum())
            flops = 2.0 * M * N * K
            peers = {"grouped_mm_bf16": lambda: torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)}
            try:
                fn = _scaled_grouped_peer(x, w, offs)
                fn()
                peers["scaled_grouped_mm_fp8"] = fn
            except Exception as e:  # noqa: BLE001
                print("scaled_grouped_mm unavailable:", repr(e)[:120])
            peers["dequant_int4_grouped_mm"] = lambda: torch._grouped_mm(
                x, moe_ops.dequantize_weight(qw_int4).transpose(-2, -1), offs=offs)
            ends = offs.tolist()

            def loop():
                s = 0
                out = x.new_empty(M, N)
                for e, t in enumerate(ends):
                    if t > s:
                        out[s:t] = F.linear(x[s:t], w[e])
                    s = t
                return out
            peers["linear_loop"] = loop
            peer_ms = {k: harness.bench_ms(v) for k, v in peers.items()}
            row_base = {"shape": sname, "T": T, "M": M, "active_experts": active}
            peer_row = {**row_base, "variant": "peers", **{f"{k}_ms": v for k, v in peer_ms.items()}}
            # launch-overhead-free times (CUDA graph replay): every row at decode shapes; at prefill
            # the bf16 and activation-quantized rows (W8A8's target is our bf16 path, and its two
            # launches, the second with TMA descriptors, can outlast the kernels on the host)
            peer_row["grouped_mm_bf16_graph_ms"] = harness.bench_graph_ms(peers["grouped_mm_bf16"])
            rows.append(peer_row)
            ours_bf16_graph_ms = None
            for lab, _f, _gr, _gs, act in OURS:
                qw = qws[lab]
                fn = lambda: moe_ops.grouped_mm(x, qw, offs, act_quant=act)  # noqa: E731
                fn()
                ms = harness.bench_ms(fn)
                wbytes = qw.nbytes() * active / E
                nbytes = wbytes + x.numel() * 2 + M * N * 2
                r = {**row_base, "variant": lab, "ms": ms, "TFLOPs": flops / ms / 1e9, "GBps": nbytes / ms / 1e6,
                     "copy_share": nbytes / ms / 1e6 / ceil["copy_GBps"],
                     "mm_share": flops / ms / 1e9 / ceil["fp8_TFLOPs" if act else "bf16_TFLOPs"]}
                for k, v in peer_ms.items():
                    r[f"x_vs_{k}"] = v / ms
                if act:  # the GEMM alone on x cast beforehand: the peer's inputs come cast too
                    wd, wsc, wz, f, gr, gs = qw.op_args()
                    pre = dispatch.quantize_act(x, act)
                    r["gemm_ms"] = gemm_ms = harness.bench_ms(
                        lambda: dispatch.grouped_mm(x, wd, wsc, wz, offs, f, gr, gs, act, "none", prequantized=pre))
                    # graph-timed: an eager launch of the short cast is host-bound
                    r["act_cast_ms"] = harness.bench_graph_ms(lambda: dispatch.quantize_act(x, act))
                    for k, v in peer_ms.items():
                        r[f"gemm_x_vs_{k}"] = v / gemm_ms
                if T <= 128 or act or lab == "bf16":
                    r["graph_ms"] = gms = harness.bench_graph_ms(fn)
                    r["graph_copy_share"] = nbytes / gms / 1e6 / ceil["copy_GBps"]
                    r["graph_x_vs_grouped_mm_bf16"] = peer_row["grouped_mm_bf16_graph_ms"] / gms
                    if lab == "bf16":
                        ours_bf16_graph_ms = gms
                    elif ours_bf16_graph_ms is not None:
                        r["graph_x_vs_ours_bf16"] = ours_bf16_graph_ms / gms
                rows.append(r)
                print(sname, T, lab, f"{ms:.4f} ms", {k: round(v / ms, 2) for k, v in peer_ms.items()}, flush=True)
            x = None  # free before the next T
    cols = ["shape", "T", "variant", "ms", "TFLOPs", "GBps", "copy_share", "mm_share", "graph_ms", "graph_copy_share",
            "graph_x_vs_grouped_mm_bf16", "graph_x_vs_ours_bf16", "x_vs_grouped_mm_bf16",
            "x_vs_scaled_grouped_mm_fp8", "gemm_ms", "act_cast_ms", "gemm_x_vs_scaled_grouped_mm_fp8", "x_vs_dequant_int4_grouped_mm", "x_vs_linear_loop",
            "grouped_mm_bf16_ms", "grouped_mm_bf16_graph_ms", "scaled_grouped_mm_fp8_ms", "dequant_int4_grouped_mm_ms",
            "linear_loop_ms"]
    name = "forward_" + env.get("device", "gpu").replace(" ", "_")
    print(harness.write_results(name, env, ceil, rows, cols, args.out))


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    p.add_argument("--quick", action="store_true")
    p.add_argument("--tokens", type=int, nargs="*", help="token counts T (default 1 16 128 1024 4096)")
    run(p.parse_args())
