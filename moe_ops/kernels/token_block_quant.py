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
one program per (block, ``STEP_BLOCKS`` column tiles); ``per_expert=True`` (``fp8_rowwise``) ``[E, C]`` per
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
from .grouped_gemm import _expert_of_rank, _expert_of_tile, _tiles_of_expert
from .host_math import cdiv, next_power_of_2
from .scale_division import SIXTEEN_BIT, absmax_scale, fp8_e4m3_codes

BLOCK = formats.BLOCK


@triton.jit
def _block_words(v0, v1, v2, v3, safe, RCP: tl.constexpr):
    """The codes of a block's rows, given as the four parts of :func:`.fp8_packing.load_quads`
    (zeros in missing rows), four rows a word (:func:`.fp8_packing.pack_codes`)."""
    s = safe[None, :]
    return pack_codes(fp8_e4m3_codes(v0, s, RCP), fp8_e4m3_codes(v1, s, RCP), fp8_e4m3_codes(v2, s, RCP),
                      fp8_e4m3_codes(v3, s, RCP))


@triton.jit
def token_block_quant_kernel(t_ptr, q_ptr, s_ptr, offs_ptr, C, stride_tm, stride_qc, stride_sb,
                             E: tl.constexpr, E_POW2: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_C: tl.constexpr, PER_EXPERT: tl.constexpr, COLS_FAST: tl.constexpr,
                             RCP: tl.constexpr, STEP_BLOCKS: tl.constexpr, PREFETCH: tl.constexpr,
                             LARGEST_FIRST: tl.constexpr = False, WIDE_KEYS: tl.constexpr = True):
    """Per expert: ``STEP_BLOCKS`` token blocks a loop step in the first pass over the expert's
    rows, and in the second without ``PREFETCH`` (their loads issued together: fewer dependent
    round trips for a large expert); ``PREFETCH``: the second pass takes one block a step and
    issues the next block's loads before this one's codes are computed and stored (a load after
    a store waits for it: the two may alias). ``LARGEST_FIRST``: program ``u`` takes the expert
    with the u-th most rows (:func:`.grouped_gemm._expert_of_rank`; its keys in int32 unless
    ``WIDE_KEYS``), else expert ``u``. Per block: ``STEP_BLOCKS`` column tiles a program (its
    expert found once), with ``PREFETCH`` the next tile's loads issued before this one's stores."""
    pid = tl.program_id(1 if COLS_FAST else 0)  # the unit: token block, or expert
    pid_c = tl.program_id(0 if COLS_FAST else 1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = cols < C
    ri = tl.arange(0, BLOCK_M)
    QUADS: tl.constexpr = BLOCK_M // 4  # the codes of 4 tokens a word (fp8_packing)
    q32 = q_ptr.to(tl.pointer_type(tl.uint32))
    e_idx = tl.arange(0, E_POW2)  # offs as values (see _expert_tiles)
    ends = tl.load(offs_ptr + e_idx, mask=e_idx < E, other=0)
    prev = tl.load(offs_ptr + e_idx - 1, mask=(e_idx < E) & (e_idx > 0), other=0)
    if PER_EXPERT:  # program pid: an expert
        expert = _expert_of_rank(prev, ends, pid, E, E_POW2, WIDE_KEYS) if LARGEST_FIRST else pid
        start, end, first, count = _tiles_of_expert(prev, ends, expert, E, E_POW2, BLOCK_M)
        # first pass: an elementwise max over the expert's blocks of |v|'s bits as integers
        # (for floats >= 0 the same order; NaN above inf), reduced across the block's rows once
        # after the loop
        IBITS: tl.constexpr = t_ptr.dtype.element_ty.primitive_bitwidth
        ITYPE: tl.constexpr = tl.int16 if IBITS == 16 else tl.int32
        SIGN_OFF: tl.constexpr = (1 << (IBITS - 1)) - 1
        run = tl.zeros((BLOCK_M, BLOCK_C), dtype=ITYPE)
        for j0 in range(0, count, STEP_BLOCKS):
            for i in tl.static_range(STEP_BLOCKS):
                rm = start + (j0 + i) * BLOCK_M + ri  # past the expert's rows: nothing read
                v = tl.load(t_ptr + rm.to(tl.int64)[:, None] * stride_tm + cols[None, :],
                            mask=(rm < end)[:, None] & c_mask[None, :], other=0.0)
                run = tl.maximum(run, v.to(ITYPE, bitcast=True) & SIGN_OFF)
        amax = tl.max(run, 0).to(ITYPE).to(t_ptr.dtype.element_ty, bitcast=True).to(tl.float32)
        if PREFETCH:  # the second pass's first block, loaded before the scales are known
            r0, r1, r2, r3 = load_quads_stored(t_ptr, start, end, cols, c_mask, stride_tm, 1, QUADS)
        scale = absmax_scale(amax, 448.0, RCP)
        tl.store(s_ptr + expert.to(tl.int64) * stride_sb + cols, scale, mask=c_mask)
        safe = tl.where(scale > 0, scale, 1.0)
        if PREFETCH:  # kept in their stored dtype, converted where used
            for j in range(0, count):
                n0, n1, n2, n3 = load_quads_stored(t_ptr, start + (j + 1) * BLOCK_M, end, cols, c_mask, stride_tm,
                                                   1, QUADS)  # past the expert's rows: nothing read
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
    else:  # program pid = token block; STEP_BLOCKS column tiles from column tile pid_c * STEP_BLOCKS
        _e, row0, end, total, _last = _expert_of_tile(prev, ends, pid, E, E_POW2, BLOCK_M)
        if pid < total:
            cols = pid_c * STEP_BLOCKS * BLOCK_C + tl.arange(0, BLOCK_C)
            if PREFETCH:  # kept in their stored dtype, converted where used
                r0, r1, r2, r3 = load_quads_stored(t_ptr, row0, end, cols, cols < C, stride_tm, 1, QUADS)
            for i in range(STEP_BLOCKS):
                c_mask = cols < C
                if PREFETCH:  # the next column tile's loads, issued before this one's stores
                    n0, n1, n2, n3 = load_quads_stored(t_ptr, row0, end, cols + BLOCK_C,
                                                       (cols + BLOCK_C < C) & (i + 1 < STEP_BLOCKS), stride_tm, 1,
                                                       QUADS)
                    v0, v1, v2, v3 = r0.to(tl.float32), r1.to(tl.float32), r2.to(tl.float32), r3.to(tl.float32)
                    r0, r1, r2, r3 = n0, n1, n2, n3
                else:
                    v0, v1, v2, v3 = load_quads(t_ptr, row0, end, cols, c_mask, stride_tm, 1, QUADS)
                scale = absmax_scale(tl.max(quads_abs(v0, v1, v2, v3), 0), 448.0, RCP)
                tl.store(s_ptr + pid.to(tl.int64) * stride_sb + cols, scale, mask=c_mask)
                off, ok = word_offsets(pid * QUADS, (pid + 1) * QUADS, cols, c_mask, stride_qc, QUADS)
                tl.store(q32 + off, _block_words(v0, v1, v2, v3, tl.where(scale > 0, scale, 1.0), RCP), mask=ok)
                cols += BLOCK_C


def padded_blocks(M: int, E: int) -> int:
    """Static upper bound on the token blocks of ``M`` rows over ``E`` experts."""
    return cdiv(M, BLOCK) + E


def token_block_quant(t: torch.Tensor, offs: torch.Tensor, per_expert: bool, config=None):
    """``(q_t [C, P] float8_e4m3fn, scale float32)`` of ``t`` ``[M, C]`` in the padded
    token-block layout (module docstring); scale ``[E, C]`` if ``per_expert`` else
    ``[cdiv(M, 128) + E, C]``. ``config``: ``(BLOCK_C, num_warps[, cols_fast[, step_blocks[,
    prefetch[, largest_first]]]])``: ``cols_fast`` makes the column tiles the grid's first axis
    (one unit's column tiles launch together, reading whole rows); per expert, ``step_blocks``
    token blocks a loop step, ``prefetch`` the second pass's next block loaded ahead, and
    ``largest_first`` the experts launched in order of their row counts, most first; per block,
    ``step_blocks`` column tiles a program, ``prefetch`` the next one loaded ahead (kernel
    docstring)."""
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
    # program were slower then (each step's load waited for the previous step's store; NOTES.md).
    # Per expert, token blocks loaded a loop step together (tune_recipes.py --only
    # cast_x_token_blocks_expert, results/tune_token_blocks_steps_s17_h100.*), and the second
    # pass's next block loaded ahead (results/tune_token_blocks_prefetch_h100_s24.*): Qwen3-30B-A3B
    # down (C 768) 0.0721 -> 0.0605 ms with (16, 4, True, 4, True), gate_up (C 2048) 0.1426 (64, 4,
    # True, 2) -> 0.1343 with (32, 4, True, 4, True), DeepSeek-V3 E=32 (C 7168) 0.4232 -> 0.4181
    # with (64, 4, True, 2, True). The session 25 sweep with the first pass on integer bits
    # (results/tune_token_blocks_running_max_h100_s25.*) timed gate_up 0.1307 -> 0.1280 with (64, 4,
    # True, 4, True) and DeepSeek-V3 0.4093 -> 0.3985 with (64, 8, True, 2, True); session 27's sweep
    # and A/B (results/tune_casts_h100_s27.*, ab_casts_h100_s27.log, bit-equal codes and
    # scales) again: 0.1314 -> 0.1289 and 0.4123 -> 0.4073, so those are the defaults now. Per block,
    # 8 column tiles of 32 a program with the next one loaded ahead: Qwen3-30B-A3B gate_up (C 2048)
    # 0.1073 -> 0.0992 ms, down (C 768) 0.0434 -> 0.0405; DeepSeek-V3 (C 7168) keeps (64, 4, True)
    # (0.2792 against 0.3026). largest_first was slower at every shape (gate_up 0.1314 -> 0.1592).
    if config is None:
        if per_expert:
            config = (16, 4, True, 4, True) if C < 2048 else ((64, 4, True, 4, True) if C < 4096 else
                                                               (64, 8, True, 2, True))
        else:
            config = (32, 4, True, 8, True) if C < 4096 else (64, 4, True)
    bc, warps, *rest = config
    cols_fast, step, prefetch, largest_first = tuple(rest) + (False, 1, False, False)[len(rest):]
    if step < 1 or step & (step - 1):
        raise ValueError(f"token_block_quant: config's step_blocks must be a power of two, got {step}")
    if largest_first and not per_expert:
        raise ValueError("token_block_quant: config's largest_first is for per_expert=True (a program an expert)")
    units = E if per_expert else nb
    cols_fast = bool(cols_fast) and units < 65536  # the grid's second axis holds at most 65535
    col_programs = cdiv(C, bc) if per_expert else cdiv(C, bc * step)
    grid = (col_programs, units) if cols_fast else (units, col_programs)
    wrap_triton(token_block_quant_kernel)[grid](
        tc, q, s, offs, C, tc.stride(0), q.stride(0), s.stride(0),
        E=E, E_POW2=next_power_of_2(E), BLOCK_M=BLOCK, BLOCK_C=bc, PER_EXPERT=per_expert, COLS_FAST=cols_fast,
        RCP=tc.dtype in SIXTEEN_BIT, STEP_BLOCKS=step, PREFETCH=bool(prefetch),
        LARGEST_FIRST=bool(largest_first), WIDE_KEYS=(M + 1) * next_power_of_2(E) > 2**31, num_warps=warps)
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
