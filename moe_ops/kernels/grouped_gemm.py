"""Triton grouped GEMM ``y[g] = x[g] @ W[e]^T`` for every weight format, dequantization fused.

One kernel family, switched by constexprs (the weight never goes back to memory in 16 bits):

``W_KIND``    0 plain float, 1 integer codes, 2 fp8.
``W_BITS``    8, 4 or 2 for integer codes (4 and 2 packed along K, low bits first);
              ``PACK = 8 // W_BITS`` codes a byte: a K tile is PACK sub-dots, sub-dot j
              multiplying x's columns ``k0 + PACK*i + j`` by bit field j of each byte (each byte
              is loaded once, no shuffles); with ``UNPACK_JOIN`` (prefill tiles) the codes are
              instead interleaved in registers into one ``[BLOCK_K, BLOCK_N]`` tile.
``ZERO_MODE`` 0 none, 1 implicit zero point ``IMPLICIT_ZERO`` (packed sym), 2 stored uint8 zero.
``UNIT_N``, ``UNIT_K``  the scale unit (1/huge for channel, huge/huge for tensor, 1/g for
              group, 128/128 for block); scale strides are 0 along broadcast dims.
``SCALE_TILE`` the scale is constant over a K tile (``UNIT_K % BLOCK_K == 0``): one
              ``[BLOCK_N]`` load per tile instead of a ``[BLOCK_K, BLOCK_N]`` gather.
``ACT``       0: 16/32-bit x, W dequantized to x's dtype in registers, fp32 accumulation;
              1: int8 x (``int8_token``), integer weight values as int8, int32 accumulation
              (exact), scales applied per scale unit along K (group) or once at the end;
              2: fp8 e4m3 x (``fp8_token`` / ``fp8_1x128``), fp8 weights, fp32 accumulation,
              scales per K tile when they vary along K.
``SCALE_UNIFORM_N`` (ACT 2) every column of a tile lies in one weight scale unit along N (block
              or tensor scales, ``UNIT_N % BLOCK_N == 0``, tiles aligned; the host checks the
              up rows of a SwiGLU launch too): W's scale is one load a K tile, folded into x's
              per-row scale, so the partial product takes one FMA an element.
``POST_SCALE`` (ACT 0, scales constant along K): codes go to x's dtype exactly and the scale
              multiplies the accumulator once, after the K loop.
              3: 16-bit x quantized to int8 per row while it is loaded (the fused W8A8
              pipeline's down GEMM at decode sizes): the row scale is s = max(``amax``
              partials) / 127, the partials written by the gate/up GEMM's epilogue
              (``AMAX_OUT``); codes clamp(round(x * (1/s))), which differ from the spec's
              round(x / s) by one where x / s is within an ulp of a half-integer; then as ACT 1.
``GROUP_M``   swizzle: GROUP_M consecutive M tiles walk the N tiles together (1: no swizzle).
``GEMV``      (decode, weight-only, W contiguous along K) the tile is computed without tensor
              cores, :func:`_gemv_acc`: each weight tile is loaded along K in 16-byte vectors,
              its codes go to float32 once and are multiplied into every row of the tile
              (``[BLOCK_M, BLOCK_N, BLOCK_K]`` broadcast, reduced along K); zero points and
              scales apply to the ``[BLOCK_M, BLOCK_N]`` partial sums, once per K tile. No
              conversion of the weight tile to a tensor-core operand layout (a round trip
              through shared memory) and no padding of a few rows to the 16 an MMA needs.
              Packed int4/int2 codes take :func:`_gemv_packed_acc` (32-bit words, one row a
              tile, ``GEMV_PREFETCH`` the depth of its register prefetch).
``W_LHS``     (16/32-bit x: weight-only quantized W, or plain W) the tile is computed
              transposed, the (dequantized) weight as the MMA's left operand, which Hopper's
              wgmma takes from registers: :func:`_dequant_acc_w_lhs`.
``TMA_X``, ``TMA_W`` (tensor-core tiles, Hopper and later) x's and W's tiles arrive by TMA
              descriptors (host-side ``TensorDescriptor``s over x and the stored W) instead of
              pointer loads: no address arithmetic or masks in the K loop, out-of-range rows
              and columns read as zero; same values (:func:`_gemm_acc`). W for 16-bit or fp8
              weights, and in the ``W_LHS`` tile for integer codes too (the stored bytes,
              unpacked in registers: :func:`_dequant_acc_w_lhs`); x also under integer codes.

Fused MoE prologue/epilogue (the expert MLP, :mod:`moe_ops.expert_mlp`):
``GATHER``    (> 0) row r of the GEMM reads x row ``xrow[r] // GATHER`` (xrow = sorted_rows,
              GATHER = top_k: the token of a sorted row), its activation scale row likewise:
              the permuted ``[M, K]`` copy never exists.
``SWIGLU``    the weights hold ``[gate; up]`` (2N rows); the program computes the gate tile
              (rows n) and the up tile (rows N + n) and stores ``silu(gate) * up`` ``[M, N]``:
              with ``ONE_LOOP`` in one K loop over the ``[BLOCK_M, 2 * BLOCK_N]`` tile of
              interleaved gate/up rows (x read once), else in two loops (two accumulators of
              ``[BLOCK_M, BLOCK_N]``).
``AMAX_OUT``  also store each row's absmax over the program's stored columns to
              ``amax[r, pid_n]`` (float32 ``[M, AMAX_COLS]``, ``AMAX_POW2`` its next power of
              two), for ACT 3 downstream.
``SCATTER``   row r is stored at output row ``dst[r]`` (token-major ``t * top_k + j``), and
              with ``ROW_WEIGHT`` multiplied first by ``rw[dst[r]]`` (the routing weight).
``SLOT_OUT``  (with ``GATHER``) also store the inverse of ``xrow``: ``slot[xrow[r]] = r`` (int32
              ``[M]``), for a ``COMBINE`` launch downstream.
``COMBINE``   (= top_k, > 0; 16-bit or packed int4/int2 weight-only on the gemv tile) the down launch
              token-major, combine included: program ``(t, n block)`` sums ``rw[s] * x[slot[s]] @
              W[e]^T`` over the token's top_k slots s (``COMBINE_POW2`` its next power of two),
              side by side, and stores ``y[t]`` (``[M / top_k, N]``); grid ``T * cdiv(N,
              BLOCK_N)``, not the row tiles below (:func:`_combine_program`).
``SLOT_SUM``  (= top_k, > 0; with ``SCATTER``, the fused expert MLP's row-tile down launch) also
              sum each token's top_k stored rows into ``sum`` (``[M / top_k, N]``): the last
              program of each column block, counted on ``cnt`` (int32 ``[cdiv(N, BLOCK_N)]``),
              adds them in slot order (:func:`_slot_sum_last`); no separate reduction launch.
``CNT_ZERO``  (> 0) program 0 zeroes ``cnt[:CNT_ZERO]`` first, for a ``SLOT_SUM`` launch
              downstream (the fused expert MLP's gate/up launch).

Scheduling (no host sync): the grid is ``row_tile_bound(M, BLOCK_M, E) * cdiv(N, BLOCK_N)``
programs, a static upper bound on the row tiles a routing can use (``host_math.row_tile_bound``:
at decode it is sized by the rows, not by the experts; one row a tile, exactly ``M``). Each
program reads ``offs`` on the device, finds which expert its M tile belongs to
(tiles numbered expert by expert). The programs after the last expert's tiles write the zero
rows at or past ``offs[-1]``, so every output row is written. Decode and prefill differ only
in tile shape (BLOCK_M 16 with a wide K tile for weight streaming; 64/128 for prefill), chosen
from static shapes in :mod:`moe_ops.lowering.kernel_choice`. Row and expert offsets are int64.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _expert_tiles(prev, ends, E: tl.constexpr, E_POW2: tl.constexpr, BLOCK_M: tl.constexpr):
    """Per expert (``[E_POW2]``, zeros past E): index, number of BLOCK_M tiles.

    The tile helpers take ``offs`` as values (``prev`` = ``offs[e - 1]``, 0 for e = 0, ``ends``
    = ``offs[e]``, both ``[E_POW2]`` int32, zeros past E), loaded by the kernels themselves:
    Inductor's mutation analysis counts a pointer handed to a helper whose results feed a
    store address as written, so under torch.compile ``offs`` would count as mutated by
    every launch (``tests/test_kernel_writes.py``)."""
    idx = tl.arange(0, E_POW2)
    valid = idx < E
    sizes = tl.maximum(ends - prev, 0)
    ntiles = tl.where(valid, (sizes + BLOCK_M - 1) // BLOCK_M, 0)
    return idx, ntiles


@triton.jit
def _locate_tile(tile, idx, ntiles, cum, prev, ends, BLOCK_M: tl.constexpr):
    """(expert, first row, end row of the expert) of used tile ``tile``, from
    :func:`_expert_tiles`' ``idx`` and ``ntiles`` and ``cum`` = their inclusive prefix sum."""
    expert = tl.sum((cum <= tile).to(tl.int32), 0)
    sel = idx == expert
    first_tile = tl.sum(tl.where(sel, cum - ntiles, 0), 0)
    start = tl.sum(tl.where(sel, prev, 0), 0)
    return expert, start + (tile - first_tile) * BLOCK_M, tl.sum(tl.where(sel, ends, 0), 0)


