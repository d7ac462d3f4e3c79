"""Triton grouped wgrad ``dW[e] = dy[g]^T @ x[g]``: a K-grouped reduction over each expert's rows.

Grid ``(cdiv(N, BLOCK_N) * cdiv(K, BLOCK_K), E)``: program (t, e) owns one ``[BLOCK_N, BLOCK_K]``
tile of expert e, reads the expert's row range ``[offs[e-1], offs[e])`` on the device and
reduces over it in BLOCK_M chunks. Deterministic (one program per output tile, fixed order, no
atomics); an expert with no rows writes exact zeros. fp32 accumulation; output in
``out_dtype``. Rows at or past ``offs[-1]`` are read by nobody.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton


@triton.jit
def grouped_wgrad_kernel(dy_ptr, x_ptr, dw_ptr, offs_ptr, sdy_ptr, sx_ptr, blk_ptr, N, K,
                         stride_dym, stride_dyn, stride_xm, stride_xk, stride_we, stride_wn, stride_wk,
                         stride_sdy, stride_sx,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         UPCAST_DOT: tl.constexpr, FP8: tl.constexpr):
    pid = tl.program_id(0)
    e = tl.program_id(1)
    num_k = tl.cdiv(K, BLOCK_K)
    pid_n = pid // num_k
    pid_k = pid % num_k
    end = tl.load(offs_ptr + e)
    start = tl.load(offs_ptr + e - 1, mask=e > 0, other=0)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    n_mask = rn < N
    k_mask = rk < K
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        m_mask = rm < end
        rm64 = rm.to(tl.int64)
        a = tl.load(dy_ptr + rm64[:, None] * stride_dym + rn[None, :].to(tl.int64) * stride_dyn,
                    mask=m_mask[:, None] & n_mask[None, :], other=0.0)
        b = tl.load(x_ptr + rm64[:, None] * stride_xm + rk[None, :].to(tl.int64) * stride_xk,
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        if FP8:
            # fp8 operands scaled per (token block, column): chunks never straddle a block
            blk = tl.load(blk_ptr + m0)
            sdy = tl.load(sdy_ptr + blk * stride_sdy + rn, mask=n_mask, other=0.0)
            sx = tl.load(sx_ptr + blk * stride_sx + rk, mask=k_mask, other=0.0)
            part = tl.dot(tl.trans(a), b, out_dtype=tl.float32)
            acc += part * sdy[:, None] * sx[None, :]
        elif UPCAST_DOT:
            acc = tl.dot(tl.trans(a.to(tl.float32)), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(tl.trans(a), b, acc)
    out = dw_ptr + e.to(tl.int64) * stride_we + rn.to(tl.int64)[:, None] * stride_wn + rk.to(tl.int64)[None, :] * stride_wk
    tl.store(out, acc.to(dw_ptr.dtype.element_ty), mask=n_mask[:, None] & k_mask[None, :])


def launch_wgrad(dy: torch.Tensor, x: torch.Tensor, offs: torch.Tensor, out_dtype: torch.dtype, config=None,
                 interpret: bool = False, fp8_scales=None) -> torch.Tensor:
    """``[E, N, K]`` in ``out_dtype``. ``config``: ``(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)``.
    ``fp8_scales``: ``(s_dy [NB, N], s_x [NB, K], blk [M])`` when dy and x are float8."""
    M, N = dy.shape
    K = x.shape[1]
    E = offs.shape[0]
    dw = torch.empty(E, N, K, dtype=out_dtype, device=dy.device)
    if E == 0 or N == 0 or K == 0:
        return dw
    bm, bn, bk, warps, stages = config or ((128, 128, 128, 8, 3) if fp8_scales is not None else (64, 128, 128, 8, 3))
    sdy, sx, blk = fp8_scales if fp8_scales is not None else (dy, x, offs)
    grid = (triton.cdiv(N, bn) * triton.cdiv(K, bk), E)
    wrap_triton(grouped_wgrad_kernel)[grid](
        dy, x, dw, offs, sdy, sx, blk, N, K, dy.stride(0), dy.stride(1), x.stride(0), x.stride(1),
        dw.stride(0), dw.stride(1), dw.stride(2),
        sdy.stride(0) if fp8_scales is not None else 0, sx.stride(0) if fp8_scales is not None else 0,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, UPCAST_DOT=interpret or dy.dtype == torch.float32,
        FP8=fp8_scales is not None, num_warps=warps, num_stages=stages)
    return dw
