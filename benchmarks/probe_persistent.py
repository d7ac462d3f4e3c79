"""Probe: the persistent bf16 grouped GEMM (:mod:`moe_ops.kernels.persistent_gemm`: one program
per SM looping over the output tiles, the tile loop and the K loop flattened into one
software-pipelined loop, or not: ``flatten``) against ``grouped_gemm_kernel`` at
``choose_forward_config``'s tile (one program a tile; what ``moe_ops.grouped_mm`` ran before
``choose_persistent_config``) and ``torch._grouped_mm``, at the training shapes and Mixtral's
gate_up, T=4096, skewed routing; forward ``y[g] = x[g] @ W[e]^T`` and dgrad ``dx[g] = dy[g] @
W[e]``. CUDA-graph timed; error relative to ``torch._grouped_mm``'s output.

``--fp8``: the forward of fp8 W8A8 (``fp8_token`` x, e4m3 channel-scaled W; the GEMM alone on x
cast beforehand) through the kernel's ``ACT`` 2 path against ``grouped_gemm_kernel`` at the
table's fp8 tile and ``torch._scaled_grouped_mm`` on the same codes and scales.

``--int8``: the forward of int8 W8A8 (``int8_token`` x, ``int8_sym`` channel-scaled W; the GEMM
alone on x cast beforehand) through the kernel's ``ACT`` 1 path (exact int32 sums) against
``grouped_gemm_kernel`` at its default tile (the outputs compared bit for bit), our bf16 default
and ``torch._grouped_mm`` on the unquantized operands, and the activation cast alone (issue 3's
int8 W8A8 target: the cast plus the GEMM faster than our bf16 path). Error relative to
``torch._grouped_mm``'s bf16 output (the formats' quantization error).

``--half``: bf16 forward and dgrad, fp8 and int8 W8A8 forward (x cast beforehand), each at the
persistent table tile (``choose_persistent_config``; where the table takes another kernel, at
:data:`HALF_DEFAULT_TILES`' tile) with ``half_m`` off and on (``HALF_M``: an expert's last row
tile of at most half the tile's rows runs as a half-height tile), the pass's launch as the table
chooses it and ``torch._grouped_mm``, alternated over ``--rounds`` rounds; each output's error
against ``torch._grouped_mm`` (bf16) and whether the two persistent variants' outputs are equal
bit for bit.

Usage (GPU): ``python benchmarks/probe_persistent.py [--out DIR] [--shapes ...] [--fp8 | --int8 |
--half [--rounds N]]``
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import harness  # noqa: E402

import moe_ops  # noqa: E402
from moe_ops.kernels import dispatch  # noqa: E402
from moe_ops.kernels.persistent_gemm import launch_persistent  # noqa: E402
from moe_ops.lowering.kernel_choice import (KernelConfig, choose_forward_config,  # noqa: E402
                                            choose_persistent_config)

SHAPES = {"qwen3_gate_up": (128, 8, 2048, 1536), "qwen3_down": (128, 8, 768, 2048),
          "dsv3_gate_up_e32": (32, 8, 7168, 4096), "mixtral_gate_up": (8, 2, 4096, 28672)}
# (tile, flatten)
TILES = [(KernelConfig(128, 256, 64, 8, 3), True), (KernelConfig(128, 256, 64, 8, 4), True),
         (KernelConfig(128, 256, 64, 8, 3), False), (KernelConfig(128, 128, 64, 8, 4), True),
         (KernelConfig(128, 128, 64, 4, 4), True), (KernelConfig(128, 256, 64, 8, 3, group_m=1), True)]


FP8_TILES = [(KernelConfig(128, 128, 256, 8, 3), True), (KernelConfig(128, 128, 256, 8, 2), True),
             (KernelConfig(128, 128, 128, 8, 4), True), (KernelConfig(128, 256, 128, 8, 3), True),
             (KernelConfig(64, 128, 128, 4, 3), True), (KernelConfig(128, 128, 256, 8, 3), False)]


INT8_TILES = [(KernelConfig(64, 128, 128, 4, 3), True), (KernelConfig(128, 128, 128, 8, 3), True),
              (KernelConfig(128, 128, 128, 8, 4), True), (KernelConfig(128, 256, 128, 8, 3), True),
              (KernelConfig(128, 128, 256, 8, 3), True), (KernelConfig(128, 256, 64, 8, 4), True),
              (KernelConfig(64, 256, 128, 8, 3), True), (KernelConfig(128, 128, 128, 8, 3), False)]


def _codes_case(name, fmt, act, dev):
    """The operands of one 8-bit-codes case at T=4096: ``(offs, x, w, qw, xq, xs, scales, used,
    flops)``; ``qw`` the channel-scaled weight's op args, ``(xq, xs)`` x cast under ``act``,
    ``scales`` the persistent kernel's."""
    E, k, K, N = SHAPES[name]
    offs, x, w, _ = harness.training_operands(E, k, K, N, 4096, dev)
    used = int(offs[-1])
    return (offs, x, w, *_codes(x, w, fmt, act), used, 2 * used * N * K)


