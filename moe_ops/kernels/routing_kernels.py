"""Triton routing kernels: top-k selection and a one-launch counting sort by expert.

``topk_kernel``  one program per ``BLOCK_T`` tokens: scores of the ``[BLOCK_T, E]`` logits
                 (softmax or sigmoid, float32), selection key (the logits themselves without
                 bias, the scores plus bias with one), ``TOP_K`` rounds of argmax (ties: the
                 lower expert), weights renormalised on request, each output row stored
                 once. Same rule as :func:`moe_ops.routing.topk_route`.
``topk_sort_kernel``  both in one program for decode-sized routing (all tokens' picks stay in
                 registers; :func:`moe_ops.routing.route`).
``count_sort_kernel``  one program: a histogram of the expert ids (ids outside ``[0, E)``
                 dropped), their cumulative sum (``offs``), then each flat row's position
                 ``start[e] + rows of e before it`` in chunks of ``BLOCK_R`` rows (rank inside
                 a chunk from a cumulative sum over the chunk's one-hot rows): stable, as
                 :func:`moe_ops.routing.sort_rows`, and every position written (dropped rows
                 fill the positions past ``offs[-1]`` in flat order). Launch cost, not
                 bandwidth, dominates decode-sized routing; larger inputs use the sort path.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _topk_tile(logits_ptr, bias_ptr, rt, T, E, stride_lt, TOP_K: tl.constexpr, K_POW2: tl.constexpr,
               E_POW2: tl.constexpr, BLOCK_T: tl.constexpr, SOFTMAX: tl.constexpr, RENORM: tl.constexpr,
               HAS_BIAS: tl.constexpr):
    """``(weights float32, ids int32)`` ``[BLOCK_T, K_POW2]`` of tokens ``rt`` (columns past
    ``TOP_K`` and rows past ``T`` hold no pick)."""
    re = tl.arange(0, E_POW2)
    t_ok = rt < T
    e_ok = re < E
    rt64 = rt.to(tl.int64)
    lg = tl.load(logits_ptr + rt64[:, None] * stride_lt + re[None, :], mask=t_ok[:, None] & e_ok[None, :],
                 other=float("-inf")).to(tl.float32)
    lg = tl.where(t_ok[:, None], lg, 0.0)  # rows past T: finite (never stored)
    if SOFTMAX:
        ex = tl.exp(lg - tl.max(lg, 1)[:, None])
        p = ex / tl.sum(ex, 1)[:, None]
    else:
        p = 1.0 / (1.0 + tl.exp(-lg))
    if HAS_BIAS:
        b = tl.load(bias_ptr + re, mask=e_ok, other=0.0).to(tl.float32)
        sel = tl.where(e_ok[None, :], p + b[None, :], float("-inf"))
    else:
        sel = lg  # monotone in p: the same choice, with no rounding of p in between
    # the TOP_K picks gathered in registers ([BLOCK_T, K_POW2]) and stored once
    rk = tl.arange(0, K_POW2)
    wts = tl.zeros((BLOCK_T, K_POW2), dtype=tl.float32)
    sel_ids = tl.zeros((BLOCK_T, K_POW2), dtype=tl.int32)
    total = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        idx = tl.argmax(sel, 1, tie_break_left=True)
        hit = re[None, :] == idx[:, None]
        wj = tl.sum(tl.where(hit, p, 0.0), 1)
        sel = tl.where(hit, float("-inf"), sel)
        total += wj
        wts = tl.where(rk[None, :] == j, wj[:, None], wts)
        sel_ids = tl.where(rk[None, :] == j, idx.to(tl.int32)[:, None], sel_ids)
    if RENORM:
        wts = wts / total[:, None]
    return wts, sel_ids


@triton.jit
def topk_kernel(logits_ptr, bias_ptr, w_ptr, ids_ptr, T, E, stride_lt, stride_wt, stride_it,
                TOP_K: tl.constexpr, K_POW2: tl.constexpr, E_POW2: tl.constexpr, BLOCK_T: tl.constexpr,
                SOFTMAX: tl.constexpr, RENORM: tl.constexpr, HAS_BIAS: tl.constexpr):
    rt = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    wts, sel_ids = _topk_tile(logits_ptr, bias_ptr, rt, T, E, stride_lt, TOP_K, K_POW2, E_POW2, BLOCK_T,
                              SOFTMAX, RENORM, HAS_BIAS)
    rk = tl.arange(0, K_POW2)
    rt64 = rt.to(tl.int64)
    out_mask = (rt < T)[:, None] & (rk < TOP_K)[None, :]
    tl.store(w_ptr + rt64[:, None] * stride_wt + rk[None, :], wts, mask=out_mask)
    tl.store(ids_ptr + rt64[:, None] * stride_it + rk[None, :], sel_ids, mask=out_mask)


@triton.jit
def topk_sort_kernel(logits_ptr, bias_ptr, w_ptr, ids_ptr, rows_ptr, offs_ptr, T, E, stride_lt,
                     TOP_K: tl.constexpr, K_POW2: tl.constexpr, E_POW2: tl.constexpr, T_POW2: tl.constexpr,
                     SOFTMAX: tl.constexpr, RENORM: tl.constexpr, HAS_BIAS: tl.constexpr):
    """One program: the top-k of all ``T`` tokens (weights, ids ``[T, TOP_K]`` contiguous) and
    their counting sort by expert (``sorted_rows``, ``offs``), the picks kept in registers."""
    rt = tl.arange(0, T_POW2)
    wts, sel_ids = _topk_tile(logits_ptr, bias_ptr, rt, T, E, stride_lt, TOP_K, K_POW2, E_POW2, T_POW2,
                              SOFTMAX, RENORM, HAS_BIAS)
    rk = tl.arange(0, K_POW2)
    picked = (rt < T)[:, None] & (rk < TOP_K)[None, :]
    flat = rt[:, None] * TOP_K + rk[None, :]  # flat row t * top_k + j
    tl.store(w_ptr + flat, wts, mask=picked)
    tl.store(ids_ptr + flat, sel_ids, mask=picked)
    # counting sort of the picks in (t, j) order, i.e. flat order: stable
    R: tl.constexpr = T_POW2 * K_POW2
    e = tl.reshape(tl.where(picked, sel_ids, -1), (R,))
    rows = tl.reshape(flat, (R,))
    re = tl.arange(0, E_POW2)
    onehot = (re[None, :] == e[:, None]).to(tl.int32)  # [R, E_POW2]; no pick: all zero
    counts = tl.sum(onehot, 0)
    ends = tl.cumsum(counts, 0)
    tl.store(offs_ptr + re, ends, mask=re < E)
    rank = tl.sum(tl.cumsum(onehot, 0) * onehot, 1) - 1  # picks of the same expert before
    pos = tl.sum(onehot * (ends - counts)[None, :], 1) + rank
    tl.store(rows_ptr + pos, rows, mask=e >= 0)


@triton.jit
def count_sort_kernel(ids_ptr, rows_ptr, offs_ptr, M, E, E_POW2: tl.constexpr, BLOCK_R: tl.constexpr):
    re = tl.arange(0, E_POW2)
    rr = tl.arange(0, BLOCK_R)
    # pass 1: rows per expert; slot E_POW2 - 1 ... E collect nothing (dropped ids are masked)
    counts = tl.zeros((E_POW2,), dtype=tl.int32)
    for r0 in range(0, M, BLOCK_R):
        r = r0 + rr
        e = tl.load(ids_ptr + r, mask=r < M, other=-1)
        valid = (r < M) & (e >= 0) & (e < E)
        onehot = ((re[None, :] == e[:, None]) & valid[:, None]).to(tl.int32)
        counts += tl.sum(onehot, 0)
    ends = tl.cumsum(counts, 0)
    tl.store(offs_ptr + re, ends, mask=re < E)
    n_valid = tl.sum(counts, 0)
    start = ends - counts
    # pass 2: positions, chunk by chunk in flat order (stable)
    seen = tl.zeros((E_POW2,), dtype=tl.int32)
    dropped_seen = 0
    for r0 in range(0, M, BLOCK_R):
        r = r0 + rr
        in_range = r < M
        e = tl.load(ids_ptr + r, mask=in_range, other=-1)
        valid = in_range & (e >= 0) & (e < E)
        onehot = ((re[None, :] == e[:, None]) & valid[:, None]).to(tl.int32)
        rank = tl.sum(tl.cumsum(onehot, 0) * onehot, 1) - 1  # rows of the same expert before, in chunk
        base = tl.sum(onehot * (start + seen)[None, :], 1)
        dropped = in_range & ~valid
        d_rank = tl.cumsum(dropped.to(tl.int32), 0) - 1
        pos = tl.where(valid, base + rank, n_valid + dropped_seen + d_rank)
        tl.store(rows_ptr + pos, r.to(tl.int32), mask=in_range)
        seen += tl.sum(onehot, 0)
        dropped_seen += tl.sum(dropped.to(tl.int32), 0)
