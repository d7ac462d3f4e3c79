"""Triton grouped wgrad ``dW[e] = dy[g]^T @ x[g]``: a K-grouped reduction over each expert's rows.

Grid ``(cdiv(N, BLOCK_N) * cdiv(K, BLOCK_K), E)`` (or, with ``EXPERT_GROUP``, the same programs
in a 1-D grid taken that many experts at a time): program (t, e) owns one ``[BLOCK_N, BLOCK_K]``
tile of expert e, reads the expert's row range ``[offs[e-1], offs[e])`` on the device and
reduces over it in BLOCK_M chunks. Deterministic (one program per output tile, fixed order, no
atomics); an expert with no rows writes exact zeros. fp32 accumulation; output in
``out_dtype``. Rows at or past ``offs[-1]`` are read by nobody.

Two kernels: ``grouped_wgrad_kernel`` on 16/32-bit dy ``[M, N]`` and x ``[M, K]`` (on Hopper the
expert's whole BLOCK_M-row chunks by TMA descriptors, its last part-filled chunk by masked
loads: ``TMA``, :data:`WGRAD_TMA`);
``grouped_wgrad_fp8_kernel`` on the FP8 recipes' operands in the padded token-block layout of
:mod:`.token_block_quant` (``[N, P]`` and ``[K, P]`` float8, token dim contiguous, every block
128-column aligned and zero padded), looping over the expert's blocks: per-block scales are
applied to each block's partial product (``fp8_blockwise``), per-expert scales once at the end
(``fp8_rowwise``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from moe_ops.lowering.kernel_choice import choose_wgrad_config, choose_wgrad_fp8_config
from . import launch
from .grouped_gemm import _tiles_of_expert
from .host_math import cdiv, next_power_of_2
from .token_block_quant import BLOCK


@triton.jit
def _expert_group_tile(pid, E, tiles, EXPERT_GROUP: tl.constexpr):
    """``(tile, expert)`` of program ``pid`` of a 1-D grid of ``E * tiles`` programs taken
    ``EXPERT_GROUP`` experts at a time, tile position by tile position: the group's experts'
    tiles at one position launch together (the last group holds the experts left)."""
    span = EXPERT_GROUP * tiles
    group = pid // span
    size = tl.minimum(EXPERT_GROUP, E - group * EXPERT_GROUP)
    r = pid - group * span
    return r // size, group * EXPERT_GROUP + r % size


@triton.jit
def grouped_wgrad_kernel(dy_ptr, x_ptr, dw_ptr, offs_ptr, dy_desc, x_desc, N, K,
                         stride_dym, stride_dyn, stride_xm, stride_xk, stride_we, stride_wn, stride_wk, E,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         UPCAST_DOT: tl.constexpr, TMA: tl.constexpr = False, EXPERT_GROUP: tl.constexpr = 0):
    """``TMA``: the whole ``BLOCK_M``-row chunks of the expert come by TMA descriptors
    (``dy_desc`` ``[BLOCK_M, BLOCK_N]`` over dy, ``x_desc`` ``[BLOCK_M, BLOCK_K]`` over x; columns
    past N / K read as zero) and only the last, part-filled chunk by masked pointer loads (a
    descriptor cannot stop at the expert's last row). ``EXPERT_GROUP`` 0: grid ``(tiles, E)``,
    expert by expert; else a 1-D grid in :func:`_expert_group_tile`'s order, so that the tiles
    in flight mix the group's experts (an empty or small expert's tiles only store, a large
    one's mostly multiply) while the group's rows stay in L2."""
    num_k = tl.cdiv(K, BLOCK_K)
    if EXPERT_GROUP > 0:
        pid, e = _expert_group_tile(tl.program_id(0), E, tl.cdiv(N, BLOCK_N) * num_k, EXPERT_GROUP)
    else:
        pid = tl.program_id(0)
        e = tl.program_id(1)
    pid_n = pid // num_k
    pid_k = pid % num_k
    end = tl.load(offs_ptr + e)
    start = tl.load(offs_ptr + e - 1, mask=e > 0, other=0)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    n_mask = rn < N
    k_mask = rk < K
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    tail = start
    if TMA:
        tail = end - (end - start) % BLOCK_M
        for m0 in range(start, tail, BLOCK_M):
            a = dy_desc.load([m0, pid_n * BLOCK_N])
            b = x_desc.load([m0, pid_k * BLOCK_K])
            if UPCAST_DOT:
                acc = tl.dot(tl.trans(a.to(tl.float32)), b.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(tl.trans(a), b, acc)
    for m0 in range(tail, end, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        m_mask = rm < end
        rm64 = rm.to(tl.int64)
        a = tl.load(dy_ptr + rm64[:, None] * stride_dym + rn[None, :].to(tl.int64) * stride_dyn,
                    mask=m_mask[:, None] & n_mask[None, :], other=0.0)
        b = tl.load(x_ptr + rm64[:, None] * stride_xm + rk[None, :].to(tl.int64) * stride_xk,
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        if UPCAST_DOT:
            acc = tl.dot(tl.trans(a.to(tl.float32)), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(tl.trans(a), b, acc)
    _store_dw(dw_ptr, acc, e, rn, rk, n_mask, k_mask, stride_we, stride_wn, stride_wk)


@triton.jit
def _store_dw(dw_ptr, acc, e, rn, rk, n_mask, k_mask, stride_we, stride_wn, stride_wk):
    out = (dw_ptr + e.to(tl.int64) * stride_we + rn.to(tl.int64)[:, None] * stride_wn
           + rk.to(tl.int64)[None, :] * stride_wk)
    tl.store(out, acc.to(dw_ptr.dtype.element_ty), mask=n_mask[:, None] & k_mask[None, :])


@triton.jit
def grouped_wgrad_fp8_kernel(qdy_ptr, qx_ptr, dw_ptr, offs_ptr, sdy_ptr, sx_ptr, dy_desc, x_desc, N, K,
                             stride_dyn, stride_xk, stride_we, stride_wn, stride_wk, stride_sdy, stride_sx,
                             E: tl.constexpr, E_POW2: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PER_EXPERT: tl.constexpr,
                             TMA: tl.constexpr = False, EXPERT_GROUP: tl.constexpr = 0):
    """``TMA``: each token block's operand tiles by TMA descriptors (``dy_desc`` ``[BLOCK_N,
    BLOCK_M]`` over ``qdy_t``, ``x_desc`` ``[BLOCK_K, BLOCK_M]`` over ``qx_t``; rows past N / K
    read as zero); else masked pointer loads. ``EXPERT_GROUP``: the grid's order, as
    :func:`grouped_wgrad_kernel`'s."""
    num_k = tl.cdiv(K, BLOCK_K)
    if EXPERT_GROUP > 0:
        pid, e = _expert_group_tile(tl.program_id(0), E, tl.cdiv(N, BLOCK_N) * num_k, EXPERT_GROUP)
    else:
        pid = tl.program_id(0)
        e = tl.program_id(1)
    pid_n = pid // num_k
    pid_k = pid % num_k
    e_idx = tl.arange(0, E_POW2)  # offs as values (see _expert_tiles)
    ends = tl.load(offs_ptr + e_idx, mask=e_idx < E, other=0)
    prev = tl.load(offs_ptr + e_idx - 1, mask=(e_idx < E) & (e_idx > 0), other=0)
    _start, _end, first, count = _tiles_of_expert(prev, ends, e, E, E_POW2, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    n_mask = rn < N
    k_mask = rk < K
    dy_rows = qdy_ptr + rn.to(tl.int64)[:, None] * stride_dyn
    x_rows = qx_ptr + rk.to(tl.int64)[:, None] * stride_xk
    ri = tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for j in range(0, count):
        blk = first + j
        col = blk * BLOCK_M + ri  # a whole, aligned, zero-padded token block
        if TMA:
            a = dy_desc.load([pid_n * BLOCK_N, blk * BLOCK_M])
            b = x_desc.load([pid_k * BLOCK_K, blk * BLOCK_M])
        else:
            a = tl.load(dy_rows + col[None, :], mask=n_mask[:, None], other=0.0)
            b = tl.load(x_rows + col[None, :], mask=k_mask[:, None], other=0.0)
        if PER_EXPERT:
            acc = tl.dot(a, tl.trans(b), acc, out_dtype=tl.float32)
        else:
            sdy = tl.load(sdy_ptr + blk.to(tl.int64) * stride_sdy + rn, mask=n_mask, other=0.0)
            sx = tl.load(sx_ptr + blk.to(tl.int64) * stride_sx + rk, mask=k_mask, other=0.0)
            acc += tl.dot(a, tl.trans(b), out_dtype=tl.float32) * sdy[:, None] * sx[None, :]
    if PER_EXPERT:
        sdy = tl.load(sdy_ptr + e.to(tl.int64) * stride_sdy + rn, mask=n_mask, other=0.0)
        sx = tl.load(sx_ptr + e.to(tl.int64) * stride_sx + rk, mask=k_mask, other=0.0)
        acc = acc * sdy[:, None] * sx[None, :]
    _store_dw(dw_ptr, acc, e, rn, rk, n_mask, k_mask, stride_we, stride_wn, stride_wk)


def _expert_group(rest, caller: str) -> int:
    """The config's optional last entry after the tile (the kernels' ``EXPERT_GROUP``; 0 if left
    out): a non-negative int."""
    if len(rest) > 1 or (rest and not (isinstance(rest[0], int) and rest[0] >= 0)):
        raise ValueError(f"{caller}: config takes the tile and at most one more entry, expert_group (an int "
                         f">= 0), got {tuple(rest)} after the tile")
    return rest[0] if rest else 0


# whole row chunks of the bf16 wgrad by TMA descriptors where the device and layout allow
# (grouped_wgrad_kernel TMA; measured in benchmarks/tune_backward.py --tma)
WGRAD_TMA = True


def launch_wgrad(dy: torch.Tensor, x: torch.Tensor, offs: torch.Tensor, out_dtype: torch.dtype, config=None,
                 interpret: bool = False, tma: bool = None) -> torch.Tensor:
    """``[E, N, K]`` in ``out_dtype`` from 16/32-bit dy ``[M, N]``, x ``[M, K]``. ``config``:
    ``(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages[, expert_group])`` (default:
    ``choose_wgrad_config`` from the rows per expert; ``expert_group`` the kernel's
    ``EXPERT_GROUP``, 0 if left out); ``tma`` (default ``WGRAD_TMA``):
    TMA descriptors for the whole row chunks, where :mod:`.launch` allows them."""
    M, N = dy.shape
    K = x.shape[1]
    E = offs.shape[0]
    dw = torch.empty(E, N, K, dtype=out_dtype, device=dy.device)
    if E == 0 or N == 0 or K == 0:
        return dw
    bm, bn, bk, warps, stages, *rest = config or choose_wgrad_config(M, E)
    expert_group = _expert_group(rest, "launch_wgrad")
    grid = (cdiv(N, bn) * cdiv(K, bk), E) if expert_group == 0 else (cdiv(N, bn) * cdiv(K, bk) * E,)
    use_tma = ((WGRAD_TMA if tma is None else tma) and dy.dtype != torch.float32 and launch.tma_device(dy)
               and launch.tma_aligned(dy) and launch.tma_aligned(x) and launch.descriptors_allowed(dy))
    descs = {"dy_desc": (dy, (bm, bn)), "x_desc": (x, (bm, bk))} if use_tma else {}
    kwargs = dict(dy_ptr=dy, x_ptr=x, dw_ptr=dw, offs_ptr=offs, N=N, K=K, E=E,
                  stride_dym=dy.stride(0), stride_dyn=dy.stride(1), stride_xm=x.stride(0), stride_xk=x.stride(1),
                  stride_we=dw.stride(0), stride_wn=dw.stride(1), stride_wk=dw.stride(2),
                  BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, UPCAST_DOT=interpret or dy.dtype == torch.float32, TMA=use_tma,
                  EXPERT_GROUP=expert_group)
    if not use_tma:
        kwargs.update(dy_desc=dy, x_desc=x)  # plain pointers in the descriptors' places
    launch.launch(grouped_wgrad_kernel, grid, kwargs, descs, num_warps=warps, num_stages=stages)
    return dw


# the FP8 wgrad's token-block tiles by TMA descriptors where the device and layout allow
# (grouped_wgrad_fp8_kernel TMA; benchmarks/tune_recipes.py --only wgrad_fp8)
WGRAD_FP8_TMA = True


def launch_wgrad_fp8(qdy_t: torch.Tensor, qx_t: torch.Tensor, sdy: torch.Tensor, sx: torch.Tensor,
                     offs: torch.Tensor, per_expert: bool, out_dtype: torch.dtype, config=None,
                     tma: bool = None) -> torch.Tensor:
    """``[E, N, K]`` in ``out_dtype`` from the padded token-block operands of
    :func:`.token_block_quant.token_block_quant`: ``qdy_t`` ``[N, P]``, ``qx_t`` ``[K, P]``
    float8 and their scales (``[E, .]`` if ``per_expert`` else per block). ``config``:
    ``(BLOCK_N, BLOCK_K, num_warps, num_stages[, expert_group])`` (default:
    ``choose_wgrad_fp8_config``; ``expert_group`` the kernel's ``EXPERT_GROUP``, 0 if left out); the
    reduction chunk is one token block. ``tma`` (default ``WGRAD_FP8_TMA``): TMA descriptors
    for the token-block tiles, where :mod:`.launch` allows them."""
    N, K, E = qdy_t.shape[0], qx_t.shape[0], offs.shape[0]
    dw = torch.empty(E, N, K, dtype=out_dtype, device=qdy_t.device)
    if E == 0 or N == 0 or K == 0:
        return dw
    rows = qdy_t.shape[1] - E * BLOCK  # P = (cdiv(M, BLOCK) + E) * BLOCK: M rounded up to a block
    bn, bk, warps, stages, *rest = config or choose_wgrad_fp8_config(rows, E, per_expert)
    expert_group = _expert_group(rest, "launch_wgrad_fp8")
    grid = (cdiv(N, bn) * cdiv(K, bk), E) if expert_group == 0 else (cdiv(N, bn) * cdiv(K, bk) * E,)
    use_tma = ((WGRAD_FP8_TMA if tma is None else tma) and launch.tma_device(qdy_t) and launch.tma_aligned(qdy_t)
               and launch.tma_aligned(qx_t) and launch.descriptors_allowed(qdy_t))
    descs = {"dy_desc": (qdy_t, (bn, BLOCK)), "x_desc": (qx_t, (bk, BLOCK))} if use_tma else {}
    kwargs = dict(qdy_ptr=qdy_t, qx_ptr=qx_t, dw_ptr=dw, offs_ptr=offs, sdy_ptr=sdy, sx_ptr=sx, N=N, K=K,
                  stride_dyn=qdy_t.stride(0), stride_xk=qx_t.stride(0), stride_we=dw.stride(0),
                  stride_wn=dw.stride(1), stride_wk=dw.stride(2), stride_sdy=sdy.stride(0), stride_sx=sx.stride(0),
                  E=E, E_POW2=next_power_of_2(E), BLOCK_M=BLOCK, BLOCK_N=bn, BLOCK_K=bk, PER_EXPERT=per_expert,
                  TMA=use_tma, EXPERT_GROUP=expert_group)
    if not use_tma:
        kwargs.update(dy_desc=qdy_t, x_desc=qx_t)  # plain pointers in the descriptors' places
    launch.launch(grouped_wgrad_fp8_kernel, grid, kwargs, descs, num_warps=warps, num_stages=stages)
    return dw