def _codes(x, w, fmt, act):
    """``(qw, xq, xs, scales)``: ``w`` quantized to ``fmt`` with channel scales (op args), ``x``
    cast under ``act``, and the persistent kernel's ``scales`` argument."""
    qw = moe_ops.quantize_weight(w, fmt, "channel", 0).op_args()
    xq, xs = dispatch.quantize_act(x, act)
    ws, _, st = dispatch._scale_operands(qw[0], qw[1], qw[2], "channel", transposed=False)
    return qw, xq, xs, (xs, ws, (xs.stride(0), st[0], st[1]))


def _persistent_cands(tiles, xq, codes, offs, scales, n, dev) -> dict:
    """``{label: launch}`` of the persistent kernel at each ``(tile, flatten)`` of ``tiles``."""
    cands = {}
    for tile, flatten in tiles:
        y = torch.empty(xq.shape[0], n, dtype=torch.bfloat16, device=dev)
        cands[f"persistent {tile} flatten={flatten}"] = (
            lambda t=tile, f=flatten, y=y: launch_persistent(xq, codes, y, offs, t, False, flatten=f, scales=scales))
    return cands


def int8(args, dev, env, ceil):
    rows = []
    for name in args.shapes:
        offs, x, w, qw, xq, xs, scales, used, flops = _codes_case(name, "int8_sym", "int8_token", dev)
        ref = torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)
        default = dispatch.grouped_mm(x, *qw[:3], offs, *qw[3:], "int8_token", "none", prequantized=(xq, xs))
        cands = {"torch._grouped_mm bf16": lambda: torch._grouped_mm(x, w.transpose(-2, -1), offs=offs),
                 "ours bf16 default": lambda: dispatch.grouped_mm(x, w, None, None, offs, "none", "none", 0, "none",
                                                                  "none"),
                 "int8_token cast alone": lambda: dispatch.quantize_act(x, "int8_token")[0],
                 "one_a_tile default": lambda: dispatch.grouped_mm(x, *qw[:3], offs, *qw[3:], "int8_token", "none",
                                                                   prequantized=(xq, xs)),
                 **_persistent_cands(INT8_TILES, xq, qw[0], offs, scales, w.shape[1], dev)}
        for label, fn in cands.items():
            cast = label.startswith("int8_token cast")
            try:
                if cast:
                    fn()
                    torch.cuda.synchronize()
                    out, ms, err = None, harness.bench_graph_ms(fn), float("nan")
                else:
                    timed = harness.time_variant(f"{name} int8 {label}", fn, ref, used)
                    if timed is None:
                        continue
                    out, ms, err = timed
            except Exception as e:  # noqa: BLE001  (reported, the probe goes on)
                print(f"{name} int8 {label}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
                continue
            same = None if out is None or "bf16" in label else bool(torch.equal(out[:used], default[:used]))
            tf = flops / ms / 1e9
            rows.append({"shape": name, "pass": "fwd_int8_w8a8", "variant": label, "ms": ms,
                         "TFLOPs": None if cast else tf, "rel_err_vs_bf16_aten": err, "equal_to_default": same})
            print(f"{name} int8 {label}: {ms * 1e3:.1f} us" + ("" if cast else f" {tf:.0f} TFLOP/s err vs bf16 "
                  f"{err:.2e} equal to default {same}"), flush=True)
    harness.write_json(os.path.join(args.out, "probe_persistent_int8.json"), {"env": env, "ceilings": ceil,
                                                                              "rows": rows})


def fp8(args, dev, env, ceil):
    rows = []
    for name in args.shapes:
        offs, x, w, qw, xq, xs, scales, used, flops = _codes_case(name, "fp8_e4m3", "fp8_token", dev)
        E, N = w.shape[0], w.shape[1]
        peer = torch._scaled_grouped_mm(xq, qw[0].transpose(-2, -1), xs.view(-1), qw[1].view(E, N), offs=offs,
                                        out_dtype=torch.bfloat16)
        ours = dispatch.grouped_mm(x, *qw[:3], offs, *qw[3:], "fp8_token", "none", prequantized=(xq, xs))
        cands = {"torch._scaled_grouped_mm": lambda: torch._scaled_grouped_mm(
                     xq, qw[0].transpose(-2, -1), xs.view(-1), qw[1].view(E, N), offs=offs, out_dtype=torch.bfloat16),
                 "one_a_tile default": lambda: dispatch.grouped_mm(x, *qw[:3], offs, *qw[3:], "fp8_token", "none",
                                                                   prequantized=(xq, xs)),
                 **_persistent_cands(FP8_TILES, xq, qw[0], offs, scales, N, dev)}
        for label, fn in cands.items():
            timed = harness.time_variant(f"{name} fp8 {label}", fn, peer, used)
            if timed is None:
                continue
            out, ms, err = timed
            same = bool(torch.equal(out, ours))
            tf = flops / ms / 1e9
            rows.append({"shape": name, "pass": "fwd_fp8_w8a8", "variant": label, "ms": ms, "TFLOPs": tf,
                         "mm_share": tf / ceil["fp8_TFLOPs"], "rel_err_vs_peer": err, "equal_to_default": same})
            print(f"{name} fp8 {label}: {ms * 1e3:.1f} us {tf:.0f} TFLOP/s ({tf / ceil['fp8_TFLOPs']:.2f} of the fp8 "
                  f"ceiling) err vs peer {err:.2e} equal to default {same}", flush=True)
    harness.write_json(os.path.join(args.out, "probe_persistent_fp8.json"), {"env": env, "ceilings": ceil, "rows": rows})


# the persistent tile each pass is probed at where the table does not take the persistent kernel
# (bf16 dgrad above 512 rows per expert; fp8 W8A8 up to 512; int8 W8A8 up to 64)
HALF_DEFAULT_TILES = {"fwd": KernelConfig(128, 256, 64, 8, 3), "dgrad": KernelConfig(128, 256, 64, 8, 3),
                      "fwd_fp8_token": KernelConfig(128, 128, 256, 8, 3),
                      "fwd_int8_token": KernelConfig(128, 256, 128, 8, 3)}


def _half_cases(name, dev):
    """``[(pass, tile, launch(tile) -> y, table, peer, ref, used, flops)]`` of one shape at T=4096:
    bf16 forward and dgrad, fp8 and int8 W8A8 forward on x cast beforehand; ``tile`` the
    persistent table tile (else :data:`HALF_DEFAULT_TILES`'), ``half_m`` off; ``table`` the
    pass's launch as the table chooses it (persistent or not); ``peer`` the pass's bf16
    ``torch._grouped_mm`` launch, ``ref`` its output."""
    from dataclasses import replace
    E, k, K, N = SHAPES[name]
    offs, x, w, dy = harness.training_operands(E, k, K, N, 4096, dev)
    M, used = x.shape[0], int(offs[-1])
    flops = 2 * used * N * K
    fwd_peer = lambda: torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)  # noqa: E731
    cases = []
    for ps, a, red, out_n in (("fwd", x, K, N), ("dgrad", dy, N, K)):
        dgrad = ps == "dgrad"
        tile = choose_persistent_config(M, out_n, red, E, dgrad=dgrad) or HALF_DEFAULT_TILES[ps]
        y = torch.empty(M, out_n, dtype=a.dtype, device=dev)
        table = ((lambda: dispatch.grouped_mm_dgrad(dy, w, None, None, offs, "none", "none", 0, "none")) if dgrad
                 else (lambda: dispatch.grouped_mm(x, w, None, None, offs, "none", "none", 0, "none", "none")))
        peer = (lambda: torch._grouped_mm(dy, w, offs=offs)) if dgrad else fwd_peer
        cases.append((ps, replace(tile, half_m=False),
                      lambda t, a=a, y=y, dgrad=dgrad: launch_persistent(a, w, y, offs, t, dgrad), table, peer,
                      peer(), used, flops))
    ref = fwd_peer()
    for fmt, act, flag in (("fp8_e4m3", "fp8_token", "fp8_dot"), ("int8_sym", "int8_token", "int8_dot")):
        qw, xq, xs, scales = _codes(x, w, fmt, act)
        tile = choose_persistent_config(M, N, K, E, **{flag: True}) or HALF_DEFAULT_TILES[f"fwd_{act}"]
        y = torch.empty(M, N, dtype=torch.bfloat16, device=dev)
        cases.append((f"fwd_{act}", replace(tile, half_m=False),
                      lambda t, xq=xq, c=qw[0], sc=scales, y=y: launch_persistent(xq, c, y, offs, t, False, scales=sc),
                      lambda qw=qw, act=act, xq=xq, xs=xs: dispatch.grouped_mm(x, *qw[:3], offs, *qw[3:], act, "none",
                                                                               prequantized=(xq, xs)),
                      fwd_peer, ref, used, flops))
    return cases


