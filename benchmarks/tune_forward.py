"""Sweep the forward kernel's tile configs on the benchmark shapes; print the best per case.

Usage (GPU): ``python benchmarks/tune_forward.py [--out DIR] [--focus | --gemv | --w-lhs [--shapes ...]
[--tokens ...] [--variants ...] | --packed-gemv | --tma]``. The winners
inform the static table in ``lowering/kernel_choice.py`` (kernel choice stays static: no tuning
at call time). ``--gemv``: the CUDA-core decode tiles against the tensor-core decode tile.
``--w-lhs``: weight-only formats with the dequantized weight as the MMA's register operand.
``--packed-gemv``: int4 decode on the CUDA cores, codes read as 32-bit words, against the table.
``--tma [--shapes ...] [--tokens ...] [--variants ...]``: prefill tiles with x and W by TMA
descriptors (Hopper; int4 weight-only: x only) against the table's pointer-load tiles, forward
and (with bf16 among the variants) bf16 dgrad; with ``--tma-w``, the weight-only ``w_lhs`` tiles
with W's stored tile by TMA too against x alone (``dispatch.W_LHS_TMA_W``); with ``--variants bf16``,
the ``w_lhs`` tiles on plain weights (the weight tile as the MMA's left operand).
``--fp8-promotion [--shapes ...]``: fp8 W8A8 (``fp8_token`` x, channel-scaled W) at T=4096, the
GEMM alone on x cast beforehand, K tiles of 128 and 256 (the fp32 promotion interval: each K
tile's product accumulates in the tensor core, then is added to the float32 tile), each
config's relative error against the float64 product of the same codes, and
``torch._scaled_grouped_mm`` (default ``use_fast_accum=False``) on the same codes in the same
run, its error too.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import harness  # noqa: E402
from bench_forward import OURS, SHAPES  # noqa: E402

from moe_ops.kernels import dispatch  # noqa: E402
from moe_ops.lowering.kernel_choice import MID_TILE_MAX_ROWS, KernelConfig, choose_forward_config  # noqa: E402

C = KernelConfig
PREFILL = [C(128, 256, 64, 8, 3), C(128, 128, 64, 8, 3), C(128, 128, 64, 4, 4), C(64, 128, 64, 4, 4),
           C(128, 128, 128, 8, 3), C(128, 256, 64, 8, 3, group_m=1), C(128, 128, 64, 8, 3, group_m=1),
           C(128, 256, 64, 8, 4)]
DECODE = [C(16, 64, 128, 4, 4, group_m=1), C(16, 64, 256, 4, 3, group_m=1), C(16, 32, 256, 4, 4, group_m=1),
          C(16, 128, 128, 4, 3, group_m=1), C(16, 32, 512, 4, 3, group_m=1), C(16, 64, 128, 4, 4, group_m=8),
          C(16, 256, 128, 8, 3, group_m=1), C(16, 64, 256, 4, 2, group_m=1)]


FOCUS = {  # (shape, T, variant) -> configs: the cases short of their targets
    ("qwen3_gate_up", 16, "int4_asym_g128"): [C(16, 128, 128, 4, 3, group_m=1), C(16, 64, 256, 4, 4, group_m=1),
                                              C(16, 128, 256, 4, 3, group_m=1), C(16, 64, 256, 4, 3, group_m=1),
                                              C(16, 32, 512, 4, 3, group_m=1), C(16, 64, 512, 4, 3, group_m=1),
                                              C(16, 128, 128, 8, 4, group_m=1), C(16, 32, 256, 4, 4, group_m=1)],
    ("qwen3_gate_up", 4096, "int4_asym_g128"): [C(128, 128, 64, 4, 4), C(128, 128, 128, 8, 3), C(128, 256, 64, 8, 3),
                                                C(64, 128, 128, 4, 4), C(128, 64, 128, 4, 4), C(64, 256, 64, 4, 4),
                                                C(128, 128, 128, 4, 3), C(64, 128, 64, 4, 3)],
    ("dsv3_gate_up_e32", 4096, "w8a8_fp8"): [C(128, 128, 128, 8, 3), C(128, 256, 128, 8, 3), C(128, 128, 128, 4, 4),
                                             C(128, 256, 64, 8, 4), C(64, 256, 128, 8, 3), C(128, 128, 64, 8, 4),
                                             C(128, 256, 128, 8, 4), C(128, 128, 128, 8, 4), C(256, 128, 128, 8, 3),
                                             C(256, 128, 64, 8, 4), C(256, 128, 128, 8, 2)],
    ("qwen3_down", 4096, "w8a8_int8"): [C(128, 128, 64, 4, 4), C(128, 128, 64, 8, 3), C(64, 128, 64, 4, 4),
                                        C(128, 256, 64, 8, 3), C(64, 128, 128, 4, 3), C(128, 128, 128, 8, 3)],
}


def gemv_space(T: int, E: int, top_k: int, K: int, N: int, w_bits: int, group: int) -> list:
    """CUDA-core decode tiles for ``T`` tokens (BLOCK_M around the rows per expert; BLOCK_K of
    256 or 512 stored bytes per weight row, within a scale group), and the table's tensor-core
    decode tile, to compare."""
    rpe = T * top_k / E
    bms = (1,) if rpe <= 0.5 else ((1, 2, 4) if rpe <= 2 else (2, 4))
    per_byte = 8 // w_bits if w_bits < 8 else 1
    elem = 2 if w_bits == 16 else 1
    bks = sorted({min(b * per_byte // elem, group or K) for b in (256, 512)})
    space = [C(bm, bn, bk, w, 1, group_m=1, gemv=True)
             for bm in bms for bn in (8, 16, 32) for bk in bks for w in (2, 4)]
    return space + [choose_forward_config(T * top_k, N, K, E, w_bits, group or K, k_contiguous=False)]


GEMV_CASES = [(s, t, v) for s, ts, vs in (
    ("qwen3_gate_up", (1, 16), ("bf16", "int4_asym_g128", "int8_sym_ch", "fp8_e4m3_ch")),
    ("qwen3_down", (1, 16), ("bf16", "int4_asym_g128", "fp8_e4m3_ch")),
    ("dsv3_gate_up_e32", (1, 16), ("bf16", "int4_asym_g128"))) for t in ts for v in vs]
_BITS = {"bf16": 16, "int4_asym_g128": 4, "int8_sym_ch": 8, "fp8_e4m3_ch": 8, "w8a8_int8": 8, "w8a8_fp8": 8}

# int4/int2 codes read as 32-bit words on the CUDA cores (grouped_gemm._gemv_packed_acc): one
# row a tile; num_stages is the register prefetch depth of the weight words (1: none); k_split
# K tiles side by side a loop step, with 2 warps each
PACKED_GEMV = [C(1, bn, 128, 2 * ks, st, group_m=1, gemv=True, k_split=ks)
               for bn in (16, 32, 64) for ks in (1, 2, 4) for st in (2, 3)]
PACKED_GEMV_CASES = [(s, t, "int4_asym_g128") for s, ts in (
    ("qwen3_gate_up", (1, 16)), ("qwen3_down", (1, 16)), ("dsv3_gate_up_e32", (1,)), ("mixtral_gate_up", (1,)))
    for t in ts]

# weight-only formats: the dequantized weight as the MMA's left operand (KernelConfig.w_lhs;
# its output tile is [BLOCK_N, BLOCK_M] to the tensor cores) against the table's tile
W_LHS_PREFILL = [C(128, 256, 64, 8, 3, w_lhs=True), C(128, 128, 64, 8, 3, w_lhs=True),
                 C(256, 128, 64, 8, 3, w_lhs=True), C(128, 256, 64, 8, 4, w_lhs=True),
                 C(64, 256, 64, 8, 3, w_lhs=True), C(128, 128, 128, 8, 3, w_lhs=True)]
W_LHS_DECODE = [C(16, 128, 128, 4, 3, group_m=1, w_lhs=True), C(16, 64, 128, 4, 4, group_m=1, w_lhs=True),
                C(16, 128, 256, 4, 3, group_m=1, w_lhs=True), C(16, 256, 128, 8, 3, group_m=1, w_lhs=True),
                C(16, 64, 256, 4, 4, group_m=1, w_lhs=True)]


def w_lhs_cases(shapes, variants, tokens) -> list:
    """``(shape, T, variant, space)``: the table's tile first, then the w_lhs tiles."""
    cases = []
    for s in shapes:
        E, top_k, K, N = SHAPES[s]
        for v in variants:
            for t in tokens:
                table = choose_forward_config(t * top_k, N, K, E, _BITS[v], 128 if "g128" in v else K)
                cases.append((s, t, v, [table] + (W_LHS_DECODE if table.decode else W_LHS_PREFILL)))
    return cases


