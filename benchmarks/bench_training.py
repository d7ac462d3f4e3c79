"""Forward + dgrad + wgrad of one grouped GEMM: ours against ``torch._grouped_mm`` (bf16).

Usage (GPU): ``python benchmarks/bench_training.py [--out DIR]``. Ratios are peer_ms / our_ms.
Rows: the whole forward+backward per recipe through ``moe_ops.grouped_mm`` (``fp8_blockwise``
there casts W once for forward and dgrad: ``recipe_weights`` + ``grouped_mm_recipe``) (eager,
and as CUDA-graph replays: ``ms_graph``,
the kernels without the host's per-op cost, as a compiled ``reduce-overhead`` step runs); each
operator alone (``fwd``/``dgrad``/``wgrad`` bf16, and per recipe with its casts inside;
``wgrad_gemm_fp8_*`` the fp8 wgrad GEMM on pre-quantized operands) against the matmul ceilings;
each quantization cast against the copy ceiling (bytes read + written); ``bound_*``: the
least time of each recipe's step at this run's ceilings and the largest ratio it allows
(:mod:`step_bounds`).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import harness  # noqa: E402
import step_bounds  # noqa: E402

import moe_ops  # noqa: E402

SHAPES = {"qwen3_gate_up": (128, 8, 2048, 1536), "qwen3_down": (128, 8, 768, 2048),
          "dsv3_gate_up_e32": (32, 8, 7168, 4096)}


def cast_rows(sname, T, x, w, offs, ceil):
    """The recipes' quantization kernels alone: bytes read + written over the copy ceiling."""
    from moe_ops.kernels.dispatch import quantize_act
    from moe_ops.kernels.token_block_quant import padded_blocks, token_block_quant
    from moe_ops.kernels.weight_quant import fp8_weight_quant
    M, K = x.shape
    E, N, _ = w.shape
    nb = padded_blocks(M, E)
    casts = {  # name: (fn, bytes read + written; the token-block layout's zero padding not counted)
        "cast_x_fp8_1x128": (lambda: quantize_act(x, "fp8_1x128"), M * K * 3 + M * (K // 128) * 4),
        "cast_x_fp8_token": (lambda: quantize_act(x, "fp8_token"), M * K * 3 + M * 4),
        "cast_x_token_blocks_128": (lambda: token_block_quant(x, offs, False), M * K * 3 + nb * K * 4),
        "cast_x_token_blocks_expert": (lambda: token_block_quant(x, offs, True), M * K * 3 + E * K * 4),
        "cast_w_fp8_block": (lambda: fp8_weight_quant(w, "block"), E * N * K * 3),
        "cast_w_fp8_block_transposed": (lambda: fp8_weight_quant(w, "block", transpose=True), E * N * K * 3),
        # W's and W^T's block codes from one read (recipe_weights, fp8_blockwise under autograd)
        "cast_w_fp8_block_pair": (lambda: fp8_weight_quant(w, "block", pair=True), E * N * K * 4),
        "cast_w_fp8_channel": (lambda: fp8_weight_quant(w, "channel"), E * N * K * 3),
        "cast_wT_fp8_channel": (lambda: fp8_weight_quant(w, "channel", transpose=True), E * N * K * 3),
    }
    out = []
    for name, (fn, nbytes) in casts.items():
        fn()
        ms = harness.bench_ms(fn)  # eager: includes the host's ~0.1-0.3 ms per call where longer
        ms_graph = harness.bench_graph_ms(fn)  # the kernels alone: 20 launches in one CUDA graph
        gbps = nbytes / ms_graph / 1e6
        out.append({"shape": sname, "T": T, "variant": name, "ms": ms, "ms_graph": ms_graph,
                    "GBps": gbps, "copy_share": gbps / ceil["copy_GBps"]})
        print(out[-1], flush=True)
    return out


def _wgrad_gemm(dy, x, offs, per_expert):
    """The fp8 wgrad GEMM alone, on operands quantized once beforehand."""
    from moe_ops.kernels.grouped_wgrad import launch_wgrad_fp8
    from moe_ops.kernels.token_block_quant import token_block_quant
    qdy, sdy = token_block_quant(dy, offs, per_expert)
    qx, sx = token_block_quant(x, offs, per_expert)
    return lambda: launch_wgrad_fp8(qdy, qx, sdy, sx, offs, per_expert, dy.dtype)


def run(args):
    dev = torch.device("cuda")
    env = harness.environment(dev)
    ceil = harness.ceilings(dev)
    rows = []
    T = 4096
    for sname, (E, top_k, K, N) in SHAPES.items():
        offs, x, w, dy = harness.training_operands(E, top_k, K, N, T, dev, requires_grad=True)
        M = T * top_k
        flops = 3 * 2.0 * M * N * K

        def peer():
            y = torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)
            return torch.autograd.grad(y, (x, w), dy)

        peer_ms = harness.bench_ms(peer)
        peer_graph = harness.bench_graph_ms(peer, reps=5)
        rows.append({"shape": sname, "T": T, "variant": "grouped_mm_bf16_fwd_bwd", "ms": peer_ms,
                     "ms_graph": peer_graph, "TFLOPs": flops / peer_ms / 1e9})
        rows.extend(step_bounds.bound_rows(sname, T, E, top_k, K, N, ceil, peer_graph))
        for recipe in (None, "fp8_rowwise", "fp8_blockwise"):
            def ours(recipe=recipe):
                y = moe_ops.grouped_mm(x, w, offs, recipe=recipe)
                return torch.autograd.grad(y, (x, w), dy)
            ours()
            ms = harness.bench_ms(ours)
            ms_graph = harness.bench_graph_ms(ours, reps=5)  # the step's kernels without the host
            rows.append({"shape": sname, "T": T, "variant": f"ours_{recipe or 'bf16'}_fwd_bwd", "ms": ms,
                         "ms_graph": ms_graph, "TFLOPs": flops / ms / 1e9,
                         "mm_share": flops / ms / 1e9 / ceil["bf16_TFLOPs"], "x_vs_grouped_mm_bf16": peer_ms / ms,
                         "graph_x_vs_grouped_mm_bf16": peer_graph / ms_graph})
            print(rows[-1], flush=True)
        with torch.no_grad():
            parts = {
                "fwd": lambda: torch.ops.moe_ops.grouped_mm(x, w, None, None, offs),
                "dgrad": lambda: torch.ops.moe_ops.grouped_mm_dgrad(dy, w, None, None, offs),
                "wgrad": lambda: torch.ops.moe_ops.grouped_mm_wgrad(dy, x, offs),
                "peer_fwd": lambda: torch._grouped_mm(x, w.transpose(-2, -1), offs=offs),
                "peer_dgrad": lambda: torch._grouped_mm(dy, w, offs=offs),
                "peer_wgrad": lambda: torch._grouped_mm(dy.t(), x, offs=offs),
            }
            for recipe in ("fp8_rowwise", "fp8_blockwise"):
                parts.update({
                    f"fwd_{recipe}": lambda r=recipe: torch.ops.moe_ops.grouped_mm(x, w, None, None, offs, recipe=r),
                    f"dgrad_{recipe}": lambda r=recipe: torch.ops.moe_ops.grouped_mm_dgrad(dy, w, None, None, offs,
                                                                                          recipe=r),
                    f"wgrad_{recipe}": lambda r=recipe: torch.ops.moe_ops.grouped_mm_wgrad(dy, x, offs, r)})
                parts[f"wgrad_gemm_{recipe}"] = _wgrad_gemm(dy, x, offs, recipe == "fp8_rowwise")
            for k, fn in parts.items():
                ms = harness.bench_ms(fn)
                ceiling = ceil["bf16_TFLOPs"] if k.endswith(("fwd", "dgrad", "wgrad")) else ceil["fp8_TFLOPs"]
                rows.append({"shape": sname, "T": T, "variant": k, "ms": ms, "TFLOPs": 2.0 * M * N * K / ms / 1e9,
                             "mm_share": 2.0 * M * N * K / ms / 1e9 / ceiling})
            rows.extend(cast_rows(sname, T, x.detach(), w.detach(), offs, ceil))
        x = w = dy = None  # free before the next shape
    cols = ["shape", "T", "variant", "ms", "ms_graph", "TFLOPs", "mm_share", "x_vs_grouped_mm_bf16",
            "graph_x_vs_grouped_mm_bf16", "GBps", "copy_share"]
    name = "training_" + env.get("device", "gpu").replace(" ", "_")
    print(harness.write_results(name, env, ceil, rows, cols, args.out))


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    run(p.parse_args())
