"""Triton quantization of the FP8 recipes' wgrad operands, in the layout the wgrad kernel reads.

Input ``t`` ``[M, C]`` (rows sorted by expert, 16/32-bit). Output: float8 e4m3 codes ``q_t``
``[C, P]`` (token dim contiguous: the wgrad GEMM's reduction dim, which fp8 tensor-core
operands want contiguous) in the *padded token-block layout*, and float32 scales.

Padded token-block layout: rows are cut into blocks of ``BLOCK`` (128) rows from each expert's
first row (an expert's last block may be short; blocks never cross an expert boundary),
numbered expert by expert as :func:`moe_ops.recipes.token_blocks` numbers them. Block ``b``
occupies columns ``[b * BLOCK, (b + 1) * BLOCK)`` of ``q_t``; a short block's missing rows are
zero codes. So every block starts 128-column aligned and the wgrad GEMM reads whole blocks,
unmasked. The kernel writes the codes four tokens a 32-bit word (:mod:`.fp8_packing`).
``P = (cdiv(M, BLOCK) + E) * BLOCK`` bounds the used blocks; columns of unused blocks and rows
at or past ``offs[-1]`` are never written nor read.

Scales (s = absmax / 448 over the unit's rows, per column; an all-zero unit gets s = 0, codes 0):
``per_expert=False`` (``fp8_blockwise``) ``[cdiv(M, BLOCK) + E, C]`` per (block, column),
one program per (block, column tile); ``per_expert=True`` (``fp8_rowwise``) ``[E, C]`` per
(expert, column) over all of the expert's rows, one program per (expert, column tile), two
passes over the expert's rows. Same math as :func:`moe_ops.recipes.quantize_token_blocks`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from moe_ops import formats

from .fp8_packing import load_quads, load_quads_stored, pack_codes, quads_abs, word_offsets
from .grouped_gemm import _expert_of_tile, _expert_tiles, _locate_tile, _tiles_of_expert
from .host_math import cdiv, next_power_of_2
from .scale_division import SIXTEEN_BIT, fp8_e4m3_codes
from .launch import persistent_programs

BLOCK = formats.BLOCK


@triton.jit
def _block_words(v0, v1, v2, v3, safe, RCP: tl.constexpr):
    """The codes of a block's rows, given as the four parts of :func:`.fp8_packing.load_quads`
    (zeros in missing rows), four rows a word (:func:`.fp8_packing.pack_codes`)."""
    s = safe[None, :]
    return pack_codes(fp8_e4m3_codes(v0, s, RCP), fp8_e4m3_codes(v1, s, RCP), fp8_e4m3_codes(v2, s, RCP),
                      fp8_e4m3_codes(v3, s, RCP))


@triton.jit
def _block_scale_words(v0, v1, v2, v3, amax_ptr, expert, cols, c_mask, stride_ae, EXPERT_AMAX: tl.constexpr,
                       RCP: tl.constexpr):
    """``(scale [BLOCK_C], words)`` of one token block: the four parts of
    :func:`.fp8_packing.load_quads` in their stored dtype, scaled by their own column absmax
    (``fp8_blockwise``), or with ``EXPERT_AMAX`` by their expert's (``amax_ptr``, float32 bits
    as int32, row ``expert``: :func:`token_block_amax_kernel`)."""
    v0, v1, v2, v3 = v0.to(tl.float32), v1.to(tl.float32), v2.to(tl.float32), v3.to(tl.float32)
    if EXPERT_AMAX:
        amax = tl.load(amax_ptr + expert.to(tl.int64) * stride_ae + cols, mask=c_mask, other=0)
        scale = tl.math.div_rn(amax.to(tl.float32, bitcast=True), 448.0)
    else:
        scale = tl.math.div_rn(tl.max(quads_abs(v0, v1, v2, v3), 0), 448.0)
    return scale, _block_words(v0, v1, v2, v3, tl.where(scale > 0, scale, 1.0), RCP)


@triton.jit
def token_block_amax_kernel(t_ptr, amax_ptr, offs_ptr, C, stride_tm, stride_ae, E: tl.constexpr,
                            E_POW2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per (column tile, token block) program (grid ``(cdiv(C, BLOCK_C), blocks)``): the column
    absmax of the block's rows, max-ed into its expert's row of ``amax_ptr`` (``[E, C]`` float32
    bits as int32, zeroed before; nonnegative floats order as their bits do, so the result is
    the exact maximum whatever the order)."""
    pid = tl.program_id(1)
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = cols < C
    e_idx = tl.arange(0, E_POW2)
    ends = tl.load(offs_ptr + e_idx, mask=e_idx < E, other=0)
    prev = tl.load(offs_ptr + e_idx - 1, mask=(e_idx < E) & (e_idx > 0), other=0)
    expert, row0, end, total, _last = _expert_of_tile(prev, ends, pid, E, E_POW2, BLOCK_M)
    if pid < total:
        rm = row0 + tl.arange(0, BLOCK_M)
        v = tl.load(t_ptr + rm.to(tl.int64)[:, None] * stride_tm + cols[None, :],
                    mask=(rm < end)[:, None] & c_mask[None, :], other=0.0)
        amax = tl.max(tl.abs(v.to(tl.float32)), 0)
        tl.atomic_max(amax_ptr + expert.to(tl.int64) * stride_ae + cols, amax.to(tl.int32, bitcast=True),
                      mask=c_mask, sem="relaxed")


