"""Triton kernels on the routing layouts' rows (:mod:`moe_ops.routing`): the permute gather, the
slot combine and the expert MLP's SwiGLU backward.

Rows are read and written whole (the column index contiguous), one row index loaded per row, so
that every load and store is vectorized; PyTorch's (and Inductor's) indexed gathers compute an
address per element and measured 3-5x below copy bandwidth on these shapes.

* :func:`gather_token_rows`: ``out[r] = src[sorted_rows[r] // top_k]`` ``[M, H]`` and, with
  ``row_scale``, ``scaled[r] = (row_scale[r] * src[...]).to(src.dtype)`` (float32 product) from
  the same read.
* :func:`combine_slots`: ``out[t] = sum_j w[t, j] * rows[pos[t * top_k + j]]`` ``[T, H]``,
  float32 sums in slot order j = 0, 1, ... (deterministic), ``rows.dtype`` out.
* :func:`swiglu_backward`: from the gate/up rows ``gu`` ``[M, 2I]``, the gradient at h ``dzh``
  ``[M, I]`` before the routing weight and the rows' routing weights ``rw`` ``[M]``: ``dgu``
  ``[M, 2I]``, ``per_row[r] = sum_c dzh[r, c] * h[r, c]`` (float32) and, on request, ``h``.

All take 16-bit or float32 rows, any row strides with contiguous columns; float32 math.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .host_math import cdiv, next_power_of_2
from .launch import launch

_TILE = 4096  # elements a program: [BLOCK_R, BLOCK_C] tiles


@triton.jit
def gather_rows_kernel(src, sorted_rows, scale, out, scaled, M, H, stride_src, stride_out, stride_scaled,
                       TOP_K: tl.constexpr, WRITE_PLAIN: tl.constexpr, WRITE_SCALED: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    r_mask = r < M
    m = r_mask[:, None] & (c < H)[None, :]
    tok = tl.load(sorted_rows + r, mask=r_mask, other=0) // TOP_K
    v = tl.load(src + tok.to(tl.int64)[:, None] * stride_src + c[None, :], mask=m)
    if WRITE_PLAIN:
        tl.store(out + r.to(tl.int64)[:, None] * stride_out + c[None, :], v, mask=m)
    if WRITE_SCALED:
        w = tl.load(scale + r, mask=r_mask, other=0.0).to(tl.float32)
        tl.store(scaled + r.to(tl.int64)[:, None] * stride_scaled + c[None, :],
                 (v.to(tl.float32) * w[:, None]).to(scaled.dtype.element_ty), mask=m)


@triton.jit
def combine_slots_kernel(rows, pos, weights, out, T, H, stride_rows, stride_out,
                         TOP_K: tl.constexpr, WEIGHTED: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    t_mask = t < T
    m = t_mask[:, None] & (c < H)[None, :]
    acc = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        slot = t.to(tl.int64) * TOP_K + j
        p = tl.load(pos + slot, mask=t_mask, other=0)
        v = tl.load(rows + p.to(tl.int64)[:, None] * stride_rows + c[None, :], mask=m, other=0.0).to(tl.float32)
        if WEIGHTED:
            v = v * tl.load(weights + slot, mask=t_mask, other=0.0).to(tl.float32)[:, None]
        acc += v
    tl.store(out + t.to(tl.int64)[:, None] * stride_out + c[None, :], acc.to(out.dtype.element_ty), mask=m)


@triton.jit
def swiglu_backward_kernel(gu, dzh, rw, dgu, per_row, h, M, I, stride_gu, stride_dzh, stride_dgu, stride_h,
                           WRITE_H: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = r < M
    r64 = r.to(tl.int64)[:, None]
    w = tl.load(rw + r, mask=r_mask, other=0.0).to(tl.float32)[:, None]
    dot = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for c0 in range(0, I, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        m = r_mask[:, None] & (c < I)[None, :]
        g = tl.load(gu + r64 * stride_gu + c[None, :], mask=m, other=0.0).to(tl.float32)
        u = tl.load(gu + r64 * stride_gu + I + c[None, :], mask=m, other=0.0).to(tl.float32)
        d = tl.load(dzh + r64 * stride_dzh + c[None, :], mask=m, other=0.0).to(tl.float32)
        sig = 1.0 / (1.0 + tl.exp(-g))
        silu = g * sig
        hq = (silu * u).to(dgu.dtype.element_ty)  # h as the forward rounds it
        dot += tl.sum(d * hq.to(tl.float32), 1)
        if WRITE_H:
            tl.store(h + r64 * stride_h + c[None, :], hq, mask=m)
        dh = d * w
        tl.store(dgu + r64 * stride_dgu + c[None, :],
                 (dh * u * sig * (1.0 + g * (1.0 - sig))).to(dgu.dtype.element_ty), mask=m)
        tl.store(dgu + r64 * stride_dgu + I + c[None, :], (dh * silu).to(dgu.dtype.element_ty), mask=m)
    tl.store(per_row + r, dot, mask=r_mask)


def _tiles(cols: int):
    block_c = min(next_power_of_2(max(cols, 1)), 1024)
    return max(1, _TILE // block_c), block_c


def _check_rows(name: str, t: torch.Tensor) -> None:
    if t.dim() != 2 or (t.shape[1] > 1 and t.stride(1) != 1):
        raise ValueError(f"{name}: expected a 2-D tensor with contiguous columns, got shape "
                         f"{tuple(t.shape)} strides {t.stride()}")


def gather_token_rows(src: torch.Tensor, sorted_rows: torch.Tensor, top_k: int, row_scale=None,
                      plain: bool = True):
    """``(out, scaled)``: ``out`` ``[M, H]`` (None unless ``plain``) and ``scaled`` (None
    without ``row_scale`` ``[M]``) of ``src`` ``[T, H]`` (see the module docstring)."""
    _check_rows("src", src)
    if not plain and row_scale is None:
        return None, None
    M, H = sorted_rows.shape[0], src.shape[1]
    out = torch.empty(M, H, dtype=src.dtype, device=src.device) if plain else None
    scaled = torch.empty(M, H, dtype=src.dtype, device=src.device) if row_scale is not None else None
    if M and H:
        block_r, block_c = _tiles(H)
        first = out if plain else scaled
        launch(gather_rows_kernel, (cdiv(M, block_r), cdiv(H, block_c)),
               dict(src=src, sorted_rows=sorted_rows, scale=row_scale if row_scale is not None else sorted_rows,
                    out=first, scaled=scaled if scaled is not None else first, M=M, H=H, stride_src=src.stride(0),
                    stride_out=first.stride(0), stride_scaled=(scaled if scaled is not None else first).stride(0),
                    TOP_K=top_k, WRITE_PLAIN=plain, WRITE_SCALED=row_scale is not None,
                    BLOCK_R=block_r, BLOCK_C=block_c), {}, num_warps=4)
    return out, scaled


def combine_slots(rows: torch.Tensor, pos: torch.Tensor, top_k: int, weights=None) -> torch.Tensor:
    """``[T, H]`` in ``rows.dtype``: ``rows`` ``[T * top_k, H]`` in sorted order, ``pos`` ``[T *
    top_k]`` each flat row's sorted position, ``weights`` ``[T, top_k]`` or None (see the module
    docstring)."""
    _check_rows("rows", rows)
    M, H = rows.shape
    T = M // top_k
    out = torch.empty(T, H, dtype=rows.dtype, device=rows.device)
    if T and H:
        block_t, block_c = _tiles(H)
        w = weights.contiguous() if weights is not None else pos
        launch(combine_slots_kernel, (cdiv(T, block_t), cdiv(H, block_c)),
               dict(rows=rows, pos=pos, weights=w, out=out, T=T, H=H, stride_rows=rows.stride(0),
                    stride_out=out.stride(0), TOP_K=top_k, WEIGHTED=weights is not None,
                    BLOCK_T=block_t, BLOCK_C=block_c), {}, num_warps=4)
    return out


def swiglu_backward(gu: torch.Tensor, dzh: torch.Tensor, rw: torch.Tensor, write_h: bool):
    """``(dgu [M, 2I] gu.dtype, per_row [M] float32, h [M, I] gu.dtype or None)`` (see the
    module docstring); ``dzh`` any float dtype, ``rw`` ``[M]``."""
    _check_rows("gu", gu)
    _check_rows("dzh", dzh)
    M, I = dzh.shape
    dgu = torch.empty(M, 2 * I, dtype=gu.dtype, device=gu.device)
    per_row = torch.empty(M, dtype=torch.float32, device=gu.device)
    h = torch.empty(M, I, dtype=gu.dtype, device=gu.device) if write_h else None
    if M:
        block_r, block_c = _tiles(I)
        block_c = min(block_c, 512)  # five [BLOCK_R, BLOCK_C] float32 tiles live
        block_r = max(1, 2048 // block_c)
        h_arg = h if write_h else dgu
        launch(swiglu_backward_kernel, (cdiv(M, block_r),),
               dict(gu=gu, dzh=dzh, rw=rw.contiguous(), dgu=dgu, per_row=per_row, h=h_arg, M=M, I=I,
                    stride_gu=gu.stride(0), stride_dzh=dzh.stride(0), stride_dgu=dgu.stride(0),
                    stride_h=h_arg.stride(0), WRITE_H=write_h, BLOCK_R=block_r, BLOCK_C=block_c), {}, num_warps=4)
    return dgu, per_row, h
