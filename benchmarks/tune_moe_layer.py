"""Tile sweep of the fused expert-MLP launches (gate/up with SwiGLU, down with the
routing-weight scatter), one launch at a time with the other at its table choice, CUDA-graph
timed: decode tiles at decode sizes, prefill tiles above 16 rows per expert.

Usage (GPU): ``python benchmarks/tune_moe_layer.py [--out DIR] [--layer qwen3|dsv3]
[--formats ...] [--tokens T ...] [--w-lhs] [--one-loop] [--pipeline] [--gemv] [--combine] [--tma-down]
[--slot-sum] [--tma-gate-up]``
(default: Qwen3-30B-A3B's
layer at T=1 and 8; e.g. ``--tokens 4096 --formats int4_g128`` for the prefill gate/up tiles,
whose 4-warp choice spills registers at int4, see benchmarks/NOTES.md; ``--one-loop``: only
the gate/up launch, over tiles that read x once for the gate and up rows; ``--pipeline``: both
launches, the table's tile over K tiles and pipeline depths; ``--gemv``: int4/int2 decode on the
CUDA cores, codes read as 32-bit words; ``--combine``: only the down launch, token-major with the
combine, against the row-tile w_lhs down tile and its separate sum; for bf16 against the tensor-core
decode tile and its sum; ``--tma-down``: only the down launch, its 16-row ``w_lhs`` tiles with x and W by
TMA and by pointers, against the table's tile and the one it gives where TMA is not possible;
``--slot-sum``: the table's configs with the down launch summing the slots itself against the
same launch and the separate sum, alternating; ``--tma-gate-up``: the gate/up launch's w_lhs tiles
with W's codes by TMA (x gathered by pointers) and without, and the op's unfused composition).
Prints the fastest configs per (format, T, launch) and writes ``tune_moe_layer.json``. The winners go to
:func:`moe_ops.lowering.kernel_choice.choose_expert_mlp_configs`.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import harness  # noqa: E402
from bench_moe_layer import FORMATS, LAYERS, quantized_layer  # noqa: E402

from moe_ops.expert_mlp import composed as em_composed  # noqa: E402
from moe_ops.kernels import dispatch  # noqa: E402
from moe_ops.lowering.kernel_choice import KernelConfig  # noqa: E402

SPACE = [KernelConfig(16, bn, bk, w, s, group_m=1)
         for bn, bk, (w, s) in itertools.product((16, 32, 64, 128), (64, 128, 256), ((4, 3), (4, 4), (2, 4)))]
PREFILL_SPACE = [KernelConfig(bm, bn, bk, w, s) for bm, bn, bk, w, s in (
    (128, 128, 64, 4, 4), (128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (64, 128, 64, 4, 4), (64, 128, 128, 4, 3),
    (128, 64, 64, 4, 4), (128, 128, 128, 8, 3), (64, 128, 64, 8, 3))] + [
    KernelConfig(bm, bn, bk, w, s, w_lhs=True) for bm, bn, bk, w, s in (  # weight-only formats
        (128, 128, 64, 8, 3), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (128, 256, 64, 8, 3))]


# decode tiles with the dequantized weight as the register operand (weight-only formats)
W_LHS_SPACE = [KernelConfig(16, bn, 128, w, s, group_m=1, w_lhs=True)
               for bn, (w, s) in itertools.product((32, 64, 128), ((4, 3), (4, 4)))]


# the gate/up launch with gate and up rows in one K loop (KernelConfig.one_loop): the loop's
# weight tile is block_m x 2*block_n; w_lhs applies to weight-only formats only
ONE_LOOP_SPACE = [KernelConfig(16, bn, 128, w, s, group_m=1, one_loop=True, w_lhs=wl)
                  for bn, (w, s), wl in itertools.product((16, 32, 64), ((4, 3), (4, 4)), (False, True))]
ONE_LOOP_PREFILL_SPACE = [KernelConfig(bm, bn, bk, w, s, one_loop=True) for bm, bn, bk, w, s in (
    (128, 64, 64, 4, 4), (128, 64, 64, 8, 3), (128, 128, 64, 8, 3), (64, 128, 64, 4, 4), (64, 64, 64, 4, 4))] + [
    KernelConfig(bm, bn, bk, w, s, one_loop=True, w_lhs=True) for bm, bn, bk, w, s in (
        (64, 64, 64, 4, 4), (128, 64, 64, 8, 3), (64, 128, 64, 8, 3), (128, 128, 64, 8, 3))]


# packed int4/int2 codes on the CUDA cores (KernelConfig.gemv, one row a tile): gate/up with and
# without one loop, and the down launch; num_stages is the weight words' prefetch depth, k_split
# the K tiles a loop step (2 warps each)
GEMV_SPACE = [KernelConfig(1, bn, 128, 2 * ks, st, group_m=1, gemv=True, one_loop=ol, k_split=ks)
              for bn, ks, st, ol in itertools.product((16, 32), (1, 2, 4), (2, 3), (False, True))]


# the down launch token-major with the combine (KernelConfig.combine: the token's slots side by
# side, one K tile a step, num_stages the prefetch depth), and the table's row-tile w_lhs down
# tile with the separate sum as the reference row
COMBINE_SPACE = [KernelConfig(1, bn, bk, w, st, group_m=1, gemv=True, combine=True)
                 for bn, w, st in itertools.product((4, 8, 16, 32), (2, 4, 8), (2, 3)) for bk in (128,)] + [
    KernelConfig(1, bn, 64, 4, 3, group_m=1, gemv=True, combine=True) for bn in (8, 16)] + [
    KernelConfig(16, 64, 128, 4, 3, group_m=1, w_lhs=True)]
# the same for 16-bit weights (grouped_gemm._gemv16_slots_acc), and session 10's table tile for
# the bf16 down launch (tensor-core decode tile, then the sum) as the reference row
COMBINE16_SPACE = [KernelConfig(1, bn, bk, w, st, group_m=1, gemv=True, combine=True)
                   for bn, bk, w, st in itertools.product((8, 16, 32), (32, 64), (4, 8), (1, 2))] + [
    KernelConfig(16, 64, 64, 2, 4, group_m=1)]


# the down launch at decode sizes: 16-row w_lhs tiles with x (the intermediate, read in order)
# and W's codes by TMA descriptors, and the same tiles by pointers (Hopper)
TMA_DOWN_SPACE = [KernelConfig(16, bn, 128, 4, st, group_m=1, w_lhs=True, tma=tma)
                  for bn, st, tma in itertools.product((64, 128), (3, 4), (True, False))]


def _slot_sum_ab(args_, default, label):
    """The fused MLP with the table's row-tile down launch summing the slots itself
    (``slot_sum``) and with the separate sum after it, alternating three times, CUDA-graph
    timed; the two outputs' largest relative difference (the sums' orders may differ: float32
    rounding, then the output's)."""
    if default[1].combine or not default[1].decode:
        print(f"{label}: the table's down launch is {'token-major' if default[1].combine else 'a prefill tile'}")
        return None
    pair = {on: (default[0], dataclasses.replace(default[1], slot_sum=on)) for on in (False, True)}
    outs = {on: dispatch.expert_mlp(*args_, configs=cfgs).float() for on, cfgs in pair.items()}
    diff = float(((outs[True] - outs[False]).abs() / outs[False].abs().clamp_min(1e-3)).max())
    times = {False: [], True: []}
    for _ in range(3):
        for on, cfgs in pair.items():
            times[on].append(harness.bench_graph_ms(lambda: dispatch.expert_mlp(*args_, configs=cfgs)) * 1e3)
    sep, fused = sorted(times[False])[1], sorted(times[True])[1]
    print(f"{label} separate sum {sep:.1f} us, slot sum {fused:.1f} us ({(sep - fused) / sep * 100:+.1f}%), "
          f"runs {[round(v, 1) for v in times[False]]} / {[round(v, 1) for v in times[True]]}, "
          f"largest relative difference {diff:.2e}", flush=True)
    return {"separate_us": sep, "slot_sum_us": fused, "runs": times, "max_rel_diff": diff}