def half(args, dev, env, ceil):
    from dataclasses import replace
    rows = []
    for name in args.shapes:
        for ps, tile, run, table, peer, ref, used, flops in _half_cases(name, dev):
            outs = {}
            for rnd in range(args.rounds):
                for label, fn in (("torch._grouped_mm bf16", peer), ("table", table),
                                  ("half_m=False", lambda: run(tile)),
                                  ("half_m=True", lambda: run(replace(tile, half_m=True)))):
                    timed = harness.time_variant(f"{name} {ps} {label}", fn, ref, used)
                    if timed is None:
                        continue
                    out, ms, err = timed
                    if label.startswith("half_m"):
                        outs[label] = out[:used].clone()
                    tf = flops / ms / 1e9
                    rows.append({"shape": name, "pass": ps, "tile": str(tile), "variant": label, "round": rnd,
                                 "ms": ms, "TFLOPs": tf, "rel_err_vs_bf16_aten": err})
                    print(f"{name} {ps} round {rnd} {label}: {ms * 1e3:.1f} us {tf:.0f} TFLOP/s err {err:.2e}",
                          flush=True)
            if len(outs) == 2:
                same = bool(torch.equal(outs["half_m=False"], outs["half_m=True"]))
                print(f"{name} {ps} {tile}: half_m on and off equal bit for bit: {same}", flush=True)
                rows.append({"shape": name, "pass": ps, "tile": str(tile), "half_equal": same})
    harness.write_json(os.path.join(args.out, "probe_persistent_half.json"), {"env": env, "ceilings": ceil,
                                                                              "rows": rows})