# --tma: the table's prefill tile with x and W by TMA descriptors (KernelConfig.tma), and wider
# TMA tiles; forward formats whose W tile is one code a stored element, and bf16 dgrad
TMA_VARIANTS = ["bf16", "w8a8_fp8", "fp8_e4m3_ch", "int4_asym_g128", "int8_sym_ch"]
# weight-only 8-bit codes: x by TMA (fp8 W too outside w_lhs; int8 codes by pointers)
_TMA_W8 = [C(256, 128, 64, 8, 4, w_lhs=True, tma=True), C(256, 128, 64, 8, 3, w_lhs=True, tma=True),
           C(128, 128, 64, 8, 4, w_lhs=True, tma=True), C(128, 256, 64, 8, 3, tma=True),
           C(128, 128, 64, 8, 4, tma=True)]
TMA_EXTRA = {"bf16": [C(128, 256, 64, 8, 4, tma=True), C(128, 128, 64, 8, 4, tma=True)],
             "w8a8_fp8": [C(128, 256, 128, 8, 3, tma=True), C(128, 128, 128, 8, 4, tma=True),
                          C(64, 128, 128, 4, 4, tma=True)],
             # int4 weight-only: x by TMA (W's packed codes by pointers), both weight-operand sides
             "int4_asym_g128": [C(256, 128, 64, 8, 3, w_lhs=True, tma=True), C(128, 128, 64, 4, 4, tma=True),
                                C(128, 128, 64, 8, 3, tma=True), C(128, 256, 64, 8, 3, tma=True),
                                C(128, 128, 128, 8, 3, w_lhs=True, tma=True),
                                C(128, 256, 64, 8, 3, w_lhs=True, tma=True),
                                C(256, 128, 64, 8, 4, w_lhs=True, tma=True),
                                C(128, 128, 64, 8, 4, w_lhs=True, tma=True),
                                C(128, 128, 64, 8, 5, w_lhs=True, tma=True),
                                C(128, 128, 64, 8, 3, w_lhs=True, tma=True),
                                C(128, 64, 64, 4, 4, w_lhs=True, tma=True), C(64, 128, 64, 8, 4, w_lhs=True, tma=True),
                                C(128, 128, 64, 8, 3, group_m=1, w_lhs=True, tma=True),
                                C(128, 128, 64, 8, 3, group_m=16, w_lhs=True, tma=True),
                                C(128, 128, 32, 8, 4, w_lhs=True, tma=True),
                                C(128, 128, 64, 8, 2, w_lhs=True, tma=True)],
             "int8_sym_ch": _TMA_W8, "fp8_e4m3_ch": _TMA_W8}