@triton.jit
def _block_unit(u, units, n_cols, idx, ntiles, cum, prev, ends, C, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """``(block, expert, first row, end row, columns)`` of unit ``u`` of the persistent grid (units
    numbered block by block, a block's column tiles consecutive); past the ``units`` used the end
    row is 0, so that its loads read nothing."""
    b = u // n_cols
    expert, row0, end = _locate_tile(b, idx, ntiles, cum, prev, ends, BLOCK_M)
    return b, expert, row0, tl.where(u < units, end, 0), (u % n_cols) * BLOCK_C + tl.arange(0, BLOCK_C)


@triton.jit
def token_block_quant_kernel(t_ptr, q_ptr, s_ptr, offs_ptr, C, stride_tm, stride_qc, stride_sb,
                             E: tl.constexpr, E_POW2: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_C: tl.constexpr, PER_EXPERT: tl.constexpr, COLS_FAST: tl.constexpr,
                             RCP: tl.constexpr, STEP_BLOCKS: tl.constexpr, PREFETCH: tl.constexpr,
                             PERSISTENT: tl.constexpr, amax_ptr, stride_ae, EXPERT_AMAX: tl.constexpr):
    """``STEP_BLOCKS`` (per expert): token blocks a loop step in the first pass over the expert's
    rows (and the second without ``PREFETCH``; their loads issued together: fewer dependent
    round trips for a large expert). ``PREFETCH``: the next block's rows (per expert, second
    pass) or the next unit's (``PERSISTENT``) are loaded before the current one's codes are
    computed and stored. ``PERSISTENT`` (per block): a 1-D grid of any size whose programs walk
    the used (block, column tile) units, ``tl.num_programs(0)`` apart. ``EXPERT_AMAX`` (per
    expert): the per-block grid (or ``PERSISTENT``), each block scaled by its expert's absmax
    from ``amax_ptr`` (:func:`token_block_amax_kernel`, run before); expert ``e``'s scale row is
    written by the programs of block ``e``'s units, used or not (blocks >= E >= experts)."""
    BLOCK_GRID: tl.constexpr = PERSISTENT or not PER_EXPERT or EXPERT_AMAX  # programs walk block units
    QUADS: tl.constexpr = BLOCK_M // 4  # the codes of 4 tokens a word (fp8_packing)
    q32 = q_ptr.to(tl.pointer_type(tl.uint32))
    e_idx = tl.arange(0, E_POW2)  # offs as values (see _expert_tiles)
    ends = tl.load(offs_ptr + e_idx, mask=e_idx < E, other=0)
    prev = tl.load(offs_ptr + e_idx - 1, mask=(e_idx < E) & (e_idx > 0), other=0)
    tl.static_assert(not PER_EXPERT or EXPERT_AMAX or not PERSISTENT, "the persistent grid walks token blocks")
    if PERSISTENT:  # per block, program pid takes units pid, pid + programs, ...
        idx, ntiles = _expert_tiles(prev, ends, E, E_POW2, BLOCK_M)
        cum = tl.cumsum(ntiles, 0)
        n_cols = tl.cdiv(C, BLOCK_C)
        units = tl.sum(ntiles, 0) * n_cols
        step = tl.num_programs(0)
        if EXPERT_AMAX:  # every expert's scale row, empty experts' (0) included
            for u in range(tl.program_id(0), E * n_cols, step):
                sc = (u % n_cols) * BLOCK_C + tl.arange(0, BLOCK_C)
                am = tl.load(amax_ptr + (u // n_cols).to(tl.int64) * stride_ae + sc, mask=sc < C, other=0)
                tl.store(s_ptr + (u // n_cols).to(tl.int64) * stride_sb + sc,
                         tl.math.div_rn(am.to(tl.float32, bitcast=True), 448.0), mask=sc < C)
        if PREFETCH:
            b, e, row0, end, cols = _block_unit(tl.program_id(0), units, n_cols, idx, ntiles, cum, prev, ends, C,
                                             BLOCK_M, BLOCK_C)
            r0, r1, r2, r3 = load_quads_stored(t_ptr, row0, end, cols, cols < C, stride_tm, 1, QUADS)
        for u in range(tl.program_id(0), units, step):
            if PREFETCH:  # the next unit's loads issued before this one's stores
                nb, ne, nrow0, nend, ncols = _block_unit(u + step, units, n_cols, idx, ntiles, cum, prev, ends, C,
                                                     BLOCK_M, BLOCK_C)
                n0, n1, n2, n3 = load_quads_stored(t_ptr, nrow0, nend, ncols, ncols < C, stride_tm, 1, QUADS)
            else:
                b, e, row0, end, cols = _block_unit(u, units, n_cols, idx, ntiles, cum, prev, ends, C, BLOCK_M, BLOCK_C)
                r0, r1, r2, r3 = load_quads_stored(t_ptr, row0, end, cols, cols < C, stride_tm, 1, QUADS)
            c_mask = cols < C
            scale, words = _block_scale_words(r0, r1, r2, r3, amax_ptr, e, cols, c_mask, stride_ae, EXPERT_AMAX, RCP)
            if not EXPERT_AMAX:
                tl.store(s_ptr + b.to(tl.int64) * stride_sb + cols, scale, mask=c_mask)
            off, ok = word_offsets(b * QUADS, (b + 1) * QUADS, cols, c_mask, stride_qc, QUADS)
            tl.store(q32 + off, words, mask=ok)
            if PREFETCH:
                b, e, cols, r0, r1, r2, r3 = nb, ne, ncols, n0, n1, n2, n3
        return
    pid = tl.program_id(1 if COLS_FAST else 0)  # the unit: token block, or expert
    pid_c = tl.program_id(0 if COLS_FAST else 1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = cols < C
    if not BLOCK_GRID:  # program pid = expert
        start, end, first, count = _tiles_of_expert(prev, ends, pid, E, E_POW2, BLOCK_M)
        amax = tl.zeros((BLOCK_C,), dtype=tl.float32)
        rs = tl.arange(0, STEP_BLOCKS * BLOCK_M)
        for j in range(0, count, STEP_BLOCKS):
            rm = start + j * BLOCK_M + rs
            v = tl.load(t_ptr + rm.to(tl.int64)[:, None] * stride_tm + cols[None, :],
                        mask=(rm < end)[:, None] & c_mask[None, :], other=0.0)
            amax = tl.maximum(amax, tl.max(tl.abs(v.to(tl.float32)), 0))
        if PREFETCH:  # the second pass's first block, loaded before the scales are known
            r0, r1, r2, r3 = load_quads_stored(t_ptr, start, end, cols, c_mask, stride_tm, 1, QUADS)
        scale = tl.math.div_rn(amax, 448.0)
        tl.store(s_ptr + pid.to(tl.int64) * stride_sb + cols, scale, mask=c_mask)
        safe = tl.where(scale > 0, scale, 1.0)
        if PREFETCH:  # one block a step, the next block's loads issued before this one's stores
            for j in range(0, count):
                n0, n1, n2, n3 = load_quads_stored(t_ptr, start + (j + 1) * BLOCK_M, end, cols, c_mask, stride_tm,
                                                   1, QUADS)
                off, ok = word_offsets((first + j) * QUADS, (first + j + 1) * QUADS, cols, c_mask, stride_qc, QUADS)
                tl.store(q32 + off, _block_words(r0.to(tl.float32), r1.to(tl.float32), r2.to(tl.float32),
                                                 r3.to(tl.float32), safe, RCP), mask=ok)
                r0, r1, r2, r3 = n0, n1, n2, n3
        else:
            for j0 in range(0, count, STEP_BLOCKS):
                for i in tl.static_range(STEP_BLOCKS):
                    j = j0 + i  # blocks past the expert's (j >= count) read and write nothing
                    v0, v1, v2, v3 = load_quads(t_ptr, start + j * BLOCK_M, end, cols, c_mask, stride_tm, 1, QUADS)
                    word_end = tl.where(j < count, (first + j + 1) * QUADS, 0)
                    off, ok = word_offsets((first + j) * QUADS, word_end, cols, c_mask, stride_qc, QUADS)
                    tl.store(q32 + off, _block_words(v0, v1, v2, v3, safe, RCP), mask=ok)
    else:  # program pid = token block
        e, row0, end, total, _last = _expert_of_tile(prev, ends, pid, E, E_POW2, BLOCK_M)
        if EXPERT_AMAX and pid < E:  # every expert's scale row, empty experts' (0) included
            am = tl.load(amax_ptr + pid.to(tl.int64) * stride_ae + cols, mask=c_mask, other=0)
            tl.store(s_ptr + pid.to(tl.int64) * stride_sb + cols, tl.math.div_rn(am.to(tl.float32, bitcast=True), 448.0),
                     mask=c_mask)
        if pid < total:
            v0, v1, v2, v3 = load_quads_stored(t_ptr, row0, end, cols, c_mask, stride_tm, 1, QUADS)
            scale, words = _block_scale_words(v0, v1, v2, v3, amax_ptr, e, cols, c_mask, stride_ae, EXPERT_AMAX, RCP)
            if not EXPERT_AMAX:
                tl.store(s_ptr + pid.to(tl.int64) * stride_sb + cols, scale, mask=c_mask)
            off, ok = word_offsets(pid * QUADS, (pid + 1) * QUADS, cols, c_mask, stride_qc, QUADS)
            tl.store(q32 + off, words, mask=ok)


def padded_blocks(M: int, E: int) -> int:
    """Static upper bound on the token blocks of ``M`` rows over ``E`` experts."""
    return cdiv(M, BLOCK) + E


def token_block_quant(t: torch.Tensor, offs: torch.Tensor, per_expert: bool, config=None):
    """``(q_t [C, P] float8_e4m3fn, scale float32)`` of ``t`` ``[M, C]`` in the padded
    token-block layout (module docstring); scale ``[E, C]`` if ``per_expert`` else
    ``[cdiv(M, 128) + E, C]``. ``config``: ``(BLOCK_C, num_warps[, cols_fast[, step_blocks[,
    prefetch[, programs_per_sm[, expert_amax]]]]])``: ``cols_fast`` makes the column tiles the
    grid's first axis (one unit's column tiles launch together, reading whole rows);
    ``step_blocks`` (per expert, one program an expert): token blocks a loop step; ``prefetch``:
    the next block's (one program an expert) or unit's (persistent grid) loads issued before the
    current one's stores; ``programs_per_sm``: a persistent grid of that many programs per
    multiprocessor walking the (block, column tile) units (0: a program per unit);
    ``expert_amax`` (per expert): two launches, each expert's column absmax first
    (:func:`token_block_amax_kernel`), then the codes a program per block unit as for
    ``per_expert=False``, instead of one program per expert and column tile."""
    M, C = t.shape
    E = offs.shape[0]
    nb = padded_blocks(M, E)
    q = torch.empty(C, nb * BLOCK, dtype=torch.float8_e4m3fn, device=t.device)
    s = torch.empty(E if per_expert else nb, C, dtype=torch.float32, device=t.device)
    if M == 0 or C == 0 or E == 0:
        return q, s.zero_()
    tc = t if t.stride(1) == 1 else t.contiguous()
    # tune_recipes.py on an H100, CUDA-graph timed, x of the three training shapes, with the
    # reciprocal division: (64, 4, column tiles first) best or within 3% but at Qwen3 down per
    # expert (0.100 against 0.087 ms); summed over the six cases 1.18 ms against 1.27 for (16, 2)
    # and 1.66 for session 12's (32, 4) in expert order with div_rn. More column steps per
    # program were slower (each step's load waits for the previous step's store; NOTES.md).
    # Per expert, token blocks loaded a loop step together (tune_recipes.py --only
    # cast_x_token_blocks_expert, results/tune_token_blocks_steps_s17_h100.*): Qwen3-30B-A3B
    # down (C 768) 0.103 -> 0.075 ms with (16, 4, True, 4), gate_up (C 2048) 0.157 -> 0.149 with
    # (64, 4, True, 2), DeepSeek-V3 E=32 (C 7168) 0.428 -> 0.427
    if config is None and per_expert:
        config = (16, 4, True, 4) if C < 2048 else (64, 4, True, 2)
    bc, warps, *rest = config or (64, 4, True)
    cols_fast, step, prefetch, per_sm, expert_amax = tuple(rest) + (False, 1, False, 0, False)[len(rest):]
    if step < 1 or step & (step - 1):
        raise ValueError(f"token_block_quant: config's step_blocks must be a power of two, got {step}")
    if expert_amax and not per_expert:
        raise ValueError("token_block_quant: config's expert_amax is for per_expert=True")
    block_grid = expert_amax or not per_expert  # programs walk (block, column tile) units
    if per_sm and not block_grid:
        raise ValueError("token_block_quant: config's programs_per_sm (a persistent grid over token blocks) needs "
                         "per_expert=False or expert_amax")
    if prefetch and block_grid and not per_sm:
        raise ValueError("token_block_quant: config's prefetch needs programs_per_sm > 0 over token blocks "
                         "(a program per unit has no next unit)")
    # every argument passed (Inductor's write analysis of the launch needs them all); without the
    # expert absmax, offs stands in for the amax tensor the kernel then does not read
    meta = dict(E=E, E_POW2=next_power_of_2(E), BLOCK_M=BLOCK, BLOCK_C=bc, PER_EXPERT=per_expert,
                RCP=tc.dtype in SIXTEEN_BIT, STEP_BLOCKS=step, PREFETCH=bool(prefetch), PERSISTENT=False,
                amax_ptr=offs, stride_ae=0, EXPERT_AMAX=False, num_warps=warps)
    if expert_amax:
        amax = torch.zeros(E, C, dtype=torch.int32, device=t.device)  # float32 bits; 0.0 is 0
        wrap_triton(token_block_amax_kernel)[(cdiv(C, bc), nb)](
            tc, amax, offs, C, tc.stride(0), amax.stride(0), E=E, E_POW2=next_power_of_2(E), BLOCK_M=BLOCK,
            BLOCK_C=bc, num_warps=warps)
        meta.update(amax_ptr=amax, stride_ae=amax.stride(0), EXPERT_AMAX=True)
    programs = persistent_programs(t.device, per_sm) if block_grid else 0
    if programs:
        grid = (min(programs, nb * cdiv(C, bc)),)
        meta.update(COLS_FAST=True, PERSISTENT=True)
    else:
        units = nb if block_grid else E
        cols_fast = bool(cols_fast) and units < 65536  # the grid's second axis holds at most 65535
        grid = (cdiv(C, bc), units) if cols_fast else (units, cdiv(C, bc))
        meta.update(COLS_FAST=cols_fast)
    wrap_triton(token_block_quant_kernel)[grid](tc, q, s, offs, C, tc.stride(0), q.stride(0), s.stride(0), **meta)
    return q, s


def padded_columns(offs: torch.Tensor, M: int) -> torch.Tensor:
    """Column of ``q_t`` holding each row ``[M]`` int64 (``-1`` for rows at or past ``offs[-1]``):
    the layout's definition, for tests and debugging."""
    from moe_ops import recipes
    blk, _ = recipes.token_blocks(offs, M, BLOCK)
    rows = torch.arange(M, device=offs.device)
    offs64 = offs.to(torch.int64)
    starts = torch.cat([offs64.new_zeros(1), offs64[:-1]])
    eid = torch.searchsorted(offs64, rows, right=True)
    inside = eid < offs.shape[0]
    pos = (rows - starts[eid.clamp(max=offs.shape[0] - 1)]) % BLOCK
    return torch.where(inside, blk * BLOCK + pos, torch.full_like(rows, -1))
