"""Sweep the FP8 training recipes' kernels: the fp8 wgrad GEMM and the quantization casts.

Usage (GPU): ``python benchmarks/tune_recipes.py [--out DIR] [--only SUBSTRING[,SUBSTRING..]]``; prints each ranking (wgrad:
TFLOP/s over the fp8 matmul ceiling; casts: bytes read + written over the copy ceiling) and
writes ``tune_recipes.json`` (``--only promote_blockwise``: the blockwise GEMMs' promotion A/B,
:func:`_scale_uniform_n`; ``--only groups``: the fp8 wgrad's table tile with its grid taken
``tune_backward.WGRAD_GROUPS`` experts at a time). The defaults in the kernels' launchers come from these rankings.
Every config is timed as CUDA-graph replays: an eager launch of these ops costs the host about
0.3 ms, which ``do_bench`` would count for every kernel shorter than that.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import harness  # noqa: E402
from bench_training import SHAPES  # noqa: E402

from moe_ops.kernels import dispatch  # noqa: E402
from moe_ops.kernels.grouped_wgrad import launch_wgrad_fp8  # noqa: E402
from moe_ops.kernels.token_block_quant import token_block_quant  # noqa: E402
from moe_ops.kernels.weight_quant import fp8_weight_quant  # noqa: E402
from moe_ops.lowering.kernel_choice import KernelConfig as C, choose_wgrad_fp8_config  # noqa: E402
from tune_backward import WGRAD_GROUPS  # noqa: E402  (the bf16 wgrad's groups, swept alike)

FWD = [C(128, 128, 128, 8, 3), C(128, 128, 128, 8, 4), C(64, 128, 128, 4, 4), C(64, 128, 128, 4, 3),
       C(128, 64, 128, 4, 4), C(128, 256, 128, 8, 3), C(64, 256, 128, 8, 3), C(128, 128, 128, 4, 3),
       # TMA tiles (Hopper)
       C(128, 128, 128, 8, 4, tma=True), C(128, 128, 128, 8, 3, tma=True), C(64, 128, 128, 4, 3, tma=True),
       C(64, 256, 128, 8, 3, tma=True), C(128, 256, 128, 8, 3, tma=True)]
WGRAD = [(128, 128, 8, 4), (128, 128, 8, 3), (128, 128, 4, 4), (128, 256, 8, 3), (256, 128, 8, 3),
         (64, 128, 4, 4), (128, 64, 4, 4)]
ACT_ROW = [(4, 2048, 8), (2, 2048, 4), (1, 2048, 4), (8, 2048, 8), (16, 512, 8),  # BLOCK_C < K: two passes
           (8, 1024, 8), (4, 1024, 4), (16, 1024, 8), (2, 1024, 2), (16, 256, 4), (32, 256, 8),
           (1, 8192, 8), (2, 8192, 16), (1, 8192, 16), (2, 4096, 8)]
ACT_1X128 = [(32, 128, 4), (16, 128, 4), (64, 128, 8), (8, 128, 4), (32, 128, 8)]
# (BLOCK_C, num_warps, column tiles first in the grid[, steps[, prefetch[, largest_first]]]): token_block_quant's
# config; steps: token blocks a first-pass step (per expert) or column tiles a program (per block)
TOKEN_BLOCKS = [(16, 2, True), (32, 4, True), (64, 4, True), (64, 8, True), (128, 8, True), (128, 4, True), (32, 4, False),
                (64, 4, False)]
TOKEN_BLOCKS_PER_BLOCK = TOKEN_BLOCKS + [
    # column tiles a program (session 26: one expert lookup for several tiles), the next tile loaded ahead
    (64, 4, True, 2), (64, 4, True, 4), (64, 4, True, 8), (64, 8, True, 2, True), (64, 8, True, 4, True),
    (64, 4, True, 2, True), (64, 4, True, 4, True), (32, 4, True, 4, True), (32, 4, True, 8, True),
    (128, 8, True, 2, True), (128, 8, True, 4)]
TOKEN_BLOCKS_PER_EXPERT = TOKEN_BLOCKS + [
    # token blocks a loop step; the second pass's next block loaded ahead
    (64, 8, True, 2), (32, 8, True, 4), (32, 4, True, 4), (16, 4, True, 4), (16, 4, True, 8), (64, 4, True, 2),
    (16, 4, True, 4, True), (64, 4, True, 2, True), (32, 4, True, 4, True), (32, 4, True, 2, True),
    (16, 4, True, 8, True), (64, 8, True, 2, True),
    # with the first pass's running max (session 25): more blocks a step, wider column tiles
    (64, 4, True, 4, True), (32, 4, True, 8, True), (128, 8, True, 2, True), (128, 4, True, 1, True),
    # the experts launched by row count, most first (session 25, not yet timed)
    (16, 4, True, 4, True, True), (32, 4, True, 4, True, True), (64, 4, True, 4, True, True),
    (64, 8, True, 2, True, True)]
# (BLOCK_N, BLOCK_K, num_warps, flat grid in memory order[, programs per SM: persistent])
W_CHANNEL = [(4, 1024, 4, True), (8, 256, 4, True), (2, 2048, 8, True), (8, 1024, 8, False),
             # one read of rows up to K 8192 (DeepSeek-V3's 7168: its default takes two passes)
             (1, 8192, 8, True), (2, 8192, 16, True), (1, 8192, 4, True)]
W_CHANNEL_T = [(32, 64, 4, True), (64, 64, 4, True), (16, 256, 4, True, 4),
               # BLOCK_K >= N: one read of W (the rows' whole reduced dim in registers)
               (4, 2048, 4, True), (8, 2048, 4, True), (8, 2048, 8, True), (16, 2048, 8, True), (16, 2048, 16, True),
               (2, 4096, 4, True), (4, 4096, 8, True), (8, 4096, 8, True), (8, 4096, 16, True),
               # two 4-warp programs an SM at 255 registers against one 8-warp (8, 4096) at 227
               # (offline, sass_histogram.py --weight-cast channel_t): the same bytes in flight;
               # measured 1.4-2x slower than the defaults (results/tune_wT_channel_4x4096_h100_s29.*)
               (4, 4096, 4, True)]
W_BLOCK = [(128, 128, w, f) for w in (16, 8, 4) for f in (False, True)]


@contextlib.contextmanager
def _scale_uniform_n(on: bool):
    """Force the forward launch's ``SCALE_UNIFORM_N`` constexpr (the promotion A/B)."""
    orig = dispatch._tile_meta

    def meta(*a, **k):
        return {**orig(*a, **k), "SCALE_UNIFORM_N": on}
    dispatch._tile_meta = meta
    try:
        yield
    finally:
        dispatch._tile_meta = orig