def _with_tma(cfg, on: bool = True):
    return KernelConfig(**{**cfg.__dict__, "tma": on})


def tma_cases(shapes, tokens, variants=TMA_VARIANTS, dgrad=True) -> list:
    """``(shape, T, variant, space, dgrad)``: the table's tile with pointer loads, with TMA, then
    other TMA tiles."""
    cases = []
    for s in shapes:
        E, top_k, K, N = SHAPES[s]
        for t in tokens:
            for v in variants:
                act8 = v.startswith("w8a8")
                table = choose_forward_config(t * top_k, N, K, E, _BITS[v], 128 if "g128" in v else K,
                                              act_bits=8 if act8 else 16)
                extra = TMA_EXTRA[v]
                cases.append((s, t, v, [_with_tma(table, False), _with_tma(table)]
                              + [c for c in extra if c != _with_tma(table)], False))
            if not dgrad:
                continue
            table = choose_forward_config(t * top_k, K, N, E, 16, N, k_contiguous=False, dgrad=True)
            cases.append((s, t, "bf16", [_with_tma(table, False), _with_tma(table)]
                          + [c for c in TMA_EXTRA["bf16"] if c != _with_tma(table)], True))
    return cases


def tune_tma(cases, out_path, offs_seed=None):
    """Time each case's configs (eager; prefill kernels outlast the host) and check that the
    TMA twin of the table tile gives the pointer-load tile's output bit for bit."""
    import moe_ops
    dev = torch.device("cuda")
    results = []
    for sname, T, lab, space, dgrad in cases:
        E, top_k, K, N = SHAPES[sname]
        _, f, gr, gs, act = next(o for o in OURS if o[0] == lab)
        w = (torch.randn(E, N, K, device=dev) * 0.02).to(torch.bfloat16)
        wd, ws, wz, fmt, g2, gs2 = moe_ops.quantize_weight(w, f, gr, gs).op_args()
        offs = harness.skewed_offs(T, E, top_k, dev, seed=T if offs_seed is None else offs_seed)
        x = torch.randn(T * top_k, N if dgrad else K, device=dev, dtype=torch.bfloat16)

        def make(cfg):
            if dgrad:
                return lambda: dispatch.grouped_mm_dgrad(x, wd, ws, wz, offs, fmt, g2, gs2, "none", config=cfg)
            return lambda: dispatch.grouped_mm(x, wd, ws, wz, offs, fmt, g2, gs2, act or "none", "none", config=cfg)
        same = torch.equal(make(space[0])(), make(space[1])())
        label = f"{sname:18s} T={T:5d} {lab:12s} {'dgrad' if dgrad else 'fwd':5s}"
        ranking = harness.sweep(make, space, label)
        by_cfg = {cfg: ms for ms, cfg in ranking}
        ms0, ms1 = by_cfg.get(space[0]), by_cfg.get(space[1])
        print(f"{label} table tile: pointers {ms0} ms, tma {ms1} ms, bitwise equal: {same}", flush=True)
        results.append({"shape": sname, "T": T, "variant": lab, "dgrad": dgrad, "tma_equal": same,
                        "ranking": [(round(ms, 5), cfg.__dict__) for ms, cfg in ranking]})
        w = wd = x = None
        harness.write_json(out_path, {"env": harness.environment(dev), "results": results})