def _weight_only(fname: str) -> bool:
    return FORMATS[fname] is not None and FORMATS[fname][3] in (None, "none")


def main(args):
    dev = torch.device("cuda")
    H, I, E, k = LAYERS[args.layer]  # Qwen3-style routing at both sizes, as bench_moe_layer.py
    results = {}
    for fname in args.formats.split(","):
        m, act = quantized_layer(args.layer, fname, dev)
        a1, a2 = m.gate_up.op_args(), m.down.op_args()
        for T in args.tokens:
            x = torch.randn(T, H, device=dev, dtype=torch.bfloat16)
            r = m.route(x)
            args_ = (x, r.weights, r.sorted_rows, r.offs, *a1[:3], *a2[:3], a1[3], a1[4], a1[5], a2[5], act, "none")
            default = dispatch.expert_mlp_configs(T * k, H, I, E, a1[3], a1[4], a1[5], a2[5], act,
                                                  down_tma=dispatch.down_tma_possible(x, a2[0], I))
            base = harness.bench_graph_ms(lambda: dispatch.expert_mlp(*args_, configs=default))
            print(f"{fname} T={T} default {default}: {base * 1e3:.1f} us", flush=True)
            if args.tma_gate_up:  # the composition the op would run instead, same run
                unfused = harness.bench_graph_ms(lambda: em_composed(*args_))
                print(f"{fname} T={T} unfused composition: {unfused * 1e3:.1f} us", flush=True)
            if args.slot_sum:
                results[f"{fname}/T{T}/slot_sum"] = _slot_sum_ab(args_, default, f"{fname} T={T}")
                continue
            launches = (0,) if (args.one_loop and not args.pipeline) or args.tma_gate_up else (
                (1,) if args.combine or args.tma_down else (0, 1))
            for which in launches:
                def make(cfg, which=which):
                    cfgs = (cfg, default[1]) if which == 0 else (default[0], cfg)
                    fn = lambda: dispatch.expert_mlp(*args_, configs=cfgs)  # noqa: E731
                    if fn() is None:
                        raise ValueError("not served")
                    return fn
                if args.pipeline:
                    # the table's tile with other K tiles and pipeline depths (bytes in flight)
                    space = [dataclasses.replace(default[which], block_k=bk, num_stages=st)
                             for bk, st in itertools.product((64, 128, 256), (2, 3, 4, 5, 6, 8))]
                elif args.combine:
                    space = COMBINE16_SPACE if FORMATS[fname] is None else COMBINE_SPACE
                elif args.tma_gate_up:  # the gathered gate/up launch: x by pointers, W's codes by TMA
                    space = [default[0]] + [dataclasses.replace(c, tma=True) for c in W_LHS_SPACE] + W_LHS_SPACE
                    space = list(dict.fromkeys(space))
                elif args.tma_down:  # also the down tile the table gives where TMA is not possible
                    no_tma = dispatch.expert_mlp_configs(T * k, H, I, E, a1[3], a1[4], a1[5], a2[5], act,
                                                         down_tma=False)[1]
                    space = [default[1]] + [c for c in [no_tma] + TMA_DOWN_SPACE if c != default[1]]
                    space = list(dict.fromkeys(space))
                elif args.gemv:
                    space = [c for c in GEMV_SPACE if which == 0 or not c.one_loop]
                elif args.one_loop:
                    space = ONE_LOOP_SPACE if T * k <= 16 * E else ONE_LOOP_PREFILL_SPACE
                    space = [c for c in space if _weight_only(fname) or not c.w_lhs]
                else:
                    space = (W_LHS_SPACE if args.w_lhs else SPACE) if T * k <= 16 * E else PREFILL_SPACE
                launch_name = 'gate_up' if which == 0 else 'down'
                best = harness.sweep(make, space, f"{fname} T={T} {launch_name}", graph=True)
                if args.tma_down or args.tma_gate_up:  # every row: the table's tile wherever it ranks
                    for ms, c in best:
                        print(f"{fname} T={T} {launch_name} all {ms * 1e3:.1f} us {c}", flush=True)
                if args.combine:  # the reference row (the last of the space), wherever it ranks
                    ref = [(ms, c) for ms, c in best if c == space[-1]]
                    print(f"{fname} T={T} reference {space[-1]}: "
                          + (f"{ref[0][0] * 1e3:.1f} us" if ref else "not served"), flush=True)
                results[f"{fname}/T{T}/{which}"] = [(ms, vars(c)) for ms, c in best[:5]]
        m = None
    harness.write_json(os.path.join(args.out, "tune_moe_layer.json"), results)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    p.add_argument("--layer", default="qwen3", choices=sorted(LAYERS))
    p.add_argument("--formats", default="bf16,int4_g128,int8_w8a8,fp8_block")
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 8])
    p.add_argument("--w-lhs", action="store_true", help="decode sizes: only the w_lhs decode tiles")
    p.add_argument("--tma-down", action="store_true",
                   help="decode, weight-only: the down launch's w_lhs tiles with x and W by TMA, and by pointers")
    p.add_argument("--one-loop", action="store_true", help="only the gate/up launch, its one-loop tiles")
    p.add_argument("--gemv", action="store_true", help="decode, packed int4/int2: the CUDA-core tiles")
    p.add_argument("--combine", action="store_true",
                   help="decode, packed int4/int2: only the down launch, token-major with the combine")
    p.add_argument("--tma-gate-up", action="store_true",
                   help="decode, weight-only: the gate/up launch's w_lhs tiles with W's codes by TMA, and the "
                        "unfused composition")
    p.add_argument("--slot-sum", action="store_true",
                   help="decode: the table's down launch summing the slots itself against the separate sum")
    p.add_argument("--pipeline", action="store_true",
                   help="both launches: the table's tile over K tiles 64-256 and 2-8 pipeline stages")
    main(p.parse_args())
