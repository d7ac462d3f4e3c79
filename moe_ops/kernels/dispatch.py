"""Launchers: which Triton kernel serves an operator call, with which constexprs and tiles.

16-bit plain weights at prefill sizes on TMA devices take the persistent kernel of
:mod:`.persistent_gemm` (``choose_persistent_config``; forward, and dgrad up to 512 rows per
expert), and so does the fp8 x fp8 forward with scales constant along K (``fp8_token`` x,
channel or tensor-scaled fp8 W) above 512 rows per expert, and the int8 x int8 forward
(``int8_token`` x, channel or tensor-scaled ``int8_sym`` W) above 64; every other call
:func:`.grouped_gemm.grouped_gemm_kernel`.
Each launcher returns None for a combination no Triton kernel serves (``grouped_mm``:
``int8_token`` with weight scales that vary inside a 32*PACK-column K tile; ``grouped_mm_dgrad``:
packed int4/int2 weights); the operator then runs the reference path. Training recipes go to
:mod:`.recipe_gemms`. Launch grids and tiles come from static shapes only.
"""
from __future__ import annotations

import os
import time

import torch
import triton
from torch.library import wrap_triton

from moe_ops import formats
from moe_ops.lowering import autotune
from moe_ops.lowering.kernel_choice import (KernelConfig, choose_expert_mlp_configs, choose_forward_config,
                                            choose_persistent_config, fused_expert_mlp_pays)

from . import launch, persistent_gemm
from .act_quant import quantize_rows_kernel
from .grouped_gemm import grouped_gemm_kernel
from .host_math import cdiv, next_power_of_2, row_tile_bound
from .routing_kernels import count_sort_kernel, router_topk_sort_kernel, topk_kernel, topk_sort_kernel
from .scale_division import SIXTEEN_BIT

_HUGE = 1 << 30
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_ACT_CODE = {"none": 0, "int8_token": 1, "fp8_token": 2, "fp8_1x128": 2}


def _scale_unit(granularity: str, group_size: int):
    """(UNIT_N, UNIT_K) of a granularity; huge K unit = constant along K."""
    return {
        "group": (1, group_size),
        "channel": (1, _HUGE),
        "tensor": (_HUGE, _HUGE),
        "block": (formats.BLOCK, formats.BLOCK),
    }.get(granularity, (1, _HUGE))


def quantize_act(x: torch.Tensor, mode: str, config=None):
    """Triton activation quantization: ``(q, scale)`` as :func:`moe_ops.activations.quantize_act`.
    ``config``: ``(BLOCK_R, BLOCK_C, num_warps)``; BLOCK_C (a power of two) matters per row only."""
    M, K = x.shape
    unit = formats.BLOCK if mode == "fp8_1x128" else max(K, 1)
    to_int8 = mode == "int8_token"
    q = torch.empty(M, K, dtype=torch.int8 if to_int8 else torch.float8_e4m3fn, device=x.device)
    s = torch.empty(M, cdiv(K, unit), dtype=torch.float32, device=x.device)
    if M and K:
        xc = x if x.stride(1) == 1 else x.contiguous()
        per_row = unit >= K
        default = _per_row_tiles(K) if per_row else (32, unit, 4)
        block_r, block_c, warps = config or default
        grid = (cdiv(M, block_r), 1 if per_row else cdiv(K, unit))
        wrap_triton(quantize_rows_kernel)[grid](
            xc, q, s, M, K, xc.stride(0), q.stride(0), s.stride(0), UNIT=unit if not per_row else 1,
            PER_ROW=per_row, BLOCK_R=block_r, BLOCK_C=block_c, QMAX=127.0 if to_int8 else 448.0,
            TO_INT8=to_int8, RCP=xc.dtype in SIXTEEN_BIT, num_warps=warps)
    return q, s


def _per_row_tiles(K: int):
    """``(BLOCK_R, BLOCK_C, num_warps)`` of a per-row activation cast over ``K`` columns: one row a
    program, the whole row in registers up to 8192 columns (one read). tune_act_quant.py on an H100
    (bf16 x, the reciprocal division; CUDA-graph timed over 1-32768 rows,
    results/tune_act_quant_h100.json): fastest or within 2% at K = 2048 and 7168 for every row
    count; at K = 768 fastest up to 512 rows (1.8 us against 2.9 for two passes of 256) and
    within 9% of the best above."""
    block_c = min(8192, next_power_of_2(K))
    return 1, block_c, 4 if block_c <= 2048 else 8


def _tile_k(config: KernelConfig, act: int, pack: int) -> int:
    """The K tile of a launch: each tensor-core sub-dot needs K >= 16 (>= 32 for 8-bit
    operands), decode tiles run PACK sub-dots; CUDA-core (gemv) tiles take the config's."""
    if config.gemv:
        return max(config.block_k, pack)
    return max(config.block_k, (32 if act else 16) * (pack if config.decode else 1))


def _weight_consts(spec):
    """(W_KIND, W_BITS, ZERO_MODE, IMPLICIT_ZERO, PACK) of a format spec (None: plain)."""
    if spec is None:
        return 0, 16, 0, 0, 1
    zero_mode = 2 if spec.has_zero else (1 if spec.implicit_zero else 0)
    return 1 if spec.kind == "int" else 2, spec.bits, zero_mode, spec.implicit_zero, spec.pack