@triton.jit
def _expert_of_tile(prev, ends, tile, E: tl.constexpr, E_POW2: tl.constexpr, BLOCK_M: tl.constexpr):
    """(expert, first row of the tile, end row of the expert, number of used tiles, end row of
    the last expert). Tiles are numbered expert by expert, ``cdiv(rows, BLOCK_M)`` each, every
    tile starting ``BLOCK_M * j`` rows after its expert's first row."""
    idx, ntiles = _expert_tiles(prev, ends, E, E_POW2, BLOCK_M)
    cum = tl.cumsum(ntiles, 0)
    expert, row0, end = _locate_tile(tile, idx, ntiles, cum, prev, ends, BLOCK_M)
    total = tl.sum(ntiles, 0)
    last_end = tl.max(tl.where(idx < E, ends, 0), 0)
    return expert, row0, end, total, last_end


@triton.jit
def _expert_of_rank(prev, ends, rank, E: tl.constexpr, E_POW2: tl.constexpr, WIDE_KEYS: tl.constexpr = True):
    """The expert with the ``rank``-th most rows (0: the most; equal counts by index), ``rank <
    E``: a grid whose programs take one expert each, numbered so, starts its longest programs
    first (GPUs dispatch a grid's programs in order), which keeps the largest experts' serial work
    off the kernel's tail. One ``[E_POW2]`` sort of (rows, index) keys ``rows * E_POW2 + (E_POW2 -
    1 - index)``: int64, or int32 when the caller knows they fit (``WIDE_KEYS=False``: every
    expert's rows ``< 2**31 // E_POW2 - 1``, e.g. from ``(M + 1) * E_POW2 <= 2**31``)."""
    idx = tl.arange(0, E_POW2)
    rows = tl.where(idx < E, ends - prev, -1)  # padding sorts last
    tie = E_POW2 - 1 - idx
    if WIDE_KEYS:
        rows, tie = rows.to(tl.int64), tie.to(tl.int64)
    else:
        rows, tie = rows.to(tl.int32), tie.to(tl.int32)
    key = tl.sort(rows * E_POW2 + tie, descending=True)
    return (E_POW2 - 1) - (tl.sum(tl.where(idx == rank, key, 0), 0) % E_POW2).to(tl.int32)


@triton.jit
def _tiles_of_expert(prev, ends, expert, E: tl.constexpr, E_POW2: tl.constexpr, BLOCK_M: tl.constexpr):
    """(first row, end row, index of the first tile, number of tiles) of ``expert``, tiles
    numbered as in :func:`_expert_of_tile`."""
    idx, ntiles = _expert_tiles(prev, ends, E, E_POW2, BLOCK_M)
    sel = idx == expert
    first_tile = tl.sum(tl.where(idx < expert, ntiles, 0), 0)
    return (tl.sum(tl.where(sel, prev, 0), 0), tl.sum(tl.where(sel, ends, 0), 0), first_tile,
            tl.sum(tl.where(sel, ntiles, 0), 0))


