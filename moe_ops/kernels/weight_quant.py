"""Triton fp8 e4m3 quantization of plain expert weights for the FP8 training recipes.

Same math as :func:`moe_ops.formats.quantize` (``fp8_e4m3``; s = absmax / 448 per unit,
data = float8(clamp(w / s, -448, 448)), an all-zero unit gets s = 0 and zero codes), for two
units: ``block`` (128 x 128 tiles, one program a tile) and ``channel`` (one scale per output
row over all of K, one program per BLOCK_N rows, two passes over K). Input and outputs are
addressed through strides, so the kernel can read W ``[E, N, K]`` as its transpose and write
the transposed codes and scales directly (the layout the dgrad GEMM reads); ``pair``: a block
tile's codes go to both layouts from one read of W (``moe_ops::recipe_weights``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .fp8_packing import load_quads, pack_codes, quads_abs, word_offsets
from .host_math import cdiv, next_power_of_2
from .scale_division import SIXTEEN_BIT, absmax_scale, fp8_e4m3_codes


@triton.jit
def _quantize_unit(w_ptr, q_ptr, s_ptr, e, pid_n, pid_k, N, K,
                   stride_we, stride_wn, stride_wk, stride_qe, stride_qn, stride_qk,
                   stride_se, stride_sn, stride_sk,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PER_ROW: tl.constexpr, RCP: tl.constexpr,
                   qt_ptr, st_ptr, stride_qte, stride_qtn, stride_qtk, stride_ste, stride_stn, stride_stk,
                   PAIR: tl.constexpr, WORDS: tl.constexpr, ONE_READ: tl.constexpr):
    """One unit: ``BLOCK_N`` rows over all of K (``PER_ROW``: with ``ONE_READ``, ``BLOCK_K >= K``,
    one read of W; else two passes of ``BLOCK_K`` columns), else the tile (pid_n, pid_k).
    ``PAIR`` (tiles only): the tile's codes and scale also go to ``qt_ptr`` / ``st_ptr`` through
    their own strides (element (n, k) of W at ``n * stride_qtn + k * stride_qtk``: W^T's layout).
    ``WORDS`` (with ``PAIR``): W^T's codes are written four rows of W a 32-bit word
    (:mod:`.fp8_packing`; ``stride_qtn`` 1, ``stride_qtk`` and ``N`` multiples of 4)."""
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < N
    w_base = w_ptr + e * stride_we + rn.to(tl.int64)[:, None] * stride_wn
    q_base = q_ptr + e * stride_qe + rn.to(tl.int64)[:, None] * stride_qn
    if PER_ROW and ONE_READ:  # the rows' whole K in one tile (BLOCK_K >= K): one read of W
        rk = tl.arange(0, BLOCK_K)
        m = n_mask[:, None] & (rk < K)[None, :]
        v = tl.load(w_base + rk[None, :].to(tl.int64) * stride_wk, mask=m, other=0.0).to(tl.float32)
        scale = absmax_scale(tl.max(tl.abs(v), 1), 448.0, RCP)
        tl.store(s_ptr + e * stride_se + rn.to(tl.int64) * stride_sn, scale, mask=n_mask)
        safe = tl.where(scale > 0, scale, 1.0)[:, None]
        tl.store(q_base + rk[None, :].to(tl.int64) * stride_qk, fp8_e4m3_codes(v, safe, RCP), mask=m)
    elif PER_ROW:
        amax = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            v = tl.load(w_base + rk[None, :].to(tl.int64) * stride_wk, mask=n_mask[:, None] & (rk < K)[None, :],
                        other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.max(tl.abs(v), 1))
        scale = absmax_scale(amax, 448.0, RCP)
        tl.store(s_ptr + e * stride_se + rn.to(tl.int64) * stride_sn, scale, mask=n_mask)
        safe = tl.where(scale > 0, scale, 1.0)[:, None]
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            m = n_mask[:, None] & (rk < K)[None, :]
            v = tl.load(w_base + rk[None, :].to(tl.int64) * stride_wk, mask=m, other=0.0).to(tl.float32)
            tl.store(q_base + rk[None, :].to(tl.int64) * stride_qk, fp8_e4m3_codes(v, safe, RCP), mask=m)
    elif PAIR and WORDS:  # rows 4i + j as four parts: W^T's codes (n contiguous) four rows a word
        rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        k_mask = rk < K
        r0 = pid_n * BLOCK_N
        QUADS: tl.constexpr = BLOCK_N // 4
        v0, v1, v2, v3 = load_quads(w_ptr + e * stride_we, r0, N, rk, k_mask, stride_wn, stride_wk, QUADS)
        scale = absmax_scale(tl.max(tl.max(quads_abs(v0, v1, v2, v3), 1), 0), 448.0, RCP)
        tl.store(s_ptr + e * stride_se + pid_n * stride_sn + pid_k * stride_sk, scale)
        tl.store(st_ptr + e * stride_ste + pid_n * stride_stn + pid_k * stride_stk, scale)
        safe = tl.where(scale > 0, scale, 1.0)
        words = pack_codes(fp8_e4m3_codes(v0, safe, RCP), fp8_e4m3_codes(v1, safe, RCP),
                           fp8_e4m3_codes(v2, safe, RCP), fp8_e4m3_codes(v3, safe, RCP))
        w_off, w_ok = word_offsets(r0 // 4, N // 4, rk, k_mask, stride_qtk, QUADS)
        tl.store((qt_ptr + e * stride_qte).to(tl.pointer_type(tl.uint32)) + w_off, words, mask=w_ok)
        # W's codes from a second (cached) read of the tile in its own layout. Storing the
        # words' float8 parts to q as well gave wrong W^T words on an H100 (Triton 3.6; the
        # interpreter was right): the parts stay private to the words
        m = n_mask[:, None] & k_mask[None, :]
        v = tl.load(w_base + rk[None, :].to(tl.int64) * stride_wk, mask=m, other=0.0).to(tl.float32)
        tl.store(q_base + rk[None, :].to(tl.int64) * stride_qk, fp8_e4m3_codes(v, safe, RCP), mask=m)
    else:
        rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        m = n_mask[:, None] & (rk < K)[None, :]
        v = tl.load(w_base + rk[None, :].to(tl.int64) * stride_wk, mask=m, other=0.0).to(tl.float32)
        scale = absmax_scale(tl.max(tl.max(tl.abs(v), 1), 0), 448.0, RCP)
        tl.store(s_ptr + e * stride_se + pid_n * stride_sn + pid_k * stride_sk, scale)
        safe = tl.where(scale > 0, scale, 1.0)
        codes = fp8_e4m3_codes(v, safe, RCP)
        tl.store(q_base + rk[None, :].to(tl.int64) * stride_qk, codes, mask=m)
        if PAIR:
            qt = (qt_ptr + e * stride_qte + rn.to(tl.int64)[:, None] * stride_qtn
                  + rk[None, :].to(tl.int64) * stride_qtk)
            tl.store(qt, codes, mask=m)
            tl.store(st_ptr + e * stride_ste + pid_n * stride_stn + pid_k * stride_stk, scale)


@triton.jit
def fp8_weight_quant_kernel(w_ptr, q_ptr, s_ptr, E, N, K,
                            stride_we, stride_wn, stride_wk, stride_qe, stride_qn, stride_qk,
                            stride_se, stride_sn, stride_sk,
                            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PER_ROW: tl.constexpr,
                            FLAT: tl.constexpr, RCP: tl.constexpr,
                            qt_ptr, st_ptr, stride_qte, stride_qtn, stride_qtk, stride_ste, stride_stn, stride_stk,
                            PAIR: tl.constexpr = False, WORDS: tl.constexpr = False,
                            ONE_READ: tl.constexpr = False):
    if FLAT:  # a 1-D grid over the units, K tiles fastest, then N tiles, then experts (memory
        # order: neighbours read neighbours); a grid smaller than the units loops (persistent)
        tiles_k = 1 if PER_ROW else tl.cdiv(K, BLOCK_K)
        tiles_n = tl.cdiv(N, BLOCK_N)
        for pid in range(tl.program_id(0), E * tiles_n * tiles_k, tl.num_programs(0)):
            _quantize_unit(w_ptr, q_ptr, s_ptr, (pid // (tiles_k * tiles_n)).to(tl.int64), (pid // tiles_k) % tiles_n,
                           pid % tiles_k, N, K, stride_we, stride_wn, stride_wk, stride_qe, stride_qn, stride_qk,
                           stride_se, stride_sn, stride_sk, BLOCK_N, BLOCK_K, PER_ROW, RCP,
                           qt_ptr, st_ptr, stride_qte, stride_qtn, stride_qtk, stride_ste, stride_stn, stride_stk,
                           PAIR, WORDS, ONE_READ)
    else:
        _quantize_unit(w_ptr, q_ptr, s_ptr, tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2), N, K,
                       stride_we, stride_wn, stride_wk, stride_qe, stride_qn, stride_qk,
                       stride_se, stride_sn, stride_sk, BLOCK_N, BLOCK_K, PER_ROW, RCP,
                       qt_ptr, st_ptr, stride_qte, stride_qtn, stride_qtk, stride_ste, stride_stn, stride_stk, PAIR,
                       WORDS, ONE_READ)


def _grid_options(config):
    """``config`` padded to ``(BLOCK_N, BLOCK_K, num_warps, flat, programs_per_sm)``."""
    return tuple(config) + (False, 0)[len(config) - 3:]


def _persistent_programs(device: torch.device, per_sm: int) -> int:
    """``per_sm`` programs per streaming multiprocessor (0: no bound). The CPU (Triton's
    interpreter) counts as one multiprocessor, so that tests run the persistent loop."""
    if per_sm <= 0:
        return 0
    if device.type == "cuda":
        return per_sm * torch.cuda.get_device_properties(device).multi_processor_count
    return per_sm if device.type == "cpu" else 0


def _channel_tiles(C: int, transpose: bool):
    """Default ``channel`` config for ``C`` reduced columns (tune_recipes.py on an H100,
    CUDA-graph timed, share of copy bandwidth). W: K = 2048 (4, 1024, 4) 0.96-1.0; K = 768
    (8, 256, 4) 0.94 (a masked 1024-wide step: 0.44); K = 7168 one row over all of K in one tile,
    one read (1, 8192, 8) 0.96 (session 27, results/tune_casts_h100_s27.*) against
    0.74-0.85 for two passes of (2, 2048, 8), which rows past 8192 keep. W^T (tall tiles: its
    rows are W's contiguous dim): up to N = 4096, 8 rows over all of N in one tile, one read of
    W, 128 elements a thread (results/tune_wT_channel_one_pass_s17_h100.*): Qwen3-30B-A3B
    gate_up (N 1536) 0.866 -> 0.605 ms (0.52 -> 0.67 of copy), down (N 2048) 0.439 -> 0.283
    (0.71), DeepSeek-V3 E=32 (N 4096) 2.08 -> 1.63 (0.58); 16 rows, more warps or 4 rows were
    slower. Above 4096 (64, 64, 4), two passes, 0.51-0.52, the second read
    missing L2. All with the flat grid (equal or up to 6% faster)."""
    if transpose:
        if C <= 4096:
            block_k = max(next_power_of_2(C), 16)
            return 8, block_k, max(1, block_k // 512), True
        return 64, 64, 4, True
    if C > 8192:
        return 2, 2048, 8, True
    if C > 4096:  # one row a program, one read (with the reciprocal division: fp8_weight_quant)
        return 1, 8192, 8, True
    block_k = min(1024, C & -C if C & -C >= 256 else next_power_of_2(C))
    return min(8, 4096 // block_k), block_k, 4, True


def _block_outputs(E: int, R: int, C: int, transpose: bool, device):
    """Block-granularity ``(codes, scales, code strides, scale strides)`` for W ``[E, R, C]``'s
    tiles: W's own layout, or with ``transpose`` W^T's codes ``[E, C, R]`` and scales
    ``[E, kb, nb]``, the strides given in W's (e, r, c) order so that the kernel writes them
    directly."""
    nb, kb = cdiv(R, 128), cdiv(C, 128)
    if transpose:
        q = torch.empty(E, C, R, dtype=torch.float8_e4m3fn, device=device)
        s = torch.empty(E, kb, nb, dtype=torch.float32, device=device)
        return q, s, (q.stride(0), q.stride(2), q.stride(1)), (s.stride(0), s.stride(2), s.stride(1))
    q = torch.empty(E, R, C, dtype=torch.float8_e4m3fn, device=device)
    s = torch.empty(E, nb, kb, dtype=torch.float32, device=device)
    return q, s, (q.stride(0), q.stride(1), q.stride(2)), (s.stride(0), s.stride(1), s.stride(2))


def fp8_weight_quant(w: torch.Tensor, granularity: str, transpose: bool = False, config=None, rcp=None,
                     pair: bool = False, words=None):
    """``(data, scale)`` of ``w`` ``[E, N, K]`` in fp8_e4m3 ``channel`` or ``block`` granularity,
    as :func:`moe_ops.formats.quantize`; with ``transpose`` those of ``W^T`` ``[E, K, N]``
    (``channel``: one scale per (e, k) over N; ``block``: W's tiles, transposed).
    ``config``: ``(BLOCK_N, BLOCK_K, num_warps[, flat[, programs_per_sm]])``; for ``channel``
    BLOCK_N rows of one scale each, BLOCK_K reduced columns per step; ``block`` tiles are
    128 x 128 whatever the config says. ``flat``: a 1-D grid in memory order (a tile's
    neighbours in W launch together) instead of ``(E, N tiles, K tiles)``; ``programs_per_sm``
    (flat only, CUDA): that many programs per multiprocessor loop over the units, so that fewer
    units are in flight (a two-pass unit's second read then stays in L2). ``rcp``: divide by the
    scales through :func:`.scale_division.divide_by_scale`'s reciprocal form, and the absmaxes by
    448 through :func:`.scale_division.absmax_scale`'s (16-bit ``w`` only; the same bits);
    ``None``: where it measured faster. ``pair`` (``block``, not ``transpose``):
    return ``(data, scale, data_t, scale_t)``, W's codes and W^T's from one read of W (block
    quantization commutes with transposition). ``words`` (``pair``): W^T's codes written four a
    32-bit word (:mod:`.fp8_packing`; the same bytes); ``None``: wherever W's N is a multiple of
    4 (W^T's rows then hold whole words)."""
    E = w.shape[0]
    if pair and (granularity != "block" or transpose):
        raise ValueError("pair: W's and W^T's codes from one read need block granularity and transpose=False")
    wv = w.transpose(1, 2) if (transpose and granularity == "channel") else w
    R, C = wv.shape[1], wv.shape[2]  # rows (one scale each, channel) and reduced columns
    if rcp is None:
        # the reciprocal-and-FMA division (scale_division) for 16-bit weights where it measured
        # faster (tune_recipes.py, H100, results/tune_casts_h100_s13_rcp.json): 128 x 128 blocks
        # with 8 warps 0.406 / 0.441 ms (W / W^T codes, Qwen3-30B-A3B gate_up) against 0.443 /
        # 0.454 with div_rn and 16 warps (DeepSeek-V3 0.947 against 1.053 ms); the W^T channel
        # cast 0.768 against 0.850. The W channel cast is as fast or faster with div_rn (0.415 /
        # 0.214 / 1.269 ms against 0.497 / 0.274 / 1.335 with its default tiles), but for its one
        # read of rows of 4097-8192 columns: DeepSeek-V3 E=32 (K 7168) 0.978 ms against 1.266
        # (results/tune_casts_h100_s27.*).
        w_channel = granularity == "channel" and not transpose
        rcp = not w_channel or (config is None and _channel_tiles(C, False)[0] == 1)  # the one-row tile
    rcp = rcp and w.dtype in SIXTEEN_BIT
    if granularity == "channel":
        q = torch.empty(E, R, C, dtype=torch.float8_e4m3fn, device=w.device)
        s = torch.empty(E, R, 1, dtype=torch.float32, device=w.device)
        bn, bk, warps, flat, per_sm = _grid_options(config or _channel_tiles(C, transpose))
        grid, per_row = (E, cdiv(R, bn), 1), True
        q_strides = (q.stride(0), q.stride(1), q.stride(2))
        s_strides = (s.stride(0), s.stride(1), 0)
    else:
        nb, kb = cdiv(R, 128), cdiv(C, 128)
        q, s, q_strides, s_strides = _block_outputs(E, R, C, transpose, w.device)
        grid, per_row = (E, nb, kb), False
        # tune_recipes.py (H100, CUDA graphs): W's codes 8 warps; W^T's 4 warps (Qwen3-30B-A3B
        # gate_up 0.442 -> 0.397 ms, DeepSeek-V3 E=32 1.06 -> 0.933: results/tune_casts_pair2_s15_h100.log);
        # both (pair) 4 warps (session 14: Qwen3-30B-A3B gate_up 0.774 -> 0.756 ms)
        bn, bk, warps, flat, per_sm = _grid_options(config or (128, 128, 4 if (pair or transpose) else 8, True))
        bn = bk = 128
    if words is None:
        # tune_recipes.py, H100, CUDA graphs (results/tune_casts_pair2_s15_h100.log): the pair with
        # words 0.641 ms at Qwen3-30B-A3B gate_up against 0.755 with bytes (0.84 of copy against
        # 0.71), DeepSeek-V3 E=32 1.52 against 1.77. (W^T's codes alone measured slower with
        # words, 0.430 against 0.397 ms, results/tune_casts_words_s15_h100.log: not offered.)
        words = pair and R % 4 == 0
    if words and not pair:
        raise ValueError("words: W^T's codes four a word are written by the pair only (pair=True)")
    if words and R % 4:
        raise ValueError(f"words: W^T's codes four a word need W's N a multiple of 4, got {R}")
    words = bool(words)
    if pair:
        qt, st, qt_strides, st_strides = _block_outputs(E, R, C, True, w.device)
        pair_args = (qt, st, *qt_strides, *st_strides)
    else:
        pair_args = (q, s, 0, 0, 0, 0, 0, 0)  # unused
    if flat:
        units = grid[0] * grid[1] * grid[2]
        grid = (min(units, _persistent_programs(w.device, per_sm) or units),)
    if E and R and C:
        wrap_triton(fp8_weight_quant_kernel)[grid](
            wv, q, s, E, R, C, wv.stride(0), wv.stride(1), wv.stride(2), *q_strides, *s_strides,
            BLOCK_N=bn, BLOCK_K=bk, PER_ROW=per_row, FLAT=flat, RCP=rcp, qt_ptr=pair_args[0], st_ptr=pair_args[1],
            stride_qte=pair_args[2], stride_qtn=pair_args[3], stride_qtk=pair_args[4], stride_ste=pair_args[5],
            stride_stn=pair_args[6], stride_stk=pair_args[7], PAIR=pair, WORDS=words,
            ONE_READ=per_row and bk >= C, num_warps=warps)
    return (q, s, qt, st) if pair else (q, s)
