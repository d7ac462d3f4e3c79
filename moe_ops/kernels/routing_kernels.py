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
def _topk_of_logits(lg, bias, rt, T, E, TOP_K: tl.constexpr, K_POW2: tl.constexpr, E_POW2: tl.constexpr,
                    BLOCK_T: tl.constexpr, SOFTMAX: tl.constexpr, RENORM: tl.constexpr, HAS_BIAS: tl.constexpr):
    """``(weights float32, ids int32)`` ``[BLOCK_T, K_POW2]`` of tokens ``rt`` from their float32
    logits ``lg`` ``[BLOCK_T, E_POW2]`` (``-inf`` past ``E``) and the float32 selection bias
    ``bias`` ``[E_POW2]`` (used when ``HAS_BIAS``); columns past ``TOP_K`` and rows past ``T``
    hold no pick.

    Values, not pointers, come in: Inductor's mutation analysis of a kernel counts every
    pointer passed to a helper whose results feed a store address as written, so the kernels
    load the logits and the bias themselves."""
    re = tl.arange(0, E_POW2)
    t_ok = rt < T
    e_ok = re < E
    lg = tl.where(t_ok[:, None], lg, 0.0)  # rows past T: finite (never stored)
    if SOFTMAX:
        ex = tl.exp(lg - tl.max(lg, 1)[:, None])
        p = ex / tl.sum(ex, 1)[:, None]
    else:
        p = 1.0 / (1.0 + tl.exp(-lg))
    if HAS_BIAS:
        sel = tl.where(e_ok[None, :], p + bias[None, :], float("-inf"))
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
    re = tl.arange(0, E_POW2)
    lg = tl.load(logits_ptr + rt.to(tl.int64)[:, None] * stride_lt + re[None, :],
                 mask=(rt < T)[:, None] & (re < E)[None, :], other=float("-inf")).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + re, mask=re < E, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros((E_POW2,), dtype=tl.float32)
    wts, sel_ids = _topk_of_logits(lg, bias, rt, T, E, TOP_K, K_POW2, E_POW2, BLOCK_T, SOFTMAX, RENORM, HAS_BIAS)
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
    re = tl.arange(0, E_POW2)
    lg = tl.load(logits_ptr + rt.to(tl.int64)[:, None] * stride_lt + re[None, :],
                 mask=(rt < T)[:, None] & (re < E)[None, :], other=float("-inf")).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + re, mask=re < E, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros((E_POW2,), dtype=tl.float32)
    wts, sel_ids = _topk_of_logits(lg, bias, rt, T, E, TOP_K, K_POW2, E_POW2, T_POW2, SOFTMAX, RENORM, HAS_BIAS)
    _store_sorted_picks(wts, sel_ids, w_ptr, ids_ptr, rows_ptr, offs_ptr, T, E, TOP_K, K_POW2, E_POW2, T_POW2)