def _scale_operands(w, w_scale, w_zero, granularity: str, transposed: bool):
    """``(ws, wz, (stride_e, stride_out, stride_red))`` of the scales (and zero points, which
    share their shape) as the kernel reads them: 0 along dims a granularity broadcasts over,
    out/reduction swapped for the transposed (dgrad) view. Without scales, ``ws`` is ``w``
    itself (the kernel's HAS_SCALE is ``ws is not w``)."""
    if w_scale is None:
        return w, w, (0, 0, 0)
    st = [w_scale.stride(0), w_scale.stride(1), w_scale.stride(2)]
    if granularity == "tensor":
        st[1] = st[2] = 0
    elif granularity == "channel":
        st[2] = 0
    wz = w_zero if w_zero is not None else w_scale
    return w_scale, wz, (st[0], st[2], st[1]) if transposed else tuple(st)


def _tile_meta(config: KernelConfig, bk: int, unit_k: int, pack: int, w_lhs_ok: bool, unit_n: int = 1,
               swiglu_n=None) -> dict:
    """The kernel's tile constexprs for one config (K tile ``bk``); ``w_lhs_ok``: 16/32-bit
    activations on quantized (weight-only) or plain weights. ``config.w_lhs`` applies there when
    the weight scale is constant over the K tile (not, e.g., int2 with 32-column groups under a
    decode tile's 64-column K tile, which takes the plain kernel). ``unit_n``: the weight scale
    unit along N; ``swiglu_n``: the output width N of a SwiGLU launch (its up rows start at row
    N), else None."""
    scale_tile = unit_k >= _HUGE or unit_k % bk == 0
    uniform_n = unit_n % config.block_n == 0
    if swiglu_n is not None:  # the up tile [N + j * BLOCK_N, ...) must not cross a scale unit either
        uniform_n = uniform_n and not config.one_loop and isinstance(swiglu_n, int) and swiglu_n % config.block_n == 0
    return dict(BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=bk, GROUP_M=config.group_m,
                SCALE_UNIFORM_N=uniform_n,
                UNPACK_JOIN=pack > 1 and not config.decode, GEMV=config.gemv,
                W_LHS=config.w_lhs and w_lhs_ok and scale_tile and not config.gemv, SCALE_TILE=scale_tile,
                ONE_LOOP=config.one_loop, GEMV_PREFETCH=min(max(config.num_stages, 1), 3),
                GEMV_KSPLIT=config.k_split)


def gemv_layout_ok(w_strides, storage_offset: int, K: int, pack: int) -> bool:
    """Whether the CUDA-core (gemv) tile can read weights of these (logical ``[E, N, K]``, stored
    units) strides: contiguous along K, and for packed codes (read as 32-bit words) every row
    and expert block 4-byte aligned with K a multiple of the codes in a word."""
    if w_strides[2] != 1:
        return False
    if pack == 1:
        return True
    return (w_strides[0] % 4 == 0 and w_strides[1] % 4 == 0 and storage_offset % 4 == 0
            and K % (4 * pack) == 0)


def _feasible(configs, act: int, pack: int, unit_k: int, gemv_layout: bool) -> list:
    """``[(config, bk)]`` of the configs a launch can run: quantized activations need the
    weight scale constant over a K tile; the gemv tile also 16-bit x, weights laid out as
    :func:`gemv_layout_ok` says (``gemv_layout``), and for packed codes one row a tile."""
    out = []
    for cfg in configs:
        bk = _tile_k(cfg, act, pack)
        scale_tile = unit_k >= _HUGE or unit_k % bk == 0
        if act and not scale_tile:
            continue
        if cfg.gemv and not (act == 0 and gemv_layout and scale_tile and (pack == 1 or cfg.block_m == 1)):
            continue
        if cfg.combine and not (cfg.gemv and cfg.k_split == 1):
            continue
        out.append((cfg, bk))
    return out


# the key of the opt-in tuner (moe_ops.lowering.autotune): weight shape and format, never M
_TUNE_KEY = ["N", "K", "E", "W_KIND", "W_BITS", "ZERO_MODE", "UNIT_N", "UNIT_K", "ACT", "GATHER", "SWIGLU",
             "SCATTER", "HAS_SCALE"]
_TUNERS: dict = {}


def _interpret_bench(fn, quantiles=None, **_):
    """Host-clock timing for Triton's autotuner under the interpreter (no device events)."""
    t0 = time.perf_counter()
    fn()
    t = time.perf_counter() - t0
    return [t, t, t] if quantiles else t


def _tuned_kernel(tiles: tuple):
    """The ``triton.autotune`` wrapper of :func:`grouped_gemm_kernel` over ``tiles`` (``(meta
    items, num_warps, num_stages)`` per candidate), one object per distinct candidate list."""
    kern = _TUNERS.get(tiles)
    if kern is None:
        configs = [triton.Config(dict(meta), num_warps=w, num_stages=s) for meta, w, s in tiles]
        extra = {"do_bench": _interpret_bench} if _INTERPRET else {}
        kern = _TUNERS[tiles] = triton.autotune(configs=configs, key=_TUNE_KEY, **extra)(grouped_gemm_kernel)
    return kern