# --tma --tma-w: the weight-only w_lhs tiles marked tma with W's stored tile by TMA too
# (dispatch.W_LHS_TMA_W) against x alone by TMA, same tiles, same run
TMA_W_TILES = [C(128, 128, 64, 8, 3, w_lhs=True, tma=True), C(256, 128, 64, 8, 4, w_lhs=True, tma=True),
               C(128, 128, 64, 8, 4, w_lhs=True, tma=True)]
# decode sizes (16-row w_lhs tiles): the table's tile, its TMA twin and these
TMA_W_DECODE = [C(16, 64, 128, 4, 4, group_m=1, w_lhs=True, tma=True),
                C(16, 128, 128, 4, 3, group_m=1, w_lhs=True, tma=True),
                C(16, 64, 128, 4, 3, group_m=1, w_lhs=True, tma=True),
                C(16, 128, 128, 4, 4, group_m=1, w_lhs=True, tma=True)]
# 17-64 rows per expert: w_lhs tiles of 32 and 64 rows by TMA, one M tile per expert's rows (swept
# with TMA_W_TILES[0], the 128-row tile int4 takes above these rows)
TMA_W_MID = [C(32, 128, 64, 4, 3, w_lhs=True, tma=True), C(64, 128, 64, 4, 3, w_lhs=True, tma=True),
             C(64, 128, 64, 4, 4, w_lhs=True, tma=True), C(64, 128, 128, 4, 3, w_lhs=True, tma=True),
             C(64, 64, 64, 4, 4, w_lhs=True, tma=True), C(32, 128, 128, 4, 3, group_m=1, w_lhs=True, tma=True),
             C(64, 128, 64, 8, 3, w_lhs=True, tma=True)]
# 8-bit weights at decode sizes, also: 256-column K tiles (the pointer table's K tile)
TMA_W_DECODE_8BIT = [C(16, 64, 256, 4, 3, group_m=1, w_lhs=True, tma=True),
                     C(16, 128, 256, 4, 3, group_m=1, w_lhs=True, tma=True)]

# plain 16-bit weights at decode sizes (the w_lhs tile with W's tile as loaded), also: 256-column K
# tiles, 64-column K tiles four deep, and 8-warp tiles 128 and 256 wide
TMA_W_DECODE_16BIT = [C(16, 64, 256, 4, 3, group_m=1, w_lhs=True, tma=True),
                      C(16, 128, 64, 4, 4, group_m=1, w_lhs=True, tma=True),
                      C(16, 128, 128, 8, 3, group_m=1, w_lhs=True, tma=True),
                      C(16, 256, 64, 8, 4, group_m=1, w_lhs=True, tma=True)]