@triton.jit
def _store_sorted_picks(wts, sel_ids, w_ptr, ids_ptr, rows_ptr, offs_ptr, T, E, TOP_K: tl.constexpr,
                        K_POW2: tl.constexpr, E_POW2: tl.constexpr, T_POW2: tl.constexpr):
    """Store the picks ``wts``/``sel_ids`` ``[T_POW2, K_POW2]`` of tokens ``0..T-1`` (weights,
    ids ``[T, TOP_K]`` contiguous) and their stable counting sort by expert (``sorted_rows``
    ``[T * TOP_K]``, ``offs`` ``[E]``)."""
    rt = tl.arange(0, T_POW2)
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
def router_topk_sort_kernel(x_ptr, wr_ptr, bias_ptr, part_ptr, sem_ptr, logits_ptr, w_ptr, ids_ptr, rows_ptr,
                            offs_ptr, T, E, H, stride_xt, stride_we, TOP_K: tl.constexpr, K_POW2: tl.constexpr,
                            E_POW2: tl.constexpr, T_POW2: tl.constexpr, BLOCK_T: tl.constexpr,
                            BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr, H_STEPS: tl.constexpr, SPLIT: tl.constexpr,
                            SOFTMAX: tl.constexpr, RENORM: tl.constexpr, HAS_BIAS: tl.constexpr,
                            UPCAST_DOT: tl.constexpr):
    """The router GEMM and :func:`topk_sort_kernel` in one launch. Program ``(e, s)`` computes
    the float32 partial logits of experts ``[e * BLOCK_E, (e + 1) * BLOCK_E)`` over the hidden
    range ``[s * H_STEPS * BLOCK_H, (s + 1) * H_STEPS * BLOCK_H)`` into ``part`` ``[SPLIT, T,
    E]``, then counts itself done on the int32 semaphore (acquire-release, GPU scope). The
    last program to finish sums the partials in split order (deterministic), rounds them to
    ``x``'s dtype (the logits output ``[T, E]``, as an unfused ``nn.Linear`` would give), picks
    the top-k from those rounded logits, sorts the picks by expert and resets the semaphore
    to 0 for the next launch."""
    pid_e = tl.program_id(0)
    pid_s = tl.program_id(1)
    rt = tl.arange(0, T_POW2)
    rm = tl.arange(0, BLOCK_T)  # max(16, T_POW2): tl.dot needs 16 rows; rows past T are zeros
    re_blk = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    acc = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    h0 = pid_s * (H_STEPS * BLOCK_H)
    for i in tl.static_range(H_STEPS):
        rh = h0 + i * BLOCK_H + tl.arange(0, BLOCK_H)
        h_ok = rh < H
        xt = tl.load(x_ptr + rm[:, None].to(tl.int64) * stride_xt + rh[None, :], mask=(rm < T)[:, None] & h_ok[None, :],
                     other=0.0)
        wt = tl.load(wr_ptr + re_blk[:, None].to(tl.int64) * stride_we + rh[None, :],
                     mask=(re_blk < E)[:, None] & h_ok[None, :], other=0.0)
        if UPCAST_DOT:  # float32 inputs, or the interpreter (its 16-bit dot is wrong)
            acc = tl.dot(xt.to(tl.float32), tl.trans(wt.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(xt, tl.trans(wt), acc)
    part = part_ptr + pid_s * T * E
    tl.store(part + rm[:, None] * E + re_blk[None, :], acc, mask=(rm < T)[:, None] & (re_blk < E)[None, :])
    tl.debug_barrier()  # every warp's partials issued before the release below
    done = tl.atomic_add(sem_ptr, 1, sem="acq_rel", scope="gpu")
    if done == tl.num_programs(0) * tl.num_programs(1) - 1:
        re = tl.arange(0, E_POW2)
        tile = (rt < T)[:, None] & (re < E)[None, :]
        offsets = rt[:, None] * E + re[None, :]
        total = tl.zeros((T_POW2, E_POW2), dtype=tl.float32)
        for s in tl.static_range(SPLIT):  # unrolled: the loads issue together
            total += tl.load(part_ptr + s * T * E + offsets, mask=tile, other=0.0, cache_modifier=".cg")
        logits = total.to(logits_ptr.dtype.element_ty)
        tl.store(logits_ptr + offsets, logits, mask=tile)
        lg = tl.where(tile, logits.to(tl.float32), float("-inf"))
        if HAS_BIAS:
            bias = tl.load(bias_ptr + re, mask=re < E, other=0.0).to(tl.float32)
        else:
            bias = tl.zeros((E_POW2,), dtype=tl.float32)
        wts, sel_ids = _topk_of_logits(lg, bias, rt, T, E, TOP_K, K_POW2, E_POW2, T_POW2, SOFTMAX, RENORM, HAS_BIAS)
        _store_sorted_picks(wts, sel_ids, w_ptr, ids_ptr, rows_ptr, offs_ptr, T, E, TOP_K, K_POW2, E_POW2, T_POW2)
        tl.atomic_xchg(sem_ptr, 0, sem="relaxed", scope="gpu")


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