def _tma_operands(xq, w, w_strides, config: KernelConfig, meta: dict, consts: dict):
    """``({param: (tensor, block_shape)}, TMA_X, TMA_W)`` of a launch (see
    ``grouped_gemm._gemm_acc`` and :mod:`.launch`): TMA for ``config.tma`` tensor-core tiles,
    x when its rows are read in order (no gather), W unless gate and up rows interleave
    (``ONE_LOOP``). Integer weight codes only under 16-bit x (with one sub-dot a K tile or
    ``W_LHS``; int8 x int8 tiles keep pointer loads: int8 codes by TMA measured slower,
    benchmarks/NOTES.md). The ``W_LHS`` tile takes W's stored tile (codes, fp8 or plain values) by
    TMA where :data:`W_LHS_TMA_W`, its rows are a multiple of 16 bytes and it has at most 128 rows
    (256-row, 8-warp int4 tiles came out wrong and nondeterministic with it on Triton 3.6:
    ``benchmarks/probe_w_lhs_tma_w.py``); the other integer-code tiles x only."""
    int_w = consts["W_KIND"] == 1
    if int_w and not (consts["ACT"] == 0 and (meta["W_LHS"] or meta["UNPACK_JOIN"] or consts["PACK"] == 1)):
        return {}, False, 0
    if not (config.tma and not consts["COMBINE"] and not meta["GEMV"] and launch.tma_device(xq)
            and launch.descriptors_allowed(xq)):
        return {}, False, 0
    bm, bn, bk = meta["BLOCK_M"], meta["BLOCK_N"], meta["BLOCK_K"]
    descs, tma_w = {}, 0
    if not consts["GATHER"] and x_tma_possible(xq):
        descs["x_desc"] = (xq, (bm, bk))
    if int_w or meta["W_LHS"]:
        w_box = bk // consts["PACK"]
        if (meta["W_LHS"] and W_LHS_TMA_W and bm <= 128 and tuple(w_strides) == tuple(w.stride())
                and w_tma_possible(w) and w_box * w.element_size() % 16 == 0
                and not (consts["SWIGLU"] and meta["ONE_LOOP"])):  # the stored layout is the logical one
            tma_w = 1  # the stored codes' tile [1, BLOCK_N, BLOCK_K // PACK], dequantized in registers
            descs["w_desc"] = (w, (1, bn, w_box))
        return descs, "x_desc" in descs, tma_w
    if w.dim() == 3 and launch.tma_aligned(w) and not (consts["SWIGLU"] and meta["ONE_LOOP"]):
        if w_strides[2] == 1:  # stored [E, N, K]
            descs["w_desc"], tma_w = (w, (1, bn, bk)), 1
        elif w_strides[1] == 1:  # stored [E, K, N]: the dgrad view
            descs["w_desc"], tma_w = (w, (1, bk, bn)), 2
    return descs, "x_desc" in descs, tma_w


# the W_LHS tile's stored weight tile (codes, fp8 or plain values) by a TMA descriptor too where the
# tile takes x by TMA (grouped_gemm._dequant_acc_w_lhs TMA_W; benchmarks/tune_forward.py --tma --tma-w)
W_LHS_TMA_W = True


def x_tma_possible(x: torch.Tensor) -> bool:
    """Whether a plain (not gathered) launch on x ``[M, K]`` can take x's tiles by TMA
    descriptors (the device, x's layout, and the tracing context allow them: :mod:`.launch`)."""
    return x.dim() == 2 and launch.tma_device(x) and launch.tma_aligned(x) and launch.descriptors_allowed(x)


def w_tma_possible(w: torch.Tensor) -> bool:
    """Whether W's stored ``[E, N, K / PACK]`` (contiguous along K) can be read by a 3-D TMA
    descriptor (device, layout, tracing context: :mod:`.launch`)."""
    return (w.dim() == 3 and w.stride(2) == 1 and launch.tma_device(w) and launch.tma_aligned(w)
            and launch.descriptors_allowed(w))


def _check_config(config: KernelConfig, bk: int, spec, act: int, unit_k: int, gemv_layout: bool, has_scale: bool,
                  combine: bool, slot_sum: bool = False):
    """Raise ``ValueError`` where ``config`` (K tile ``bk``) cannot serve a launch on weights of
    ``spec`` (None: 16-bit) with activation code ``act`` and scales over ``unit_k`` columns:
    the gemv tile's needs (:func:`_feasible`), ``config.combine`` on exactly the fused
    expert MLP's token-major down launch (``combine``) with weights it reads (16-bit, or packed
    int4/int2 codes with scales) and 16-bit activations, and ``config.slot_sum`` on exactly its
    row-tile down launch that sums the slots (``slot_sum``); ``config.half_m`` never (the
    persistent kernel's)."""
    w_kind, _, _, _, pack = _weight_consts(spec)
    if config.gemv and not _feasible([config], act, pack, unit_k, gemv_layout):
        raise ValueError(f"config {config}: the CUDA-core (gemv) tile needs 16/32-bit activations, weights "
                         f"contiguous along K (packed codes: 4-byte aligned rows, K a multiple of {4 * pack}, "
                         f"one row a tile) and scales constant over a {bk}-column K tile")
    combine_weights = w_kind == 0 or (w_kind == 1 and pack > 1 and has_scale)  # 16-bit, or packed codes
    if config.combine != combine or (combine and not (combine_weights and act == 0
                                                      and _feasible([config], act, pack, unit_k, True))):
        raise ValueError(f"config {config}: combine=True is the fused expert MLP's token-major down launch, "
                         "16-bit weights or packed int4/int2 weight-only codes on the gemv tile with k_split 1, "
                         "and only that launch")
    if config.slot_sum != slot_sum or (slot_sum and config.combine):
        raise ValueError(f"config {config}: slot_sum=True is the fused expert MLP's row-tile down launch "
                         "(not combine), and only that launch")
    if config.half_m:
        raise ValueError(f"config {config}: half_m=True is the persistent kernel's (persistent_gemm."
                         "launch_persistent), which a config given to a call does not take")


