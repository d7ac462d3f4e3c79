"""Triton quantization of the FP8 recipes' wgrad operands, in the layout the wgrad kernel reads.

``t`` ``[M, C]`` (rows sorted by expert) to float8 e4m3 ``q`` ``[M, C]`` and float32 scales
``[num_blocks, C]`` per (token block, column), s = absmax / 448 over the block's rows, as
:func:`moe_ops.recipes.quantize_token_blocks` (same block numbering: expert by expert, blocks of
``BLOCK_M`` rows from each expert's first row; or one block per expert). One program per
(block, column tile): two passes over the block's rows (absmax, then quantize). Rows at or
past ``offs[-1]`` are left unwritten (no GEMM reads them); so are unused blocks' scales.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .grouped_gemm import _expert_of_tile


@triton.jit
def token_block_quant_kernel(t_ptr, q_ptr, s_ptr, offs_ptr, C, stride_tm, stride_qm, stride_qc, stride_sb,
                             E: tl.constexpr, E_POW2: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_C: tl.constexpr, PER_EXPERT: tl.constexpr):
    blk = tl.program_id(0)
    pid_c = tl.program_id(1)
    if PER_EXPERT:
        end = tl.load(offs_ptr + blk)
        start = tl.load(offs_ptr + blk - 1, mask=blk > 0, other=0)
    else:
        expert, start, row_end, total, last_end = _expert_of_tile(offs_ptr, blk, E, E_POW2, BLOCK_M)
        end = tl.minimum(start + BLOCK_M, row_end)
        end = tl.where(blk < total, end, start)  # spare programs: no rows
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = cols < C
    amax = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        msk = (rm < end)[:, None] & c_mask[None, :]
        v = tl.load(t_ptr + rm.to(tl.int64)[:, None] * stride_tm + cols[None, :], mask=msk, other=0.0)
        amax = tl.maximum(amax, tl.max(tl.abs(v.to(tl.float32)), 0))
    scale = tl.math.div_rn(amax, 448.0)
    if end > start:
        tl.store(s_ptr + blk.to(tl.int64) * stride_sb + cols, scale, mask=c_mask)
    safe = tl.where(scale > 0, scale, 1.0)
    for m0 in range(start, end, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        msk = (rm < end)[:, None] & c_mask[None, :]
        v = tl.load(t_ptr + rm.to(tl.int64)[:, None] * stride_tm + cols[None, :], mask=msk, other=0.0)
        qv = tl.math.div_rn(v.to(tl.float32), safe[None, :])
        qv = tl.minimum(tl.maximum(qv, -448.0), 448.0)
        tl.store(q_ptr + rm.to(tl.int64)[:, None] * stride_qm + cols.to(tl.int64)[None, :] * stride_qc,
                 qv.to(q_ptr.dtype.element_ty), mask=msk)


def token_block_quant(t: torch.Tensor, offs: torch.Tensor, block: int, num_blocks: int):
    """``(q [M, C] float8_e4m3fn, scale [num_blocks, C] float32)``; ``block <= 0``: per expert.
    ``q`` is stored column-major (a ``[C, M]`` buffer, returned as its ``[M, C]`` view): the
    token dim is the wgrad GEMM's reduction dim, and fp8 tensor-core operands want it
    contiguous."""
    M, C = t.shape
    E = offs.shape[0]
    tc = t.contiguous()
    q = torch.empty(C, M, dtype=torch.float8_e4m3fn, device=t.device).t()
    s = torch.empty(num_blocks, C, dtype=torch.float32, device=t.device)
    if M == 0 or C == 0:
        return q, s
    bm, bc = (block, 64) if block > 0 else (64, 64)
    grid = (num_blocks - 1 if block > 0 else E, triton.cdiv(C, bc))
    wrap_triton(token_block_quant_kernel)[grid](
        tc, q, s, offs, C, tc.stride(0), q.stride(0), q.stride(1), s.stride(0),
        E=E, E_POW2=triton.next_power_of_2(E), BLOCK_M=bm, BLOCK_C=bc, PER_EXPERT=block <= 0)
    return q, s