@triton.jit
def grouped_order(t, row_tiles, num_n, GROUP_M: tl.constexpr):
    """``(row tile, column tile)`` of the ``t``-th output tile over ``row_tiles`` x ``num_n``
    tiles: GROUP_M consecutive row tiles walk the column tiles together, so a weight tile is read
    from memory once per GROUP_M row tiles of its expert (L2 reuse)."""
    per_group = GROUP_M * num_n
    first_tile = (t // per_group) * GROUP_M
    group_rows = tl.minimum(row_tiles - first_tile, GROUP_M)
    return first_tile + (t % per_group) % group_rows, (t % per_group) // group_rows


@triton.jit
def swizzled_tile(pid, M, N, E: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """``(row tile, column tile)`` of program ``pid`` over ``host_math.row_tile_bound``'s row
    tiles (the grouped grid's static bound, computed here alike: the two must agree) and
    ``cdiv(N, BLOCK_N)`` column tiles, in :func:`grouped_order`."""
    row_tiles = (M + (tl.minimum(M, E) + 1) * (BLOCK_M - 1)) // BLOCK_M
    return grouped_order(pid, row_tiles, tl.cdiv(N, BLOCK_N), GROUP_M)


@triton.jit
def grouped_gemm_kernel(
    x_ptr, xs_ptr, w_ptr, ws_ptr, wz_ptr, y_ptr, offs_ptr, xrow_ptr, dst_ptr, rw_ptr, amax_ptr, slot_ptr,
    cnt_ptr, sum_ptr,
    x_desc, w_desc,
    M, N, K,
    stride_xm, stride_xk, stride_xsm, stride_xsk,
    stride_we, stride_wn, stride_wk,
    stride_se, stride_sn, stride_sk,
    stride_ym, stride_yn,
    E: tl.constexpr, E_POW2: tl.constexpr,
    W_KIND: tl.constexpr, W_BITS: tl.constexpr, ZERO_MODE: tl.constexpr, IMPLICIT_ZERO: tl.constexpr,
    UNIT_N: tl.constexpr, UNIT_K: tl.constexpr, SCALE_TILE: tl.constexpr, HAS_SCALE: tl.constexpr,
    ACT: tl.constexpr, ACT_UNIT_K: tl.constexpr, INT8_OFFSET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST_DOT: tl.constexpr,
    GROUP_M: tl.constexpr, POST_SCALE: tl.constexpr, PACK: tl.constexpr, UNPACK_JOIN: tl.constexpr,
    GATHER: tl.constexpr = 0, SWIGLU: tl.constexpr = False, AMAX_OUT: tl.constexpr = False,
    SCATTER: tl.constexpr = False, ROW_WEIGHT: tl.constexpr = False, AMAX_COLS: tl.constexpr = 1,
    AMAX_POW2: tl.constexpr = 1, GEMV: tl.constexpr = False, W_LHS: tl.constexpr = False,
    ONE_LOOP: tl.constexpr = False, GEMV_PREFETCH: tl.constexpr = 2, GEMV_KSPLIT: tl.constexpr = 1,
    SLOT_OUT: tl.constexpr = False, COMBINE: tl.constexpr = 0, COMBINE_POW2: tl.constexpr = 1,
    TMA_X: tl.constexpr = False, TMA_W: tl.constexpr = 0, SCALE_UNIFORM_N: tl.constexpr = False,
    SLOT_SUM: tl.constexpr = 0, CNT_ZERO: tl.constexpr = 0,
):
    if COMBINE:
        _combine_program(x_ptr, w_ptr, ws_ptr, wz_ptr, y_ptr, offs_ptr, rw_ptr, slot_ptr, N, K,
                         stride_xm, stride_xk, stride_we, stride_wn, stride_se, stride_sn, stride_sk,
                         stride_ym, stride_yn, E, E_POW2, W_KIND, W_BITS, ZERO_MODE, IMPLICIT_ZERO, UNIT_N, UNIT_K,
                         PACK, GEMV, BLOCK_M, BLOCK_N, BLOCK_K, GEMV_PREFETCH, GEMV_KSPLIT, ACT, SWIGLU, COMBINE,
                         COMBINE_POW2)
        return
    if CNT_ZERO:
        if tl.program_id(0) == 0:  # the next launch's arrival counters (SLOT_SUM)
            for c0 in tl.static_range(0, CNT_ZERO, 128):
                rc = c0 + tl.arange(0, 128)
                tl.store(cnt_ptr + rc, tl.zeros((128,), dtype=tl.int32), mask=rc < CNT_ZERO)
    tile, pid_n = swizzled_tile(tl.program_id(0), M, N, E, BLOCK_M, BLOCK_N, GROUP_M)
    e_idx = tl.arange(0, E_POW2)  # offs as values (see _expert_tiles)
    ends = tl.load(offs_ptr + e_idx, mask=e_idx < E, other=0)
    prev = tl.load(offs_ptr + e_idx - 1, mask=(e_idx < E) & (e_idx > 0), other=0)
    expert, row0, row_end, total, last_end = _expert_of_tile(prev, ends, tile, E, E_POW2, BLOCK_M)

    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < N
    y_cols = rn.to(tl.int64) * stride_yn

    if tile >= total:
        # spare programs: write the zero rows at or past offs[-1]
        zr = last_end + (tile - total) * BLOCK_M + tl.arange(0, BLOCK_M)
        z_ok = zr < M
        if SCATTER:
            zdst = tl.load(dst_ptr + zr, mask=z_ok, other=0).to(tl.int64)
        else:
            zdst = zr.to(tl.int64)
        zeros = tl.zeros((BLOCK_M, BLOCK_N), dtype=y_ptr.dtype.element_ty)
        tl.store(y_ptr + zdst[:, None] * stride_ym + y_cols[None, :], zeros, mask=z_ok[:, None] & n_mask[None, :])
        if AMAX_OUT:
            tl.store(amax_ptr + zr.to(tl.int64) * AMAX_COLS + pid_n, tl.zeros((BLOCK_M,), dtype=tl.float32),
                     mask=z_ok)
        if SLOT_OUT:
            if pid_n == 0:
                tl.store(slot_ptr + tl.load(xrow_ptr + zr, mask=z_ok, other=0), zr, mask=z_ok)
    else:
        rm = row0 + tl.arange(0, BLOCK_M)
        m_mask = rm < row_end
        if GATHER:
            slot = tl.load(xrow_ptr + rm, mask=m_mask, other=0)
            xrow = (slot // GATHER).to(tl.int64)
            if SLOT_OUT:
                if pid_n == 0:
                    tl.store(slot_ptr + slot, rm, mask=m_mask)
        else:
            xrow = rm.to(tl.int64)
        if ACT == 3:
            # per-row int8 scale of the 16-bit x from the absmax partials of its producer
            ac = tl.arange(0, AMAX_POW2)
            part = tl.load(amax_ptr + xrow[:, None] * AMAX_COLS + ac[None, :],
                           mask=m_mask[:, None] & (ac < AMAX_COLS)[None, :], other=0.0)
            xs_row = tl.math.div_rn(tl.max(part, 1), 127.0)
        elif (ACT == 1) | (ACT == 2):
            xs_row = tl.load(xs_ptr + xrow * stride_xsm, mask=m_mask, other=0.0)
        else:
            xs_row = tl.zeros((BLOCK_M,), dtype=tl.float32)
        # the weight rows of the accumulated tile: rn, or with SWIGLU and ONE_LOOP the gate and
        # up rows interleaved (rn[0], N + rn[0], rn[1], ...) so that one K loop reads x once
        TILE_N: tl.constexpr = 2 * BLOCK_N if (SWIGLU and ONE_LOOP) else BLOCK_N
        if SWIGLU and ONE_LOOP:
            wn = tl.reshape(tl.join(rn, rn + N), (TILE_N,))
            wn_mask = tl.reshape(tl.join(n_mask, n_mask), (TILE_N,))
        else:
            wn = rn
            wn_mask = n_mask
        if GEMV and (W_KIND == 1) and (PACK > 1):
            out = _gemv_packed_acc(x_ptr, w_ptr, ws_ptr, wz_ptr, expert, xrow, m_mask, wn, wn_mask, K,
                                   stride_xm, stride_xk, stride_we, stride_wn, stride_se, stride_sn, stride_sk,
                                   W_BITS, ZERO_MODE, IMPLICIT_ZERO, UNIT_N, UNIT_K, BLOCK_M, TILE_N, BLOCK_K,
                                   GEMV_PREFETCH, GEMV_KSPLIT, 0)
            out = tl.sum(out, 0)[None, :]
        elif GEMV:
            out = _gemv_acc(x_ptr, w_ptr, ws_ptr, wz_ptr, expert, xrow, m_mask, wn, wn_mask, K,
                            stride_xm, stride_xk, stride_we, stride_wn, stride_se, stride_sn, stride_sk,
                            W_KIND, W_BITS, ZERO_MODE, IMPLICIT_ZERO, UNIT_N, UNIT_K, HAS_SCALE,
                            BLOCK_M, TILE_N, BLOCK_K, PACK)
        elif W_LHS:
            tl.static_assert(SCALE_TILE, "W_LHS needs the weight scale constant over a K tile")
            out = _dequant_acc_w_lhs(x_ptr, w_ptr, ws_ptr, wz_ptr, expert, xrow, m_mask, wn, wn_mask, K,
                                     stride_xm, stride_xk, stride_we, stride_wn, stride_wk,
                                     stride_se, stride_sn, stride_sk,
                                     W_KIND, W_BITS, ZERO_MODE, IMPLICIT_ZERO, UNIT_N, UNIT_K,
                                     BLOCK_M, TILE_N, BLOCK_K, UPCAST_DOT, POST_SCALE, PACK,
                                     x_ptr.dtype.element_ty, x_desc, row0, TMA_X, w_desc, pid_n * BLOCK_N, TMA_W)
        else:
            out = _gemm_acc(x_ptr, xs_ptr, w_ptr, ws_ptr, wz_ptr, expert, xrow, xs_row, m_mask, wn, wn_mask, K,
                            stride_xm, stride_xk, stride_xsm, stride_xsk, stride_we, stride_wn, stride_wk,
                            stride_se, stride_sn, stride_sk,
                            W_KIND, W_BITS, ZERO_MODE, IMPLICIT_ZERO, UNIT_N, UNIT_K, SCALE_TILE, HAS_SCALE,
                            ACT, ACT_UNIT_K, INT8_OFFSET, BLOCK_M, TILE_N, BLOCK_K, UPCAST_DOT, POST_SCALE, PACK,
                            UNPACK_JOIN, x_ptr.dtype.element_ty,
                            x_desc, w_desc, row0, pid_n * BLOCK_N, TMA_X, TMA_W, SCALE_UNIFORM_N)
        if SWIGLU and ONE_LOOP:
            out, up = tl.split(tl.reshape(out, (BLOCK_M, BLOCK_N, 2)))  # gate, up
        elif SWIGLU:
            if W_LHS:
                up = _dequant_acc_w_lhs(x_ptr, w_ptr, ws_ptr, wz_ptr, expert, xrow, m_mask, rn + N, n_mask, K,
                                        stride_xm, stride_xk, stride_we, stride_wn, stride_wk,
                                        stride_se, stride_sn, stride_sk,
                                        W_KIND, W_BITS, ZERO_MODE, IMPLICIT_ZERO, UNIT_N, UNIT_K,
                                        BLOCK_M, BLOCK_N, BLOCK_K, UPCAST_DOT, POST_SCALE, PACK,
                                        x_ptr.dtype.element_ty, x_desc, row0, TMA_X, w_desc, N + pid_n * BLOCK_N, TMA_W)
            elif GEMV and (W_KIND == 1) and (PACK > 1):
                up = _gemv_packed_acc(x_ptr, w_ptr, ws_ptr, wz_ptr, expert, xrow, m_mask, rn + N, n_mask, K,
                                      stride_xm, stride_xk, stride_we, stride_wn, stride_se, stride_sn, stride_sk,
                                      W_BITS, ZERO_MODE, IMPLICIT_ZERO, UNIT_N, UNIT_K, BLOCK_M, BLOCK_N, BLOCK_K,
                                      GEMV_PREFETCH, GEMV_KSPLIT, 0)
                up = tl.sum(up, 0)[None, :]
            elif GEMV:
                up = _gemv_acc(x_ptr, w_ptr, ws_ptr, wz_ptr, expert, xrow, m_mask, rn + N, n_mask, K,
                               stride_xm, stride_xk, stride_we, stride_wn, stride_se, stride_sn, stride_sk,
                               W_KIND, W_BITS, ZERO_MODE, IMPLICIT_ZERO, UNIT_N, UNIT_K, HAS_SCALE,
                               BLOCK_M, BLOCK_N, BLOCK_K, PACK)
            else:
                up = _gemm_acc(x_ptr, xs_ptr, w_ptr, ws_ptr, wz_ptr, expert, xrow, xs_row, m_mask, rn + N, n_mask,
                               K, stride_xm, stride_xk, stride_xsm, stride_xsk, stride_we, stride_wn, stride_wk,
                               stride_se, stride_sn, stride_sk,
                               W_KIND, W_BITS, ZERO_MODE, IMPLICIT_ZERO, UNIT_N, UNIT_K, SCALE_TILE, HAS_SCALE,
                               ACT, ACT_UNIT_K, INT8_OFFSET, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST_DOT, POST_SCALE,
                               PACK, UNPACK_JOIN, x_ptr.dtype.element_ty,
                               x_desc, w_desc, row0, N + pid_n * BLOCK_N, TMA_X, TMA_W, SCALE_UNIFORM_N)
        if SWIGLU:
            out = out / (1.0 + tl.exp(-out)) * up
        rm64 = rm.to(tl.int64)
        if SCATTER:
            dst = tl.load(dst_ptr + rm, mask=m_mask, other=0).to(tl.int64)
        else:
            dst = rm64
        if ROW_WEIGHT:
            out = out * tl.load(rw_ptr + dst, mask=m_mask, other=0.0)[:, None]
        res = out.to(y_ptr.dtype.element_ty)
        o_mask = m_mask[:, None] & n_mask[None, :]
        tl.store(y_ptr + dst[:, None] * stride_ym + y_cols[None, :], res, mask=o_mask)
        if AMAX_OUT:
            amax = tl.max(tl.where(o_mask, tl.abs(res.to(tl.float32)), 0.0), 1)
            tl.store(amax_ptr + rm64 * AMAX_COLS + pid_n, amax, mask=m_mask)
    if SLOT_SUM:
        _slot_sum_last(y_ptr, sum_ptr, cnt_ptr, M, N, pid_n, rn, n_mask, y_cols, stride_ym, SLOT_SUM, BLOCK_N)


@triton.jit
def _slot_sum_last(y_ptr, sum_ptr, cnt_ptr, M, N, pid_n, rn, n_mask, y_cols, stride_ym, TOP_K: tl.constexpr,
                   BLOCK_N: tl.constexpr):
    """``SLOT_SUM``: count this program's column block done on ``cnt[pid_n]`` (int32, zeroed
    by the launch before, acquire-release at GPU scope, after every warp's stores); the last of
    the block's ``num_programs / cdiv(N, BLOCK_N)`` programs sums each token's ``TOP_K`` slot
    rows of ``y`` (``[M, N]``, slot ``t * TOP_K + j`` at row ``t * TOP_K + j``) over the block's
    columns in float32, slot order (deterministic), into ``sum[t]`` (``[M / TOP_K, N]``,
    contiguous, ``sum_ptr``'s dtype)."""
    tl.debug_barrier()  # every warp's stores issued before the release below
    arrived = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
    if arrived == tl.num_programs(0) // tl.cdiv(N, BLOCK_N) - 1:
        T = M // TOP_K
        ROWS: tl.constexpr = 16
        for t0 in range(0, T, ROWS):
            rt = t0 + tl.arange(0, ROWS)
            ok = (rt < T)[:, None] & n_mask[None, :]
            total = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
            for j in tl.static_range(TOP_K):
                src = (rt * TOP_K + j).to(tl.int64) * stride_ym
                total += tl.load(y_ptr + src[:, None] + y_cols[None, :], mask=ok, other=0.0,
                                 cache_modifier=".cg").to(tl.float32)
            tl.store(sum_ptr + rt.to(tl.int64)[:, None] * N + rn[None, :], total.to(sum_ptr.dtype.element_ty),
                     mask=ok)


@triton.jit
def _unpack_join(byte, W_BITS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """``[BLOCK_K // PACK, BLOCK_N]`` bytes to ``[BLOCK_K, BLOCK_N]`` codes in K order (low bits
    first), interleaved in registers with join / permute / reshape."""
    MASK: tl.constexpr = (1 << W_BITS) - 1
    if W_BITS == 4:
        pair = tl.join(byte & MASK, (byte >> 4) & MASK)  # [BK/2, BN, 2]
        return tl.reshape(tl.permute(pair, (0, 2, 1)), (BLOCK_K, BLOCK_N))
    else:
        lo = tl.join(byte & MASK, (byte >> 2) & MASK)  # codes 0, 1
        hi = tl.join((byte >> 4) & MASK, (byte >> 6) & MASK)  # codes 2, 3
        quad = tl.join(lo, hi)  # [BK/4, BN, 2 (q), 2 (p)]: code 2p + q
        return tl.reshape(tl.permute(quad, (0, 3, 2, 1)), (BLOCK_K, BLOCK_N))


@triton.jit
def _expert_operands(w_ptr, ws_ptr, wz_ptr, expert, rn, stride_we, stride_wn, stride_se, stride_sn,
                     UNIT_N: tl.constexpr):
    """Expert ``expert``'s weight / scale / zero base pointers and the int64 row offsets of the
    output columns ``rn`` in W and in its scales (scale row ``rn // UNIT_N``)."""
    e64 = expert.to(tl.int64)
    return (w_ptr + e64 * stride_we, ws_ptr + e64 * stride_se, wz_ptr + e64 * stride_se,
            rn.to(tl.int64) * stride_wn, (rn // UNIT_N).to(tl.int64) * stride_sn)


@triton.jit
def _load_scale_row(s_base, z_base, s_rows, k0, n_mask, stride_sk, UNIT_K: tl.constexpr, ZERO_MODE: tl.constexpr):
    """``[1, BLOCK_N]`` scale (and int32 zero) of the scale unit holding column ``k0``."""
    s = tl.load(s_base + s_rows + (k0 // UNIT_K) * stride_sk, mask=n_mask, other=0.0)[None, :]
    if ZERO_MODE == 2:
        z = tl.load(z_base + s_rows + (k0 // UNIT_K) * stride_sk, mask=n_mask, other=0).to(tl.int32)[None, :]
    else:
        z = tl.zeros_like(s).to(tl.int32)
    return s, z


@triton.jit
def _gemm_acc(x_ptr, xs_ptr, w_ptr, ws_ptr, wz_ptr, expert, xrow, xs_row, m_mask, rn, n_mask, K,
              stride_xm, stride_xk, stride_xsm, stride_xsk, stride_we, stride_wn, stride_wk,
              stride_se, stride_sn, stride_sk,
              W_KIND: tl.constexpr, W_BITS: tl.constexpr, ZERO_MODE: tl.constexpr, IMPLICIT_ZERO: tl.constexpr,
              UNIT_N: tl.constexpr, UNIT_K: tl.constexpr, SCALE_TILE: tl.constexpr, HAS_SCALE: tl.constexpr,
              ACT: tl.constexpr, ACT_UNIT_K: tl.constexpr, INT8_OFFSET: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST_DOT: tl.constexpr,
              POST_SCALE: tl.constexpr, PACK: tl.constexpr, UNPACK_JOIN: tl.constexpr, X_DTYPE: tl.constexpr,
              x_desc, w_desc, x_row0, w_row0, TMA_X: tl.constexpr, TMA_W: tl.constexpr,
              SCALE_UNIFORM_N: tl.constexpr = False):
    """The float32 ``[BLOCK_M, BLOCK_N]`` tile of ``x[xrow] @ W[expert][rn]^T``, scales applied.
    ``xrow``: int64 x rows of the tile; ``xs_row``: their activation scales (ACT 1-3).
    ``TMA_X``: x's tile is ``x_desc.load([x_row0, k0])`` (a ``[BLOCK_M, BLOCK_K]`` descriptor over
    ``[M, K]``; rows past the expert's are other experts' rows, masked at the store, and columns
    past K read as zero), for ``xrow = x_row0 + arange(BLOCK_M)`` and one sub-dot a K tile.
    ``TMA_W`` (16-bit or fp8 weights): 1, W's tile is ``w_desc.load([expert, w_row0, k0])``
    over the stored ``[E, N, K]`` (block ``[1, BLOCK_N, BLOCK_K]``), transposed; 2, the stored
    tensor is ``[E, K, N]`` (the dgrad view: block ``[1, BLOCK_K, BLOCK_N]`` at
    ``[expert, k0, w_row0]``). ``rn = w_row0 + arange(BLOCK_N)``."""
    w_base, s_base, z_base, w_rows, s_rows = _expert_operands(w_ptr, ws_ptr, wz_ptr, expert, rn, stride_we,
                                                              stride_wn, stride_se, stride_sn, UNIT_N)
    # packed codes: a K tile is PACK sub-dots of SUB columns each; sub-dot j takes columns
    # k0 + PACK*i + j, i.e. bits [j*W_BITS, (j+1)*W_BITS) of the tile's SUB bytes per row of W
    SUB: tl.constexpr = BLOCK_K // PACK
    NSUB: tl.constexpr = 1 if UNPACK_JOIN else PACK  # sub-dots per K tile
    CODE_MASK: tl.constexpr = (1 << W_BITS) - 1
    rs = tl.arange(0, SUB)
    rsk = tl.arange(0, BLOCK_K // NSUB)

    IS_INT: tl.constexpr = (ACT == 1) | (ACT == 3)
    # fp8 x fp8 (ACT 2): which scales vary along K, and whether W's varies over the tile's
    # columns (else one scale a K tile, at row w_row0 // UNIT_N)
    X_STEP: tl.constexpr = ACT_UNIT_K < 1 << 30
    W_STEP: tl.constexpr = UNIT_K < 1 << 30
    S_COLS_STEP: tl.constexpr = not SCALE_UNIFORM_N
    # packed codes (unsigned bit fields) dequantized to float by exponent bits (see below)
    MAGIC: tl.constexpr = (ACT == 0) & (W_KIND == 1) & (PACK > 1)
    if ACT == 3:  # codes round(x * (1 / s)): one multiply per element instead of a division
        inv_scale = tl.where(xs_row > 0, tl.math.div_rn(tl.full(xs_row.shape, 1.0, tl.float32), xs_row), 0.0)
    if IS_INT:
        acc_i = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    for k0 in range(0, K, BLOCK_K):
        if TMA_W == 1:
            w_tile = tl.reshape(w_desc.load([expert, w_row0, k0]), (BLOCK_N, BLOCK_K)).T
        elif TMA_W == 2:
            w_tile = tl.reshape(w_desc.load([expert, k0, w_row0]), (BLOCK_K, BLOCK_N))
        if W_KIND == 1:
            rb = k0 // PACK + rs
            byte = tl.load(w_base + rb.to(tl.int64)[:, None] * stride_wk + w_rows[None, :],
                           mask=(rb < K // PACK)[:, None] & n_mask[None, :], other=0).to(tl.int32)
        if HAS_SCALE:
            if SCALE_TILE and ((ACT != 2) or (W_STEP and S_COLS_STEP)):
                s, z = _load_scale_row(s_base, z_base, s_rows, k0, n_mask, stride_sk, UNIT_K, ZERO_MODE)
        if IS_INT:
            part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for j in tl.static_range(NSUB):
            kk = k0 + rsk * NSUB + j
            k_mask = kk < K
            if TMA_X:
                a = x_desc.load([x_row0, k0])
            else:
                a = tl.load(x_ptr + xrow[:, None] * stride_xm + kk[None, :].to(tl.int64) * stride_xk,
                            mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            if ACT == 3:  # the int8_token rule, with x / s as x * (1 / s)
                v = a.to(tl.float32) * inv_scale[:, None]
                a = tl.minimum(tl.maximum((v + 12582912.0) - 12582912.0, -127.0), 127.0).to(tl.int8)
            bmask = k_mask[:, None] & n_mask[None, :]
            if W_KIND == 1:
                if PACK == 1:
                    code = byte
                elif UNPACK_JOIN:
                    code = _unpack_join(byte, W_BITS, BLOCK_K, BLOCK_N)
                else:
                    code = (byte >> (j * W_BITS)) & CODE_MASK
                if (ZERO_MODE == 1) & (not MAGIC):
                    code = code - IMPLICIT_ZERO
            elif TMA_W:
                raw = w_tile
            else:
                raw = tl.load(w_base + kk.to(tl.int64)[:, None] * stride_wk + w_rows[None, :], mask=bmask,
                              other=0.0)
            if HAS_SCALE:
                if not SCALE_TILE:
                    s_off = s_base + s_rows[None, :] + (kk // UNIT_K).to(tl.int64)[:, None] * stride_sk
                    s = tl.load(s_off, mask=bmask, other=0.0)
                    if ZERO_MODE == 2:
                        z = tl.load(z_base + s_rows[None, :] + (kk // UNIT_K).to(tl.int64)[:, None] * stride_sk,
                                    mask=bmask, other=0).to(tl.int32)

            if ACT == 0:
                if W_KIND == 0:
                    b = raw
                elif MAGIC:
                    # unsigned fields q < 2^23: the float with bits 0x4B000000 | q is 2^23 + q, so
                    # q - z = that float minus (2^23 + z), exactly, with no integer conversion
                    if ZERO_MODE == 2:
                        zf = z.to(tl.float32) + 8388608.0
                    else:
                        zf = 8388608.0 + IMPLICIT_ZERO
                    qz = (code | 0x4B000000).to(tl.float32, bitcast=True) - zf
                    if POST_SCALE:  # integers |q - z| <= 255 are exact in bf16/fp16
                        b = qz.to(X_DTYPE)
                    else:
                        b = (qz * s).to(X_DTYPE)
                elif W_KIND == 1:
                    if ZERO_MODE == 2:
                        code = code - z
                    if POST_SCALE:  # integers |q| <= 255 are exact in bf16/fp16
                        b = code.to(tl.float32).to(X_DTYPE)
                    else:
                        b = (code.to(tl.float32) * s).to(X_DTYPE)
                else:
                    if POST_SCALE:  # every fp8 value is exact in bf16/fp16
                        b = raw.to(tl.float32).to(X_DTYPE)
                    else:
                        b = (raw.to(tl.float32) * s).to(X_DTYPE)
                if UPCAST_DOT:
                    acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
                else:
                    acc = tl.dot(a, b, acc)
            elif IS_INT:
                if INT8_OFFSET:
                    # int8_asym: u - z in [-255, 255]; dot with (u - 128), correct by rowsum * (128 - z)
                    part += tl.dot(a, (code - 128).to(tl.int8), out_dtype=tl.int32)
                    part += tl.sum(a.to(tl.int32), 1)[:, None] * (128 - z)
                else:
                    if ZERO_MODE == 2:
                        code = code - z
                    part += tl.dot(a, code.to(tl.int8), out_dtype=tl.int32)
            else:
                # fp8 x fp8: the K tile's partial product, times the scales that vary along K
                # (x's with X_STEP, W's with W_STEP): one FMA an element where the factor is one
                # per row (W's scale uniform over the tile's columns), two where it is not
                pf = tl.dot(a, raw, out_dtype=tl.float32)
                if X_STEP:
                    xs = tl.load(xs_ptr + xrow * stride_xsm + (k0 // ACT_UNIT_K) * stride_xsk, mask=m_mask,
                                 other=0.0)
                if W_STEP and not S_COLS_STEP:
                    s_tile = tl.load(s_base + (w_row0 // UNIT_N).to(tl.int64) * stride_sn + (k0 // UNIT_K) * stride_sk)
                if X_STEP and W_STEP:
                    if S_COLS_STEP:
                        acc += pf * xs[:, None] * s
                    else:
                        acc += pf * (xs * s_tile)[:, None]
                elif X_STEP:
                    acc += pf * xs[:, None]
                elif W_STEP:
                    if S_COLS_STEP:
                        acc += pf * s
                    else:
                        acc += pf * s_tile
                else:
                    acc += pf
        if IS_INT:
            acc_i += part
            if UNIT_K < 1 << 30:
                # group scales: flush the exact integer sum at the end of each scale unit
                if ((k0 + BLOCK_K) % UNIT_K == 0) | (k0 + BLOCK_K >= K):
                    acc += acc_i.to(tl.float32) * s
                    acc_i = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)

    if IS_INT:
        if UNIT_K < 1 << 30:
            out = acc * xs_row[:, None]
        else:
            s_end, _z = _load_scale_row(s_base, z_base, s_rows, 0, n_mask, stride_sk, UNIT_K, 0)
            out = (acc_i.to(tl.float32) * xs_row[:, None]) * s_end
    elif ACT == 2:  # the scales constant along K, applied once
        if X_STEP and W_STEP:
            out = acc
        elif X_STEP:
            s_end, _z = _load_scale_row(s_base, z_base, s_rows, 0, n_mask, stride_sk, UNIT_K, 0)
            out = acc * s_end
        elif W_STEP:
            out = acc * xs_row[:, None]
        else:
            s_end, _z = _load_scale_row(s_base, z_base, s_rows, 0, n_mask, stride_sk, UNIT_K, 0)
            out = acc * xs_row[:, None] * s_end
    else:
        if POST_SCALE:
            s_end, _z = _load_scale_row(s_base, z_base, s_rows, 0, n_mask, stride_sk, UNIT_K, 0)
            out = acc * s_end
        else:
            out = acc
    return out


@triton.jit
def _unpack_rows(byte, W_BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``[BLOCK_N, BLOCK_K // PACK]`` int32 bytes to ``[BLOCK_N, BLOCK_K]`` codes in K order
    (low bits first): the bit fields joined along a new last axis, which reshapes in place."""
    MASK: tl.constexpr = (1 << W_BITS) - 1
    if W_BITS == 4:
        return tl.reshape(tl.join(byte & MASK, byte >> 4), (BLOCK_N, BLOCK_K))
    else:
        lo = tl.join(byte & MASK, (byte >> 2) & MASK)  # codes 0, 1
        hi = tl.join((byte >> 4) & MASK, byte >> 6)  # codes 2, 3
        quad = tl.permute(tl.join(lo, hi), (0, 1, 3, 2))  # [BN, BK/4, 2 (p), 2 (q)]: code 2p + q
        return tl.reshape(quad, (BLOCK_N, BLOCK_K))


@triton.jit
def _dequant_acc_w_lhs(x_ptr, w_ptr, ws_ptr, wz_ptr, expert, xrow, m_mask, rn, n_mask, K,
                       stride_xm, stride_xk, stride_we, stride_wn, stride_wk, stride_se, stride_sn, stride_sk,
                       W_KIND: tl.constexpr, W_BITS: tl.constexpr, ZERO_MODE: tl.constexpr,
                       IMPLICIT_ZERO: tl.constexpr, UNIT_N: tl.constexpr, UNIT_K: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, UPCAST_DOT: tl.constexpr, POST_SCALE: tl.constexpr,
                       PACK: tl.constexpr, X_DTYPE: tl.constexpr, x_desc=None, x_row0=0,
                       TMA_X: tl.constexpr = False, w_desc=None, w_row0=0, TMA_W: tl.constexpr = 0):
    """Weight-only formats (``W_KIND`` 1 or 2, scales constant over a K tile) and plain weights
    (``W_KIND`` 0, x's dtype) under 16/32-bit x: the float32 ``[BLOCK_M, BLOCK_N]`` tile of
    ``x[xrow] @ W[expert][rn]^T``, computed as the transpose of ``W[rn] @ x[xrow]^T``. The
    dequantized weight tile ``[BLOCK_N, BLOCK_K]`` is the MMA's left operand, which Hopper's wgmma
    reads from registers: it goes from the dequantization to the tensor cores without a store to
    shared memory and the wait that store needs each K step (as the right operand it would); a plain
    weight tile is the operand as loaded, and a decode tile's few rows of x become the MMA's narrow
    N side instead of a mostly masked 64-row M side. Packed codes are unpacked along K within each
    weight row (W's stored layout), and turned into floats by exponent bits: ``0x4B000000 | q`` is
    the float ``2^23 + q``, so ``q - z`` is that minus ``2^23 + z``, exactly. Decode tiles
    (``BLOCK_M <= 16``) with the scale constant over the K tile do it in x's 16-bit type
    (``0x4300 | q`` is bf16 ``128 + q``, ``0x6400 | q`` fp16 ``1024 + q``; two codes per
    instruction) and multiply the tile's exact-code partial sums by the scale: the weight is then
    not rounded to 16 bits before the product, as in :func:`_gemv_acc`. ``TMA_X``: x's tile is
    ``x_desc.load([x_row0, k0])`` transposed (as in :func:`_gemm_acc`: rows past the expert's are
    other experts' rows, masked at the store; columns past K read as zero). ``TMA_W`` (1): W's
    stored tile (``[BLOCK_N, BLOCK_K // PACK]`` bytes of codes, or ``[BLOCK_N, BLOCK_K]`` fp8 or
    plain values) is ``w_desc.load([expert, w_row0, k0 // PACK])`` over the stored
    ``[E, N, K // PACK]`` (rows past N and columns past the row's end read as zero;
    ``rn = w_row0 + arange(BLOCK_N)``)."""
    w_base, s_base, z_base, w_rows, s_rows = _expert_operands(w_ptr, ws_ptr, wz_ptr, expert, rn, stride_we,
                                                              stride_wn, stride_se, stride_sn, UNIT_N)
    SUB: tl.constexpr = BLOCK_K // PACK  # stored columns per K tile
    rs = tl.arange(0, SUB)
    rk = tl.arange(0, BLOCK_K)
    # decode tiles, packed codes, scale constant over the K tile: q - z exactly in x's 16-bit
    # type (exponent bits of 128.0 in bf16 / 1024.0 in fp16), the scale on the tile's sums
    CODES16: tl.constexpr = (W_KIND == 1) & (PACK > 1) & (not POST_SCALE) & (BLOCK_M <= 16) & (
        (X_DTYPE == tl.bfloat16) | (X_DTYPE == tl.float16))
    if X_DTYPE == tl.bfloat16:
        bias16: tl.constexpr = 0x4300  # bf16 128.0: 7 mantissa bits, 128 + q exact for q < 128
        bias16_val: tl.constexpr = 128.0
    else:
        bias16: tl.constexpr = 0x6400  # fp16 1024.0
        bias16_val: tl.constexpr = 1024.0
    zero_bias: tl.constexpr = 8388608.0 if PACK > 1 else 0.0  # 2^23: 0x4B000000 | q is 2^23 + q
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        k_mask = kk < K
        if TMA_X:
            a = tl.trans(x_desc.load([x_row0, k0]))  # [BLOCK_K, BLOCK_M]
        else:
            a = tl.load(x_ptr + xrow[None, :] * stride_xm + kk[:, None].to(tl.int64) * stride_xk,
                        mask=k_mask[:, None] & m_mask[None, :], other=0.0)  # [BLOCK_K, BLOCK_M]
        if W_KIND != 0:
            s = tl.load(s_base + s_rows + (k0 // UNIT_K) * stride_sk, mask=n_mask, other=0.0)[:, None]
        if ZERO_MODE == 2:  # z, and the float32 zero with exponent bits included for packed codes
            z = tl.load(z_base + s_rows + (k0 // UNIT_K) * stride_sk, mask=n_mask, other=0)[:, None]
            zf = z.to(tl.float32) + zero_bias
        else:
            zf = zero_bias + IMPLICIT_ZERO
        if TMA_W:
            w_tile = tl.reshape(w_desc.load([expert, w_row0, k0 // PACK]), (BLOCK_N, SUB))
        if W_KIND == 1:
            if TMA_W:
                byte = w_tile
            else:
                rb = k0 // PACK + rs
                byte = tl.load(w_base + w_rows[:, None] + rb.to(tl.int64)[None, :] * stride_wk,
                               mask=n_mask[:, None] & (rb < K // PACK)[None, :], other=0)
        if CODES16:
            code = _unpack_rows(byte.to(tl.int16), W_BITS, BLOCK_N, BLOCK_K)
            q16 = (code | bias16).to(X_DTYPE, bitcast=True)
            if ZERO_MODE == 2:
                z16 = (z.to(tl.float32) + bias16_val).to(X_DTYPE)
            else:
                z16 = tl.full((BLOCK_N, 1), bias16_val + IMPLICIT_ZERO, X_DTYPE)
            if UPCAST_DOT:  # the interpreter (its 16-bit arithmetic on bitcast values is wrong)
                part = tl.dot(q16.to(tl.float32) - z16.to(tl.float32), a.to(tl.float32), input_precision="ieee")
            else:
                part = tl.dot(q16 - z16, a)  # integers |q - z| < 128: exact in bf16 / fp16
            acc += part * s
        else:
            if W_KIND == 1:
                if PACK > 1:
                    q = (_unpack_rows(byte.to(tl.int32), W_BITS, BLOCK_N, BLOCK_K) | 0x4B000000).to(
                        tl.float32, bitcast=True)
                else:
                    q = byte.to(tl.float32)
                q = q - zf
            elif TMA_W:  # fp8 or plain values: the stored tile
                q = w_tile
            else:
                q = tl.load(w_base + w_rows[:, None] + kk.to(tl.int64)[None, :] * stride_wk,
                            mask=n_mask[:, None] & k_mask[None, :], other=0.0)
            if W_KIND == 0:  # plain weights in x's dtype: the stored tile is the operand
                b = q
            elif POST_SCALE:  # |q - z| <= 255 and fp8 values are exact in bf16/fp16
                b = q.to(tl.float32).to(X_DTYPE)
            else:
                b = (q.to(tl.float32) * s).to(X_DTYPE)
            if UPCAST_DOT:
                acc = tl.dot(b.to(tl.float32), a.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(b, a, acc)
    if POST_SCALE:
        acc = acc * tl.load(s_base + s_rows, mask=n_mask, other=0.0)[:, None]
    return tl.trans(acc)


@triton.jit
def _gemv_weight_tile(w_base, w_rows, rb, n_mask, k_stored, W_KIND: tl.constexpr):
    """``[BLOCK_N, SUB]`` stored weight values at stored columns ``rb`` (zeros past the end)."""
    w_mask = n_mask[:, None] & (rb < k_stored)[None, :]
    if W_KIND == 1:
        return tl.load(w_base + w_rows[:, None] + rb[None, :], mask=w_mask, other=0)
    return tl.load(w_base + w_rows[:, None] + rb[None, :], mask=w_mask, other=0.0)


@triton.jit
def _gemv_acc(x_ptr, w_ptr, ws_ptr, wz_ptr, expert, xrow, m_mask, rn, n_mask, K,
              stride_xm, stride_xk, stride_we, stride_wn, stride_se, stride_sn, stride_sk,
              W_KIND: tl.constexpr, W_BITS: tl.constexpr, ZERO_MODE: tl.constexpr, IMPLICIT_ZERO: tl.constexpr,
              UNIT_N: tl.constexpr, UNIT_K: tl.constexpr, HAS_SCALE: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PACK: tl.constexpr):
    """The float32 ``[BLOCK_M, BLOCK_N]`` tile of ``x[xrow] @ W[expert][rn]^T`` on the CUDA cores
    (weight-only formats; W's stored columns contiguous, ``stride_wk == 1``; scales constant
    over a K tile). Per K tile, with codes q (the stored values, 0..2^bits-1 or signed int8,
    or float) and the tile's zero z and scale s per output column::

        acc += s * (sum_k x_k q_k - z * sum_k x_k)

    the weight tile goes to float32 once per program, whatever the number of rows."""
    w_base, s_base, z_base, w_rows, s_rows = _expert_operands(w_ptr, ws_ptr, wz_ptr, expert, rn, stride_we,
                                                              stride_wn, stride_se, stride_sn, UNIT_N)
    SUB: tl.constexpr = BLOCK_K // PACK  # stored columns (bytes of packed codes) per K tile
    CODE_MASK: tl.constexpr = (1 << W_BITS) - 1
    HAS_ZERO: tl.constexpr = ZERO_MODE > 0
    K_SCALES: tl.constexpr = UNIT_K < 1 << 30  # scales vary along K (one per K tile)
    rs = tl.arange(0, SUB)
    k_stored = (K + PACK - 1) // PACK
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # the weight stream is double-buffered in registers: tile k+1 is in flight while tile k
    # is multiplied (a plain loop would wait a full memory latency per K tile)
    raw_next = _gemv_weight_tile(w_base, w_rows, rs, n_mask, k_stored, W_KIND)
    for k0 in range(0, K, BLOCK_K):
        raw = raw_next
        raw_next = _gemv_weight_tile(w_base, w_rows, (k0 + BLOCK_K) // PACK + rs, n_mask, k_stored, W_KIND)
        part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        xsum = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for j in tl.static_range(PACK):
            kk = k0 + rs * PACK + j
            xa = tl.load(x_ptr + xrow[:, None] * stride_xm + kk[None, :].to(tl.int64) * stride_xk,
                         mask=m_mask[:, None] & (kk < K)[None, :], other=0.0).to(tl.float32)
            if PACK == 1:
                q = raw.to(tl.float32)
            else:
                q = ((raw >> (j * W_BITS)) & CODE_MASK).to(tl.float32)
            part += tl.sum(xa[:, None, :] * q[None, :, :], 2)
            if HAS_ZERO:
                xsum += tl.sum(xa, 1)
        if HAS_ZERO:
            if ZERO_MODE == 2:
                z = tl.load(z_base + s_rows + (k0 // UNIT_K) * stride_sk, mask=n_mask, other=0).to(tl.float32)
            else:
                z = tl.full((BLOCK_N,), IMPLICIT_ZERO, tl.float32)
            part -= xsum[:, None] * z[None, :]
        if HAS_SCALE and K_SCALES:
            s = tl.load(s_base + s_rows + (k0 // UNIT_K) * stride_sk, mask=n_mask, other=0.0)
            acc += part * s[None, :]
        else:
            acc += part
    if HAS_SCALE and not K_SCALES:
        acc = acc * tl.load(s_base + s_rows, mask=n_mask, other=0.0)[None, :]
    return acc


@triton.jit
def _join8(c0, c1, c2, c3, c4, c5, c6, c7):
    """Eight ``[R, W]`` tensors to ``[R, W, 8]`` (``c_i`` at index i), the new axis in-thread."""
    v = tl.join(tl.join(tl.join(c0, c1), tl.join(c2, c3)), tl.join(tl.join(c4, c5), tl.join(c6, c7)))
    return tl.reshape(tl.permute(v, (0, 1, 4, 3, 2)), (c0.shape[0], c0.shape[1], 8))  # v[.., a, b, c]: 4c+2b+a


@triton.jit
def _fields_in_place(word, W_BITS: tl.constexpr):
    """``[R, WORDS]`` uint32 words to ``[R, WORDS, 32 // W_BITS]`` bit fields left in place: field i
    is ``word & (MASK << W_BITS*i)`` for the low fields that end below bit 23, the rest taken
    from ``word >> 16`` likewise (:func:`_field_scale` gives each field's power of two). One
    LOP3 a code (plus one shift a word), and each field below 2^23: ``| 0x4B000000`` makes it
    the float ``2^23 + field`` exactly."""
    MASK: tl.constexpr = (1 << W_BITS) - 1
    hi = word >> 16
    if W_BITS == 4:  # fields 0-4 in place (bits 0..19), 5-7 from word >> 16 (bits 4..15)
        return _join8(word & MASK, word & (MASK << 4), word & (MASK << 8), word & (MASK << 12),
                      word & (MASK << 16), hi & (MASK << 4), hi & (MASK << 8), hi & (MASK << 12))
    else:  # 2-bit fields 0-10 in place (bits 0..21), 11-15 from word >> 16 (bits 6..15)
        lo = _join8(word & MASK, word & (MASK << 2), word & (MASK << 4), word & (MASK << 6),
                    word & (MASK << 8), word & (MASK << 10), word & (MASK << 12), word & (MASK << 14))
        up = _join8(word & (MASK << 16), word & (MASK << 18), word & (MASK << 20), hi & (MASK << 6),
                    hi & (MASK << 8), hi & (MASK << 10), hi & (MASK << 12), hi & (MASK << 14))
        v = tl.join(lo, up)  # [R, W, 8, 2]: field 8h + i
        return tl.reshape(tl.permute(v, (0, 1, 3, 2)), (word.shape[0], word.shape[1], 16))


@triton.jit
def _field_scale(W_BITS: tl.constexpr):
    """``[32 // W_BITS]`` float32: field i of :func:`_fields_in_place` is code i times this."""
    CPW: tl.constexpr = 32 // W_BITS
    LOW: tl.constexpr = 5 if W_BITS == 4 else 11  # fields kept in place
    i = tl.arange(0, CPW)
    pos = tl.where(i < LOW, i * W_BITS, i * W_BITS - 16)
    return tl.exp2(pos.to(tl.float32))


@triton.jit
def _split8(t):
    """``[A, B, C, 8]`` (last axis in-thread) to its eight ``[A, B, C]`` slices, in index order."""
    shp: tl.constexpr = t.shape
    v = tl.reshape(t, (shp[0], shp[1], shp[2], 2, 2, 2))
    c0, c1 = tl.split(v)  # last axis: index bit 0
    c00, c01 = tl.split(c0)  # bit 1
    c10, c11 = tl.split(c1)
    t0, t4 = tl.split(c00)  # bit 2
    t2, t6 = tl.split(c01)
    t1, t5 = tl.split(c10)
    t3, t7 = tl.split(c11)
    return t0, t1, t2, t3, t4, t5, t6, t7


@triton.jit
def _dot8(q, x, acc):
    """``acc + sum_i q[..., i] * x[..., i]`` (``x`` broadcast against ``q``, both 4-D ending in
    an axis of 8) as one multiply-add chain: a tree reduction takes a multiply and an add for half
    the products."""
    q0, q1, q2, q3, q4, q5, q6, q7 = _split8(q)
    x0, x1, x2, x3, x4, x5, x6, x7 = _split8(x)
    acc += q0 * x0
    acc += q1 * x1
    acc += q2 * x2
    acc += q3 * x3
    acc += q4 * x4
    acc += q5 * x5
    acc += q6 * x6
    acc += q7 * x7
    return acc


@triton.jit
def _gemv_words(words, w_rows32, row_ok, wn, k_words):
    """``[D0, BLOCK_N, WORDS]`` 32-bit words of packed codes: rows at word offsets ``w_rows32``
    (``[D0 or 1, BLOCK_N]``, masked by ``row_ok``), word columns ``wn`` (``[D0 or 1, WORDS]``;
    zeros past the row)."""
    return tl.load(words + w_rows32[:, :, None] + wn[:, None, :],
                   mask=row_ok[:, :, None] & (wn < k_words)[:, None, :], other=0)


@triton.jit
def _gemv_packed_acc(x_ptr, w_ptr, ws_ptr, wz_ptr, expert, xrow, m_mask, rn, n_mask, K,
                     stride_xm, stride_xk, stride_we, stride_wn, stride_se, stride_sn, stride_sk,
                     W_BITS: tl.constexpr, ZERO_MODE: tl.constexpr, IMPLICIT_ZERO: tl.constexpr,
                     UNIT_N: tl.constexpr, UNIT_K: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREFETCH: tl.constexpr,
                     KSPLIT: tl.constexpr, SLOTS: tl.constexpr):
    """:func:`_gemv_acc` for packed integer codes (int4/int2), read as 32-bit words, on the CUDA
    cores: float32 ``[D0, BLOCK_N]`` partial sums of ``x[xrow] @ W[expert][rn]^T``, their sum
    over the first axis the tile. ``SLOTS == 0``: one row (``xrow``, ``m_mask`` of shape
    ``[1]``, ``expert`` a scalar) and ``D0 = KSPLIT`` K tiles side by side a loop step, each
    entry of the first axis the sum over its K tiles. ``SLOTS > 0`` (``KSPLIT == 1``): ``D0 =
    SLOTS`` rows of possibly different experts side by side (``expert``, ``xrow``, ``m_mask``
    of shape ``[SLOTS]``; masked slots read nothing and give 0), entry s row s's products.
    Needs W's stored rows and expert blocks 4-byte aligned, ``K`` a multiple of ``32 // W_BITS``
    and the scale constant over the K tile. Word w of a row holds codes ``CPW*w + i`` at bits
    ``W_BITS*i`` (low bits first). Each code stays in place (:func:`_fields_in_place`):
    ``field | 0x4B000000`` is the float ``2^23 + f_i q`` (``f_i`` a power of two,
    :func:`_field_scale`), so ``f_i (q - z)`` is one LOP3 and one exact FADD, and x is
    multiplied by ``1 / f_i`` (exact) once per K tile for all rows of the tile. Per K tile and
    output element ``acc += s * sum_k (q_k - z) x_k``, the K sum an FMA chain per word for int4
    (:func:`_dot8`): the sums of the tensor-core decode tile, without the MMA's 16-row padding
    and operand shuffles. ``PREFETCH``: the weight words are loaded ``PREFETCH - 1`` K tiles
    ahead (1: not ahead)."""
    tl.static_assert((SLOTS == 0) | (KSPLIT == 1), "slots side by side take one K tile a step")
    CPW: tl.constexpr = 32 // W_BITS  # codes per 32-bit word
    WORDS: tl.constexpr = BLOCK_K // CPW  # words of a row per K tile
    STEP: tl.constexpr = KSPLIT * BLOCK_K  # K columns a loop iteration (KSPLIT tiles side by side)
    D0: tl.constexpr = SLOTS if SLOTS else KSPLIT
    words = w_ptr.to(tl.pointer_type(tl.uint32))
    rn64 = rn.to(tl.int64)
    e64 = expert.to(tl.int64)
    if SLOTS:  # [SLOTS, BLOCK_N] rows of each slot's expert
        w_rows = e64[:, None] * stride_we + rn64[None, :] * stride_wn
        s_rows = e64[:, None] * stride_se + (rn64 // UNIT_N)[None, :] * stride_sn
        row_ok = m_mask[:, None] & n_mask[None, :]
        tile_words = tl.arange(0, WORDS)[None, :]  # [1, WORDS]: every slot at the same K
        tile_k = tl.arange(0, BLOCK_K)[None, :]
        k_first = tl.zeros((1,), dtype=tl.int32)  # [1]: the first K column of each entry, minus k0
    else:  # [1, BLOCK_N] rows of the expert, [KSPLIT, WORDS] word columns
        w_rows = e64 * stride_we + rn64[None, :] * stride_wn
        s_rows = e64 * stride_se + (rn64 // UNIT_N)[None, :] * stride_sn
        row_ok = n_mask[None, :]
        rs = tl.arange(0, KSPLIT)
        tile_words = rs[:, None] * WORDS + tl.arange(0, WORDS)[None, :]
        tile_k = rs[:, None] * BLOCK_K + tl.arange(0, BLOCK_K)[None, :]  # [KSPLIT, BLOCK_K]
        k_first = rs * BLOCK_K
        tl.static_assert(BLOCK_M == 1, "the packed gemv tile takes one row")
    w_rows32 = w_rows // 4
    k_words = K // CPW
    # field i is code i times f_i (a power of two): (2^23 + f_i q) - (2^23 + f_i z) = f_i (q - z)
    # exactly, and x is multiplied by 1 / f_i (exact) once per K tile for all rows
    f = _field_scale(W_BITS)
    inv_f = (1.0 / f)[None, None, :]
    if ZERO_MODE != 2:
        zf_const = (8388608.0 + IMPLICIT_ZERO * f)[None, None, None, :]
    # 0x4B000000 in a register (an expert id >> 31 is 0, which the compiler cannot fold: unlike
    # the program id's, a loaded value's range is unknown to it): the field masks are then the
    # LOP3s' immediates, not registers rematerialized per mask and K tile
    magic = (tl.max(expert, 0) if SLOTS else expert).to(tl.uint32) >> 31 | 0x4B000000
    acc = tl.zeros((D0, BLOCK_N, WORDS), dtype=tl.float32)
    # the weight stream prefetched PREFETCH - 1 iterations ahead in registers (Triton's
    # pipeliner does not stage loads that feed no dot)
    if PREFETCH >= 2:
        w_a = _gemv_words(words, w_rows32, row_ok, tile_words, k_words)
    if PREFETCH >= 3:
        w_b = _gemv_words(words, w_rows32, row_ok, STEP // CPW + tile_words, k_words)
    for k0 in range(0, K, STEP):
        if PREFETCH >= 3:
            word = w_a
            w_a = w_b
            w_b = _gemv_words(words, w_rows32, row_ok, (k0 + 2 * STEP) // CPW + tile_words, k_words)
        elif PREFETCH == 2:
            word = w_a
            w_a = _gemv_words(words, w_rows32, row_ok, (k0 + STEP) // CPW + tile_words, k_words)
        else:
            word = _gemv_words(words, w_rows32, row_ok, k0 // CPW + tile_words, k_words)
        kk = k0 + tile_k
        xa = tl.load(x_ptr + xrow[:, None] * stride_xm + kk.to(tl.int64) * stride_xk,
                     mask=m_mask[:, None] & (kk < K), other=0.0).to(tl.float32)
        xa = tl.reshape(xa, (D0, 1, WORDS, CPW)) * inv_f[None, :, :, :]
        # each K tile's scale (and zero) per row; tiles past K read nothing (their x is 0)
        g_off = ((k0 + k_first) // UNIT_K) * stride_sk
        g_ok = (k0 + k_first < K)[:, None] & row_ok
        if ZERO_MODE == 2:
            z = tl.load(wz_ptr + s_rows + g_off[:, None], mask=g_ok, other=0).to(tl.float32)
            zf = 8388608.0 + z[:, :, None, None] * f[None, None, None, :]
        else:
            zf = zf_const
        sc = tl.load(ws_ptr + s_rows + g_off[:, None], mask=g_ok, other=0.0)
        fields = _fields_in_place(tl.reshape(word, (D0 * BLOCK_N, WORDS)), W_BITS)
        q = tl.reshape(fields | magic, (D0, BLOCK_N, WORDS, CPW)).to(tl.float32, bitcast=True) - zf
        if CPW == 8:
            part = _dot8(q, xa, tl.zeros((D0, BLOCK_N, WORDS), dtype=tl.float32))
        else:
            part = tl.sum(q * xa, 3)  # [D0, BLOCK_N, WORDS]
        acc += part * sc[:, :, None]
    return tl.sum(acc, 2)


@triton.jit
def _gemv16_slots_acc(x_ptr, w_ptr, expert, xrow, s_ok, rn, n_mask, K, stride_xm, stride_xk, stride_we, stride_wn,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREFETCH: tl.constexpr, SLOTS: tl.constexpr):
    """float32 ``[SLOTS, BLOCK_N]``: entry (s, n) is ``x[xrow[s]] . W[expert[s]][rn[n]]`` for
    16-bit weights whose K stride is 1, on the CUDA cores (the combine's slots side by side,
    each from its own expert; masked slots read nothing and give 0). Products accumulate
    elementwise over the K tiles and are summed along K once at the end. ``PREFETCH`` 2: the
    weight tile is loaded one K tile ahead in registers (1: not ahead)."""
    rk = tl.arange(0, BLOCK_K)
    w_rows = expert.to(tl.int64)[:, None] * stride_we + rn.to(tl.int64)[None, :] * stride_wn  # [SLOTS, BLOCK_N]
    row_ok = s_ok[:, None] & n_mask[None, :]
    acc = tl.zeros((SLOTS, BLOCK_N, BLOCK_K), dtype=tl.float32)
    if PREFETCH >= 2:
        w_next = tl.load(w_ptr + w_rows[:, :, None] + rk[None, None, :],
                         mask=row_ok[:, :, None] & (rk < K)[None, None, :], other=0.0)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        if PREFETCH >= 2:
            w = w_next
            kn = kk + BLOCK_K
            w_next = tl.load(w_ptr + w_rows[:, :, None] + kn[None, None, :],
                             mask=row_ok[:, :, None] & (kn < K)[None, None, :], other=0.0)
        else:
            w = tl.load(w_ptr + w_rows[:, :, None] + kk[None, None, :],
                        mask=row_ok[:, :, None] & (kk < K)[None, None, :], other=0.0)
        xa = tl.load(x_ptr + xrow[:, None] * stride_xm + kk.to(tl.int64)[None, :] * stride_xk,
                     mask=s_ok[:, None] & (kk < K)[None, :], other=0.0).to(tl.float32)
        acc += w.to(tl.float32) * xa[:, None, :]
    return tl.sum(acc, 2)


@triton.jit
def _combine_program(x_ptr, w_ptr, ws_ptr, wz_ptr, y_ptr, offs_ptr, rw_ptr, slot_ptr, N, K,
                     stride_xm, stride_xk, stride_we, stride_wn, stride_se, stride_sn, stride_sk,
                     stride_ym, stride_yn, E: tl.constexpr, E_POW2: tl.constexpr,
                     W_KIND: tl.constexpr, W_BITS: tl.constexpr, ZERO_MODE: tl.constexpr,
                     IMPLICIT_ZERO: tl.constexpr, UNIT_N: tl.constexpr, UNIT_K: tl.constexpr, PACK: tl.constexpr,
                     GEMV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     PREFETCH: tl.constexpr, KSPLIT: tl.constexpr, ACT: tl.constexpr, SWIGLU: tl.constexpr,
                     TOP_K: tl.constexpr, TOP_K_POW2: tl.constexpr):
    """One program of the token-major down launch (``COMBINE``; 16-bit weights, or packed
    int4/int2 codes): output columns ``pid % cdiv(N, BLOCK_N)`` of token ``t = pid //
    cdiv(N, BLOCK_N)``, ``y[t] = sum_j rw[s] * x[p] @ W[e]^T`` over the token's slots ``s = t
    * TOP_K + j``, ``p = slot[s]`` the slot's row of x (expert-sorted), ``e`` the expert
    holding row p (the number of ``offs`` entries at or below p; rows at or past ``offs[-1]``
    add nothing). The slots run side by side (:func:`_gemv_packed_acc` with ``SLOTS``, or
    :func:`_gemv16_slots_acc`), summed in a fixed order: deterministic, and the ``[T * top_k,
    N]`` rows never go to memory."""
    tl.static_assert(GEMV and (((W_KIND == 1) and (PACK > 1)) or (W_KIND == 0)) and (ACT == 0) and (not SWIGLU)
                     and (KSPLIT == 1),
                     "COMBINE: 16-bit weights or packed int4/int2 weight-only codes on the gemv tile, "
                     "one K tile a step")
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    t = pid // num_n
    rn = (pid % num_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < N
    j = tl.arange(0, TOP_K_POW2)
    s = t * TOP_K + j
    s_ok = j < TOP_K
    p = tl.load(slot_ptr + s, mask=s_ok, other=0)
    ex = tl.arange(0, E_POW2)
    ends = tl.load(offs_ptr + ex, mask=ex < E, other=0x7FFFFFFF)
    expert = tl.sum((ends[None, :] <= p[:, None]).to(tl.int32), 1)
    s_ok = s_ok & (expert < E)
    expert = tl.where(s_ok, expert, 0)
    if W_KIND == 0:
        part = _gemv16_slots_acc(x_ptr, w_ptr, expert, p.to(tl.int64), s_ok, rn, n_mask, K, stride_xm, stride_xk,
                                 stride_we, stride_wn, BLOCK_N, BLOCK_K, PREFETCH, TOP_K_POW2)
    else:
        part = _gemv_packed_acc(x_ptr, w_ptr, ws_ptr, wz_ptr, expert, p.to(tl.int64), s_ok, rn, n_mask, K,
                                stride_xm, stride_xk, stride_we, stride_wn, stride_se, stride_sn, stride_sk,
                                W_BITS, ZERO_MODE, IMPLICIT_ZERO, UNIT_N, UNIT_K, BLOCK_M, BLOCK_N, BLOCK_K,
                                PREFETCH, 1, TOP_K_POW2)
    rw = tl.load(rw_ptr + s, mask=s_ok, other=0.0)
    out = tl.sum(part * rw[:, None], 0)
    tl.store(y_ptr + t.to(tl.int64) * stride_ym + rn.to(tl.int64) * stride_yn, out.to(y_ptr.dtype.element_ty),
             mask=n_mask)