def _launch(xq, xs, w, w_strides, ws, wz, s_strides, y, offs, M, N, K, E, spec, unit_n, unit_k, act, act_unit_k,
            int8_offset, post_scale, config: KernelConfig, bk: int, fused: dict = None, candidates=None):
    """One launch of :func:`grouped_gemm_kernel` over logical weights ``[E, N, K]`` whose
    element (e, n, k) sits at ``w + e*w_strides[0] + n*w_strides[1] + k*w_strides[2]`` (k in
    stored units: bytes of packed codes), scales likewise with ``s_strides``. ``fused`` holds
    the expert-MLP prologue/epilogue operands (``xrow``, ``dst``, ``rw``, ``amax`` tensors;
    ``gather`` (top_k), ``swiglu``, ``amax_out``, ``amax_cols``): see the kernel's docstring. With
    ``swiglu``, N is the output width (the weights have 2N rows). ``candidates``: feasible
    ``[(config, bk)]`` for the opt-in tuner (:mod:`moe_ops.lowering.autotune`); with two or more,
    the launch is a ``triton.autotune`` kernel over them instead of ``config``."""
    w_kind, bits, zero_mode, implicit_zero, pack = _weight_consts(spec)
    f = fused or {}
    xrow, dst, rw, amax, slot, cnt, total = (f.get(k) for k in ("xrow", "dst", "rw", "amax", "slot", "cnt", "sum"))
    amax_cols = f.get("amax_cols", 1)
    top_k = f.get("combine", 0)
    slot_sum = f.get("slot_sum", 0)
    _check_config(config, bk, spec, act, unit_k, gemv_layout_ok(w_strides, w.storage_offset(), K, pack),
                  ws is not w, bool(top_k), bool(slot_sum))
    args = (xq, xs, w, ws, wz, y, offs,
            offs if xrow is None else xrow, offs if dst is None else dst, xs if rw is None else rw,
            xs if amax is None else amax, offs if slot is None else slot,
            offs if cnt is None else cnt, y if total is None else total,
            xq, w,  # x_desc, w_desc: the pointers unless _tma_operands gives descriptors
            M, N, K,
            xq.stride(0), xq.stride(1), xs.stride(0), xs.stride(1) if xs.dim() == 2 else 0,
            w_strides[0], w_strides[1], w_strides[2],
            s_strides[0], s_strides[1], s_strides[2],
            y.stride(0), y.stride(1))
    consts = dict(
        E=E, E_POW2=next_power_of_2(E),
        W_KIND=w_kind, W_BITS=bits, ZERO_MODE=zero_mode, IMPLICIT_ZERO=implicit_zero,
        UNIT_N=unit_n, UNIT_K=unit_k, HAS_SCALE=ws is not w,
        ACT=act, ACT_UNIT_K=act_unit_k, INT8_OFFSET=int8_offset,
        UPCAST_DOT=_INTERPRET or xq.dtype == torch.float32, POST_SCALE=post_scale, PACK=pack,
        GATHER=f.get("gather", 0), SWIGLU=bool(f.get("swiglu")), AMAX_OUT=bool(f.get("amax_out")),
        SCATTER=dst is not None, ROW_WEIGHT=rw is not None,
        AMAX_COLS=amax_cols, AMAX_POW2=next_power_of_2(amax_cols), SLOT_OUT=bool(f.get("slot_out")),
        COMBINE=top_k, COMBINE_POW2=next_power_of_2(max(top_k, 1)), SLOT_SUM=slot_sum,
        CNT_ZERO=f.get("cnt_zero", 0))
    # the w_lhs tile's operands: 16/32-bit x, and plain weights or weight-only codes with scales
    w_lhs_ok = act == 0 and (w_kind == 0 or consts["HAS_SCALE"])
    swiglu_n = N if consts["SWIGLU"] else None
    if candidates is not None and len(candidates) > 1:
        tiles = tuple((tuple(_tile_meta(c, b, unit_k, pack, w_lhs_ok, unit_n, swiglu_n).items()), c.num_warps,
                       c.num_stages)
                      for c, b in candidates)

        def grid(meta):
            return (row_tile_bound(M, meta["BLOCK_M"], E) * cdiv(N, meta["BLOCK_N"]),)
        # every constexpr passed, defaults included: Inductor's launcher for a user-defined
        # autotuned kernel takes them all as arguments (candidates use pointer loads)
        wrap_triton(_tuned_kernel(tiles))[grid](*args, **consts, TMA_X=False, TMA_W=0)
        return y
    if top_k:  # token-major: one program per token and column block
        grid = (M // top_k * cdiv(N, config.block_n),)
    else:
        grid = (row_tile_bound(M, config.block_m, E) * cdiv(N, config.block_n),)
    meta = _tile_meta(config, bk, unit_k, pack, w_lhs_ok, unit_n, swiglu_n)
    descs, tma_x, tma_w = _tma_operands(xq, w, w_strides, config, meta, consts)
    kwargs = {**dict(zip(grouped_gemm_kernel.arg_names, args)), **consts, **meta, "TMA_X": tma_x, "TMA_W": tma_w}
    launch.launch(grouped_gemm_kernel, grid, {k: v for k, v in kwargs.items() if k not in descs}, descs,
                  num_warps=config.num_warps, num_stages=config.num_stages)
    return y


def grouped_mm(x, w, w_scale, w_zero, offs, w_format, granularity, group_size, act_quant, recipe,
               config: KernelConfig = None, out: torch.Tensor = None, prequantized=None):
    """Triton forward, or None when no kernel serves this combination (quantized activations
    with weight scales that vary inside a 32*PACK-column K tile, e.g. int2 with group size 32
    under ``int8_token``). Training recipes run :mod:`.recipe_gemms`. ``config`` overrides the
    tile choice and ``out`` (``[M, N]``, x's dtype, contiguous) receives the result (tests).
    ``prequantized``: x's ``(codes, scales)`` under ``act_quant`` as :func:`quantize_act`
    writes them, used instead of casting x (the GEMM alone, for benchmarks)."""
    if recipe != "none":
        from . import recipe_gemms
        return recipe_gemms.forward(x, w, offs, recipe)
    M, K = x.shape
    E, N = w.shape[0], w.shape[1]
    spec = None if w_format == "none" else formats.get_format(w_format)
    unit_n, unit_k = _scale_unit(granularity, group_size)
    act = _ACT_CODE[act_quant]
    w_bits = 16 if spec is None else spec.bits
    act_unit_k = formats.BLOCK if act_quant == "fp8_1x128" else _HUGE
    pack = spec.pack if spec is not None else 1
    candidates = None
    persistent = None  # the persistent kernel's tile, where it serves the call (16-bit x and W, or ACT 1 / 2)
    # x and W both 8-bit codes of one kind: fp8_token x float8 W, int8_token x int8_sym W
    codes_dot = spec is not None and ((act_quant == "fp8_token" and spec.kind == "fp8")
                                      or (act_quant == "int8_token" and w_format == "int8_sym"))
    if config is None and spec is None and act == 0 and persistent_gemm.serves(x, w):
        persistent = choose_persistent_config(M, N, K, E)
    elif config is None and codes_dot and unit_k >= _HUGE and persistent_gemm.serves_codes(x, w):
        persistent = choose_persistent_config(M, N, K, E, fp8_dot=act == 2, int8_dot=act == 1)
    if persistent is None and config is None:
        tile_unit = min(unit_k, act_unit_k, max(K, 1))
        words_ok = gemv_layout_ok(w.stride(), w.storage_offset(), K, pack)
        # plain float32 weights keep the pointer tiles: the plain decode w_lhs TMA tiles were
        # measured (and sized for shared memory) on 16-bit weights
        x_tma = x_tma_possible(x) and (spec is not None or x.element_size() == 2)
        config = choose_forward_config(M, N, K, E, w_bits, tile_unit, act_bits=8 if act else 16,
                                       k_contiguous=w.stride(2) == 1, packed_gemv=words_ok,
                                       fp8_dot=act == 2 and spec is not None and spec.kind == "fp8",
                                       x_tma=x_tma, w_tma=w_tma_possible(w))
        if autotune.enabled() and not autotune.keeps_static(config):
            candidates = _feasible(autotune.forward_candidates(config, K, tile_unit, packed=pack > 1), act, pack,
                                   unit_k, words_ok)
    if persistent is None:
        bk = _tile_k(config, act, pack)
        if act and not (unit_k >= _HUGE or unit_k % bk == 0):
            return None  # quantized activations need the weight scale constant over a K tile
    y = torch.empty(M, N, dtype=x.dtype, device=x.device) if out is None else out
    if M == 0:
        return y
    if K == 0 or N == 0:
        return y.zero_()
    if persistent is None:  # a config that cannot serve is refused before x's cast runs
        _check_config(config, bk, spec, act, unit_k, gemv_layout_ok(w.stride(), w.storage_offset(), K, pack),
                      w_scale is not None, False)
    if prequantized is not None and act:
        xq, xs = prequantized
    else:
        xq, xs = quantize_act(x, act_quant) if act else (x, x)
    has_scale = w_scale is not None
    ws, wz, s_strides = _scale_operands(w, w_scale, w_zero, granularity, transposed=False)
    if persistent is not None:
        scales = (xs, ws, (xs.stride(0), s_strides[0], s_strides[1])) if act else None
        return persistent_gemm.launch_persistent(xq, w, y, offs, persistent, False, scales=scales)
    return _launch(xq, xs, w, (w.stride(0), w.stride(1), w.stride(2)), ws, wz, s_strides, y, offs, M, N, K, E,
                   spec, unit_n, unit_k, act, act_unit_k, act == 1 and w_format == "int8_asym",
                   act == 0 and has_scale and unit_k >= _HUGE, config, bk, candidates=candidates)


def grouped_mm_dgrad(dy, w, w_scale, w_zero, offs, w_format, granularity, group_size, recipe,
                     config: KernelConfig = None, out: torch.Tensor = None):
    """Triton dgrad ``dx[g] = dy[g] @ W[e]``: the forward kernel over the transposed weights
    (logical ``[E, K, N]``: strides swapped, scale units swapped, dequantization fused). Serves
    plain weights and every unpacked format (int8, fp8); None for packed int4/int2 (whose codes
    run along the output dim here). Training recipes run :mod:`.recipe_gemms`."""
    if recipe != "none":
        from . import recipe_gemms
        return recipe_gemms.dgrad(dy, w, offs, recipe)
    spec = None if w_format == "none" else formats.get_format(w_format)
    if spec is not None and spec.pack > 1:
        return None
    M, N = dy.shape
    E, K = w.shape[0], w.shape[2]
    unit_n, unit_k = _scale_unit(granularity, group_size)  # units along (N, K) of W
    t_unit_n, t_unit_k = unit_k, unit_n  # along (K, N): the transposed view's (out, reduction)
    has_scale = w_scale is not None
    persistent = None  # the persistent kernel's tile, where it serves the call
    if config is None and spec is None and persistent_gemm.serves(dy, w):
        persistent = choose_persistent_config(M, K, N, E, dgrad=True)
    if persistent is None and config is None:
        # scales that vary faster than a 16-wide K tile are gathered per element
        tile_unit = t_unit_k if (has_scale and 16 <= t_unit_k < _HUGE) else max(N, 1)
        config = choose_forward_config(M, K, N, E, 16 if spec is None else spec.bits, tile_unit,
                                       k_contiguous=False, dgrad=True)
    y = torch.empty(M, K, dtype=dy.dtype, device=dy.device) if out is None else out
    if M == 0:
        return y
    if K == 0 or N == 0:
        return y.zero_()
    if persistent is not None:
        return persistent_gemm.launch_persistent(dy, w, y, offs, persistent, True)
    bk = max(config.block_k, 16)
    ws, wz, s_strides = _scale_operands(w, w_scale, w_zero, granularity, transposed=True)
    return _launch(dy, dy, w, (w.stride(0), w.stride(2), w.stride(1)), ws, wz, s_strides, y, offs, M, K, N, E,
                   spec, t_unit_n, t_unit_k, 0, _HUGE, False, False, config, bk)


def grouped_mm_wgrad(dy, x, offs, recipe, out_dtype=None, config=None):
    """Triton wgrad ``dW[e] = dy[g]^T @ x[g]``: plain 16/32-bit operands, or a training recipe's
    fp8 operands (:mod:`.recipe_gemms`)."""
    if recipe != "none":
        from . import recipe_gemms
        return recipe_gemms.wgrad(dy, x, offs, recipe, out_dtype or dy.dtype)
    from .grouped_wgrad import launch_wgrad
    return launch_wgrad(dy, x, offs, out_dtype or dy.dtype, config, _INTERPRET)


def expert_mlp_configs(M, H, I, E, w_format, granularity, group_size1, group_size2, act_quant,
                       packed_gemv: bool = True, packed_gemv_down: bool = True, down_tma: bool = False):
    """The (gate/up, down) tile configs the fused expert MLP picks from static shapes;
    ``packed_gemv`` / ``packed_gemv_down``: w1's / w2's packed codes can be read as 32-bit words
    (:func:`gemv_layout_ok`); ``down_tma``: :func:`down_tma_possible`."""
    spec = None if w_format == "none" else formats.get_format(w_format)
    act_unit_k = formats.BLOCK if act_quant == "fp8_1x128" else _HUGE
    units = [min(_scale_unit(granularity, gs)[1], act_unit_k) for gs in (group_size1, group_size2)]
    return choose_expert_mlp_configs(M, H, I, E, 16 if spec is None else spec.bits,
                                     *[u if u < _HUGE else 0 for u in units], 8 if act_quant != "none" else 16,
                                     packed_gemv=packed_gemv, packed_gemv_down=packed_gemv_down,
                                     down_tma=down_tma)


def down_tma_possible(x: torch.Tensor, w2: torch.Tensor, I: int) -> bool:
    """Whether the fused expert MLP's down launch can take its x (the ``[M, I]`` intermediate in
    x's dtype, contiguous) and w2's stored codes by TMA descriptors."""
    return (launch.tma_device(x) and launch.descriptors_allowed(x) and I * x.element_size() % 16 == 0
            and w_tma_possible(w2))


def expert_mlp(x, topk_weights, sorted_rows, offs, w1, w1_scale, w1_zero, w2, w2_scale, w2_zero, w_format,
               granularity, group_size1, group_size2, act_quant, recipe, configs=None):
    """The fused expert MLP (:mod:`moe_ops.expert_mlp`) in two launches, or None where it has
    no fused kernel (training recipes; quantized activations whose weight scales vary inside
    a K tile) or where its composition measured faster (:func:`~moe_ops.lowering.kernel_choice.
    fused_expert_mlp_pays`, unless ``configs`` are given). ``configs`` = (gate/up, down)
    :class:`KernelConfig` overrides (tests)."""
    if recipe != "none":
        return None
    T, H = x.shape
    top_k = topk_weights.shape[1]
    M, E, I = T * top_k, w1.shape[0], w1.shape[1] // 2
    spec = None if w_format == "none" else formats.get_format(w_format)
    if configs is None and not fused_expert_mlp_pays(M, E, 16 if spec is None else spec.bits,
                                                     8 if act_quant != "none" else 16, x_tma_possible(x),
                                                     w_tma_possible(w1) and w_tma_possible(w2)):
        return None
    pack = 1 if spec is None else spec.pack
    act = _ACT_CODE[act_quant]
    act_unit_k = formats.BLOCK if act_quant == "fp8_1x128" else _HUGE
    units = [_scale_unit(granularity, gs) for gs in (group_size1, group_size2)]
    tuned = [None, None]  # feasible candidates per launch for the opt-in tuner
    if configs is None:
        configs = expert_mlp_configs(M, H, I, E, w_format, granularity, group_size1, group_size2, act_quant,
                                     gemv_layout_ok(w1.stride(), w1.storage_offset(), H, pack),
                                     gemv_layout_ok(w2.stride(), w2.storage_offset(), I, pack),
                                     down_tma_possible(x, w2, I))
        if autotune.enabled():  # the gate/up launch keeps two accumulators: tiles at most 128 wide
            for i, (red, cap, w) in enumerate(((H, 128, w1), (I, 256, w2))):
                if autotune.keeps_static(configs[i]):
                    continue
                unit = min(units[i][1], act_unit_k, max(red, 1))
                tuned[i] = _feasible(autotune.forward_candidates(configs[i], red, unit, cap, packed=pack > 1), act,
                                     pack, units[i][1], gemv_layout_ok(w.stride(), w.storage_offset(), red, pack))
    cfgs = []
    for i, cfg in enumerate(configs):
        bk = _tile_k(cfg, act, pack)
        if act and not (units[i][1] >= _HUGE or units[i][1] % bk == 0):
            return None
        cfgs.append((cfg, bk))
    combine = cfgs[1][0].combine  # token-major down launch: no [M, H] rows, no separate sum
    slot_sum = cfgs[1][0].slot_sum  # the row-tile down launch sums the slots: no separate sum
    if combine or slot_sum:
        # the tuner's down candidates are row-tile launches of other widths (the slot sum's
        # counters are one a column block of this config's)
        tuned[1] = None
    # both launches' configs checked before either runs (_launch checks each again)
    for (cfg, bk), (_, unit_k), w, scale, red, down in zip(cfgs, units, (w1, w2), (w1_scale, w2_scale), (H, I),
                                                            (False, True)):
        _check_config(cfg, bk, spec, act, unit_k, gemv_layout_ok(w.stride(), w.storage_offset(), red, pack),
                      scale is not None, combine and down, slot_sum and down)
    out_rows = torch.empty(T if combine else M, H, dtype=x.dtype, device=x.device)
    # slot sum: one arrival counter a down column block, zeroed by the gate/up launch
    n_cnt = cdiv(H, cfgs[1][0].block_n) if slot_sum else 0
    cnt = torch.empty(n_cnt, dtype=torch.int32, device=x.device) if slot_sum else None
    out = torch.empty(T, H, dtype=x.dtype, device=x.device) if slot_sum else None
    if M and H and I:
        rows = sorted_rows.contiguous()
        # gate/up: gathered token rows (quantized once per token), SwiGLU epilogue -> h [M, I]
        xq, xs = quantize_act(x, act_quant) if act else (x.contiguous(), x)
        h = torch.empty(M, I, dtype=x.dtype, device=x.device)
        # int8: requantize h while the down GEMM loads it (decode tiles), or with the act-quant
        # kernel (prefill tiles, where each h tile would be requantized once per N tile)
        int8 = act_quant == "int8_token" and cfgs[1][0].decode
        amax_cols = cdiv(I, cfgs[0][0].block_n)
        amax = torch.empty(M, amax_cols, dtype=torch.float32, device=x.device) if int8 else None
        slot = torch.empty(M, dtype=torch.int32, device=x.device) if combine else None  # slot -> row of h
        ws, wz, st = _scale_operands(w1, w1_scale, w1_zero, granularity, transposed=False)
        _launch(xq, xs, w1, (w1.stride(0), w1.stride(1), w1.stride(2)), ws, wz, st, h, offs, M, I, H, E, spec,
                *units[0], act, act_unit_k, act == 1 and w_format == "int8_asym",
                act == 0 and w1_scale is not None and units[0][1] >= _HUGE, cfgs[0][0], cfgs[0][1],
                fused=dict(xrow=rows, swiglu=True, amax_out=int8, amax=amax, amax_cols=amax_cols,
                           gather=top_k, slot=slot, slot_out=combine, cnt=cnt, cnt_zero=n_cnt),
                candidates=None if int8 else tuned[0])  # amax_cols: fixed tile
        # down: h quantized in the loads (int8 at decode sizes) or by the act-quant kernel (fp8;
        # int8 at prefill sizes); routing weight and the token-major store in the epilogue
        if int8:
            hq, hs, act2 = h, h, 3
        elif act:
            (hq, hs), act2 = quantize_act(h, act_quant), act
        else:
            hq, hs, act2 = h, h, 0
        ws, wz, st = _scale_operands(w2, w2_scale, w2_zero, granularity, transposed=False)
        rw = topk_weights.to(torch.float32).contiguous().reshape(-1)
        fused = dict(slot=slot, rw=rw, combine=top_k) if combine else dict(dst=rows, rw=rw, amax=amax,
                                                                               amax_cols=amax_cols)
        if slot_sum:
            fused.update(cnt=cnt, sum=out, slot_sum=top_k)
        _launch(hq, hs, w2, (w2.stride(0), w2.stride(1), w2.stride(2)), ws, wz, st, out_rows, offs, M, H, I, E,
                spec, *units[1], act2, act_unit_k, act2 in (1, 3) and w_format == "int8_asym",
                act2 == 0 and w2_scale is not None and units[1][1] >= _HUGE, cfgs[1][0], cfgs[1][1],
                fused=fused, candidates=tuned[1])
    elif M:
        out_rows.zero_()
        if slot_sum:
            out.zero_()
    if slot_sum:
        return out
    return out_rows if combine else out_rows.view(T, top_k, H).sum(dim=1)


def _topk_warps(block_t: int) -> int:
    """Warps of a top-k program: one for a single token's row (its reductions stay in warp
    shuffles), else four (benchmarks/tune_routing.py, routing of one token: 128 experts 7.0 ->
    5.0 us, 32 experts 5.4 -> 4.5 us; one warp on 8 tokens x 128 experts took 16.5 us against
    9.0)."""
    return 1 if block_t == 1 else 4


def _count_sort_warps(block_r: int, e_pow2: int) -> int:
    """Warps of the counting sort over ``[block_r, e_pow2]`` one-hot chunks: one for a single
    16-row chunk over 128 or more experts, else four (benchmarks/tune_routing.py, routing of
    one token: 128 experts 5.62 -> 4.95 us with one warp; 32 experts 4.35 with four, 4.50 with
    one; 8 tokens over 32 experts, 64-row chunks: 5.21 with four, 6.08 with one)."""
    return 1 if block_r <= 16 and e_pow2 >= 128 else 4


def topk_route(logits, top_k, scoring, renormalize, bias):
    """Triton :func:`moe_ops.routing.topk_route`: ``[weights float32, ids int32]``."""
    T, E = logits.shape
    w = torch.empty(T, top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(T, top_k, dtype=torch.int32, device=logits.device)
    if T:
        e_pow2 = next_power_of_2(E)
        block_t = max(1, min(64, 4096 // e_pow2, next_power_of_2(T)))
        lc = logits if logits.stride(1) == 1 else logits.contiguous()
        wrap_triton(topk_kernel)[(cdiv(T, block_t),)](
            lc, lc if bias is None else bias, w, ids, T, E, lc.stride(0), w.stride(0), ids.stride(0),
            TOP_K=top_k, K_POW2=next_power_of_2(top_k), E_POW2=e_pow2, BLOCK_T=block_t,
            SOFTMAX=scoring == "softmax", RENORM=renormalize, HAS_BIAS=bias is not None,
            num_warps=_topk_warps(block_t))
    return [w, ids]


# one-program top-k + counting sort (decode): up to Qwen3-30B-A3B's 16 tokens x 8 picks x 128
# experts; larger inputs take the two launches (their one-hot tiles are chunked)
TOPK_SORT_MAX_ELEMENTS = 16384


def topk_sort_fits(T: int, E: int, top_k: int) -> bool:
    """Whether :func:`topk_sort` serves ``T`` tokens over ``E`` experts (one program holds a
    ``[T * top_k, E]`` one-hot tile, padded to powers of two)."""
    return next_power_of_2(max(T, 1)) * next_power_of_2(top_k) * next_power_of_2(E) <= TOPK_SORT_MAX_ELEMENTS


def _routing_outputs(T: int, top_k: int, E: int, dev):
    """Uninitialised ``[weights float32 [T, top_k], ids int32 [T, top_k], sorted_rows int32
    [T * top_k], offs int32 [E]]``."""
    return [torch.empty(T, top_k, dtype=torch.float32, device=dev),
            torch.empty(T, top_k, dtype=torch.int32, device=dev),
            torch.empty(T * top_k, dtype=torch.int32, device=dev),
            torch.empty(E, dtype=torch.int32, device=dev)]


def topk_sort(logits, top_k, scoring, renormalize, bias):
    """Triton :func:`moe_ops.routing.route` in one launch: ``[weights float32, ids int32,
    sorted_rows int32, offs int32]`` (inputs within :func:`topk_sort_fits`)."""
    T, E = logits.shape
    w, ids, rows, offs = _routing_outputs(T, top_k, E, logits.device)
    if T == 0:
        return [w, ids, rows, offs.zero_()]
    lc = logits if logits.stride(1) == 1 else logits.contiguous()
    wrap_triton(topk_sort_kernel)[(1,)](
        lc, lc if bias is None else bias, w, ids, rows, offs, T, E, lc.stride(0),
        TOP_K=top_k, K_POW2=next_power_of_2(top_k), E_POW2=next_power_of_2(E), T_POW2=next_power_of_2(T),
        SOFTMAX=scoring == "softmax", RENORM=renormalize, HAS_BIAS=bias is not None,
        num_warps=_topk_warps(T))
    return [w, ids, rows, offs]


ROUTER_PROGRAMS = 128  # router GEMM programs aimed at: about one a streaming multiprocessor
ROUTER_MAX_SPLIT = 64  # hidden-dimension splits the last program sums (unrolled loads)


def router_split(E: int, H: int):
    """``(BLOCK_H, H_STEPS, SPLIT)`` of :func:`router_topk_sort`: 16 experts a program, the
    hidden dimension in ``SPLIT`` ranges of ``H_STEPS`` tiles of ``BLOCK_H`` so that about
    :data:`ROUTER_PROGRAMS` programs each read a few KB of the router weight."""
    block_h = min(128, max(16, next_power_of_2(H)))
    n_h = cdiv(H, block_h)
    split = min(n_h, max(1, ROUTER_PROGRAMS // cdiv(E, 16)), ROUTER_MAX_SPLIT)
    steps = cdiv(n_h, split)
    return block_h, steps, cdiv(n_h, steps)


def router_topk_sort(x, router_weight, top_k, scoring, renormalize, bias, semaphore):
    """Triton :func:`moe_ops.routing.router_route` in one launch: ``[logits (x.dtype), weights
    float32, ids int32, sorted_rows int32, offs int32]`` for inputs within
    :func:`topk_sort_fits`. ``semaphore``: int32 ``[1]`` holding 0 (left holding 0)."""
    T, H = x.shape
    E = router_weight.shape[0]
    dev = x.device
    logits = torch.empty(T, E, dtype=x.dtype, device=dev)
    w, ids, rows, offs = _routing_outputs(T, top_k, E, dev)
    if T == 0:
        return [logits, w, ids, rows, offs.zero_()]
    xc = x if x.stride(1) == 1 else x.contiguous()
    wc = router_weight if router_weight.stride(1) == 1 else router_weight.contiguous()
    block_h, steps, split = router_split(E, H)
    part = torch.empty(split, T, E, dtype=torch.float32, device=dev)
    wrap_triton(router_topk_sort_kernel)[(cdiv(E, 16), split)](
        xc, wc, xc if bias is None else bias, part, semaphore, logits, w, ids, rows, offs, T, E, H, xc.stride(0),
        wc.stride(0), TOP_K=top_k, K_POW2=next_power_of_2(top_k), E_POW2=next_power_of_2(E),
        T_POW2=next_power_of_2(T), BLOCK_T=max(16, next_power_of_2(T)), BLOCK_E=16, BLOCK_H=block_h,
        H_STEPS=steps, SPLIT=split, SOFTMAX=scoring == "softmax", RENORM=renormalize, HAS_BIAS=bias is not None,
        UPCAST_DOT=_INTERPRET or x.dtype == torch.float32, num_warps=_topk_warps(T))
    return [logits, w, ids, rows, offs]


def count_sort(topk_ids, num_experts):
    """Triton :func:`moe_ops.routing.sort_rows` in one launch (decode-sized inputs)."""
    M = topk_ids.numel()
    rows = torch.empty(M, dtype=torch.int32, device=topk_ids.device)
    offs = torch.empty(num_experts, dtype=torch.int32, device=topk_ids.device)
    ids = topk_ids.reshape(-1)
    if ids.dtype != torch.int32:
        ids = ids.clamp(-1, num_experts).to(torch.int32)  # out-of-range ids stay out of range
    ids = ids.contiguous()
    e_pow2 = next_power_of_2(num_experts)
    block_r = max(16, min(next_power_of_2(max(M, 1)), 8192 // e_pow2))
    wrap_triton(count_sort_kernel)[(1,)](ids, rows, offs, M, num_experts, E_POW2=e_pow2, BLOCK_R=block_r,
                                         num_warps=_count_sort_warps(block_r, e_pow2))
    return [rows, offs]