def main(args):
    dev = torch.device("cuda")
    env = harness.environment(dev)
    ceil = harness.ceilings(dev)
    print(env, ceil, flush=True)
    if args.half:
        return half(args, dev, env, ceil)
    if args.fp8:
        return fp8(args, dev, env, ceil)
    if args.int8:
        return int8(args, dev, env, ceil)
    rows = []
    for name in args.shapes:
        E, k, K, N = SHAPES[name]
        offs, x, w, dy = harness.training_operands(E, k, K, N, 4096, dev)
        M = x.shape[0]
        for dgrad in (False, True):
            a = dy if dgrad else x
            wt = w if dgrad else w.transpose(-2, -1)
            ref = torch._grouped_mm(a, wt, offs=offs)
            used = int(offs[-1])
            flops = 2 * used * N * K
            n_out = K if dgrad else N
            one_a_tile = choose_forward_config(M, n_out, N if dgrad else K, E, 16, N if dgrad else K,
                                               k_contiguous=not dgrad, dgrad=dgrad)
            cands = {"torch._grouped_mm": lambda: torch._grouped_mm(a, wt, offs=offs)}
            if dgrad:
                cands[f"one_a_tile {one_a_tile}"] = lambda: dispatch.grouped_mm_dgrad(
                    dy, w, None, None, offs, "none", "none", 0, "none", config=one_a_tile)
            else:
                cands[f"one_a_tile {one_a_tile}"] = lambda: dispatch.grouped_mm(
                    x, w, None, None, offs, "none", "none", 0, "none", "none", config=one_a_tile)
            for tile, flatten in TILES:
                y = torch.empty(M, n_out, dtype=a.dtype, device=dev)
                cands[f"persistent {tile} flatten={flatten}"] = (
                    lambda t=tile, f=flatten, y=y: launch_persistent(a, w, y, offs, t, dgrad, flatten=f))
            for label, fn in cands.items():
                timed = harness.time_variant(f"{name} {'dgrad' if dgrad else 'fwd'} {label}", fn, ref, used)
                if timed is None:
                    continue
                _, ms, err = timed
                tf = flops / ms / 1e9
                rows.append({"shape": name, "pass": "dgrad" if dgrad else "fwd", "variant": label, "ms": ms,
                             "TFLOPs": tf, "mm_share": tf / ceil["bf16_TFLOPs"], "rel_err_vs_aten": err})
                print(f"{name} {'dgrad' if dgrad else 'fwd'} {label}: {ms * 1e3:.1f} us {tf:.0f} TFLOP/s "
                      f"({tf / ceil['bf16_TFLOPs']:.2f} of the bf16 ceiling) err {err:.2e}", flush=True)
    harness.write_json(os.path.join(args.out, "probe_persistent.json"), {"env": env, "ceilings": ceil, "rows": rows})


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    p.add_argument("--shapes", nargs="+", default=list(SHAPES))
    p.add_argument("--fp8", action="store_true")
    p.add_argument("--int8", action="store_true")
    p.add_argument("--half", action="store_true")
    p.add_argument("--rounds", type=int, default=2)
    main(p.parse_args())
