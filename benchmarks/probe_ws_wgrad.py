"""Probe: the FP8 recipes' wgrad GEMM (``dW[e] = dy[g]^T @ x[g]`` on the padded token-block
operands of ``token_block_quant``) with Triton's Hopper warp specialization: a TMA producer warp
group and two consumer warp groups (64 output rows each), so one consumer's per-block scaled
promotion (``fp8_blockwise``) overlaps the other's wgmma. Against ``launch_wgrad_fp8`` (pointer
loads, no warp specialization) on the same operands, with the float64 product of those
operands as the reference. The expert -> (first block, blocks) map comes from a separate tiny
launch (the partitioner rejects the reductions of ``_tiles_of_expert`` in the kernel).

Usage (GPU): ``python benchmarks/probe_ws_wgrad.py [--out DIR]``
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(__file__))
import harness  # noqa: E402
from moe_ops.kernels.grouped_gemm import _tiles_of_expert  # noqa: E402


@triton.jit
def expert_blocks_kernel(offs_ptr, map_ptr, E: tl.constexpr, E_POW2: tl.constexpr, BLOCK_M: tl.constexpr):
    """Program e: ``map[e] = (first token block, token blocks)`` of expert e."""
    e = tl.program_id(0)
    e_idx = tl.arange(0, E_POW2)
    ends = tl.load(offs_ptr + e_idx, mask=e_idx < E, other=0)
    prev = tl.load(offs_ptr + e_idx - 1, mask=(e_idx < E) & (e_idx > 0), other=0)
    _s, _e, first, count = _tiles_of_expert(prev, ends, e, E, E_POW2, BLOCK_M)
    tl.store(map_ptr + 2 * e, first)
    tl.store(map_ptr + 2 * e + 1, count)


@triton.jit
def wgrad_fp8_ws_kernel(qdy_ptr, qx_ptr, dw_ptr, map_ptr, sdy_ptr, sx_ptr, N, K, P,
                        stride_dyn, stride_xk, stride_we, stride_wn, stride_sdy, stride_sx,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        PER_EXPERT: tl.constexpr, STAGES: tl.constexpr, WS: tl.constexpr):
    pid = tl.program_id(0)
    e = tl.program_id(1)
    num_k = tl.cdiv(K, BLOCK_K)
    n0 = (pid // num_k) * BLOCK_N
    k0 = (pid % num_k) * BLOCK_K
    first = tl.load(map_ptr + 2 * e)
    count = tl.load(map_ptr + 2 * e + 1)
    dy_desc = tl.make_tensor_descriptor(qdy_ptr, shape=[N, P], strides=[stride_dyn, 1], block_shape=[BLOCK_N, BLOCK_M])
    x_desc = tl.make_tensor_descriptor(qx_ptr, shape=[K, P], strides=[stride_xk, 1], block_shape=[BLOCK_K, BLOCK_M])
    # scale rows as a scalar base plus a range (the partitioned consumers offset the range only)
    cn = tl.arange(0, BLOCK_N)
    ck = tl.arange(0, BLOCK_K)
    sdy_base = sdy_ptr + n0
    sx_base = sx_ptr + k0
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for j in tl.range(0, count, num_stages=STAGES, warp_specialize=WS):
        blk = first + j
        a = dy_desc.load([n0, blk * BLOCK_M])
        b = x_desc.load([k0, blk * BLOCK_M])
        if PER_EXPERT:
            acc = tl.dot(a, b.T, acc, out_dtype=tl.float32)
        else:
            sdy = tl.load(sdy_base + blk.to(tl.int64) * stride_sdy + cn, mask=cn < N - n0, other=0.0)
            sx = tl.load(sx_base + blk.to(tl.int64) * stride_sx + ck, mask=ck < K - k0, other=0.0)
            acc += tl.dot(a, b.T, out_dtype=tl.float32) * sdy[:, None] * sx[None, :]
    if PER_EXPERT:
        sdy = tl.load(sdy_base + e.to(tl.int64) * stride_sdy + cn, mask=cn < N - n0, other=0.0)
        sx = tl.load(sx_base + e.to(tl.int64) * stride_sx + ck, mask=ck < K - k0, other=0.0)
        acc = acc * sdy[:, None] * sx[None, :]
    out = dw_ptr + e.to(tl.int64) * stride_we + n0.to(tl.int64) * stride_wn + k0
    tl.store(out + cn[:, None].to(tl.int64) * stride_wn + ck[None, :], acc.to(dw_ptr.dtype.element_ty),
             mask=(cn < N - n0)[:, None] & (ck < K - k0)[None, :])


def wgrad_ws(qdy, qx, sdy, sx, offs, per_expert, tile):
    BN, BK, warps, stages, ws = tile
    N, P = qdy.shape
    K = qx.shape[0]
    E = offs.shape[0]
    bmap = torch.empty(E, 2, device=qdy.device, dtype=torch.int32)
    expert_blocks_kernel[(E,)](offs, bmap, E=E, E_POW2=triton.next_power_of_2(E), BLOCK_M=128)
    dw = torch.empty(E, N, K, device=qdy.device, dtype=torch.bfloat16)
    grid = (triton.cdiv(N, BN) * triton.cdiv(K, BK), E)
    wgrad_fp8_ws_kernel[grid](qdy, qx, dw, bmap, sdy, sx, N, K, P, qdy.stride(0), qx.stride(0), dw.stride(0),
                              dw.stride(1), sdy.stride(0), sx.stride(0), BLOCK_M=128, BLOCK_N=BN, BLOCK_K=BK,
                              PER_EXPERT=per_expert, STAGES=stages, WS=ws, num_warps=warps)
    return dw


SHAPES = {"qwen3_gate_up": (128, 8, 2048, 1536), "qwen3_down": (128, 8, 768, 2048), "dsv3_gate_up_e32": (32, 8, 7168, 4096)}
TILES = [(128, 128, 4, 3, True), (128, 128, 4, 4, True), (128, 256, 4, 3, True), (128, 64, 4, 4, True),
         (128, 128, 8, 3, False), (128, 64, 4, 4, False)]


def main(args):
    from moe_ops.kernels.grouped_wgrad import launch_wgrad_fp8
    from moe_ops.kernels.token_block_quant import token_block_quant
    dev = torch.device("cuda")
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device=dev))
    env = harness.environment(dev)
    rows = []
    for name, (E, k, K, N) in SHAPES.items():
        offs, x, w, dy = harness.training_operands(E, k, K, N, 4096, dev)
        for per_expert in (False, True):
            recipe = "fp8_rowwise" if per_expert else "fp8_blockwise"
            qdy, sdy = token_block_quant(dy, offs, per_expert)
            qx, sx = token_block_quant(x, offs, per_expert)
            ref = launch_wgrad_fp8(qdy, qx, sdy, sx, offs, per_expert, torch.float32)  # float32 out: the reference's
            flops = 2 * int(offs[-1]) * N * K
            cands = {"ours_default": lambda: launch_wgrad_fp8(qdy, qx, sdy, sx, offs, per_expert, torch.bfloat16)}
            for t in TILES:
                cands[f"ws {t}"] = (lambda t=t: wgrad_ws(qdy, qx, sdy, sx, offs, per_expert, t))
            for label, fn in cands.items():
                try:
                    out = fn()
                    err = float((out.double() - ref.double()).norm() / ref.double().norm())
                    ms = harness.bench_graph_ms(fn)
                except Exception as e:  # a config the compiler rejects: recorded, not fatal
                    print(f"{name} {recipe} {label}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:200]}",
                          flush=True)
                    continue
                rows.append({"shape": name, "recipe": recipe, "variant": label, "ms": ms, "TFLOPs": flops / ms / 1e9,
                             "rel_err_vs_default_fp32": err})
                print(f"{name} {recipe} {label}: {ms * 1e3:.1f} us {flops / ms / 1e9:.0f} TFLOP/s err {err:.2e}",
                      flush=True)
        x = w = dy = None
    harness.write_json(os.path.join(args.out, "probe_ws_wgrad.json"), {"env": env, "rows": rows})


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    main(p.parse_args())
