"""Persistent Triton grouped GEMM on TMA devices (Hopper and later): 16-bit plain weights, and
8-bit x and W codes (float8, or int8 x int8) with scales constant along K.

``y[g] = x[g] @ W[e]^T`` (forward, W stored ``[E, N, K]``) or ``dx[g] = dy[g] @ W[e]`` (dgrad,
the same stored W read as ``[E, K_red, N_out]`` tiles): bf16/fp16 x and W, float32
accumulation, output in x's dtype; or (forward, ``ACT`` 2) e4m3 x codes with per-row scales and
float8 W with channel or tensor scales, each K tile's product promoted into the float32 tile; or
(forward, ``ACT`` 1) int8 x codes with per-row scales and int8 (``int8_sym``) W with channel or
tensor scales, the products summed exactly in int32; output bf16/fp16. One program per SM (at
most the static tile bound) loops over the output tiles; the tile loop and the K loop are
flattened into one software-pipelined loop (``tl.range(..., flatten=True)``), so the loads of a
tile's first K steps are issued while the previous tile's epilogue runs. x's and W's tiles come
by host TMA descriptors: x ``[M, K]`` with block ``[BLOCK_M, BLOCK_K]`` (rows of the next expert
read into a part-filled tile are masked at the store; columns past K read as zero), W 3-D with
block ``[1, BLOCK_N, BLOCK_K]`` (dgrad ``[1, BLOCK_K, BLOCK_N]``), so a tile never reads another
expert's weights.

Tiles are numbered as :func:`.grouped_gemm._expert_of_tile` numbers them (expert by expert,
``cdiv(rows, BLOCK_M)`` each, ``GROUP_M`` row tiles walking the column tiles together); each
program reads ``offs`` once, and its tiles' experts come from that prefix sum on the device
(no host sync). Only used tiles are visited; a last loop writes zeros to the rows at or past
``offs[-1]``. With ``HALF_M`` an expert's last tile that holds at most ``BLOCK_M // 2`` rows is
left out of that numbering and runs in a second tile loop as a ``BLOCK_M // 2``-row tile.
Same function and summation order as :func:`.grouped_gemm.grouped_gemm_kernel` at the same tile
(``ACT`` 0 with plain weights, ``ACT`` 1 or 2 with scales constant along K): bit-equal outputs
(GPU ``test_persistent_tiles``, ``test_fp8_dot_k_tile_256``, ``test_persistent_int8_w8a8``).

Measured against that kernel's default tiles (``benchmarks/probe_persistent.py [--fp8]``, H100,
T=4096): :func:`moe_ops.lowering.kernel_choice.choose_persistent_config` takes it where it was
faster.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import launch
from .grouped_gemm import _expert_tiles, _locate_tile, grouped_order
from .host_math import cdiv, next_power_of_2, row_tile_bound


@triton.jit
def _output_tile(y_ptr, xs_ptr, ws_ptr, x_desc, w_desc, expert, row0, row_end, pid_n, N, K, stride_ym, stride_yn,
                 stride_xsm, stride_se, stride_sn, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, W_T: tl.constexpr, UPCAST_DOT: tl.constexpr, ACT: tl.constexpr):
    """One ``[ROWS, BLOCK_N]`` output tile: rows ``[row0, row_end)`` of ``y`` (``row0 + ROWS`` at
    most past them, those rows read by ``x_desc``, whose block is ``[ROWS, BLOCK_K]``, and not
    stored), columns ``pid_n * BLOCK_N ...``; the K loop and the epilogue of
    :func:`persistent_grouped_kernel`."""
    if ACT == 1:
        acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.int32)
    else:
        acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
    for ki in range(tl.cdiv(K, BLOCK_K)):
        a = x_desc.load([row0, ki * BLOCK_K])
        if W_T:
            b = tl.reshape(w_desc.load([expert, ki * BLOCK_K, pid_n * BLOCK_N]), (BLOCK_K, BLOCK_N))
        else:
            b = tl.reshape(w_desc.load([expert, pid_n * BLOCK_N, ki * BLOCK_K]), (BLOCK_N, BLOCK_K)).T
        if ACT == 1:  # int8 x int8, exact int32 sums chained through the accumulator
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        elif ACT == 2:  # the tensor core's fp8 sums promoted every K tile (grouped_gemm._gemm_acc)
            acc += tl.dot(a, b, out_dtype=tl.float32)
        elif UPCAST_DOT:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    rm = row0 + tl.arange(0, ROWS)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if ACT != 0:
        xs = tl.load(xs_ptr + rm.to(tl.int64) * stride_xsm, mask=rm < row_end, other=0.0)
        ws = tl.load(ws_ptr + expert.to(tl.int64) * stride_se + rn.to(tl.int64) * stride_sn, mask=rn < N, other=0.0)
        acc = acc.to(tl.float32) * xs[:, None] * ws[None, :]
    tl.store(y_ptr + rm.to(tl.int64)[:, None] * stride_ym + rn.to(tl.int64)[None, :] * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=(rm < row_end)[:, None] & (rn < N)[None, :])


@triton.jit
def persistent_grouped_kernel(y_ptr, offs_ptr, xs_ptr, ws_ptr, x_desc, w_desc, x_half_desc, M, N, K, stride_ym,
                              stride_yn, stride_xsm, stride_se, stride_sn,
                              E: tl.constexpr, E_POW2: tl.constexpr, BLOCK_M: tl.constexpr,
                              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                              W_T: tl.constexpr, STAGES: tl.constexpr, UPCAST_DOT: tl.constexpr,
                              FLATTEN: tl.constexpr = True, ACT: tl.constexpr = 0, HALF_M: tl.constexpr = False):
    """``y [M, N]``; ``K`` the reduction. ``ACT`` (:func:`.grouped_gemm._gemm_acc`'s codes): 0,
    16-bit x and W; 1, int8 x and W codes, the products summed in int32 (exact), ``(acc * xs) *
    ws`` in float32 at the end; 2, float8 x and W codes, each K tile's product promoted into the
    float32 tile, ``(acc * xs) * ws`` at the end. Scales constant along K: x's ``xs [M]`` per
    row, W's ``ws`` per (expert, output column), stride 0 where broadcast. ``W_T`` False:
    ``w_desc`` over the stored ``[E, N, K]``; True (dgrad): over the stored ``[E, K, N]``.
    ``STAGES``: the loop's pipeline depth; ``FLATTEN`` False keeps the tile loop and the K loop
    apart (only the K loop pipelined; for the probe).
    ``HALF_M``: an expert's last row tile that holds at most ``BLOCK_M // 2`` rows is a
    ``[BLOCK_M // 2, BLOCK_N]`` tile (x by ``x_half_desc``, block ``[BLOCK_M // 2, BLOCK_K]``):
    half the MMA work where the skewed routing leaves a part-filled tile. Those tiles run in a
    second tile loop after the full tiles, continuing their round robin over the programs.
    ``UPCAST_DOT``: float32 dot (Triton's interpreter, whose bf16 dot is wrong). The descriptors
    follow the pointers: torch's TTIR mutation analysis (Inductor's, ``tests/test_kernel_writes.py``)
    numbers parameters as if a descriptor were one, so parameters after a descriptor get the
    wrong names there (with torch 2.13 and Triton 3.9 on the CPU: no writes found at all)."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    e_idx = tl.arange(0, E_POW2)  # offs as values (see grouped_gemm._expert_tiles)
    ends = tl.load(offs_ptr + e_idx, mask=e_idx < E, other=0)
    prev = tl.load(offs_ptr + e_idx - 1, mask=(e_idx < E) & (e_idx > 0), other=0)
    idx, ntiles = _expert_tiles(prev, ends, E, E_POW2, BLOCK_M)
    if HALF_M:  # each expert's last tile apart where it holds at most BLOCK_M // 2 rows
        left = tl.maximum(ends - prev, 0) % BLOCK_M
        halves = tl.where((idx < E) & (left > 0) & (left <= BLOCK_M // 2), 1, 0)
        ntiles -= halves
    cum = tl.cumsum(ntiles, 0)
    total = tl.sum(ntiles, 0)
    num_n = tl.cdiv(N, BLOCK_N)
    for t in tl.range(pid, total * num_n, programs, flatten=FLATTEN, num_stages=STAGES):
        tile, pid_n = grouped_order(t, total, num_n, GROUP_M)
        expert, row0, row_end = _locate_tile(tile, idx, ntiles, cum, prev, ends, BLOCK_M)
        _output_tile(y_ptr, xs_ptr, ws_ptr, x_desc, w_desc, expert, row0, row_end, pid_n, N, K, stride_ym,
                     stride_yn, stride_xsm, stride_se, stride_sn, BLOCK_M, BLOCK_N, BLOCK_K, W_T, UPCAST_DOT, ACT)
    if HALF_M:
        HALF: tl.constexpr = BLOCK_M // 2
        cum_h = tl.cumsum(halves, 0)
        first = (pid + programs - (total * num_n) % programs) % programs  # the round robin goes on
        for t in tl.range(first, tl.sum(halves, 0) * num_n, programs, flatten=FLATTEN, num_stages=STAGES):
            tile = t // num_n
            # the half tile starts after the expert's full tiles
            expert, row0, row_end = _locate_tile(tile, idx, halves, cum_h, prev + ntiles * BLOCK_M, ends, HALF)
            _output_tile(y_ptr, xs_ptr, ws_ptr, x_half_desc, w_desc, expert, row0, row_end, t % num_n, N, K,
                         stride_ym, stride_yn, stride_xsm, stride_se, stride_sn, HALF, BLOCK_N, BLOCK_K, W_T,
                         UPCAST_DOT, ACT)
    # the rows at or past offs[-1]: zeros
    last_end = tl.max(tl.where(e_idx < E, ends, 0), 0)
    for r0 in range(last_end + pid * BLOCK_M, M, programs * BLOCK_M):
        rm = r0 + tl.arange(0, BLOCK_M)
        for n0 in range(0, N, BLOCK_N):
            rn = n0 + tl.arange(0, BLOCK_N)
            tl.store(y_ptr + rm.to(tl.int64)[:, None] * stride_ym + rn.to(tl.int64)[None, :] * stride_yn,
                     tl.zeros((BLOCK_M, BLOCK_N), dtype=y_ptr.dtype.element_ty),
                     mask=(rm < M)[:, None] & (rn < N)[None, :])


def serves(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether :func:`launch_persistent` serves ``x`` (``[M, K]``) and the stored ``w`` now:
    16-bit x and W of one dtype, a TMA device, TMA-legal layouts, descriptors allowed (see
    :mod:`.launch`)."""
    return (x.dtype in (torch.bfloat16, torch.float16) and w.dtype == x.dtype and x.dim() == 2 and w.dim() == 3
            and launch.tma_device(x) and launch.tma_aligned(x) and launch.tma_aligned(w)
            and launch.descriptors_allowed(x))


def serves_codes(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether the ``ACT`` 1 / 2 paths serve 16-bit ``x`` (``[M, K]``, cast to int8 / e4m3 codes
    per row by the caller) and the stored int8 / float8 ``w`` now: a TMA device, the codes' rows
    16-byte aligned (K a multiple of 16) and W's layout TMA-legal, descriptors allowed. (int8
    ``w`` is ``int8_sym``'s storage; ``int8_asym`` codes are uint8.)"""
    return (w.dtype in (torch.int8, torch.float8_e4m3fn, torch.float8_e5m2) and x.dim() == 2 and w.dim() == 3
            and x.shape[1] % 16 == 0 and launch.tma_device(x) and launch.tma_aligned(w)
            and launch.descriptors_allowed(x))


def _programs(x: torch.Tensor, tile_bound) -> object:
    """One program per SM, at most ``tile_bound`` (a SymInt under dynamic shapes)."""
    if launch.interpreting():
        sms = 3  # a few programs, each looping over several tiles
    else:
        sms = _sm_count(x.device.index if x.device.index is not None else torch.cuda.current_device())
    return torch.sym_min(tile_bound, sms)


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def launch_persistent(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, offs: torch.Tensor, config,
                      dgrad: bool, flatten: bool = True, scales=None) -> torch.Tensor:
    """``y`` (``[M, N_out]``, written in full) from ``x`` ``[M, K_red]`` and the stored ``w``:
    ``[E, N_out, K_red]`` (forward) or ``[E, K_red, N_out]`` (``dgrad``). ``config``: a
    :class:`~moe_ops.lowering.kernel_choice.KernelConfig` (its block sizes, ``group_m``, warps,
    stages, ``half_m``: the kernel's ``HALF_M``, for an even ``block_m`` of 32 or more);
    ``flatten``: the kernel's ``FLATTEN``. ``scales`` (forward, 8-bit x and W codes, int8 or
    float8 as ``w``'s dtype): ``(xs, ws, (stride_xsm, stride_se, stride_sn))``, the kernel's
    ``ACT`` 1 / 2 paths. The caller checks :func:`serves` (or :func:`serves_codes`)."""
    M, K = x.shape
    E = offs.shape[0]
    N = w.shape[2] if dgrad else w.shape[1]
    bm, bn, bk = config.block_m, config.block_n, config.block_k
    tile_bound = row_tile_bound(M, bm, E) * cdiv(N, bn)
    if config.half_m and (bm % 2 or bm < 32):
        raise ValueError(f"launch_persistent: config.half_m needs an even block_m of 32 or more "
                         f"(half tiles of 16 rows or more), got {bm}")
    descs = {"x_desc": (x, (bm, bk)), "w_desc": (w, (1, bk, bn) if dgrad else (1, bn, bk))}
    if config.half_m:
        descs["x_half_desc"] = (x, (bm // 2, bk))
    xs, ws, (stride_xsm, stride_se, stride_sn) = scales if scales is not None else (y, y, (0, 0, 0))
    kwargs = dict(y_ptr=y, offs_ptr=offs, xs_ptr=xs, ws_ptr=ws, M=M, N=N, K=K, stride_ym=y.stride(0),
                  stride_yn=y.stride(1), stride_xsm=stride_xsm, stride_se=stride_se, stride_sn=stride_sn,
                  E=E, E_POW2=next_power_of_2(E), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=config.group_m,
                  W_T=dgrad, STAGES=config.num_stages, UPCAST_DOT=launch.interpreting() and scales is None,
                  FLATTEN=flatten, ACT=0 if scales is None else (1 if w.dtype == torch.int8 else 2),
                  HALF_M=config.half_m)
    if not config.half_m:
        kwargs["x_half_desc"] = x  # unused: a plain pointer in the descriptor's place
    launch.launch(persistent_grouped_kernel, (_programs(x, tile_bound),), kwargs, descs,
                  num_warps=config.num_warps, num_stages=config.num_stages)
    return y
