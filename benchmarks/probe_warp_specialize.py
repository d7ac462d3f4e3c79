"""Probe: does Triton's Hopper warp specialization (``tl.range(..., warp_specialize=True)``:
a TMA producer warp group and two consumer warp groups of 64 rows each) overlap the fp8 x fp8
GEMM's per-K-tile promotion with the other consumer's wgmma? A dense GEMM (the inner loop of a
grouped one) with the DeepSeek-V3 recipe's scales (x 1x128, W 128x128; ``acc += dot * xs * ws``
each 128-column K tile) and the bf16 GEMM (``acc = dot(a, b, acc)``), with and without warp
specialization, against the float64 product of the same operands. Device-side TMA descriptors
(the partition splits the x tile's rows; a host descriptor's block shape cannot follow).

``--grouped``: the same question for the bf16 grouped GEMM (forward ``y[g] = x[g] @ W[e]^T``
and dgrad ``dx[g] = dy[g] @ W[e]``, skewed routing at T=4096): a warp-specialized kernel whose
tile -> (expert, rows) map comes from a separate launch (Triton's Hopper partitioner rejects the
reductions of the in-kernel expert search), against ``moe_ops.grouped_mm``'s default and
``torch._grouped_mm``.

Usage (GPU): ``python benchmarks/probe_warp_specialize.py [--out DIR] [--grouped]``
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
from moe_ops.kernels.grouped_gemm import _expert_of_tile, swizzled_tile  # noqa: E402


@triton.jit
def dense_gemm(a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr, M, N, K, stride_asm, stride_bsn,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               WS: tl.constexpr, STAGES: tl.constexpr, SCALED: tl.constexpr):
    """``c[M, N] = a[M, K] @ b[N, K]^T`` (bf16 out); ``SCALED``: fp8 codes times x's
    ``as[M, K/128]`` and W's ``bs[N/128, K/128]`` scales, promoted to float32 each K tile
    (``BLOCK_N <= 128``: one W scale a tile and K tile)."""
    tl.static_assert((not SCALED) or (BLOCK_N <= 128), "a scaled tile spans one W scale block")
    pid = tl.program_id(0)
    n_tiles_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid // n_tiles_n
    pid_n = pid % n_tiles_n
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[K, 1], block_shape=[BLOCK_M, BLOCK_K])
    b_desc = tl.make_tensor_descriptor(b_ptr, shape=[N, K], strides=[K, 1], block_shape=[BLOCK_N, BLOCK_K])
    c_desc = tl.make_tensor_descriptor(c_ptr, shape=[M, N], strides=[N, 1], block_shape=[BLOCK_M, BLOCK_N])
    # x's scale rows as a scalar base plus a range: Triton 3.6's partitioner offsets both the
    # range and the tile's first row in the second consumer when the rows are built as
    # pid_m * BLOCK_M + arange (rows 128-191 read instead of 64-127: session 18's first run)
    r = tl.arange(0, BLOCK_M)
    xs_base = as_ptr + (pid_m * BLOCK_M).to(tl.int64) * stride_asm
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES, warp_specialize=WS):
        a = a_desc.load([pid_m * BLOCK_M, k0])
        b = b_desc.load([pid_n * BLOCK_N, k0])
        if SCALED:
            xs = tl.load(xs_base + r * stride_asm + k0 // 128, mask=r < M - pid_m * BLOCK_M, other=0.0)
            ws = tl.load(bs_ptr + (pid_n * BLOCK_N // 128) * stride_bsn + k0 // 128)
            acc += tl.dot(a, b.T, out_dtype=tl.float32) * (xs * ws)[:, None]
        else:
            acc = tl.dot(a, b.T, acc)
    c_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], acc.to(tl.bfloat16))


@triton.jit
def tile_map_kernel(offs_ptr, map_ptr, M, E: tl.constexpr, E_POW2: tl.constexpr, BLOCK_M: tl.constexpr):
    """Program ``tile``: ``map[tile] = (expert, row0, row_end, spare)``, tiles numbered as in
    ``grouped_gemm._expert_of_tile``; spare tiles (past the used ones) cover the rows at or past
    ``offs[-1]`` (row_end M)."""
    tile = tl.program_id(0)
    e_idx = tl.arange(0, E_POW2)
    ends = tl.load(offs_ptr + e_idx, mask=e_idx < E, other=0)
    prev = tl.load(offs_ptr + e_idx - 1, mask=(e_idx < E) & (e_idx > 0), other=0)
    expert, row0, row_end, total, last_end = _expert_of_tile(prev, ends, tile, E, E_POW2, BLOCK_M)
    spare = tile >= total
    tl.store(map_ptr + tile * 4, tl.where(spare, 0, expert))
    tl.store(map_ptr + tile * 4 + 1, tl.where(spare, last_end + (tile - total) * BLOCK_M, row0))
    tl.store(map_ptr + tile * 4 + 2, tl.where(spare, M, row_end))
    tl.store(map_ptr + tile * 4 + 3, spare.to(tl.int32))


@triton.jit
def grouped_ws_kernel(x_ptr, w_ptr, y_ptr, map_ptr, M, N, K, stride_xm, stride_we, stride_wr, stride_ym,
                      E: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      GROUP_M: tl.constexpr, STAGES: tl.constexpr, WS: tl.constexpr, W_T: tl.constexpr):
    """``y[g] = x[g] @ B[e]`` over expert row groups, ``B[e] = W[e]^T`` (``W_T`` False: W
    ``[E, N, K]``) or ``W[e]`` (``W_T``: W ``[E, K, N]``, the dgrad); 16-bit, K stride 1."""
    tile, pid_n = swizzled_tile(tl.program_id(0), M, N, E, BLOCK_M, BLOCK_N, GROUP_M)
    tm = map_ptr + tile * 4
    expert = tl.load(tm)
    row0 = tl.load(tm + 1)
    row_end = tl.load(tm + 2)
    k_end = tl.where(tl.load(tm + 3) != 0, 0, K)  # spare tiles: no K loop, zero rows
    col0 = pid_n * BLOCK_N
    x_desc = tl.make_tensor_descriptor(x_ptr, shape=[M, K], strides=[stride_xm, 1], block_shape=[BLOCK_M, BLOCK_K])
    if W_T:
        w_desc = tl.make_tensor_descriptor(w_ptr, shape=[E, K, N], strides=[stride_we, stride_wr, 1],
                                           block_shape=[1, BLOCK_K, BLOCK_N])
    else:
        w_desc = tl.make_tensor_descriptor(w_ptr, shape=[E, N, K], strides=[stride_we, stride_wr, 1],
                                           block_shape=[1, BLOCK_N, BLOCK_K])
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in tl.range(0, k_end, BLOCK_K, num_stages=STAGES, warp_specialize=WS):
        a = x_desc.load([row0, k0])
        if W_T:
            b = tl.reshape(w_desc.load([expert, k0, col0]), (BLOCK_K, BLOCK_N))
        else:
            b = tl.reshape(w_desc.load([expert, col0, k0]), (BLOCK_N, BLOCK_K)).T
        acc = tl.dot(a, b, acc)
    # rows as a scalar base plus a range: the partitioned consumers offset the range (a row
    # vector built from the tile's first row would be offset twice by Triton 3.6's partitioner)
    yb = y_ptr + row0.to(tl.int64) * stride_ym + col0
    r = tl.arange(0, BLOCK_M)
    c = tl.arange(0, BLOCK_N)
    tl.store(yb + r[:, None].to(tl.int64) * stride_ym + c[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(r < row_end - row0)[:, None] & (c < N - col0)[None, :])


def grouped_ws(x, w, offs, tile, dgrad=False):
    """``x [M, K'] -> y [M, N']`` by :func:`grouped_ws_kernel` (two launches)."""
    BM, BN, BK, warps, stages, ws = tile
    M = x.shape[0]
    E = w.shape[0]
    N_out = w.shape[2] if dgrad else w.shape[1]
    K_in = x.shape[1]
    y = torch.empty(M, N_out, device=x.device, dtype=x.dtype)
    n_tiles = triton.cdiv(M, BM) + min(M, E) + 1
    tmap = torch.empty(n_tiles, 4, device=x.device, dtype=torch.int32)
    tile_map_kernel[(n_tiles,)](offs, tmap, M, E=E, E_POW2=triton.next_power_of_2(E), BLOCK_M=BM)
    grid = (n_tiles * triton.cdiv(N_out, BN),)
    # dgrad: B[e] = W[e] ([N, K] storage, rows N = the reduction) -> W_T over [E, K'=N, N'=K]
    grouped_ws_kernel[grid](x, w, y, tmap, M, N_out, K_in, x.stride(0), w.stride(0),
                            w.stride(1), y.stride(0), E=E, BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, GROUP_M=8,
                            STAGES=stages, WS=ws, W_T=dgrad, num_warps=warps)
    return y


GROUPED_SHAPES = {"qwen3_gate_up": (128, 8, 2048, 1536), "qwen3_down": (128, 8, 768, 2048),
                  "dsv3_gate_up_e32": (32, 8, 7168, 4096)}
GROUPED_TILES = [(128, 256, 64, 4, 3, True), (128, 256, 64, 4, 4, True), (256, 128, 64, 4, 3, True),
                 (128, 128, 64, 4, 4, True), (128, 256, 64, 8, 3, False), (128, 128, 64, 8, 3, False)]


def grouped(args, dev, env):
    import moe_ops
    rows = []
    for name, (E, k, K, N) in GROUPED_SHAPES.items():
        offs, x, w, dy = harness.training_operands(E, k, K, N, 4096, dev)
        for dgrad in (False, True):
            a = dy if dgrad else x
            ref = torch._grouped_mm(a, w if dgrad else w.transpose(-2, -1), offs=offs)
            used = int(offs[-1])
            flops = 2 * used * N * K
            cands = {"torch._grouped_mm": lambda: torch._grouped_mm(a, w if dgrad else w.transpose(-2, -1), offs=offs)}
            if dgrad:
                cands["ours_default"] = lambda: torch.ops.moe_ops.grouped_mm_dgrad(dy, w, None, None, offs, "none", "none",
                                                                                   0, "none")
            else:
                cands["ours_default"] = lambda: moe_ops.grouped_mm(x, w, offs)
            for t in GROUPED_TILES:
                cands[f"ws {t}"] = (lambda t=t: grouped_ws(a, w, offs, t, dgrad))
            for label, fn in cands.items():
                timed = harness.time_variant(f"{name} {'dgrad' if dgrad else 'fwd'} {label}", fn, ref, used)
                if timed is None:
                    continue
                _, ms, err = timed
                rows.append({"shape": name, "pass": "dgrad" if dgrad else "fwd", "variant": label, "ms": ms,
                             "TFLOPs": flops / ms / 1e9, "rel_err_vs_aten": err})
                print(f"{name} {'dgrad' if dgrad else 'fwd'} {label}: {ms * 1e3:.1f} us "
                      f"{flops / ms / 1e9:.0f} TFLOP/s err {err:.2e}", flush=True)
    harness.write_json(os.path.join(args.out, "probe_warp_specialize_grouped.json"), {"env": env, "rows": rows})


def _case(M, N, K, scaled, BM, BN, warps, stages, ws, dev):
    if scaled:
        a = torch.randn(M, K, device=dev).to(torch.float8_e4m3fn)
        b = torch.randn(N, K, device=dev).to(torch.float8_e4m3fn)
        a_s = torch.rand(M, K // 128, device=dev) + 0.5
        b_s = torch.rand(N // 128, K // 128, device=dev) + 0.5
        ref = ((a.double().view(M, K // 128, 128) * a_s.double()[:, :, None]).view(M, K)
               @ (b.double().view(N // 128, 128, K // 128, 128) * b_s.double()[:, None, :, None]).view(N, K).T)
    else:
        a = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
        b = torch.randn(N, K, device=dev, dtype=torch.bfloat16)
        a_s = b_s = torch.ones(1, 1, device=dev)
        ref = a.double() @ b.double().T
    c = torch.full((M, N), float("nan"), device=dev, dtype=torch.bfloat16)
    grid = (triton.cdiv(M, BM) * triton.cdiv(N, BN),)

    def f():
        dense_gemm[grid](a, b, c, a_s, b_s, M, N, K, a_s.stride(0), b_s.stride(0), BLOCK_M=BM, BLOCK_N=BN,
                         BLOCK_K=128 if scaled else 64, WS=ws, STAGES=stages, SCALED=scaled, num_warps=warps)
    f()
    err = float((c.double() - ref).norm() / ref.norm())
    ms = harness.bench_graph_ms(f)
    return ms, err


def main(args):
    dev = torch.device("cuda")
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device=dev))
    env = harness.environment(dev)
    if args.grouped:
        return grouped(args, dev, env)
    rows = []
    tiles = [(128, 128, 8, 3, False), (128, 128, 8, 4, False), (64, 128, 4, 4, False),
             (128, 128, 4, 3, True), (128, 128, 4, 4, True), (256, 128, 4, 3, True), (128, 256, 4, 3, True)]
    for scaled in (True, False):
        for M, N, K in ((32768, 1536, 2048), (32768, 4096, 7168), (8192, 4096, 7168)):
            torch.manual_seed(0)
            # SCALED tiles span one 128-column W scale block (BLOCK_N <= 128): one W scale a K tile
            for BM, BN, warps, stages, ws in [t for t in tiles if not (scaled and t[1] > 128)]:
                name = f"{'fp8_block' if scaled else 'bf16'} M={M} N={N} K={K} {BM}x{BN} w{warps} s{stages} ws={ws}"
                try:
                    ms, err = _case(M, N, K, scaled, BM, BN, warps, stages, ws, dev)
                except Exception as e:  # a config the compiler rejects: recorded, not fatal
                    print(f"{name}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
                    continue
                tf = 2 * M * N * K / ms / 1e9
                rows.append({"recipe": "fp8_block" if scaled else "bf16", "M": M, "N": N, "K": K,
                             "tile": f"{BM}x{BN}/w{warps}/s{stages}", "ws": ws, "ms": ms, "TFLOPs": tf, "rel_err": err})
                print(f"{name}: {ms * 1e3:.1f} us {tf:.0f} TFLOP/s err {err:.2e}", flush=True)
    harness.write_json(os.path.join(args.out, "probe_warp_specialize.json"), {"env": env, "rows": rows})


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    p.add_argument("--grouped", action="store_true")
    main(p.parse_args())