# packed int4/int2 codes at decode sizes, also: 64-column K tiles (32-byte rows of codes a tile),
# four and six deep, and an 8-warp tile 256 wide
TMA_W_DECODE_PACKED = [C(16, 128, 64, 4, 4, group_m=1, w_lhs=True, tma=True),
                       C(16, 64, 64, 4, 4, group_m=1, w_lhs=True, tma=True),
                       C(16, 128, 64, 4, 6, group_m=1, w_lhs=True, tma=True),
                       C(16, 256, 64, 8, 4, group_m=1, w_lhs=True, tma=True)]


def tune_tma_w(shapes, tokens, variants, out_path):
    """Per case, the table's tile, its TMA twin, the table's tile where neither x nor W can come
    by TMA, and :data:`TMA_W_TILES` (decode sizes: :data:`TMA_W_DECODE`, and for 8-bit / plain
    16-bit / packed weights :data:`TMA_W_DECODE_8BIT` / :data:`TMA_W_DECODE_16BIT` /
    :data:`TMA_W_DECODE_PACKED` too; prefill tiles at up to 64 rows per expert: :data:`TMA_W_MID`
    and the 128-row tile) with ``dispatch.W_LHS_TMA_W`` off and on (eager and CUDA-graph
    timed), and whether the two give the same bits."""
    import moe_ops
    dev = torch.device("cuda")
    results = []
    for sname in shapes:
        E, top_k, K, N = SHAPES[sname]
        for T in tokens:
            for lab in variants:
                _, f, gr, gs, act = next(o for o in OURS if o[0] == lab)
                w = (torch.randn(E, N, K, device=dev) * 0.02).to(torch.bfloat16)
                wd, ws, wz, fmt, g2, gs2 = moe_ops.quantize_weight(w, f, gr, gs).op_args()
                offs = harness.skewed_offs(T, E, top_k, dev, seed=T)
                x = torch.randn(T * top_k, K, device=dev, dtype=torch.bfloat16)
                choice = (T * top_k, N, K, E, _BITS[lab], 128 if "g128" in lab else K)
                table = choose_forward_config(*choice)
                no_tma = choose_forward_config(*choice, x_tma=False, w_tma=False)
                label = f"{sname:18s} T={T:5d} {lab:14s}"
                rows = []
                extra = TMA_W_TILES
                if not table.decode and T * top_k / E <= MID_TILE_MAX_ROWS:
                    extra = TMA_W_MID + TMA_W_TILES[:1]
                if table.decode:
                    by_bits = {8: TMA_W_DECODE_8BIT, 16: TMA_W_DECODE_16BIT}
                    extra = TMA_W_DECODE + by_bits.get(_BITS[lab], TMA_W_DECODE_PACKED)
                tiles = [table] + ([_with_tma(table)] if not table.tma else []) + ([no_tma] if no_tma != table else [])
                for cfg in tiles + [c for c in extra if c not in tiles]:
                    outs = {}
                    for tma_w in ((False, True) if cfg.w_lhs else (True,)):  # only w_lhs tiles read the flag
                        dispatch.W_LHS_TMA_W = tma_w
                        try:
                            fn = (lambda c=cfg: dispatch.grouped_mm(x, wd, ws, wz, offs, fmt, g2, gs2, "none", "none",
                                                                    config=c))
                            outs[tma_w] = fn()
                            ms, gms = harness.bench_ms(fn), harness.bench_graph_ms(fn)
                        except Exception as e:  # noqa: BLE001  (an infeasible config: recorded)
                            print("skip", label, cfg, tma_w, repr(e)[:80], flush=True)
                            continue
                        finally:
                            dispatch.W_LHS_TMA_W = True
                        rows.append({"config": cfg.__dict__, "tma_w": tma_w, "ms": round(ms, 5),
                                     "graph_ms": round(gms, 5)})
                        print(f"{label} {ms:.4f} ms eager, {gms:.4f} ms graph, W by {'TMA' if tma_w else 'pointers'} "
                              f"{cfg}", flush=True)
                    if len(outs) == 2:
                        print(f"{label} {cfg} bitwise equal: {torch.equal(outs[False], outs[True])}", flush=True)
                results.append({"shape": sname, "T": T, "variant": lab, "rows": rows})
                w = wd = x = None
                harness.write_json(out_path, {"env": harness.environment(dev), "results": results})


