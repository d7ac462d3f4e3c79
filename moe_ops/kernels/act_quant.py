"""Triton dynamic activation quantization, writing the layout the grouped GEMM reads.

``quantize_rows_kernel``: one program per row; symmetric quantization of x ``[M, K]`` over
blocks of ``UNIT`` columns (``UNIT >= K``: per row) to int8 (``TO_INT8``: round half to even,
clamp to +-127) or float8 e4m3 (clamp to +-448); scales float32 ``[M, ceil(K/UNIT)]`` =
absmax / qmax (0 for an all-zero unit, whose codes are 0). Same math as
:func:`moe_ops.activations.quantize_blocks_lastdim`.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _round_half_even(v):
    """``torch.round`` for |v| < 2^22: float32 addition rounds half to even."""
    return (v + 12582912.0) - 12582912.0


@triton.jit
def quantize_rows_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm, stride_sm,
                         UNIT: tl.constexpr, BLOCK: tl.constexpr, QMAX: tl.constexpr, TO_INT8: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    q_row = q_ptr + row * stride_qm
    cols = tl.arange(0, BLOCK)
    for u0 in range(0, K, UNIT):
        # absmax over the unit [u0, u0 + UNIT)
        amax = tl.zeros((BLOCK,), dtype=tl.float32)
        for c0 in range(u0, u0 + UNIT, BLOCK):
            c = c0 + cols
            v = tl.load(x_row + c, mask=(c < K) & (c < u0 + UNIT), other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(v))
        scale = tl.math.div_rn(tl.max(amax, 0), QMAX)
        safe = tl.where(scale > 0, scale, 1.0)
        tl.store(s_ptr + row * stride_sm + u0 // UNIT, scale)
        for c0 in range(u0, u0 + UNIT, BLOCK):
            c = c0 + cols
            m = (c < K) & (c < u0 + UNIT)
            v = tl.load(x_row + c, mask=m, other=0.0).to(tl.float32)
            v = tl.math.div_rn(v, safe)
            if TO_INT8:
                qv = tl.minimum(tl.maximum(_round_half_even(v), -127.0), 127.0).to(tl.int8)
            else:
                qv = tl.minimum(tl.maximum(v, -QMAX), QMAX).to(q_ptr.dtype.element_ty)
            tl.store(q_row + c, qv, mask=m)