def main(out_dir, only=("",)):
    def wanted(kind):
        return any(o in kind for o in only)

    dev = torch.device("cuda")
    env, ceil = harness.environment(dev), harness.ceilings(dev)
    T, res = 4096, []

    def record(sname, kind, ranking, unit, total):
        best = ranking[0][0] if ranking else float("nan")
        share = total / best / (ceil["fp8_TFLOPs"] * 1e9 if unit == "flop" else ceil["copy_GBps"] * 1e6)
        print(f"== {sname} {kind}: best {best:.4f} ms, {share:.2f} of the ceiling", flush=True)
        res.append({"shape": sname, "kind": kind, "best_share": share,
                    "ranking": [(ms, str(c)) for ms, c in ranking]})

    for sname, (E, top_k, K, N) in SHAPES.items():
        offs, x, w, dy = harness.training_operands(E, top_k, K, N, T, dev)
        M = T * top_k
        for recipe, act, gran in (("blockwise", "fp8_1x128", "block"), ("rowwise", "fp8_token", "channel")):
            if not wanted(f"fwd_{recipe}"):
                continue
            data, scale = fp8_weight_quant(w, gran)
            rk = harness.sweep(lambda c, a=(data, scale, act, gran): (
                lambda: dispatch.grouped_mm(x, a[0], a[1], None, offs, "fp8_e4m3", a[3], 0, a[2], "none", config=c)),
                FWD, f"{sname} fwd_{recipe}", graph=True)
            record(sname, f"fwd_{recipe}_incl_x_cast", rk, "flop", 2.0 * M * N * K)
            data = scale = None
        if wanted("promote_blockwise"):
            # A/B of the per-K-tile promotion (SCALE_UNIFORM_N): W's block scale folded into x's row
            # scale (one FMA an element) against W's scale loaded per column (two); the default
            # tile, x cast beforehand (the GEMM alone), forward and dgrad (W^T codes), the
            # variants alternated three times
            for lay, transpose, a in (("fwd", False, x), ("dgrad", True, dy)):
                data, scale = fp8_weight_quant(w, "block", transpose=transpose)
                pre = dispatch.quantize_act(a, "fp8_1x128")
                flops = 2.0 * M * N * K

                def gemm(a=a, data=data, scale=scale, pre=pre):
                    return dispatch.grouped_mm(a, data, scale, None, offs, "fp8_e4m3", "block", 0, "fp8_1x128",
                                               "none", prequantized=pre)
                outs, times = {}, {True: [], False: []}
                for _ in range(3):
                    for uniform in (False, True):
                        with _scale_uniform_n(uniform):
                            outs[uniform] = gemm().float()
                            times[uniform].append(harness.bench_graph_ms(gemm))
                diff = ((outs[True] - outs[False]).norm() / outs[False].norm()).item()
                for uniform in (False, True):
                    ms = min(times[uniform])
                    print(f"== {sname} promote_blockwise {lay} scale_uniform_n={uniform}: {ms:.4f} ms "
                          f"(runs {[round(t, 4) for t in times[uniform]]}), {flops / ms / 1e9:.0f} TFLOP/s", flush=True)
                    res.append({"shape": sname, "kind": f"promote_blockwise_{lay}", "scale_uniform_n": uniform,
                                "ms": times[uniform], "best_share": flops / ms / 1e9 / ceil["fp8_TFLOPs"],
                                "rel_diff_between_variants": diff})
                data = scale = pre = outs = None
        if wanted("dgrad_blockwise_layout"):  # W^T's codes (written transposed) or W's codes read transposed
            qt, st = fp8_weight_quant(w, "block", transpose=True)
            q, s = fp8_weight_quant(w, "block")
            layouts = {"wT_codes": (qt, st), "w_codes_transposed_view": (q.transpose(1, 2), s.transpose(1, 2))}
            outs = {}
            for lay, (data, scale) in layouts.items():
                rk = harness.sweep(lambda c, a=(data, scale): (
                    lambda: dispatch.grouped_mm(dy, a[0], a[1], None, offs, "fp8_e4m3", "block", 0, "fp8_1x128",
                                                "none", config=c)), FWD, f"{sname} dgrad_blockwise {lay}", graph=True)
                record(sname, f"dgrad_blockwise_layout_{lay}_incl_dy_cast", rk, "flop", 2.0 * M * N * K)
                outs[lay] = dispatch.grouped_mm(dy, data, scale, None, offs, "fp8_e4m3", "block", 0, "fp8_1x128",
                                                "none", config=FWD[0]).float()
            diff = (outs["wT_codes"] - outs["w_codes_transposed_view"]).abs().max().item()
            print(f"== {sname} dgrad_blockwise layouts: max |difference| {diff}", flush=True)
            qt = st = q = s = outs = None
        for per_expert in (False, True):
            qdy, sdy = token_block_quant(dy, offs, per_expert)
            qx, sx = token_block_quant(x, offs, per_expert)
            kind = "wgrad_fp8_" + ("rowwise" if per_expert else "blockwise")
            if not wanted(kind):
                continue
            # (tile, tma): every tile by pointer loads and by TMA descriptors
            rk = harness.sweep(lambda c, p=per_expert, a=(qdy, qx, sdy, sx): (
                lambda: launch_wgrad_fp8(*a, offs, p, torch.bfloat16, c[0], tma=c[1])),
                [(c, t) for c in WGRAD for t in (False, True)], f"{sname} {kind}", graph=True)
            record(sname, kind, rk, "flop", 2.0 * M * N * K)
        for per_expert in (False, True):
            kind = "wgrad_fp8_groups_" + ("rowwise" if per_expert else "blockwise")
            if not wanted(kind):
                continue
            qdy, sdy = token_block_quant(dy, offs, per_expert)
            qx, sx = token_block_quant(x, offs, per_expert)
            # the table's tile in the expert-by-expert grid (group 0) and taken WGRAD_GROUPS experts at a time
            table = choose_wgrad_fp8_config(M, E, per_expert)
            rk = harness.sweep(lambda c, p=per_expert, a=(qdy, qx, sdy, sx): (
                lambda: launch_wgrad_fp8(*a, offs, p, torch.bfloat16, c)),
                [tuple(table) + ((g,) if g else ()) for g in WGRAD_GROUPS if g <= E], f"{sname} {kind}",
                graph=True)
            record(sname, kind, rk, "flop", 2.0 * M * N * K)
        # the casts: bandwidth-bound, but their best tiles differ with K and N
        act_bytes = M * K * 3
        sweeps = {
            "cast_x_fp8_token": (lambda c: (lambda: dispatch.quantize_act(x, "fp8_token", c)), ACT_ROW, act_bytes),
            "cast_x_fp8_1x128": (lambda c: (lambda: dispatch.quantize_act(x, "fp8_1x128", c)), ACT_1X128,
                                 act_bytes),
            "cast_x_token_blocks_128": (lambda c: (lambda: token_block_quant(x, offs, False, c)),
                                        TOKEN_BLOCKS_PER_BLOCK, act_bytes),
            "cast_x_token_blocks_expert": (lambda c: (lambda: token_block_quant(x, offs, True, c)),
                                           TOKEN_BLOCKS_PER_EXPERT, act_bytes),
            # weight casts: (config, rcp); rcp: the reciprocal-and-FMA division or div_rn
            "cast_w_fp8_channel": (lambda c: (lambda: fp8_weight_quant(w, "channel", False, *c)),
                                   [(cfg, r) for cfg in W_CHANNEL for r in (False, True)], E * N * K * 3),
            "cast_wT_fp8_channel": (lambda c: (lambda: fp8_weight_quant(w, "channel", True, *c)),
                                    [(cfg, r) for cfg in W_CHANNEL_T for r in (False, True)], E * N * K * 3),
            "cast_w_fp8_block": (lambda c: (lambda: fp8_weight_quant(w, "block", False, *c)),
                                 [(cfg, r) for cfg in W_BLOCK for r in (False, True)], E * N * K * 3),
            "cast_w_fp8_block_transposed": (lambda c: (lambda: fp8_weight_quant(w, "block", True, *c)),
                                            [(cfg, r) for cfg in W_BLOCK for r in (False, True)], E * N * K * 3),
            # W's and W^T's codes from one read (recipe_weights): 2 bytes read, 2 written an element;
            # (config, rcp, words): W^T's codes four a 32-bit word, or bytes
            "cast_w_fp8_block_pair": (lambda c: (lambda: fp8_weight_quant(w, "block", False, c[0], c[1], pair=True,
                                                                          words=c[2])),
                                      [(cfg, True, wd) for cfg in W_BLOCK for wd in (False, True)], E * N * K * 4),
        }
        for kind, (make, space, nbytes) in sweeps.items():
            if not wanted(kind):
                continue
            record(sname, kind, harness.sweep(make, space, f"{sname} {kind}", graph=True), "byte", nbytes)
        x = dy = w = qdy = qx = None
    harness.write_json(os.path.join(out_dir, "tune_recipes.json"), {"env": env, "ceilings": ceil, "results": res})


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    p.add_argument("--only", default="", help="sweep only the kinds containing one of these comma-separated substrings")
    a = p.parse_args()
    main(a.out, tuple(a.only.split(",")))