# --fp8-promotion: fp8 x fp8 tiles whose scales are constant along K (x per token, W per channel):
# the table's K tile (128) against 256-column K tiles (half the promotions, each waiting for its
# wgmma), per rows-per-expert bucket
FP8_PROMOTION = {
    "many": [C(128, 128, 128, 8, 4, tma=True), C(128, 128, 256, 8, 3, tma=True), C(128, 128, 256, 8, 2, tma=True),
             C(64, 128, 256, 4, 3, tma=True), C(128, 64, 256, 4, 3, tma=True), C(64, 256, 256, 8, 2, tma=True)],
    "few": [C(64, 128, 128, 4, 3, tma=True), C(64, 128, 256, 4, 3, tma=True), C(64, 128, 256, 4, 2, tma=True),
            C(128, 128, 256, 8, 3, tma=True), C(64, 64, 256, 4, 3, tma=True)],
}


def _rel_err(y, ref) -> float:
    return ((y.double() - ref).norm() / ref.norm()).item()


def tune_fp8_promotion(shapes, out_path, T: int = 4096):
    """Time and check the :data:`FP8_PROMOTION` tiles against ``torch._scaled_grouped_mm`` on
    the same fp8 codes and scales (x cast per token by our kernel, W per channel)."""
    import moe_ops
    from moe_ops import reference
    dev = torch.device("cuda")
    results = []
    for sname in shapes:
        E, top_k, K, N = SHAPES[sname]
        M = T * top_k
        w = (torch.randn(E, N, K, device=dev) * 0.02).to(torch.bfloat16)
        wd, ws, wz, fmt, gr, gs = moe_ops.quantize_weight(w, "fp8_e4m3", "channel", 0).op_args()
        offs = harness.skewed_offs(T, E, top_k, dev, seed=T)
        x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
        pre = dispatch.quantize_act(x, "fp8_token")
        xq, xs = pre  # the float64 product of exactly these codes and scales
        ref = reference.segment_mm(xq.double() * xs.double(), wd.double() * ws.double(), offs, "nt")
        table = choose_forward_config(M, N, K, E, 8, K, act_bits=8, fp8_dot=True)  # the current default
        space = FP8_PROMOTION["many" if M / E > 512 else "few"]
        space = [table] + [c for c in space if c != table]

        def make(cfg):
            return lambda: dispatch.grouped_mm(x, wd, ws, wz, offs, fmt, gr, gs, "fp8_token", "none", config=cfg,
                                               prequantized=pre)
        label = f"{sname:18s} T={T:5d} w8a8_fp8 gemm"
        ranking = harness.sweep(make, space, label, graph=True)
        errs = {cfg: _rel_err(make(cfg)(), ref) for _, cfg in ranking}
        peer = lambda: torch._scaled_grouped_mm(xq, wd.transpose(-2, -1), xs.reshape(-1), ws.reshape(E, N),  # noqa: E731
                                                offs=offs, out_dtype=torch.bfloat16)
        peer_ms, peer_err = harness.bench_graph_ms(peer), _rel_err(peer(), ref)
        flops = 2.0 * M * N * K
        print(f"{label} peer _scaled_grouped_mm {peer_ms:.4f} ms, rel err {peer_err:.2e}", flush=True)
        for ms, cfg in ranking:
            print(f"{label} {ms:.4f} ms x{peer_ms / ms:.3f} of the peer, {flops / ms / 1e9:.0f} TFLOP/s, "
                  f"rel err {errs[cfg]:.2e} {'(table) ' if cfg == table else ''}{cfg}", flush=True)
        results.append({"shape": sname, "T": T, "variant": "w8a8_fp8_gemm", "peer_ms": peer_ms, "peer_rel_err": peer_err,
                        "table": table.__dict__,
                        "ranking": [(round(ms, 5), errs[cfg], cfg.__dict__) for ms, cfg in ranking]})
        w = wd = x = pre = ref = None
        harness.write_json(out_path, {"env": harness.environment(dev), "results": results})


