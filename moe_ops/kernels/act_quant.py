"""Triton dynamic activation quantization, writing the layout the grouped GEMM reads.

``quantize_rows_kernel``: symmetric quantization of x ``[M, K]`` (K contiguous) over blocks of
``UNIT`` columns (a power of two), or per row (``PER_ROW``), to int8 (``TO_INT8``: round half
to even, clamp to +-127) or float8 e4m3 (clamp to +-448); scales float32 ``[M, ceil(K/UNIT)]``
(``[M, 1]`` per row) = absmax / qmax (0 for an all-zero unit, whose codes are 0). Same math as
:func:`moe_ops.activations.quantize_blocks_lastdim`.

Grid: ``cdiv(M, BLOCK_R)`` row blocks, times ``cdiv(K, UNIT)`` units unless ``PER_ROW``; a unit
program quantizes one ``[BLOCK_R, UNIT]`` tile in one read. A per-row program holds its rows
in registers when ``BLOCK_C >= K`` (one read), else reads them twice in ``BLOCK_C`` chunks.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .scale_division import absmax_scale, scaled_codes


@triton.jit
def quantize_rows_kernel(x_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_qm, stride_sm,
                         UNIT: tl.constexpr, PER_ROW: tl.constexpr, BLOCK_R: tl.constexpr,
                         BLOCK_C: tl.constexpr, QMAX: tl.constexpr, TO_INT8: tl.constexpr, RCP: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = rows < M
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
    q_rows = q_ptr + rows.to(tl.int64)[:, None] * stride_qm
    if PER_ROW:  # one unit per row
        if BLOCK_C >= K:  # the whole row in registers: one pass
            c = tl.arange(0, BLOCK_C)
            m = r_mask[:, None] & (c < K)[None, :]
            v = tl.load(x_rows + c[None, :], mask=m, other=0.0).to(tl.float32)
            scale = absmax_scale(tl.max(tl.abs(v), 1), QMAX, RCP)
            tl.store(s_ptr + rows.to(tl.int64) * stride_sm, scale, mask=r_mask)
            safe = tl.where(scale > 0, scale, 1.0)[:, None]
            tl.store(q_rows + c[None, :], scaled_codes(v, safe, QMAX, TO_INT8, q_ptr.dtype.element_ty, RCP), mask=m)
        else:  # absmax pass, then quantize pass (the rows stay in L2)
            amax = tl.zeros((BLOCK_R,), dtype=tl.float32)
            for c0 in range(0, K, BLOCK_C):
                c = c0 + tl.arange(0, BLOCK_C)
                v = tl.load(x_rows + c[None, :], mask=r_mask[:, None] & (c < K)[None, :], other=0.0)
                amax = tl.maximum(amax, tl.max(tl.abs(v.to(tl.float32)), 1))
            scale = absmax_scale(amax, QMAX, RCP)
            tl.store(s_ptr + rows.to(tl.int64) * stride_sm, scale, mask=r_mask)
            safe = tl.where(scale > 0, scale, 1.0)[:, None]
            for c0 in range(0, K, BLOCK_C):
                c = c0 + tl.arange(0, BLOCK_C)
                m = r_mask[:, None] & (c < K)[None, :]
                v = tl.load(x_rows + c[None, :], mask=m, other=0.0).to(tl.float32)
                tl.store(q_rows + c[None, :], scaled_codes(v, safe, QMAX, TO_INT8, q_ptr.dtype.element_ty, RCP), mask=m)
    else:  # program (row block, unit): a [BLOCK_R, UNIT] tile, one pass
        u = tl.program_id(1)
        c = u * UNIT + tl.arange(0, UNIT)
        m = r_mask[:, None] & (c < K)[None, :]
        v = tl.load(x_rows + c[None, :], mask=m, other=0.0).to(tl.float32)
        scale = absmax_scale(tl.max(tl.abs(v), 1), QMAX, RCP)
        tl.store(s_ptr + rows.to(tl.int64) * stride_sm + u, scale, mask=r_mask)
        safe = tl.where(scale > 0, scale, 1.0)[:, None]
        tl.store(q_rows + c[None, :], scaled_codes(v, safe, QMAX, TO_INT8, q_ptr.dtype.element_ty, RCP), mask=m)