def tune(cases, out_path):
    """Sweep each ``(shape, T, variant, space)``; decode shapes (T <= 128) under CUDA graphs."""
    import moe_ops
    dev = torch.device("cuda")
    results = []
    for sname, T, lab, space in cases:
        E, top_k, K, N = SHAPES[sname]
        _, f, gr, gs, act = next(o for o in OURS if o[0] == lab)
        w = (torch.randn(E, N, K, device=dev) * 0.02).to(torch.bfloat16)
        wd, ws, wz, fmt, g2, gs2 = moe_ops.quantize_weight(w, f, gr, gs).op_args()
        offs = harness.skewed_offs(T, E, top_k, dev, seed=T)
        x = torch.randn(T * top_k, K, device=dev, dtype=torch.bfloat16)

        def make(cfg):
            return lambda: dispatch.grouped_mm(x, wd, ws, wz, offs, fmt, g2, gs2, act or "none", "none", config=cfg)
        ranking = harness.sweep(make, space, f"{sname:18s} T={T:5d} {lab:16s}", graph=T <= 128)
        results.append({"shape": sname, "T": T, "variant": lab,
                        "ranking": [(round(ms, 5), cfg.__dict__) for ms, cfg in ranking]})
        w = wd = x = None
        # after every case: a run cut off by its time limit keeps what it measured
        harness.write_json(out_path, {"env": harness.environment(dev), "results": results})


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    p.add_argument("--focus", action="store_true", help="tune only the cases short of their targets")
    p.add_argument("--gemv", action="store_true", help="CUDA-core decode tiles against the tensor-core one")
    p.add_argument("--w-lhs", action="store_true", help="weight-as-left-operand tiles against the table's")
    p.add_argument("--packed-gemv", action="store_true", help="int4 decode: word-reading CUDA-core tiles")
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), help="--w-lhs: shapes to sweep")
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 4096], help="--w-lhs: token counts")
    p.add_argument("--variants", nargs="+", default=["int4_asym_g128", "int8_sym_ch", "fp8_e4m3_ch"],
                   help="--w-lhs: weight-only variants")
    p.add_argument("--tma", action="store_true", help="TMA-descriptor prefill tiles against the table's")
    p.add_argument("--tma-w", action="store_true",
                   help="with --tma: weight-only w_lhs tiles with W's stored tile by TMA too against x alone")
    p.add_argument("--offs-seed", type=int, help="--tma: routing seed (default T; bench_training uses 1)")
    p.add_argument("--fp8-promotion", action="store_true", help="fp8 W8A8 K tiles 128 / 256 against the peer")
    a = p.parse_args()
    if a.fp8_promotion:
        tune_fp8_promotion(a.shapes, os.path.join(a.out, "tune_fp8_promotion.json"))
    elif a.tma and a.tma_w:
        tune_tma_w(a.shapes, a.tokens, a.variants, os.path.join(a.out, "tune_tma_w.json"))
    elif a.tma:
        variants = [v for v in a.variants if v in TMA_VARIANTS] or TMA_VARIANTS
        tune_tma(tma_cases(a.shapes, a.tokens, variants, dgrad="bf16" in variants),
                 os.path.join(a.out, "tune_tma.json"), a.offs_seed)
    elif a.w_lhs:
        tune(w_lhs_cases(a.shapes, a.variants, a.tokens), os.path.join(a.out, "tune_w_lhs.json"))
    elif a.packed_gemv:
        tune([(s, t, v, [choose_forward_config(t * SHAPES[s][1], SHAPES[s][3], SHAPES[s][2], SHAPES[s][0], 4, 128)]
               + PACKED_GEMV) for s, t, v in PACKED_GEMV_CASES], os.path.join(a.out, "tune_packed_gemv.json"))
    elif a.gemv:
        tune([(s, t, v, gemv_space(t, *SHAPES[s], _BITS[v], 128 if "g128" in v else 0)) for s, t, v in GEMV_CASES],
             os.path.join(a.out, "tune_decode_gemv.json"))
    elif a.focus:
        tune([(s, t, v, space) for (s, t, v), space in FOCUS.items()], os.path.join(a.out, "tune_forward_focus.json"))
    else:
        tune([(s, t, o[0], space) for s in SHAPES for t, space in ((16, DECODE), (4096, PREFILL)) for o in OURS],
             os.path.join(a.out, "tune_forward.json"))
